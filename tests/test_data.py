"""Tests for bitnet_jax/data.py: tokenizer, corpora (stdlib, local text through TFDS), grain iterators."""

import hashlib
import os

import grain
import numpy as np
import pytest

from bitnet_jax import data

TOK = data.ByteTokenizer()
EOS = data.ByteTokenizer.EOS


def _joined(docs):
  """Expected tokens of byte documents joined with one EOS between consecutive documents."""
  out = []
  for i, d in enumerate(docs):
    if i:
      out.append(EOS)
    out.extend(d)
  return np.asarray(out, np.int64)


def _write_corpus(root, n=20):
  """`n` small text files (nested, non-ASCII, mixed suffixes) plus files that must be ignored."""
  files = {}
  for i in range(n):
    suffix = (".txt", ".md", ".py")[i % 3]
    rel = f"sub{i % 4}/doc_{i:02d}{suffix}" if i % 2 else f"doc_{i:02d}{suffix}"
    text = f"document {i}: héllo wörld ✓ 日本 {'x' * (i * 7)}\n".encode("utf-8")
    if i == 5:
      text += b"\xff\xfe raw non-utf8 bytes"
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text)
    files[rel] = text
  (root / "ignored.bin").write_bytes(b"not text")
  (root / ".hidden.txt").write_bytes(b"hidden")
  (root / ".git").mkdir()
  (root / ".git" / "HEAD.txt").write_bytes(b"hidden dir")
  return files


@pytest.fixture(scope="module")
def stdlib_corpus():
  return data.load_corpus("stdlib")


@pytest.fixture
def text_dir(tmp_path):
  root = tmp_path / "corpus"
  root.mkdir()
  return root, _write_corpus(root)


# ---------------------------------------------------------------- tokenizer
@pytest.mark.parametrize("text", ["", "hello, world\n", "héllo wörld ✓ 日本語 🙂", "tab\tand\x00nul"])
def test_tokenizer_round_trip(text):
  ids = TOK.encode(text)
  assert ids.dtype == np.int32 and ids.ndim == 1
  assert len(ids) == len(text.encode("utf-8"))
  assert TOK.decode(ids) == text
  np.testing.assert_array_equal(TOK.encode(text.encode("utf-8")), ids)


def test_tokenizer_specials_and_bad_bytes():
  assert (TOK.PAD, TOK.BOS, TOK.EOS, TOK.vocab_size) == (256, 257, 258, 259)
  ids = np.concatenate([[TOK.BOS], TOK.encode("é"), [TOK.EOS, TOK.PAD]])
  assert TOK.decode(ids) == "é"
  assert TOK.decode(TOK.encode(b"a\xffb")) == "a\ufffdb"
  assert set(TOK.encode(bytes(range(256))).tolist()) == set(range(256))


# ---------------------------------------------------------------- stdlib corpus
def test_stdlib_corpus_size_and_dtype(stdlib_corpus):
  c = stdlib_corpus
  assert c.name == "stdlib"
  assert c.train.ndim == 1 and c.valid.ndim == 1
  assert c.train.dtype in (np.uint16, np.int32) and c.valid.dtype == c.train.dtype
  assert c.train.size + c.valid.size > 5_000_000
  assert c.n_train_files > 100 and c.n_valid_files >= 1
  assert int(c.train.max()) <= EOS
  s = c.summary()
  assert s == {"name": "stdlib", "fingerprint": c.fingerprint, "content_fingerprint": c.fingerprint,
               "tokenizer": {"name": "byte", "vocab_size": 259, "fingerprint": "byte"},
               "n_train_files": c.n_train_files, "n_valid_files": c.n_valid_files,
               "train_tokens": c.train.size, "valid_tokens": c.valid.size}
  # Token counts: every file's bytes plus one EOS between consecutive files of each split.
  files = data._stdlib_files()
  assert len(files) == c.n_train_files + c.n_valid_files
  total_bytes = sum(os.path.getsize(full) for _, full in files)
  assert c.train.size + c.valid.size == total_bytes + (c.n_train_files - 1) + (c.n_valid_files - 1)
  assert int(np.sum(c.train == EOS)) == c.n_train_files - 1


