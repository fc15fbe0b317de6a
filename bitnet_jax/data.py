"""data: corpora, tokenizer and deterministic batch iterators (data -> train).

A corpus is a list of documents (files, or records of a TFDS dataset) turned into two flat token arrays, `train`
and `valid`, with one EOS token between consecutive documents (none before the first or after the last).
Tokenization is byte-level by default (`ByteTokenizer`: ids 0..255 are the bytes, then PAD, BOS, EOS), so
every corpus needs no vocabulary file and no download.

Sources (the `source` argument of `load_corpus`):
  * `"stdlib"`            the running interpreter's standard library `.py` files, test directories excluded
                          (about 12 MB for Python 3.11). No download, no TFDS.
  * `"python_paths"`      the stdlib files plus every `.py` under each directory of `sys.path`
                          (site-packages included, test directories excluded), deduplicated by real path.
  * `"text_dir:PATH"`     every `*.txt`, `*.md`, `*.py` under PATH, built once into an array_record TFDS dataset
                          by `LocalTextBuilder` and read back with `builder.as_data_source()` (no TensorFlow).
  * `"tfds:NAME[:SPLIT]"` a registered TFDS dataset read with `tfds.data_source` (array_record, no TensorFlow).

Train / validation split, by document and without a seed: documents are ordered by the sha1 of their key
(relative path, or record index) and the last `max(1, round(valid_fraction * n_docs))` of that order are held
out. A dataset that ships a `validation` (else `test`) split uses it instead. A one-document corpus is split
inside the document: its first `1 - valid_fraction` of tokens train, the rest validate.

Batches: a training example is an int32 window of `seq_len + 1` consecutive tokens (inputs `w[:-1]`, targets
`w[1:]`); windows start at multiples of `seq_len`, so targets never overlap. `train_iterator` is a grain
pipeline (shuffle with a per-epoch reseed, repeat forever, batch) whose `get_state()` / `set_state()` resume
bit-identically and which `grain.checkpoint.CheckpointSave` / `CheckpointRestore` store inside orbax.
`eval_batches` is a fixed list of evenly spaced validation windows, the same in every run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import sys
import sysconfig
from typing import Iterable, Sequence

import grain
import numpy as np

__all__ = [
    "ByteTokenizer",
    "Corpus",
    "load_corpus",
    "train_iterator",
    "eval_batches",
    "TEXT_SUFFIXES",
]

# File suffixes read by the `text_dir:` source.
TEXT_SUFFIXES = (".txt", ".md", ".py")
# Directory names that hold test suites; never part of a code corpus (covers `idlelib/idle_test` and
# `lib2to3/tests`).
_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
# A TFDS dataset name, optionally with a version (`c4/en:3.0.1`), then optionally `:SPLIT` (`train[:10%]`).
_TFDS_SOURCE = re.compile(r"^(?P<name>[^:\[\]]+(?::\d+(?:\.\d+)*)?)(?::(?P<split>.+))?$")


# --------------------------------------------------------------------------------------------------------------
# Tokenizer.
# --------------------------------------------------------------------------------------------------------------
class ByteTokenizer:
  """Byte-level tokenizer: ids 0..255 are bytes, then specials."""

  PAD = 256
  BOS = 257
  EOS = 258
  vocab_size = 259

  def encode(self, text: str | bytes) -> np.ndarray:
    """The utf-8 bytes of `text` (or `text` itself if already bytes) as int32 ids; no specials are added."""
    if isinstance(text, str):
      text = text.encode("utf-8")
    return np.frombuffer(bytes(text), dtype=np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    """Drops special ids (>= 256) and decodes the remaining bytes as utf-8 with `errors="replace"`."""
    ids = np.asarray(ids).reshape(-1)
    ids = ids[(ids >= 0) & (ids < 256)]
    return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


# --------------------------------------------------------------------------------------------------------------
# Corpus.
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
  """A tokenized corpus: flat train / valid token arrays plus a content fingerprint.

  `fingerprint` is the sha256 of every document's key (relative path or record key, sorted) and raw bytes, so it
  is independent of the tokenizer and stable across runs and machines for the same content. For a one-document
  corpus both `n_train_files` and `n_valid_files` are 1 (the document is split by tokens).
  """

  name: str
  train: np.ndarray
  valid: np.ndarray
  fingerprint: str
  n_train_files: int
  n_valid_files: int

  def summary(self) -> dict:
    """A json-able description: name, fingerprint, file counts and token counts."""
    return {
        "name": self.name,
        "fingerprint": self.fingerprint,
        "n_train_files": int(self.n_train_files),
        "n_valid_files": int(self.n_valid_files),
        "train_tokens": int(self.train.size),
        "valid_tokens": int(self.valid.size),
    }


def _fingerprint(docs: Iterable[tuple[str, bytes]]) -> str:
  """sha256 over (key, bytes) pairs in the given (sorted) order; lengths are hashed too, so it is unambiguous."""
  h = hashlib.sha256()
  for key, data in docs:
    k = key.encode("utf-8")
    h.update(len(k).to_bytes(8, "little"))
    h.update(k)
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)
  return h.hexdigest()


def _cap(docs: list[tuple[str, bytes]], max_bytes: int | None) -> list[tuple[str, bytes]]:
  """The shortest prefix of `docs` holding at least `max_bytes` bytes (all of them if fewer or no cap)."""
  if max_bytes is None:
    return docs
  total = 0
  for i, (_, data) in enumerate(docs):
    total += len(data)
    if total >= max_bytes:
      return docs[:i + 1]
  return docs


def _token_dtype(tokenizer) -> np.dtype:
  return np.dtype(np.uint16) if int(tokenizer.vocab_size) <= 1 << 16 else np.dtype(np.int32)


def _tokenize_joined(docs: Sequence[bytes], tokenizer) -> np.ndarray:
  """Tokens of `docs` with one `tokenizer.EOS` between consecutive documents, as a read-only 1-D array."""
  dtype = _token_dtype(tokenizer)
  if not docs:
    out = np.zeros((0,), dtype)
  elif isinstance(tokenizer, ByteTokenizer):
    flat = np.frombuffer(b"".join(docs), dtype=np.uint8).astype(dtype)
    boundaries = np.cumsum([len(d) for d in docs[:-1]], dtype=np.int64)
    out = np.insert(flat, boundaries, tokenizer.EOS)
  else:
    eos = np.asarray([tokenizer.EOS], dtype)
    parts = []
    for i, d in enumerate(docs):
      if i:
        parts.append(eos)
      parts.append(np.asarray(tokenizer.encode(d.decode("utf-8", errors="replace"))).astype(dtype).reshape(-1))
    out = np.concatenate(parts)
  out.flags.writeable = False
  return out


def _split_order(keys: Sequence[str]) -> list[int]:
  """A seed-free deterministic shuffle of document indices: by sha1 of the key (ties broken by the key)."""
  return sorted(range(len(keys)), key=lambda i: (hashlib.sha1(keys[i].encode("utf-8")).hexdigest(), keys[i]))


def _make_corpus(name: str, docs: list[tuple[str, bytes]], valid_docs: list[tuple[str, bytes]] | None, *,
                 valid_fraction: float, tokenizer) -> Corpus:
  """The shared tail of every source: fingerprint, by-document split, tokenization.

  `docs` are (key, bytes) sorted by key. `valid_docs`, when given (a dataset's own validation split), are used as
  the validation set as they are; otherwise validation documents are held out of `docs` by `_split_order`.
  """
  if not docs:
    raise ValueError(f"{name}: the corpus has no documents")
  total = sum(len(d) for _, d in docs) + sum(len(d) for _, d in valid_docs or ())
  if total == 0:
    raise ValueError(f"{name}: empty corpus (all {len(docs)} documents have zero bytes)")
  fingerprint = _fingerprint(list(docs) + list(valid_docs or ()))

  if valid_docs is not None:
    train = _tokenize_joined([d for _, d in docs], tokenizer)
    valid_tokens = _tokenize_joined([d for _, d in valid_docs], tokenizer)
    n_train, n_valid = len(docs), len(valid_docs)
  elif len(docs) == 1:
    tokens = _tokenize_joined([docs[0][1]], tokenizer)
    cut = len(tokens) - int(round(valid_fraction * len(tokens)))
    train, valid_tokens = tokens[:cut], tokens[cut:]
    n_train = n_valid = 1
  else:
    n_valid = min(max(1, int(round(valid_fraction * len(docs)))), len(docs) - 1)
    held_out = set(_split_order([k for k, _ in docs])[-n_valid:])
    train = _tokenize_joined([d for i, (_, d) in enumerate(docs) if i not in held_out], tokenizer)
    valid_tokens = _tokenize_joined([d for i, (_, d) in enumerate(docs) if i in held_out], tokenizer)
    n_train = len(docs) - n_valid
  return Corpus(name=name, train=train, valid=valid_tokens, fingerprint=fingerprint,
                n_train_files=n_train, n_valid_files=n_valid)


# --------------------------------------------------------------------------------------------------------------
# File listings.
# --------------------------------------------------------------------------------------------------------------
def _walk(root: str, suffixes: tuple[str, ...], skip_dir) -> list[tuple[str, str]]:
  """(relative posix path, absolute path) of regular files under `root` ending in `suffixes`, sorted."""
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    rel_dir = os.path.relpath(dirpath, root)
    dirnames[:] = [d for d in dirnames if not skip_dir(d, os.path.normpath(os.path.join(rel_dir, d)))]
    for f in filenames:
      full = os.path.join(dirpath, f)
      if f.lower().endswith(suffixes) and os.path.isfile(full):
        out.append((os.path.normpath(os.path.join(rel_dir, f)).replace(os.sep, "/"), full))
  return sorted(out)


def _skip_test_dir(name: str, rel: str) -> bool:
  return name in _TEST_DIRS or name == "__pycache__"


def _skip_stdlib_dir(name: str, rel: str) -> bool:
  return _skip_test_dir(name, rel) or name == "site-packages" or name == "dist-packages"


def _stdlib_files() -> list[tuple[str, str]]:
  """The interpreter's standard library `.py` files outside test directories and site-packages, sorted."""
  return _walk(sysconfig.get_paths()["stdlib"], (".py",), _skip_stdlib_dir)


def _python_path_files() -> list[tuple[str, str]]:
  """The stdlib files, then `.py` files under each existing absolute `sys.path` directory, keyed
  `stdlib/REL` and `pathI/REL` (I = position among the kept directories) and deduplicated by real path.

  Test directories are excluded everywhere. The empty entry (the current directory) is skipped, so the corpus
  does not depend on where Python was started.
  """
  stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])
  roots, seen_roots = [("stdlib", stdlib, _skip_stdlib_dir)], {stdlib}
  for entry in sys.path:
    if not entry or not os.path.isabs(entry) or not os.path.isdir(entry):
      continue
    real = os.path.realpath(entry)
    if real not in seen_roots:
      seen_roots.add(real)
      roots.append((f"path{len(roots) - 1}", real, _skip_test_dir))
  out, seen = [], set()
  for label, root, skip in roots:
    for rel, full in _walk(root, (".py",), skip):
      real = os.path.realpath(full)
      if real not in seen:
        seen.add(real)
        out.append((f"{label}/{rel}", full))
  return sorted(out)


