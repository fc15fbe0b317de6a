"""Tests for bitnet_jax/tokenizer.py: byte, SentencePiece and HF tokenizers, the factory, corpora and a training run
with a tokenizer file. The SentencePiece and HF models are trained here, in a fraction of a second, on generated
text, so nothing is downloaded."""

from __future__ import annotations

import hashlib
import random
import shutil
import sys

import numpy as np
import pytest

from bitnet_jax import data, generate, tokenizer, train
from configs import lm

spm = pytest.importorskip("sentencepiece")
hf = pytest.importorskip("tokenizers")

VOCAB = 400   # above the byte tokenizer's 259, so a byte-sized model is too small for either file tokenizer
WORDS = ("the model learns ternary weights while the optimiser keeps full precision latent values and every "
         "layer scales its activations to eight bits before the matrix product").split()
TEXTS = ["", "hello world", "  two  spaces\tand a tab\n\nnew lines\n", "héllo wörld ✓ 日本語 🙂",
         "def f(x):\n  return x + 1  # </s> and <s> stay text", "qzxj never-seen bytes: \x7f ~"]


def _document(rng: random.Random, i: int) -> str:
  """A few hundred words of prose and code, with some non-ASCII, different for each `i`."""
  lines = []
  for j in range(30):
    words = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
    if j % 5 == 0:
      lines.append(f"def step_{i}_{j}(x):\n  return x * {rng.randint(0, 99)}  # {' '.join(words[:3])}")
    else:
      lines.append(" ".join(words).capitalize() + rng.choice([".", ",", "!", " — ü."]))
  return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
  """12 generated text files (about 3 kB each), the training text of both tokenizers."""
  root = tmp_path_factory.mktemp("corpus")
  rng = random.Random(0)
  for i in range(12):
    (root / f"doc_{i:02d}.txt").write_text(_document(rng, i), encoding="utf-8")
  return root


@pytest.fixture(scope="module")
def sp_path(corpus_dir, tmp_path_factory):
  """A BPE SentencePiece model that reproduces text exactly: identity normalization, byte fallback."""
  out = tmp_path_factory.mktemp("sp")
  spm.SentencePieceTrainer.train(
      input=",".join(str(p) for p in sorted(corpus_dir.glob("*.txt"))), model_prefix=str(out / "sp"),
      vocab_size=VOCAB, model_type="bpe", byte_fallback=True, character_coverage=1.0,
      normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
  return out / "sp.model"


def _train_hf(paths, out, special_tokens):
  """A byte-level BPE tokenizer.json (like GPT-2's) trained on `paths`."""
  from tokenizers import decoders, models, pre_tokenizers, trainers
  tok = hf.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=special_tokens, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train([str(p) for p in paths], trainer)
  tok.save(str(out))
  return out


@pytest.fixture(scope="module")
def hf_path(corpus_dir, tmp_path_factory):
  return _train_hf(sorted(corpus_dir.glob("*.txt")), tmp_path_factory.mktemp("hf") / "tokenizer.json",
                   ["<pad>", "<s>", "</s>"])


@pytest.fixture(scope="module", params=["sentencepiece", "hf"])
def file_tok(request, sp_path, hf_path):
  path = sp_path if request.param == "sentencepiece" else hf_path
  return tokenizer.make_tokenizer(f"{request.param}:{path}")


# ---------------------------------------------------------------- the shared interface
def test_byte_tokenizer_keeps_its_home_and_interface():
  byte = tokenizer.make_tokenizer("byte")
  assert type(byte) is tokenizer.ByteTokenizer is data.ByteTokenizer
  assert isinstance(byte, tokenizer.Tokenizer)
  assert (byte.name, byte.fingerprint, byte.vocab_size) == ("byte", "byte", 259)
  assert (byte.pad_id, byte.bos_id, byte.eos_id) == (256, 257, 258)
  ids = byte.encode("é!")
  assert ids.dtype == np.int32 and ids.tolist() == [0xC3, 0xA9, 33]
  assert [x.tolist() for x in byte.encode_batch(["a", "é!"])] == [[97], ids.tolist()]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_and_id_range(file_tok, text):
  ids = file_tok.encode(text)
  assert isinstance(ids, np.ndarray) and ids.dtype == np.int32 and ids.ndim == 1
  assert np.all((ids >= 0) & (ids < file_tok.vocab_size))
  assert file_tok.eos_id not in ids.tolist()      # no specials added, and "</s>" in the text stays text
  assert file_tok.decode(ids) == text
  assert len(ids) <= len(text.encode("utf-8")) + 1


def test_encode_batch_matches_encode(file_tok):
  batch = file_tok.encode_batch(TEXTS)
  assert len(batch) == len(TEXTS)
  for text, ids in zip(TEXTS, batch):
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, file_tok.encode(text))


def test_subwords_compress_the_training_text(file_tok, corpus_dir):
  text = (corpus_dir / "doc_03.txt").read_text(encoding="utf-8")
  ids = file_tok.encode(text)
  assert len(ids) < len(text.encode("utf-8")) / 2      # merges learned: well under one token per byte
  assert file_tok.decode(ids) == text