def test_stdlib_has_no_test_directories():
  files = data._stdlib_files()
  assert files == sorted(files)
  rels = [rel for rel, _ in files]
  assert "os.py" in rels and "json/__init__.py" in rels
  for rel in rels:
    parts = rel.split("/")
    assert rel.endswith(".py")
    assert not {"test", "tests", "idle_test", "site-packages"} & set(parts[:-1]), rel
  assert not any(r.startswith(("idlelib/idle_test/", "lib2to3/tests/", "test/")) for r in rels)


def test_stdlib_fingerprint_stable(stdlib_corpus):
  again = data.load_corpus("stdlib")
  assert again.fingerprint == stdlib_corpus.fingerprint
  assert len(again.fingerprint) == 64 and int(again.fingerprint, 16) >= 0
  np.testing.assert_array_equal(again.train, stdlib_corpus.train)
  np.testing.assert_array_equal(again.valid, stdlib_corpus.valid)


def test_python_paths_capped_is_deterministic(stdlib_corpus):
  a = data.load_corpus("python_paths", max_bytes=2_000_000)
  b = data.load_corpus("python_paths", max_bytes=2_000_000)
  assert a.fingerprint == b.fingerprint != stdlib_corpus.fingerprint
  np.testing.assert_array_equal(a.train, b.train)
  n_bytes = a.train.size + a.valid.size - (a.n_train_files - 1) - (a.n_valid_files - 1)
  assert 2_000_000 <= n_bytes < 2_000_000 + 2_000_000   # the cap stops after the file that crosses it
  keys = [k for k, _ in data._python_path_files()]
  assert keys == sorted(keys) and len(keys) == len(set(keys))


def test_fingerprint_changes_with_file_set(tmp_path):
  (tmp_path / "a.txt").write_bytes(b"alpha")
  (tmp_path / "b.md").write_bytes(b"beta")

  def fp():
    return data._fingerprint(data._read_files(data._text_dir_files(str(tmp_path)), None))

  first = fp()
  assert fp() == first
  (tmp_path / "c.py").write_bytes(b"gamma")
  added = fp()
  assert added != first
  (tmp_path / "c.py").write_bytes(b"gamma!")
  assert fp() not in (first, added)
  (tmp_path / "c.py").unlink()
  assert fp() == first
  (tmp_path / "b.md").rename(tmp_path / "b2.md")      # same bytes, another name
  assert fp() != first
  (tmp_path / "b2.md").rename(tmp_path / "b.md")
  (tmp_path / "ignored.bin").write_bytes(b"binary")   # not a text file: no change
  assert fp() == first


# ---------------------------------------------------------------- local text through TFDS (array_record)
def test_text_dir_corpus(text_dir):
  root, files = text_dir
  c = data.load_corpus(f"text_dir:{root}")
  assert c.n_train_files + c.n_valid_files == 20
  assert c.n_valid_files == max(1, round(0.02 * 20)) == 1
  assert c.train.size + c.valid.size == sum(len(t) for t in files.values()) + 18
  # The split is by file: the held-out file is the last one in sha1-of-path order, whole, and disjoint.
  rels = sorted(files)
  valid_rels = sorted(sorted(rels, key=lambda r: hashlib.sha1(r.encode()).hexdigest())[-c.n_valid_files:])
  train_rels = [r for r in rels if r not in valid_rels]
  assert set(train_rels).isdisjoint(valid_rels)
  np.testing.assert_array_equal(c.train, _joined([files[r] for r in train_rels]))
  np.testing.assert_array_equal(c.valid, _joined([files[r] for r in valid_rels]))
  assert c.fingerprint == data._fingerprint([(r, files[r]) for r in rels])
  assert (root / ".tfds" / "local_text_builder").is_dir()