def _text_dir_files(root: str) -> list[tuple[str, str]]:
  """`*.txt`, `*.md`, `*.py` under `root`, sorted; hidden files and directories (names starting with `.`,
  which includes the `.tfds` build folder) are skipped."""
  files = _walk(root, TEXT_SUFFIXES, lambda name, rel: name.startswith("."))
  return [(rel, full) for rel, full in files if not any(p.startswith(".") for p in rel.split("/"))]


def _read_files(files: list[tuple[str, str]], max_bytes: int | None) -> list[tuple[str, bytes]]:
  """Reads files in order, stopping once `max_bytes` have been read (the file that crosses it is kept)."""
  docs, total = [], 0
  for rel, full in files:
    if max_bytes is not None and total >= max_bytes:
      break
    with open(full, "rb") as f:
      data = f.read()
    docs.append((rel, data))
    total += len(data)
  return docs


# --------------------------------------------------------------------------------------------------------------
# TFDS: a builder for local text, and reading array_record data sources.
# --------------------------------------------------------------------------------------------------------------
_LOCAL_TEXT_BUILDER = None


def _local_text_builder_class():
  """`LocalTextBuilder`, defined on first use so that `import bitnet_jax.data` does not import TFDS."""
  global _LOCAL_TEXT_BUILDER
  if _LOCAL_TEXT_BUILDER is not None:
    return _LOCAL_TEXT_BUILDER
  import tensorflow_datasets as tfds

  class LocalTextBuilder(tfds.core.GeneratorBasedBuilder):
    """One example per local text file: `{"path": relative path, "text": raw file bytes}`, one `train` split.

    The config name carries the content fingerprint (`fp_<sha256 prefix>`), so an unchanged directory reuses
    its build and a changed one builds a new dataset next to the old.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "One example per file: path and raw text."}
    # TFDS uses `code_path` only to look for a download-checksums file next to the builder's code. Its default
    # for a builder inside a package needs the `importlib_resources` backport, which this stack does not have,
    # and this builder downloads nothing: no code path, hence no checksums file.
    code_path = None

    def __init__(self, *, files: Sequence[tuple[str, str]] = (), **kwargs):
      self._files = list(files)
      super().__init__(**kwargs)

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          description="Local text files, one example per file.",
          features=tfds.features.FeaturesDict({"path": tfds.features.Text(), "text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for rel, full in self._files:
        with open(full, "rb") as f:
          yield rel, {"path": rel, "text": f.read()}

  _LOCAL_TEXT_BUILDER = LocalTextBuilder
  return LocalTextBuilder


def _as_bytes(value, what: str) -> bytes:
  if isinstance(value, bytes):
    return value
  if isinstance(value, str):
    return value.encode("utf-8")
  if isinstance(value, np.ndarray) and value.dtype.kind in "SUO" and value.ndim == 0:
    return _as_bytes(value.item(), what)
  raise ValueError(f"{what}: expected text (bytes or str), got {type(value).__name__}")


def _read_source(source, *, text_key: str, key_feature: str | None, key_prefix: str, max_bytes: int | None,
                 what: str, chunk: int = 1024) -> list[tuple[str, bytes]]:
  """(key, bytes) of the records of a TFDS data source, sorted by key.

  The key is the record's `key_feature` (a path) or, without one, `key_prefix` + its zero-padded index. Without
  a key feature the records are read in index order and reading stops once `max_bytes` are held; with one,
  all records are read, sorted, then capped.
  """
  n = len(source)
  docs, total = [], 0
  for start in range(0, n, chunk):
    idx = list(range(start, min(n, start + chunk)))
    records = source.__getitems__(idx) if hasattr(source, "__getitems__") else [source[i] for i in idx]
    for i, rec in zip(idx, records):
      if text_key not in rec:
        raise ValueError(f"{what}: records have no feature {text_key!r} (features: {sorted(rec)})")
      data = _as_bytes(rec[text_key], what)
      key = _as_bytes(rec[key_feature], what).decode("utf-8") if key_feature else f"{key_prefix}{i:012d}"
      docs.append((key, data))
      total += len(data)
    if key_feature is None and max_bytes is not None and total >= max_bytes:
      break
  docs.sort(key=lambda kv: kv[0])
  return _cap(docs, max_bytes)


def _corpus_from_sources(name: str, train_source, valid_source, *, text_key: str, key_feature: str | None,
                         valid_fraction: float, tokenizer, max_bytes: int | None) -> Corpus:
  """The TFDS path shared by `text_dir:` and `tfds:`: read the data source(s), then `_make_corpus`."""
  docs = _read_source(train_source, text_key=text_key, key_feature=key_feature, key_prefix="train/",
                      max_bytes=max_bytes, what=name)
  valid_docs = None
  if valid_source is not None:
    valid_docs = _read_source(valid_source, text_key=text_key, key_feature=key_feature, key_prefix="valid/",
                              max_bytes=max_bytes, what=name)
  return _make_corpus(name, docs, valid_docs, valid_fraction=valid_fraction, tokenizer=tokenizer)


def _load_text_dir(path: str, *, source: str, data_dir: str | None, valid_fraction: float, tokenizer,
                   max_bytes: int | None) -> Corpus:
  if not path:
    raise ValueError(f"source {source!r}: no directory given (expected 'text_dir:/some/path')")
  root = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(root):
    raise ValueError(f"source {source!r}: directory {root} does not exist")
  files = _text_dir_files(root)
  if not files:
    raise ValueError(f"source {source!r}: no text files ({', '.join(TEXT_SUFFIXES)}) under {root}")
  docs = _read_files(files, max_bytes)
  if sum(len(d) for _, d in docs) == 0:
    raise ValueError(f"source {source!r}: empty corpus ({len(docs)} text files under {root}, all zero bytes)")
  fingerprint = _fingerprint(docs)
  files = files[:len(docs)]

  import tensorflow_datasets as tfds
  builder_cls = _local_text_builder_class()
  config = tfds.core.BuilderConfig(name=f"fp_{fingerprint[:20]}", version="1.0.0",
                                   description=f"{len(files)} text files under {root}")
  builder = builder_cls(files=files, config=config, data_dir=data_dir or os.path.join(root, ".tfds"),
                        file_format="array_record")
  builder.download_and_prepare()          # a no-op when this fingerprint is already built
  corpus = _corpus_from_sources(f"text_dir:{root}", builder.as_data_source(split="train"), None,
                                text_key="text", key_feature="path", valid_fraction=valid_fraction,
                                tokenizer=tokenizer, max_bytes=None)
  if corpus.fingerprint != fingerprint:
    raise ValueError(f"source {source!r}: the dataset built at {builder.data_dir} does not match the files "
                     f"under {root} (fingerprint {corpus.fingerprint[:12]} != {fingerprint[:12]}); were files "
                     "changed while it was built?")
  return corpus


def _load_tfds(spec: str, *, source: str, data_dir: str | None, valid_fraction: float, tokenizer,
               text_key: str, max_bytes: int | None) -> Corpus:
  m = _TFDS_SOURCE.match(spec)
  if not spec or m is None:
    raise ValueError(f"source {source!r}: expected 'tfds:NAME[:SPLIT]', e.g. 'tfds:lm1b' or 'tfds:c4/en:train'")
  name, split = m.group("name"), m.group("split") or "train"
  import tensorflow_datasets as tfds
  all_splits = tfds.data_source(name, data_dir=data_dir)
  train_source = all_splits[split] if split in all_splits else tfds.data_source(name, split=split,
                                                                                data_dir=data_dir)
  base_split = re.split(r"[\[+]", split, maxsplit=1)[0]
  valid_name = next((s for s in ("validation", "test") if s in all_splits and s != base_split), None)
  valid_source = all_splits[valid_name] if valid_name else None
  return _corpus_from_sources(f"tfds:{name}:{split}", train_source, valid_source, text_key=text_key,
                              key_feature=None, valid_fraction=valid_fraction, tokenizer=tokenizer,
                              max_bytes=max_bytes)


def load_corpus(source: str = "stdlib", *, valid_fraction: float = 0.02, tokenizer=None, text_key: str = "text",
                max_bytes: int | None = None, data_dir: str | None = None) -> Corpus:
  """Loads and tokenizes a corpus; see the module docstring for the sources.

  Args:
    source: `"stdlib"`, `"python_paths"`, `"text_dir:PATH"` or `"tfds:NAME[:SPLIT]"` (SPLIT defaults to train).
    valid_fraction: share of documents held out for validation (at least one document, and at least one left
      for training). A dataset with its own `validation` / `test` split uses that split instead. A corpus of a
      single document is split by tokens: the first `1 - valid_fraction` train, the rest validate.
    tokenizer: an object with `encode(str) -> ids`, `EOS` and `vocab_size`; default `ByteTokenizer()` (which
      encodes the raw bytes, so non-utf-8 files survive unchanged).
    text_key: the feature holding the text in `tfds:` records (bytes or str).
    max_bytes: stop adding documents, in sorted key order, once this many bytes are held (the document that
      crosses the cap is kept; applied before the split, and to each of a dataset's own splits).
    data_dir: where TFDS datasets are built and read; for `text_dir:` the default is `PATH/.tfds`, for `tfds:`
      TFDS's own default.

  Returns:
    A `Corpus` whose token arrays are uint16 (int32 for a vocabulary over 65536) and read-only.

  Raises:
    ValueError: unknown source, missing directory, no text files, empty corpus, bad `valid_fraction` or
      `max_bytes`.
  """
  if not isinstance(source, str):
    raise ValueError(f"source must be a string, got {type(source).__name__}")
  if not 0.0 < valid_fraction < 1.0:
    raise ValueError(f"source {source!r}: valid_fraction must be in (0, 1), got {valid_fraction!r}")
  if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < 1):
    raise ValueError(f"source {source!r}: max_bytes must be a positive int or None, got {max_bytes!r}")
  tokenizer = ByteTokenizer() if tokenizer is None else tokenizer
  kind, sep, arg = source.partition(":")

  if source in ("stdlib", "python_paths"):
    files = _stdlib_files() if source == "stdlib" else _python_path_files()
    if not files:
      raise ValueError(f"source {source!r}: no .py files found (stdlib at {sysconfig.get_paths()['stdlib']})")
    docs = _read_files(files, max_bytes)
    return _make_corpus(source, docs, None, valid_fraction=valid_fraction, tokenizer=tokenizer)
  if sep and kind == "text_dir":
    return _load_text_dir(arg, source=source, data_dir=data_dir, valid_fraction=valid_fraction,
                          tokenizer=tokenizer, max_bytes=max_bytes)
  if sep and kind == "tfds":
    return _load_tfds(arg, source=source, data_dir=data_dir, valid_fraction=valid_fraction, tokenizer=tokenizer,
                      text_key=text_key, max_bytes=max_bytes)
  raise ValueError(f"unknown source {source!r}: expected 'stdlib', 'python_paths', 'text_dir:PATH' or "
                   "'tfds:NAME[:SPLIT]'")


# --------------------------------------------------------------------------------------------------------------
# Batches.
# --------------------------------------------------------------------------------------------------------------
def _num_windows(tokens: np.ndarray, batch_size: int, seq_len: int, what: str) -> int:
  """Validates the arguments and returns the number of non-overlapping windows of `seq_len + 1` tokens."""
  if np.ndim(tokens) != 1:
    raise ValueError(f"{what}: tokens must be a 1-D array, got shape {np.shape(tokens)}")
  for arg, value in (("batch_size", batch_size), ("seq_len", seq_len)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{what}: {arg} must be a positive int, got {value!r}")
  n_windows = (len(tokens) - 1) // seq_len if len(tokens) else 0
  if n_windows < max(1, batch_size):
    raise ValueError(
        f"{what}: corpus too short: {len(tokens)} tokens give {n_windows} windows of seq_len={seq_len} (+1), "
        f"fewer than batch_size={batch_size}")
  return n_windows


class _Window:
  """Window index -> int32 tokens `[i * seq_len, i * seq_len + seq_len + 1)`; picklable for grain workers."""

  def __init__(self, tokens: np.ndarray, seq_len: int):
    self.tokens = tokens
    self.seq_len = seq_len

  def __call__(self, index) -> np.ndarray:
    start = int(index) * self.seq_len
    return np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int32)


def train_iterator(tokens: np.ndarray, *, batch_size: int, seq_len: int, seed: int) -> grain.DatasetIterator:
  """An endless, deterministic iterator of int32 batches `[batch_size, seq_len + 1]` of training windows.

  `MapDataset.range(n_windows).shuffle(seed).repeat()`: every epoch visits every window once, in an order
  reshuffled per epoch (grain folds the epoch into the seed); batches run across epoch boundaries. The
  iterator's `get_state()` / `set_state()` (and `grain.checkpoint.CheckpointSave` / `CheckpointRestore`)
  resume bit-identically.

  Raises:
    ValueError: if `tokens` hold fewer than `batch_size` windows (`(len(tokens) - 1) // seq_len`).
  """
  n_windows = _num_windows(tokens, batch_size, seq_len, "train_iterator")
  tokens = np.asarray(tokens)
  ds = (grain.MapDataset.range(n_windows)
        .shuffle(seed=int(seed))
        .repeat()
        .map(_Window(tokens, seq_len))
        .batch(batch_size, drop_remainder=True)
        .to_iter_dataset())
  return iter(ds)


def eval_batches(tokens: np.ndarray, *, batch_size: int, seq_len: int, max_batches: int) -> list[np.ndarray]:
  """A fixed list of at most `max_batches` int32 batches `[batch_size, seq_len + 1]` over `tokens`.

  No randomness: the `n_batches * batch_size` windows are spread evenly over all `n_windows` windows
  (window `j * n_windows // count` for j = 0..count-1), so the same tokens give the same batches in every run.

  Raises:
    ValueError: if the validation tokens hold fewer than `batch_size` windows (not even one batch).
  """
  if not isinstance(max_batches, (int, np.integer)) or max_batches < 1:
    raise ValueError(f"eval_batches: max_batches must be a positive int, got {max_batches!r}")
  try:
    n_windows = _num_windows(tokens, batch_size, seq_len, "eval_batches")
  except ValueError as e:
    raise ValueError(f"{e}; the validation tokens are too short for even one eval batch") from None
  n_batches = min(int(max_batches), n_windows // batch_size)
  count = n_batches * batch_size
  starts = (np.arange(count, dtype=np.int64) * n_windows // count) * seq_len
  offsets = starts[:, None] + np.arange(seq_len + 1, dtype=np.int64)[None, :]
  windows = np.asarray(tokens)[offsets].astype(np.int32)
  return [windows[b * batch_size:(b + 1) * batch_size] for b in range(n_batches)]
