"""tokenizer: text <-> token ids, byte-level or from a tokenizer file (data side: tokenizer -> data -> train).

Three tokenizers share one small interface (`Tokenizer` below), so the data pipeline and the training loop never
ask which kind they hold:
  * `ByteTokenizer`           ids 0..255 are the utf-8 bytes, then PAD 256, BOS 257, EOS 258. No file.
  * `SentencePieceTokenizer`  a SentencePiece `.model` file (`sentencepiece.SentencePieceProcessor`).
  * `HFTokenizer`             a Hugging Face `tokenizers` `tokenizer.json` (`tokenizers.Tokenizer.from_file`).
`make_tokenizer(spec)` builds one from a config string: `"byte"`, `"sentencepiece:PATH"` or `"hf:PATH"`.

Special ids are `None` where the tokenizer has none. `eos_id` is the one the pipeline needs: `data.load_corpus`
puts it between consecutive documents, and refuses a tokenizer without it rather than run documents together.
`encode` never adds specials, and text that spells a special token (`"</s>"`) is encoded as plain text, so
separators in a corpus come only from the pipeline. `decode` drops special ids and ids outside
`[0, vocab_size)` (a model's vocabulary may be padded past the tokenizer's).

`fingerprint` is the sha256 of the tokenizer file's bytes (`"byte"` for the byte tokenizer): the corpus records it,
so a run says which tokenizer made its tokens, independent of where the file lies.
The file-backed libraries are optional (`requirements-interop.txt`) and imported only when such a tokenizer is made.
"""

from __future__ import annotations

import hashlib
import os
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

__all__ = ["Tokenizer", "ByteTokenizer", "SentencePieceTokenizer", "HFTokenizer", "make_tokenizer"]

_INSTALL_HINT = "pip install -r requirements-interop.txt"
# Names `HFTokenizer` looks for among a tokenizer.json's special tokens, first match wins. tokenizer.json has no
# field that says which token ends a document (that lives in transformers' tokenizer_config.json), so the common
# spellings are tried: Llama/T5/BPE trainers, GPT-2, Gemma, Llama 3.
_HF_EOS = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>")
_HF_BOS = ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>")
_HF_PAD = ("<pad>", "[PAD]", "<|pad|>")


@runtime_checkable
class Tokenizer(Protocol):
  """What `data.load_corpus` and `train.train_and_evaluate` need from a tokenizer."""

  name: str                # e.g. "byte", "sentencepiece:/abs/path/sp.model"
  vocab_size: int          # every id `encode` or the specials produce is < vocab_size
  bos_id: int | None
  eos_id: int | None       # separates documents in a corpus; None: the tokenizer cannot be used for a corpus
  pad_id: int | None
  fingerprint: str         # sha256 of the tokenizer file, or "byte"

  def encode(self, text: str) -> np.ndarray: ...            # int32 ids, no specials added

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...

  def decode(self, ids) -> str: ...


def _file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _existing_file(path: str, kind: str) -> str:
  """`path` made absolute; FileNotFoundError naming it if it is not a file."""
  full = os.path.abspath(os.path.expanduser(path))
  if not os.path.isfile(full):
    raise FileNotFoundError(f"{kind} tokenizer file not found: {full}")
  return full


def _kept_ids(ids, vocab_size: int, specials: Sequence[int | None]) -> list[int]:
  """`ids` flattened, minus specials and ids outside `[0, vocab_size)`, as Python ints."""
  ids = np.asarray(ids, dtype=np.int64).reshape(-1)
  drop = [s for s in specials if s is not None]
  ids = ids[(ids >= 0) & (ids < vocab_size) & ~np.isin(ids, drop)]
  return ids.tolist()


# --------------------------------------------------------------------------------------------------------------
# Byte level.
# --------------------------------------------------------------------------------------------------------------
class ByteTokenizer:
  """Byte-level tokenizer: ids 0..255 are bytes, then specials. Needs no file, so every corpus works with it."""

  PAD = 256
  BOS = 257
  EOS = 258
  vocab_size = 259
  pad_id, bos_id, eos_id = PAD, BOS, EOS
  name = "byte"
  fingerprint = "byte"

  def encode(self, text: str | bytes) -> np.ndarray:
    """The utf-8 bytes of `text` (or `text` itself if already bytes) as int32 ids; no specials are added."""
    if isinstance(text, str):
      text = text.encode("utf-8")
    return np.frombuffer(bytes(text), dtype=np.uint8).astype(np.int32)

  def encode_batch(self, texts: Sequence[str | bytes]) -> list[np.ndarray]:
    return [self.encode(t) for t in texts]

  def decode(self, ids) -> str:
    """Drops special ids (>= 256) and decodes the remaining bytes as utf-8 with `errors="replace"`."""
    ids = np.asarray(ids).reshape(-1)
    ids = ids[(ids >= 0) & (ids < 256)]
    return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


