"""data_tfds: documents out of TFDS array_record datasets, for data.py (data side: data_tfds -> data -> train).

Two jobs, neither needing TensorFlow: build a directory of local text files into an array_record dataset
(`build_text_dir`, one example per file), and read the records of any TFDS data source back as
(key, bytes) documents (`read_records`). `data.load_corpus` turns those documents into a `Corpus`.
TFDS itself is imported on first use, so `import bitnet_jax.data` stays light.
"""

from __future__ import annotations

import difflib
import re
from typing import Sequence

import numpy as np

__all__ = ["TFDS_SOURCE", "local_text_builder_class", "build_text_dir", "open_tfds", "read_records"]

# A TFDS dataset name, optionally with a version (`c4/en:3.0.1`), then optionally `:SPLIT` (`train[:10%]`).
TFDS_SOURCE = re.compile(r"^(?P<name>[^:\[\]]+(?::\d+(?:\.\d+)*)?)(?::(?P<split>.+))?$")

_LOCAL_TEXT_BUILDER = None


def local_text_builder_class():
  """`LocalTextBuilder`, defined on first use so that importing this module does not import TFDS."""
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


def build_text_dir(files: Sequence[tuple[str, str]], *, fingerprint: str, root: str, data_dir: str):
  """The `train` data source of `files` ((relative path, absolute path) pairs) built under `data_dir`.

  The build is keyed by `fingerprint` (of the files' paths and bytes), so it is a no-op when done before.
  """
  import tensorflow_datasets as tfds
  config = tfds.core.BuilderConfig(name=f"fp_{fingerprint[:20]}", version="1.0.0",
                                   description=f"{len(files)} text files under {root}")
  builder = local_text_builder_class()(files=files, config=config, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return builder.as_data_source(split="train")


def _not_found(name: str, data_dir: str | None) -> ValueError:
  """One line for a dataset TFDS does not know (its own message lists all ~250 builders over ~260 lines)."""
  import tensorflow_datasets as tfds
  base = name.split(":")[0].split("/")[0]
  known = tfds.list_builders(with_community_datasets=False)   # the community index needs TensorFlow and a network
  close = difflib.get_close_matches(base, known, n=3)
  hint = f"did you mean {', '.join(close)}? " if close else ""
  return ValueError(f"tfds:{name}: TFDS knows no dataset {base!r} (no builder registered under that name, none "
                    f"prepared under {data_dir or tfds.core.constants.DATA_DIR}); {hint}"
                    "`tensorflow_datasets.list_builders(with_community_datasets=False)` lists the registered ones")


def open_tfds(name: str, split: str, data_dir: str | None):
  """(train source, validation source or None) of a registered dataset; validation is its `validation` split,
  else its `test` split, unless that is the split being trained on.

  Raises ValueError (one line) for a dataset name, or version, that TFDS does not have.
  """
  import tensorflow_datasets as tfds
  try:
    all_splits = tfds.data_source(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError as e:
    raise _not_found(name, data_dir) from e
  except AssertionError as e:   # TFDS asserts on a version it does not have
    version = re.search(r"Dataset \S+ cannot be loaded at version .*", str(e))
    if version is None:
      raise
    raise ValueError(f"tfds:{name}: {version.group(0)}") from e
  train_source = all_splits[split] if split in all_splits else tfds.data_source(name, split=split,
                                                                                data_dir=data_dir)
  base_split = re.split(r"[\[+]", split, maxsplit=1)[0]
  valid_name = next((s for s in ("validation", "test") if s in all_splits and s != base_split), None)
  return train_source, (all_splits[valid_name] if valid_name else None)


def _as_bytes(value, what: str) -> bytes:
  if isinstance(value, bytes):
    return value
  if isinstance(value, str):
    return value.encode("utf-8")
  if isinstance(value, np.ndarray) and value.dtype.kind in "SUO" and value.ndim == 0:
    return _as_bytes(value.item(), what)
  raise ValueError(f"{what}: expected text (bytes or str), got {type(value).__name__}")


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


def read_records(source, *, text_key: str, key_feature: str | None, key_prefix: str, max_bytes: int | None,
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