def test_text_dir_split_fraction_and_token_counts(text_dir):
  root, files = text_dir
  c = data.load_corpus(f"text_dir:{root}", valid_fraction=0.25)
  assert (c.n_train_files, c.n_valid_files) == (15, 5)
  assert c.train.size == sum(len(t) for t in files.values()) - (c.valid.size - 4) + 14
  valid_text = TOK.decode(c.valid)
  train_text = TOK.decode(c.train)
  for rel, text in files.items():      # each document is wholly in exactly one split
    needle = text.decode("utf-8", errors="replace")
    assert (needle in valid_text) != (needle in train_text), rel


def test_text_dir_reuses_build(text_dir, monkeypatch):
  root, _ = text_dir
  first = data.load_corpus(f"text_dir:{root}")
  builds = sorted(os.listdir(root / ".tfds" / "local_text_builder"))
  assert len(builds) == 1

  def no_rebuild(self):
    raise AssertionError("the dataset was built again")

  monkeypatch.setattr(data._local_text_builder_class(), "_generate_examples", no_rebuild)
  second = data.load_corpus(f"text_dir:{root}")
  assert second.fingerprint == first.fingerprint
  np.testing.assert_array_equal(second.train, first.train)
  np.testing.assert_array_equal(second.valid, first.valid)
  assert sorted(os.listdir(root / ".tfds" / "local_text_builder")) == builds

  # Changed content: a new fingerprint and a new build (so the patched generator must be restored).
  monkeypatch.undo()
  (root / "new.txt").write_bytes(b"one more file")
  third = data.load_corpus(f"text_dir:{root}")
  assert third.fingerprint != first.fingerprint
  assert third.train.size + third.valid.size == first.train.size + first.valid.size + len(b"one more file") + 1
  assert len(os.listdir(root / ".tfds" / "local_text_builder")) == 2


def test_text_dir_max_bytes_and_data_dir(text_dir, tmp_path):
  root, files = text_dir
  rels = sorted(files)
  c = data.load_corpus(f"text_dir:{root}", max_bytes=len(files[rels[0]]) + 1, data_dir=str(tmp_path / "dd"))
  assert c.n_train_files + c.n_valid_files == 2     # the second file crosses the cap and is kept
  assert c.fingerprint == data._fingerprint([(r, files[r]) for r in rels[:2]])
  assert (tmp_path / "dd" / "local_text_builder").is_dir()
  assert not (root / ".tfds").exists()


def test_single_file_is_split_by_tokens(tmp_path):
  text = bytes(range(32, 127)) * 10
  (tmp_path / "only.txt").write_bytes(text)
  c = data.load_corpus(f"text_dir:{tmp_path}", valid_fraction=0.1)
  assert (c.n_train_files, c.n_valid_files) == (1, 1)
  assert c.valid.size == round(0.1 * len(text))
  np.testing.assert_array_equal(np.concatenate([c.train, c.valid]), np.frombuffer(text, np.uint8))


def test_test_split_holds_out_the_documents_before_the_validation_ones_and_leaves_validation_alone(text_dir):
  root, files = text_dir
  plain = data.load_corpus(f"text_dir:{root}", valid_fraction=0.1)
  c = data.load_corpus(f"text_dir:{root}", valid_fraction=0.1, test_fraction=0.15)
  assert (c.n_train_files, c.n_test_files, c.n_valid_files) == (15, 3, 2)
  np.testing.assert_array_equal(c.valid, plain.valid)                # choices made on validation stay comparable
  order = sorted(files, key=lambda r: hashlib.sha1(r.encode()).hexdigest())
  test_rels, valid_rels = sorted(order[-5:-2]), sorted(order[-2:])
  train_rels = [r for r in sorted(files) if r not in test_rels + valid_rels]
  np.testing.assert_array_equal(c.test, _joined([files[r] for r in test_rels]))
  np.testing.assert_array_equal(c.train, _joined([files[r] for r in train_rels]))
  assert c.fingerprint == plain.fingerprint                          # the same content; the split is the config's
  s = c.summary()
  assert (s["n_test_files"], s["test_tokens"]) == (3, c.test.size) and "test_tokens" not in plain.summary()
  assert plain.test.size == 0 and plain.n_test_files == 0