# --------------------------------------------------------------------------------------------------------------
# File backed.
# --------------------------------------------------------------------------------------------------------------
class SentencePieceTokenizer:
  """A SentencePiece model file. Specials are the model's own `bos_id()` / `eos_id()` / `pad_id()` (-1 -> None).

  SentencePiece normalizes text as the model was trained to (NFKC and whitespace folding by default), so a round
  trip is exact only for text the normalizer leaves unchanged; `byte_fallback` models never produce `<unk>`.
  """

  def __init__(self, path: str):
    full = _existing_file(path, "sentencepiece")
    try:
      import sentencepiece
    except ImportError as e:
      raise ImportError(f"SentencePieceTokenizer needs the sentencepiece package: {_INSTALL_HINT}") from e
    self._sp = sentencepiece.SentencePieceProcessor(model_file=full)
    self.path = full
    self.name = f"sentencepiece:{full}"
    self.vocab_size = int(self._sp.vocab_size())
    self.bos_id, self.eos_id, self.pad_id = (
        int(i) if i >= 0 else None for i in (self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id()))
    self.fingerprint = _file_sha256(full)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text, out_type=int), dtype=np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """`encode` of each text; SentencePiece spreads a list over its own threads."""
    return [np.asarray(ids, dtype=np.int32) for ids in self._sp.encode(list(texts), out_type=int)]

  def decode(self, ids) -> str:
    return self._sp.decode(_kept_ids(ids, self.vocab_size, (self.bos_id, self.eos_id, self.pad_id)))


class HFTokenizer:
  """A Hugging Face `tokenizers` file (tokenizer.json).

  `vocab_size` is one past the largest id, added tokens included. tokenizer.json does not say which token ends a
  document, so `eos_token` names it; left None, the first of `_HF_EOS` that is a special token of the file is
  taken (BOS and PAD likewise from `_HF_BOS` / `_HF_PAD`), and `eos_id` is None when none is. The file's
  post-processor (e.g. a template adding `<s>`) is not applied: `encode` adds no specials.
  """

  def __init__(self, path: str, *, eos_token: str | None = None):
    full = _existing_file(path, "hf")
    try:
      import tokenizers
    except ImportError as e:
      raise ImportError(f"HFTokenizer needs the tokenizers package: {_INSTALL_HINT}") from e
    self._tok = tokenizers.Tokenizer.from_file(full)
    # Text that spells a special token ("</s>" in a document about tokenizers) stays text.
    self._tok.encode_special_tokens = True
    self.path = full
    self.name = f"hf:{full}"
    self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
    specials = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
    if eos_token is not None and self._tok.token_to_id(eos_token) is None:
      raise ValueError(f"HFTokenizer: eos_token={eos_token!r} is not in the vocabulary of {full}")
    pick = lambda names: next((specials[n] for n in names if n in specials), None)
    self.eos_id = self._tok.token_to_id(eos_token) if eos_token is not None else pick(_HF_EOS)
    self.bos_id, self.pad_id = pick(_HF_BOS), pick(_HF_PAD)
    self._specials = sorted(set(specials.values()) | {i for i in (self.eos_id,) if i is not None})
    self.fingerprint = _file_sha256(full)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """`encode` of each text; `tokenizers` spreads a batch over its own threads."""
    encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

  def decode(self, ids) -> str:
    return self._tok.decode(_kept_ids(ids, self.vocab_size, self._specials), skip_special_tokens=True)


# --------------------------------------------------------------------------------------------------------------
# Factory.
# --------------------------------------------------------------------------------------------------------------
_KINDS = {"sentencepiece": SentencePieceTokenizer, "hf": HFTokenizer}


def make_tokenizer(spec: str = "byte") -> Tokenizer:
  """A tokenizer from a config string: `"byte"`, `"sentencepiece:PATH"` (a .model file) or `"hf:PATH"`
  (a tokenizer.json).

  Raises:
    ValueError: `spec` is not a string, names an unknown kind, has no path, or the file does not parse.
    FileNotFoundError: the file does not exist (the message names it).
    ImportError: the kind's library is not installed (the message says how to install it).
  """
  if not isinstance(spec, str):
    raise ValueError(f"tokenizer spec must be a string, got {type(spec).__name__}")
  if spec == "byte":
    return ByteTokenizer()
  kind, sep, path = spec.partition(":")
  if not sep or kind not in _KINDS:
    raise ValueError(f"unknown tokenizer {spec!r}: expected 'byte', 'sentencepiece:PATH' or 'hf:PATH'")
  if not path:
    raise ValueError(f"tokenizer {spec!r}: no file given (expected '{kind}:PATH')")
  try:
    return _KINDS[kind](path)
  except (FileNotFoundError, ImportError, ValueError):
    raise
  except Exception as e:  # noqa: BLE001 (the libraries raise their own types for a file they cannot parse)
    raise ValueError(f"tokenizer {spec!r}: cannot read {path} ({type(e).__name__}: {e})") from None
