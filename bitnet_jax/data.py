"""data: corpora and deterministic batch iterators (data side: tokenizer, data_tfds, batches -> data -> train).

A corpus is a list of documents (files, or records of a TFDS dataset) turned into two flat token arrays, `train`
and `valid`, with the tokenizer's EOS between consecutive documents (none before the first or after the last).
Tokenization is byte-level by default (`ByteTokenizer`: ids 0..255 are the bytes, then PAD, BOS, EOS), so
every corpus needs no vocabulary file and no download; `tokenizer="sentencepiece:PATH"` or `"hf:PATH"` uses a
tokenizer file instead (see `bitnet_jax/tokenizer.py`).

Sources (the `source` argument of `load_corpus`):
  * `"stdlib"`            the running interpreter's standard library `.py` files, test directories excluded
                          (about 12 MB for Python 3.11). No download, no TFDS.
  * `"python_paths"`      the stdlib files plus every `.py` under each directory of `sys.path`
                          (site-packages included, test directories excluded), deduplicated by real path.
  * `"text_dir:PATH"`     every `*.txt`, `*.md`, `*.py` under PATH, built once into an array_record TFDS dataset
                          (`data_tfds.build_text_dir`) and read back as a data source (no TensorFlow).
  * `"tfds:NAME[:SPLIT]"` a registered TFDS dataset read with `tfds.data_source` (array_record, no TensorFlow).

Train / validation split, by document and without a seed: documents are ordered by the sha1 of their key
(relative path, or record index) and the last `max(1, round(valid_fraction * n_docs))` of that order are held
out. A dataset that ships a `validation` (else `test`) split uses it instead. A one-document corpus is split
inside the document: its first `1 - valid_fraction` of tokens train, the rest validate. With `test_fraction` > 0
a test split is held out too, the `max(1, round(test_fraction * n_docs))` documents just before the validation
ones in that order (for a one-document corpus, the tokens just before the validation tokens): the validation
split is unchanged, the training split loses those documents. Experiments choose on validation and report on
test (experiments/scaling.py).

Batches (`train_iterator`, `eval_batches`) live in `bitnet_jax/batches.py` and are re-exported here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import sysconfig
from typing import Iterable, Sequence

import numpy as np

from bitnet_jax import data_tfds
from bitnet_jax.batches import _num_windows, _Window, eval_batches, train_iterator  # noqa: F401  (re-exported)
from bitnet_jax.tokenizer import ByteTokenizer, Tokenizer, make_tokenizer

__all__ = [
    "ByteTokenizer",      # these three are re-exported from bitnet_jax.tokenizer, where they live
    "Tokenizer",
    "make_tokenizer",
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
# The TFDS source grammar and local-text builder live in data_tfds; these names keep their old home too.
_TFDS_SOURCE = data_tfds.TFDS_SOURCE
_local_text_builder_class = data_tfds.local_text_builder_class
# Documents are tokenized this many at a time, so a tokenizer library can spread a batch over its threads
# without holding the whole corpus's intermediate encodings at once.
_ENCODE_CHUNK = 64


# --------------------------------------------------------------------------------------------------------------
# Corpus.
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
  """A tokenized corpus: flat train / valid token arrays, fingerprints, and the tokenizer that made the tokens.

  `content_fingerprint` is the sha256 of every document's key (relative path or record key, sorted) and raw bytes:
  independent of the tokenizer and stable across runs and machines for the same content. `fingerprint` names
  the tokens: for the byte tokenizer, whose tokens are the bytes, it is the content fingerprint (so byte corpora
  keep the fingerprints they always had); for any other it also hashes the tokenizer's file fingerprint and EOS
  id. `tokenizer` is `{"name", "vocab_size", "fingerprint"}` of that tokenizer. For a one-document corpus both
  `n_train_files` and `n_valid_files` are 1 (the document is split by tokens). `test` is empty and `n_test_files`
  0 unless a test split was asked for (`load_corpus(test_fraction=...)`).
  """

  name: str
  train: np.ndarray
  valid: np.ndarray
  fingerprint: str
  n_train_files: int
  n_valid_files: int
  content_fingerprint: str
  tokenizer: dict
  test: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.uint16))
  n_test_files: int = 0

  def summary(self) -> dict:
    """A json-able description: name, fingerprints, tokenizer, file counts and token counts."""
    return {
        "name": self.name,
        "fingerprint": self.fingerprint,
        "content_fingerprint": self.content_fingerprint,
        "tokenizer": dict(self.tokenizer),
        "n_train_files": int(self.n_train_files),
        "n_valid_files": int(self.n_valid_files),
        "train_tokens": int(self.train.size),
        "valid_tokens": int(self.valid.size),
        # the test split's fields only where there is one: the records of runs without one stay as they were
        **({"n_test_files": int(self.n_test_files), "test_tokens": int(self.test.size)} if self.n_test_files else {}),
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


def _resolve_tokenizer(tokenizer: Tokenizer | str | None) -> Tokenizer:
  """`tokenizer` as an object: None -> `ByteTokenizer()`, a spec string -> `make_tokenizer(spec)`.

  Checks what the pipeline uses up front, before any data is read: the attributes, and an EOS id to put between
  documents (joining documents with nothing between them would make the model learn false continuations).
  """
  if tokenizer is None:
    return ByteTokenizer()
  if isinstance(tokenizer, str):
    tokenizer = make_tokenizer(tokenizer)
  missing = [a for a in ("name", "vocab_size", "eos_id", "fingerprint", "encode_batch") if not hasattr(tokenizer, a)]
  if missing:
    raise ValueError(f"tokenizer {tokenizer!r} lacks {', '.join(missing)}: pass a spec string ('byte', "
                     "'sentencepiece:PATH', 'hf:PATH') or an object with the bitnet_jax.tokenizer.Tokenizer interface")
  if tokenizer.eos_id is None:
    raise ValueError(f"tokenizer {tokenizer.name}: eos_id is None, and a corpus needs an EOS id between documents; "
                     "use a tokenizer trained with an EOS token (e.g. '</s>' or '<|endoftext|>')")
  return tokenizer


def _token_dtype(tokenizer: Tokenizer) -> np.dtype:
  """uint16 when every id fits (vocab_size <= 65536, so ids <= 65535), else int32."""
  return np.dtype(np.uint16) if int(tokenizer.vocab_size) <= 1 << 16 else np.dtype(np.int32)


def _tokenize_joined(docs: Sequence[bytes], tokenizer: Tokenizer) -> np.ndarray:
  """Tokens of `docs` with one `tokenizer.eos_id` between consecutive documents, as a read-only 1-D array.

  Non-byte tokenizers see each document decoded as utf-8 (`errors="replace"`), `_ENCODE_CHUNK` at a time.

  Raises:
    ValueError: the tokenizer produced an id outside `[0, vocab_size)` (it would not fit the token dtype).
  """
  dtype = _token_dtype(tokenizer)
  if not docs:
    out = np.zeros((0,), dtype)
  elif isinstance(tokenizer, ByteTokenizer):
    flat = np.frombuffer(b"".join(docs), dtype=np.uint8).astype(dtype)
    boundaries = np.cumsum([len(d) for d in docs[:-1]], dtype=np.int64)
    out = np.insert(flat, boundaries, tokenizer.eos_id)
  else:
    eos, vocab = np.asarray([tokenizer.eos_id], dtype), int(tokenizer.vocab_size)
    parts = []
    for start in range(0, len(docs), _ENCODE_CHUNK):
      texts = [d.decode("utf-8", errors="replace") for d in docs[start:start + _ENCODE_CHUNK]]
      for ids in tokenizer.encode_batch(texts):
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
          bad = ids.min() if ids.min() < 0 else ids.max()
          raise ValueError(f"tokenizer {tokenizer.name}: id {bad} is outside [0, vocab_size={vocab})")
        parts.extend([eos, ids.astype(dtype)] if parts else [ids.astype(dtype)])
    out = np.concatenate(parts)
  out.flags.writeable = False
  return out


def _split_order(keys: Sequence[str]) -> list[int]:
  """A seed-free deterministic shuffle of document indices: by sha1 of the key (ties broken by the key)."""
  return sorted(range(len(keys)), key=lambda i: (hashlib.sha1(keys[i].encode("utf-8")).hexdigest(), keys[i]))


def _make_corpus(name: str, docs: list[tuple[str, bytes]], valid_docs: list[tuple[str, bytes]] | None, *,
                 valid_fraction: float, tokenizer: Tokenizer, test_fraction: float = 0.0) -> Corpus:
  """The shared tail of every source: fingerprints, by-document split, tokenization.

  `docs` are (key, bytes) sorted by key. `valid_docs`, when given (a dataset's own validation split), are used as
  the validation set as they are; otherwise validation documents are held out of `docs` by `_split_order`. Test
  documents (`test_fraction` > 0) are held out of `docs` just before the validation ones in that order.
  """
  if not docs:
    raise ValueError(f"{name}: the corpus has no documents")
  total = sum(len(d) for _, d in docs) + sum(len(d) for _, d in valid_docs or ())
  if total == 0:
    raise ValueError(f"{name}: empty corpus (all {len(docs)} documents have zero bytes)")
  content = _fingerprint(list(docs) + list(valid_docs or ()))
  fingerprint = content if isinstance(tokenizer, ByteTokenizer) else _fingerprint(
      [("content", content.encode()), ("tokenizer", tokenizer.fingerprint.encode()),
       ("eos_id", str(tokenizer.eos_id).encode())])

  test = np.zeros(0, np.uint16)
  n_test = 0
  if len(docs) == 1 and valid_docs is None:
    tokens = _tokenize_joined([docs[0][1]], tokenizer)
    cut = len(tokens) - int(round(valid_fraction * len(tokens)))
    test_cut = cut - int(round(test_fraction * len(tokens)))
    train, test, valid_tokens = tokens[:test_cut], tokens[test_cut:cut], tokens[cut:]
    n_train = n_valid = 1
    n_test = 1 if test_fraction else 0
  else:
    order = _split_order([k for k, _ in docs])
    n_valid = 0 if valid_docs is not None else min(max(1, int(round(valid_fraction * len(docs)))), len(docs) - 1)
    if test_fraction:
      n_test = min(max(1, int(round(test_fraction * len(docs)))), len(docs) - n_valid - 1)
      if n_test < 1:
        raise ValueError(f"{name}: {len(docs)} documents leave none for a test split beside {n_valid} validation "
                         "and at least one training document")
    valid_ids = set(order[len(order) - n_valid:])
    test_ids = set(order[len(order) - n_valid - n_test:len(order) - n_valid])
    pick = lambda ids: _tokenize_joined([d for i, (_, d) in enumerate(docs) if i in ids], tokenizer)
    train = pick(set(range(len(docs))) - valid_ids - test_ids)
    if valid_docs is not None:
      valid_tokens, n_valid = _tokenize_joined([d for _, d in valid_docs], tokenizer), len(valid_docs)
    else:
      valid_tokens = pick(valid_ids)
    test = pick(test_ids) if n_test else test
    n_train = len(docs) - len(valid_ids) - n_test
  record = {"name": tokenizer.name, "vocab_size": int(tokenizer.vocab_size), "fingerprint": tokenizer.fingerprint}
  return Corpus(name=name, train=train, valid=valid_tokens, fingerprint=fingerprint, n_train_files=n_train,
                n_valid_files=n_valid, content_fingerprint=content, tokenizer=record, test=test,
                n_test_files=n_test)


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
# TFDS sources (the dataset side is in data_tfds).
# --------------------------------------------------------------------------------------------------------------
def _load_text_dir(path: str, *, source: str, data_dir: str | None, valid_fraction: float, tokenizer: Tokenizer,
                   max_bytes: int | None, test_fraction: float = 0.0) -> Corpus:
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

  built = data_tfds.build_text_dir(files, fingerprint=fingerprint, root=root,
                                   data_dir=data_dir or os.path.join(root, ".tfds"))
  docs = data_tfds.read_records(built, text_key="text", key_feature="path", key_prefix="", max_bytes=None,
                                what=f"text_dir:{root}")
  built_fingerprint = _fingerprint(docs)
  if built_fingerprint != fingerprint:
    raise ValueError(f"source {source!r}: the dataset built from {root} does not match its files (fingerprint "
                     f"{built_fingerprint[:12]} != {fingerprint[:12]}); were files changed while it was built?")
  return _make_corpus(f"text_dir:{root}", docs, None, valid_fraction=valid_fraction, tokenizer=tokenizer,
                      test_fraction=test_fraction)


def _load_tfds(spec: str, *, source: str, data_dir: str | None, valid_fraction: float, tokenizer: Tokenizer,
               text_key: str, max_bytes: int | None, test_fraction: float = 0.0) -> Corpus:
  m = _TFDS_SOURCE.match(spec)
  if not spec or m is None:
    raise ValueError(f"source {source!r}: expected 'tfds:NAME[:SPLIT]', e.g. 'tfds:lm1b' or 'tfds:c4/en:train'")
  name, split = m.group("name"), m.group("split") or "train"
  train_source, valid_source = data_tfds.open_tfds(name, split, data_dir)
  what = f"tfds:{name}:{split}"
  read = lambda src, prefix: data_tfds.read_records(src, text_key=text_key, key_feature=None, key_prefix=prefix,
                                                    max_bytes=max_bytes, what=what)
  valid_docs = read(valid_source, "valid/") if valid_source is not None else None
  return _make_corpus(what, read(train_source, "train/"), valid_docs, valid_fraction=valid_fraction,
                      tokenizer=tokenizer, test_fraction=test_fraction)


def load_corpus(source: str = "stdlib", *, valid_fraction: float = 0.02, tokenizer: Tokenizer | str | None = None,
                text_key: str = "text", max_bytes: int | None = None, data_dir: str | None = None,
                test_fraction: float = 0.0) -> Corpus:
  """Loads and tokenizes a corpus; see the module docstring for the sources.

  Args:
    source: `"stdlib"`, `"python_paths"`, `"text_dir:PATH"` or `"tfds:NAME[:SPLIT]"` (SPLIT defaults to train).
    valid_fraction: share of documents held out for validation (at least one document, and at least one left
      for training). A dataset with its own `validation` / `test` split uses that split instead. A corpus of a
      single document is split by tokens: the first `1 - valid_fraction` train, the rest validate.
    tokenizer: a spec string for `make_tokenizer` (`"byte"`, `"sentencepiece:PATH"`, `"hf:PATH"`) or an object
      with the `bitnet_jax.tokenizer.Tokenizer` interface; default `ByteTokenizer()` (which encodes the raw
      bytes, so non-utf-8 files survive unchanged). Its `eos_id` separates documents.
    text_key: the feature holding the text in `tfds:` records (bytes or str).
    max_bytes: stop adding documents, in sorted key order, once this many bytes are held (the document that
      crosses the cap is kept; applied before the split, and to each of a dataset's own splits).
    data_dir: where TFDS datasets are built and read; for `text_dir:` the default is `PATH/.tfds`, for `tfds:`
      TFDS's own default.
    test_fraction: share of documents held out as a test split (default 0: none), taken from the training
      documents just before the validation ones in the split order (see the module docstring), also for a
      dataset with its own validation split.

  Returns:
    A `Corpus` whose token arrays are uint16 (int32 for a vocabulary over 65536) and read-only.

  Raises:
    ValueError: unknown source, missing directory, no text files, empty corpus, bad `valid_fraction`,
      `test_fraction` or `max_bytes`, too few documents for a test split, unknown tokenizer kind, a tokenizer
      without an EOS id.
    FileNotFoundError, ImportError: from `make_tokenizer` (missing tokenizer file, library not installed).
  """
  if not isinstance(source, str):
    raise ValueError(f"source must be a string, got {type(source).__name__}")
  if not 0.0 < valid_fraction < 1.0:
    raise ValueError(f"source {source!r}: valid_fraction must be in (0, 1), got {valid_fraction!r}")
  if (not isinstance(test_fraction, (int, float)) or isinstance(test_fraction, bool) or not 0.0 <= test_fraction < 1.0
      or valid_fraction + test_fraction >= 1.0):
    raise ValueError(f"source {source!r}: test_fraction must be in [0, 1) with valid_fraction + test_fraction < 1, "
                     f"got {test_fraction!r} (valid_fraction {valid_fraction!r})")
  if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < 1):
    raise ValueError(f"source {source!r}: max_bytes must be a positive int or None, got {max_bytes!r}")
  tokenizer = _resolve_tokenizer(tokenizer)
  kind, sep, arg = source.partition(":")

  if source in ("stdlib", "python_paths"):
    files = _stdlib_files() if source == "stdlib" else _python_path_files()
    if not files:
      raise ValueError(f"source {source!r}: no .py files found (stdlib at {sysconfig.get_paths()['stdlib']})")
    docs = _read_files(files, max_bytes)
    return _make_corpus(source, docs, None, valid_fraction=valid_fraction, tokenizer=tokenizer,
                        test_fraction=test_fraction)
  if sep and kind == "text_dir":
    return _load_text_dir(arg, source=source, data_dir=data_dir, valid_fraction=valid_fraction,
                          tokenizer=tokenizer, max_bytes=max_bytes, test_fraction=test_fraction)
  if sep and kind == "tfds":
    return _load_tfds(arg, source=source, data_dir=data_dir, valid_fraction=valid_fraction, tokenizer=tokenizer,
                      text_key=text_key, max_bytes=max_bytes, test_fraction=test_fraction)
  raise ValueError(f"unknown source {source!r}: expected 'stdlib', 'python_paths', 'text_dir:PATH' or "
                   "'tfds:NAME[:SPLIT]'")