def test_decode_drops_specials_and_ids_past_the_vocabulary(file_tok):
  ids = file_tok.encode("keep this")
  specials = [i for i in (file_tok.bos_id, file_tok.eos_id, file_tok.pad_id) if i is not None]
  noisy = np.concatenate([specials, ids, [file_tok.eos_id, file_tok.vocab_size, file_tok.vocab_size + 7, -1]])
  assert file_tok.decode(noisy) == "keep this"
  assert file_tok.decode(noisy.reshape(1, -1)) == "keep this"


def test_sentencepiece_vocab_and_specials(sp_path):
  tok = tokenizer.SentencePieceTokenizer(str(sp_path))
  proc = spm.SentencePieceProcessor(model_file=str(sp_path))
  assert tok.vocab_size == VOCAB == proc.vocab_size()
  assert (tok.bos_id, tok.eos_id) == (proc.bos_id(), proc.eos_id()) == (1, 2)
  assert proc.pad_id() == -1 and tok.pad_id is None    # SentencePiece's "none" (-1) is None here
  assert tok.name == f"sentencepiece:{sp_path}"


def test_hf_vocab_and_specials(hf_path):
  tok = tokenizer.HFTokenizer(str(hf_path))
  raw = hf.Tokenizer.from_file(str(hf_path))
  assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True) == VOCAB
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2) == tuple(raw.token_to_id(t) for t in ("<pad>", "<s>",
                                                                                                   "</s>"))
  assert tok.name == f"hf:{hf_path}"


def test_hf_without_an_eos_token(corpus_dir, tmp_path):
  path = _train_hf(sorted(corpus_dir.glob("*.txt")), tmp_path / "plain.json", [])
  tok = tokenizer.HFTokenizer(str(path))
  assert tok.eos_id is None and tok.bos_id is None and tok.pad_id is None
  assert tok.decode(tok.encode("still works")) == "still works"
  with pytest.raises(ValueError, match=r"eos_token='<nope>' is not in the vocabulary"):
    tokenizer.HFTokenizer(str(path), eos_token="<nope>")
  with pytest.raises(ValueError, match="eos_id is None"):   # a corpus needs a document separator
    data.load_corpus(f"text_dir:{corpus_dir}", tokenizer=tok)


def test_fingerprint_is_the_file_hash_not_the_path(file_tok, tmp_path):
  path = file_tok.name.split(":", 1)[1]
  with open(path, "rb") as f:
    assert file_tok.fingerprint == hashlib.sha256(f.read()).hexdigest()
  copy = tmp_path / ("copy" + path[path.rindex("."):])
  shutil.copy(path, copy)
  moved = tokenizer.make_tokenizer(f"{file_tok.name.split(':', 1)[0]}:{copy}")
  assert moved.fingerprint == file_tok.fingerprint and moved.name != file_tok.name


# ---------------------------------------------------------------- the factory's errors
@pytest.mark.parametrize("spec", ["bpe:/x/tokenizer.json", "Byte", "sentencepiece", "spm:/x.model", ""])
def test_factory_unknown_kind(spec):
  with pytest.raises(ValueError, match="unknown tokenizer"):
    tokenizer.make_tokenizer(spec)


def test_factory_bad_specs(tmp_path):
  with pytest.raises(ValueError, match="no file given"):
    tokenizer.make_tokenizer("hf:")
  with pytest.raises(ValueError, match="must be a string"):
    tokenizer.make_tokenizer(None)
  for kind, name in (("sentencepiece", "missing.model"), ("hf", "missing.json")):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / name)):
      tokenizer.make_tokenizer(f"{kind}:{tmp_path / name}")


@pytest.mark.parametrize("kind,module", [("sentencepiece", "sentencepiece"), ("hf", "tokenizers")])
def test_factory_missing_library_says_how_to_install(kind, module, sp_path, hf_path, monkeypatch):
  monkeypatch.setitem(sys.modules, module, None)    # `import module` now raises ImportError
  with pytest.raises(ImportError, match=r"pip install -r requirements-interop\.txt"):
    tokenizer.make_tokenizer(f"{kind}:{sp_path if kind == 'sentencepiece' else hf_path}")