def test_test_split_of_one_document_and_bad_fractions(tmp_path):
  text = bytes(range(32, 127)) * 10
  (tmp_path / "only.txt").write_bytes(text)
  c = data.load_corpus(f"text_dir:{tmp_path}", valid_fraction=0.1, test_fraction=0.2)
  assert (c.n_train_files, c.n_test_files, c.n_valid_files) == (1, 1, 1)
  assert (c.valid.size, c.test.size) == (round(0.1 * len(text)), round(0.2 * len(text)))
  np.testing.assert_array_equal(np.concatenate([c.train, c.test, c.valid]), np.frombuffer(text, np.uint8))
  for bad in (-0.1, 1.0, 0.9, True, "0.1"):                          # 0.9: with valid 0.1 nothing is left to train
    with pytest.raises(ValueError, match="test_fraction must be in"):
      data.load_corpus(f"text_dir:{tmp_path}", valid_fraction=0.1, test_fraction=bad)
  for i in range(2):
    (tmp_path / f"more{i}.txt").write_bytes(b"x" * 10)
  with pytest.raises(ValueError, match="leave none for a test split"):   # 3 documents: 2 validate, 1 must train
    data.load_corpus(f"text_dir:{tmp_path}", valid_fraction=0.6, test_fraction=0.3)


def test_tfds_source_reads_a_prepared_dataset(text_dir):
  """`tfds:NAME` through `tfds.data_source` (download is a no-op for a prepared dataset): keyed by index."""
  root, files = text_dir
  data.load_corpus(f"text_dir:{root}")
  (config,) = os.listdir(root / ".tfds" / "local_text_builder")
  name = f"local_text_builder/{config}"
  c = data.load_corpus(f"tfds:{name}", data_dir=str(root / ".tfds"), valid_fraction=0.1)
  assert c.name == f"tfds:{name}:train"
  assert (c.n_train_files, c.n_valid_files) == (18, 2)
  assert c.train.size + c.valid.size == sum(len(t) for t in files.values()) + 18
  again = data.load_corpus(f"tfds:{name}", data_dir=str(root / ".tfds"), valid_fraction=0.1)
  assert again.fingerprint == c.fingerprint
  np.testing.assert_array_equal(again.train, c.train)
  sliced = data.load_corpus(f"tfds:{name}:1.0.0:train[:5]", data_dir=str(root / ".tfds"))
  assert sliced.n_train_files + sliced.n_valid_files == 5
  with pytest.raises(ValueError, match="no feature 'body'"):
    data.load_corpus(f"tfds:{name}", data_dir=str(root / ".tfds"), text_key="body")


def test_tfds_source_uses_validation_split(tmp_path):
  """A dataset with its own `validation` split: used whole as the validation set."""
  import tensorflow_datasets as tfds

  class TwoSplitText(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples("train", 6), "validation": self._generate_examples("valid", 3)}

    def _generate_examples(self, split, n):
      for i in range(n):
        yield i, {"text": f"{split} record {i} ü"}

  TwoSplitText(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  c = data.load_corpus("tfds:two_split_text", data_dir=str(tmp_path))
  assert (c.n_train_files, c.n_valid_files) == (6, 3)
  assert "valid record" not in TOK.decode(c.train) and "train record" not in TOK.decode(c.valid)
  assert c.valid.size == sum(len(f"valid record {i} ü".encode()) for i in range(3)) + 2


@pytest.mark.parametrize("spec,name,split", [("lm1b", "lm1b", None), ("c4/en:train", "c4/en", "train"),
                                             ("c4/en:3.0.1:validation", "c4/en:3.0.1", "validation"),
                                             ("lm1b:train[:10%]", "lm1b", "train[:10%]")])
def test_tfds_source_parsing(spec, name, split):
  m = data._TFDS_SOURCE.match(spec)
  assert (m.group("name"), m.group("split")) == (name, split)


# ---------------------------------------------------------------- errors
def test_errors_missing_and_empty_dirs(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    data.load_corpus(f"text_dir:{tmp_path / 'nope'}")
  with pytest.raises(ValueError, match="no text files"):
    data.load_corpus(f"text_dir:{tmp_path}")
  (tmp_path / "data.bin").write_bytes(b"binary only")
  with pytest.raises(ValueError, match="no text files"):
    data.load_corpus(f"text_dir:{tmp_path}")
  (tmp_path / "a.txt").write_bytes(b"")
  (tmp_path / "b.md").write_bytes(b"")
  with pytest.raises(ValueError, match="empty corpus"):
    data.load_corpus(f"text_dir:{tmp_path}")


@pytest.mark.parametrize("source", ["nope", "text_dirx:/tmp", "hf:wikitext", ""])
def test_errors_unknown_source(source):
  with pytest.raises(ValueError, match="unknown source"):
    data.load_corpus(source)


def test_errors_bad_arguments():
  with pytest.raises(ValueError, match="valid_fraction"):
    data.load_corpus("stdlib", valid_fraction=0.0)
  with pytest.raises(ValueError, match="max_bytes"):
    data.load_corpus("stdlib", max_bytes=0)
  with pytest.raises(ValueError, match="seq_len must be a positive int"):
    data.train_iterator(np.arange(100), batch_size=2, seq_len=0, seed=0)
  with pytest.raises(ValueError, match="max_batches"):
    data.eval_batches(np.arange(100), batch_size=2, seq_len=4, max_batches=0)


def test_errors_corpus_too_short():
  tokens = np.arange(33, dtype=np.uint16)              # (33 - 1) // 8 = 4 windows
  with pytest.raises(ValueError, match=r"33 tokens.*seq_len=8.*batch_size=5"):
    data.train_iterator(tokens, batch_size=5, seq_len=8, seed=0)
  with pytest.raises(ValueError, match=r"too short.*5 tokens.*seq_len=8"):
    data.train_iterator(tokens[:5], batch_size=1, seq_len=8, seed=0)
  with pytest.raises(ValueError, match="too short for even one eval batch"):
    data.eval_batches(tokens, batch_size=5, seq_len=8, max_batches=2)
  assert data.train_iterator(tokens, batch_size=4, seq_len=8, seed=0) is not None


# ---------------------------------------------------------------- iterators
TOKENS = np.arange(4001, dtype=np.int32)   # distinct values: each window is identifiable by its first token


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_train_iterator_shape_windows_and_targets():
  it = data.train_iterator(TOKENS, batch_size=8, seq_len=16, seed=0)
  assert isinstance(it, grain.DatasetIterator)
  for batch in _take(it, 5):
    assert isinstance(batch, np.ndarray) and batch.dtype == np.int32 and batch.shape == (8, 17)
    starts = batch[:, 0]
    assert np.all(starts % 16 == 0)
    np.testing.assert_array_equal(batch, starts[:, None] + np.arange(17))
    inputs, targets = batch[:, :-1], batch[:, 1:]
    np.testing.assert_array_equal(targets[:, :-1], inputs[:, 1:])   # targets are inputs shifted by one
    np.testing.assert_array_equal(TOKENS[batch], batch)


def test_train_iterator_epochs_cover_every_window_and_reshuffle():
  n_windows = (len(TOKENS) - 1) // 10                    # 400 windows, 40 batches per epoch
  it = data.train_iterator(TOKENS, batch_size=10, seq_len=10, seed=7)
  epoch1 = np.concatenate(_take(it, 40))[:, 0] // 10
  epoch2 = np.concatenate(_take(it, 40))[:, 0] // 10
  np.testing.assert_array_equal(np.sort(epoch1), np.arange(n_windows))
  np.testing.assert_array_equal(np.sort(epoch2), np.arange(n_windows))
  assert not np.array_equal(epoch1, epoch2)
  assert not np.array_equal(epoch1, np.arange(n_windows))


def test_train_iterator_determinism():
  a = _take(data.train_iterator(TOKENS, batch_size=4, seq_len=32, seed=1), 6)
  b = _take(data.train_iterator(TOKENS, batch_size=4, seq_len=32, seed=1), 6)
  c = _take(data.train_iterator(TOKENS, batch_size=4, seq_len=32, seed=2), 6)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not all(np.array_equal(x, z) for x, z in zip(a, c))


def test_train_iterator_resume_bit_identical():
  it = data.train_iterator(TOKENS, batch_size=4, seq_len=32, seed=3)
  _take(it, 5)
  state = it.get_state()
  expected = _take(it, 3)
  fresh = data.train_iterator(TOKENS, batch_size=4, seq_len=32, seed=3)
  fresh.set_state(state)
  for x, y in zip(expected, _take(fresh, 3)):
    np.testing.assert_array_equal(x, y)


def test_train_iterator_resume_across_epoch_boundary():
  tokens = np.arange(6 * 5 + 1, dtype=np.uint16)          # 6 windows of seq_len 5: an epoch is 1.5 batches
  it = data.train_iterator(tokens, batch_size=4, seq_len=5, seed=11)
  first = _take(it, 1)[0]
  state = it.get_state()
  expected = _take(it, 6)                                 # runs through four more epoch boundaries
  starts = np.concatenate([first] + expected)[:, 0] // 5
  for e in range(4):                                      # every epoch of 6 windows is a permutation
    np.testing.assert_array_equal(np.sort(starts[6 * e:6 * e + 6]), np.arange(6))
  fresh = data.train_iterator(tokens, batch_size=4, seq_len=5, seed=11)
  fresh.set_state(state)
  for x, y in zip(expected, _take(fresh, 6)):
    assert x.dtype == np.int32
    np.testing.assert_array_equal(x, y)


def test_train_iterator_orbax_round_trip(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  it = data.train_iterator(TOKENS, batch_size=4, seq_len=32, seed=5)
  _take(it, 5)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  expected = _take(it, 3)
  restored = data.train_iterator(TOKENS, batch_size=4, seq_len=32, seed=5)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    assert mngr.latest_step() == 5
    mngr.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  for x, y in zip(expected, _take(restored, 3)):
    np.testing.assert_array_equal(x, y)


def test_eval_batches_deterministic_and_evenly_spaced():
  a = data.eval_batches(TOKENS, batch_size=4, seq_len=10, max_batches=5)
  b = data.eval_batches(TOKENS.astype(np.uint16), batch_size=4, seq_len=10, max_batches=5)
  assert len(a) == 5
  for x, y in zip(a, b):
    assert x.dtype == np.int32 and x.shape == (4, 11)
    np.testing.assert_array_equal(x, y)
  windows = np.concatenate(a)[:, 0] // 10
  np.testing.assert_array_equal(windows, np.arange(20) * 400 // 20)   # 400 windows, every 20th
  for x in a:
    np.testing.assert_array_equal(x, x[:, :1] + np.arange(11))
  few = data.eval_batches(TOKENS[:201], batch_size=4, seq_len=10, max_batches=100)   # 20 windows: 5 batches
  assert len(few) == 5
  np.testing.assert_array_equal(np.concatenate(few)[:, 0] // 10, np.arange(20))


def test_eval_batches_on_stdlib_valid(stdlib_corpus):
  a = data.eval_batches(stdlib_corpus.valid, batch_size=8, seq_len=128, max_batches=4)
  b = data.eval_batches(stdlib_corpus.valid, batch_size=8, seq_len=128, max_batches=4)
  assert len(a) == 4
  for x, y in zip(a, b):
    assert x.dtype == np.int32 and x.shape == (8, 129) and int(x.max()) <= EOS
    np.testing.assert_array_equal(x, y)