# ---------------------------------------------------------------- corpora
def test_sentencepiece_corpus(corpus_dir, sp_path):
  byte = data.load_corpus(f"text_dir:{corpus_dir}", valid_fraction=0.25)
  c = data.load_corpus(f"text_dir:{corpus_dir}", valid_fraction=0.25, tokenizer=f"sentencepiece:{sp_path}")
  tok = tokenizer.make_tokenizer(f"sentencepiece:{sp_path}")
  assert (c.n_train_files, c.n_valid_files) == (byte.n_train_files, byte.n_valid_files) == (9, 3)
  for tokens in (c.train, c.valid):
    assert tokens.dtype == np.uint16 and not tokens.flags.writeable
    assert int(tokens.max()) < tok.vocab_size
  assert c.train.size < byte.train.size / 2
  # One EOS between consecutive documents and none inside one: the splits decode to the documents.
  assert int(np.sum(c.train == tok.eos_id)) == c.n_train_files - 1
  docs = {p.read_text(encoding="utf-8") for p in corpus_dir.glob("*.txt")}
  pieces = [tok.decode(part) for part in np.split(c.train, np.flatnonzero(c.train == tok.eos_id))]
  assert len(pieces) == 9 and set(pieces) < docs
  # Same text, other tokens: the content fingerprint is shared, the corpus fingerprint is not.
  assert c.content_fingerprint == byte.content_fingerprint == byte.fingerprint
  assert c.fingerprint != byte.fingerprint and len(c.fingerprint) == 64
  s = c.summary()
  assert s["tokenizer"] == {"name": tok.name, "vocab_size": VOCAB, "fingerprint": tok.fingerprint}
  assert byte.summary()["tokenizer"]["fingerprint"] == "byte"
  again = data.load_corpus(f"text_dir:{corpus_dir}", valid_fraction=0.25, tokenizer=tok)   # an object works too
  assert again.fingerprint == c.fingerprint
  np.testing.assert_array_equal(again.train, c.train)


def test_corpus_fingerprint_follows_the_tokenizer_file(corpus_dir, sp_path, hf_path):
  fps = {spec: data.load_corpus(f"text_dir:{corpus_dir}", tokenizer=spec).fingerprint
         for spec in ("byte", f"sentencepiece:{sp_path}", f"hf:{hf_path}")}
  assert len(set(fps.values())) == 3


class _FakeTokenizer:
  """A minimal object with the Tokenizer interface whose ids are `offset + byte`."""

  name, fingerprint, bos_id, pad_id = "fake", "fake", None, None

  def __init__(self, vocab_size, offset=0):
    self.vocab_size, self.eos_id, self.offset = vocab_size, 0, offset

  def encode_batch(self, texts):
    return [np.frombuffer(t.encode(), np.uint8).astype(np.int64) + self.offset for t in texts]


def test_token_dtype_holds_the_vocabulary(tmp_path):
  (tmp_path / "a.txt").write_text("first")
  (tmp_path / "b.txt").write_text("second")
  top = max(b"firstsecond")                            # "t": the largest byte, in the first document only
  small = data.load_corpus(f"text_dir:{tmp_path}", tokenizer=_FakeTokenizer(65536, offset=65535 - top))
  both = lambda c: np.concatenate([c.train, c.valid]).astype(np.int64)
  assert small.train.dtype == np.uint16 and both(small).max() == 65535     # the largest id survives, unwrapped
  big = data.load_corpus(f"text_dir:{tmp_path}", tokenizer=_FakeTokenizer(70000, offset=69000))
  assert big.train.dtype == np.int32 and both(big).max() == 69000 + top
  with pytest.raises(ValueError, match=r"id 300 is outside \[0, vocab_size=300\)"):
    data.load_corpus(f"text_dir:{tmp_path}", tokenizer=_FakeTokenizer(300, offset=300 - top))
  with pytest.raises(ValueError, match="lacks"):
    data.load_corpus(f"text_dir:{tmp_path}", tokenizer=object())


# ---------------------------------------------------------------- training
def _hf_config(corpus_dir, hf_path):
  config = lm.get_config("b158-tiny,smoke")
  config.data.source = f"text_dir:{corpus_dir}"
  config.data.tokenizer = f"hf:{hf_path}"
  config.data.eval_batches = 1
  config.data.valid_fraction = 0.25
  config.train.update(steps=6, eval_every=3, checkpoint_every=3, log_every=3, batch_size=4, seq_len=32)
  config.optim.warmup_steps = 0                         # the smoke run's 20 would outlast these 6 steps
  return config


def test_training_with_an_hf_tokenizer(corpus_dir, hf_path, tmp_path):
  tok = tokenizer.make_tokenizer(f"hf:{hf_path}")
  config = _hf_config(corpus_dir, hf_path)
  config.model.vocab_size = tok.vocab_size
  summary = train.train_and_evaluate(config, tmp_path, progress=False)
  assert np.isfinite(summary["eval_loss"]) and summary["steps"] == 6
  assert summary["data"]["tokenizer"] == {"name": tok.name, "vocab_size": VOCAB, "fingerprint": tok.fingerprint}
  model, _ = train.load_checkpoint(tmp_path)
  out = generate.greedy(model, tok.encode("def ")[None], 4)
  assert tok.decode(np.asarray(out[0])).startswith("def ")   # the prompt, encoded and decoded by the HF tokenizer


def test_training_refuses_a_model_vocabulary_smaller_than_the_tokenizer(corpus_dir, hf_path, tmp_path):
  config = _hf_config(corpus_dir, hf_path)
  assert config.model.vocab_size == 259                # the byte-sized default
  with pytest.raises(ValueError, match=rf"vocab_size=259 is smaller.*--config\.model\.vocab_size={VOCAB}"):
    train.train_and_evaluate(config, tmp_path, progress=False)
  config.data.tokenizer = f"hf:{tmp_path / 'absent.json'}"
  with pytest.raises(FileNotFoundError, match="absent.json"):
    train.train_and_evaluate(config, tmp_path, progress=False)
