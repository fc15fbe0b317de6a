"""Tests for run integrity (bitnet_jax/checkpoint.py, bitnet_jax/runs.py and the trainer's use of them): non-finite
state never saved, refused resumes that write nothing, checkpoint checksums and fallback, metrics repair, the
workdir lock, failed saves, and the one-line errors of the CLIs on these faults."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from bitnet_jax import checkpoint, generate, runs, train
from bitnet_jax.tokenizer import ByteTokenizer
from configs import lm

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _tiny(**train_overrides):
  config = lm.get_config("b158-tiny")
  config.train.update({**dict(steps=12, eval_every=6, checkpoint_every=4, log_every=1), **train_overrides})
  config.data.eval_batches = 2
  return config


def _rows(workdir):
  return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _steps(workdir):
  return sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def _snapshot(workdir):
  return {name: (Path(workdir) / name).read_bytes() for name in ("config.json", "data.json", "metrics.jsonl")}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished 12-step run (checkpoints at 4, 8, 12) and its metrics; tests copy it before changing it."""
  workdir = tmp_path_factory.mktemp("finished") / "run"
  train.train_and_evaluate(_tiny(), workdir, progress=False)
  return workdir


def _copy(finished, tmp_path):
  shutil.copytree(finished, tmp_path / "run")
  return tmp_path / "run"


def _largest_data_file(workdir, step):
  files = (Path(workdir) / "checkpoints" / str(step) / "state").rglob("d/*")
  return max((f for f in files if f.is_file()), key=lambda f: f.stat().st_size)


def _cli(module, *args, timeout=300, env=None):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout, env=env or ENV)


# ---------------------------------------------------------------- checksums
@pytest.mark.parametrize("dtype", [np.float32, np.int32, np.uint32, np.int8, jnp.bfloat16])
def test_array_checksum_matches_numpy_oracle(dtype):
  x = np.random.default_rng(0).normal(size=(37, 11)).astype(np.float32) * 100
  x = np.asarray(jnp.asarray(x).astype(dtype))
  u = x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]).reshape(-1).astype(np.uint64)
  w = np.arange(u.size, dtype=np.uint64) * 2 + 1
  oracle = [int(u.sum() % 2**32), int(((u * w) % 2**32).sum() % 2**32)]
  assert [int(v) for v in checkpoint.array_checksum(jnp.asarray(x))] == oracle


def test_checksum_sees_a_changed_element_and_a_swap():
  x = jnp.arange(1000, dtype=jnp.float32)
  base = np.asarray(checkpoint.array_checksum(x))
  zeroed = np.asarray(checkpoint.array_checksum(x.at[500].set(0.0)))
  swapped = np.asarray(checkpoint.array_checksum(x.at[3].set(x[7]).at[7].set(x[3])))
  assert not np.array_equal(base, zeroed) and not np.array_equal(base, swapped)
  assert base[0] == swapped[0]   # the plain sum cannot see a swap; the position-weighted one does


def test_verify_names_non_finite_and_changed_arrays():
  tree = {"a": jnp.ones(4), "b": jnp.zeros(3, jnp.int32)}
  sums = checkpoint.tree_checksums(tree)
  checkpoint.verify(tree, sums, "x")
  with pytest.raises(checkpoint.CheckpointError, match=r"fails its checksums in 1 arrays \(\['a'\]\)"):
    checkpoint.verify({**tree, "a": jnp.ones(4).at[1].set(2.0)}, sums, "x")
  with pytest.raises(checkpoint.CheckpointError, match=r"non-finite values in 1 arrays \(\['a'\]\)"):
    checkpoint.verify({**tree, "a": jnp.ones(4).at[1].set(jnp.nan)}, None, "x")


# ---------------------------------------------------------------- non-finite state is never saved
def test_diverging_run_names_a_finite_last_checkpoint(tmp_path):
  """The issue's command: lr 1e6 with a checkpoint every step. The state the bad update produced is not saved, and
  the checkpoint the message names exists and restores finite."""
  config = _tiny(steps=40, checkpoint_every=1)
  config.optim.lr = config.optim.lr2 = 1e6
  with pytest.raises(train.NonFiniteLossError, match=r"last checkpoint, step (\d+), holds finite state") as info:
    train.train_and_evaluate(config, tmp_path, progress=False)
  named = int(re.search(r"last checkpoint, step (\d+)", str(info.value)).group(1))
  assert _steps(tmp_path)[-1] == named
  model, _ = train.load_checkpoint(tmp_path, step=named)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(nnx.state(model)) if x.dtype == jnp.float32)


def test_an_update_that_poisons_the_weights_is_not_saved(tmp_path, monkeypatch):
  """A finite loss and gradient norm, but the update made a weight NaN: the save of that step refuses."""
  real_step, calls = train.train_step, {"n": 0}

  def poisoning(model, optimizer, batch, **kwargs):
    calls["n"] += 1
    out = real_step(model, optimizer, batch, **kwargs)
    if calls["n"] == 6:
      model.embed[...] = model.embed[...].at[0, 0].set(jnp.inf)
    return out

  monkeypatch.setattr(train, "train_step", poisoning)
  with pytest.raises(train.NonFiniteLossError, match=r"update of step 6 made 1 arrays non-finite .*embed.*"
                     r"last checkpoint, step 5"):
    train.train_and_evaluate(_tiny(checkpoint_every=1), tmp_path, progress=False)
  assert _steps(tmp_path) == [3, 4, 5]   # the last 3 kept


# ---------------------------------------------------------------- resume checks before anything is written
@pytest.mark.parametrize("key,value", [("optim.lr", float("nan")), ("optim.lr", -1e-3),
                                       ("train.init_from", "run:/nonexistent/run")])
def test_a_refused_fresh_run_leaves_no_workdir(tmp_path, key, value):
  config = _tiny()
  section, field = key.split(".")
  config[section][field] = value
  with pytest.raises((ValueError, FileNotFoundError), match=rf"{field}"):
    train.train_and_evaluate(config, tmp_path / "run", progress=False)
  assert not (tmp_path / "run").exists()



@pytest.mark.parametrize("section,key,value", [
    ("model", "d_model", 128), ("model", "weight_quant", "none"), ("train", "batch_size", 4),
    ("train", "seq_len", 32), ("train", "steps", 24), ("train", "seed", 1), ("optim", "lr", 1e-2),
    ("data", "valid_fraction", 0.05)])
def test_a_resume_that_changes_the_run_is_refused_and_writes_nothing(finished, tmp_path, section, key, value):
  workdir = _copy(finished, tmp_path)
  before, history = _snapshot(workdir), (workdir / runs.HISTORY_NAME).read_text()
  config = _tiny()
  config[section][key] = value
  old = json.loads(before["config.json"])[section][key]
  with pytest.raises(runs.ResumeRefused, match=rf"{section}\.{key}: {old!r} -> {value!r}.*"
                                                rf"--config\.{section}\.{key}={old}"):
    train.train_and_evaluate(config, workdir, progress=False)
  assert _snapshot(workdir) == before and (workdir / runs.HISTORY_NAME).read_text() == history
  assert not (workdir / runs.LOCK_NAME).exists()   # released


def test_safe_changes_resume_and_are_recorded(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  summary = train.train_and_evaluate(_tiny(eval_every=3, log_every=2), workdir, progress=False)
  assert summary["resumed_from"] == 12
  last = json.loads((workdir / runs.HISTORY_NAME).read_text().splitlines()[-1])
  assert last["changes"] == {"train.eval_every": [6, 3], "train.log_every": [1, 2]} and last["start_step"] == 12


def test_more_steps_are_allowed_only_where_the_trained_schedule_is_unchanged(tmp_path):
  config = _tiny(steps=8, checkpoint_every=4)
  config.optim = ml_collections.ConfigDict({**config.optim.to_dict(), "recipe": "constant", "warmup_steps": 0})
  train.train_and_evaluate(config, tmp_path, progress=False)
  more = _tiny(steps=12, checkpoint_every=4)
  more.optim = config.optim
  assert train.train_and_evaluate(more, tmp_path, progress=False)["resumed_from"] == 8
  assert _steps(tmp_path)[-1] == 12
  assert json.loads((tmp_path / runs.HISTORY_NAME).read_text().splitlines()[-1])["changes"] == {
      "train.steps": [8, 12]}


def test_a_changed_tokenizer_or_corpus_is_refused(finished):
  config = json.loads((finished / "config.json").read_text())
  data = json.loads((finished / "data.json").read_text())
  runs.check_resume(finished, config, data, 12)
  with pytest.raises(runs.ResumeRefused, match=r"tokenizer: .*not the file the run was trained with"):
    runs.check_resume(finished, config, {**data, "tokenizer": {**data["tokenizer"], "fingerprint": "x"}}, 12)
  with pytest.raises(runs.ResumeRefused, match=r"data: .*the corpus stdlib changed"):
    runs.check_resume(finished, config, {**data, "fingerprint": "0" * 64}, 12)


def test_generate_and_export_verify_the_tokenizer_and_export_refuses_a_run_dir(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  runs.check_tokenizer(workdir, ByteTokenizer())
  record = json.loads((workdir / "data.json").read_text())
  record["tokenizer"]["fingerprint"] = "sha256:another-file"
  (workdir / "data.json").write_text(json.dumps(record))
  with pytest.raises(ValueError, match="is not the one .* was trained with"):
    generate.load_run(workdir)
  for out in (workdir, workdir / "config.json", workdir / "checkpoints" / "x"):
    with pytest.raises(ValueError, match="would overwrite the run"):
      runs.check_not_a_run(out, workdir)
  with pytest.raises(ValueError, match="holds a training run"):
    runs.check_not_a_run(finished, workdir)
  runs.check_not_a_run(tmp_path / "export", workdir)


# ---------------------------------------------------------------- checkpoint integrity and fallback
def _zero_bytes(workdir, step):
  f = _largest_data_file(workdir, step)
  with open(f, "r+b") as handle:
    handle.seek(f.stat().st_size // 2)
    handle.write(b"\0" * 8)


def _delete_a_file(workdir, step):
  _largest_data_file(workdir, step).unlink()


def _garble_metadata(workdir, step):
  (Path(workdir) / "checkpoints" / str(step) / "state" / "_METADATA").write_text("{garbled")


def _delete_checksums(workdir, step):
  shutil.rmtree(Path(workdir) / "checkpoints" / str(step) / checkpoint.CHECKSUMS)


@pytest.mark.parametrize("damage", [_zero_bytes, _delete_a_file, _garble_metadata, _delete_checksums])
def test_a_damaged_latest_step_is_skipped_and_training_continues_exactly(finished, tmp_path, capfd, damage):
  workdir = _copy(finished, tmp_path)
  rows = _rows(workdir)
  damage(workdir, 12)
  summary = train.train_and_evaluate(_tiny(), workdir, progress=False)
  err = capfd.readouterr().err
  assert "checkpoint step 12 in" in err and "unusable" in err and "moved to" in err
  assert summary["resumed_from"] == 8 and (workdir / checkpoint.CORRUPT_DIR / "12").is_dir()
  assert _steps(workdir) == [4, 8, 12]
  assert [(r["step"], r["loss"]) for r in _rows(workdir)] == [(r["step"], r["loss"]) for r in rows]


def test_load_checkpoint_falls_back_unless_a_step_is_named(finished, tmp_path, capfd):
  workdir = _copy(finished, tmp_path)
  for f in (workdir / "checkpoints" / "12" / "state").rglob("d/*"):   # the model's arrays too
    f.write_bytes(b"\0" * f.stat().st_size)
  with pytest.raises(checkpoint.CheckpointError, match="no intact checkpoint .*step 12: "):
    train.load_checkpoint(workdir, step=12)
  model, _ = train.load_checkpoint(workdir)
  assert "warning: checkpoint step 12 in" in capfd.readouterr().err
  reference, _ = train.load_checkpoint(finished, step=8)
  for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(reference))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_no_intact_step_is_a_clear_error(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  for step in _steps(workdir):
    _zero_bytes(workdir, step)
  with pytest.raises(checkpoint.CheckpointError, match=r"no intact checkpoint .*step 12: .*step 8: .*step 4: "):
    train.train_and_evaluate(_tiny(), workdir, progress=False)


# ---------------------------------------------------------------- metrics.jsonl
def test_a_torn_last_metrics_line_is_dropped_and_a_bad_middle_line_named(finished, tmp_path, capfd):
  workdir = tmp_path / "run"
  train.train_and_evaluate(_tiny(), workdir, progress=False, stop_at_step=8)
  with (workdir / "metrics.jsonl").open("a") as f:
    f.write('{"step": 9, "loss": 2.')   # killed mid-write
  summary = train.train_and_evaluate(_tiny(), workdir, progress=False)
  assert "dropping its torn last line" in capfd.readouterr().err and summary["resumed_from"] == 8
  assert [(r["step"], r["loss"]) for r in _rows(workdir)] == [(r["step"], r["loss"]) for r in _rows(finished)]
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  (workdir / "metrics.jsonl").write_text("\n".join(lines[:3] + ["garbage"] + lines[3:]) + "\n")
  with pytest.raises(ValueError, match=r"metrics.jsonl line 4 is not a metrics row"):
    runs.read_metrics(workdir / "metrics.jsonl")


# ---------------------------------------------------------------- the workdir lock
def test_a_held_lock_stops_a_second_trainer(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
      import sys, time
      from bitnet_jax import runs
      with runs.WorkdirLock({str(tmp_path)!r}):
        print("held", flush=True)
        time.sleep(60)
      """)], cwd=ROOT, stdout=subprocess.PIPE, text=True, env=ENV)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(runs.WorkdirLocked, match=rf"in use by another trainer \(host .*, pid {holder.pid}"):
      train.train_and_evaluate(_tiny(), tmp_path, progress=False)
    assert not (tmp_path / "config.json").exists()
  finally:
    holder.kill()
    holder.wait()
  # the holder was killed: its lock is stale, and the next trainer takes it over
  assert json.loads((tmp_path / runs.LOCK_NAME).read_text())["pid"] == holder.pid
  with runs.WorkdirLock(tmp_path):
    assert json.loads((tmp_path / runs.LOCK_NAME).read_text())["pid"] == os.getpid()
  assert not (tmp_path / runs.LOCK_NAME).exists()


def test_a_lock_written_by_another_host_is_not_taken(tmp_path):
  (tmp_path / runs.LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "then"}))
  with pytest.raises(runs.WorkdirLocked, match="written by host elsewhere .* delete .*LOCK"):
    runs.WorkdirLock(tmp_path).acquire()


# ---------------------------------------------------------------- CLIs: one line, nothing lost
def test_cli_nan_run_prints_one_line_and_generate_still_works(tmp_path):
  """The issue's reproduction, end to end through the CLIs."""
  out = _cli("bitnet_jax.train", "--config=configs/lm.py:b158-tiny", f"--workdir={tmp_path}",
             "--config.train.steps=40", "--config.train.checkpoint_every=1", "--config.optim.lr=1e6",
             "--config.optim.lr2=1e6")
  assert out.returncode == 1 and "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines()[-1].startswith("train: error: loss is")
  gen = _cli("bitnet_jax.generate", f"--workdir={tmp_path}", "--max_new_tokens=8")
  assert gen.returncode == 0, gen.stderr[-2000:]
  assert "\x00" not in gen.stdout


def test_cli_refused_resume_and_debug_traceback(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  before = _snapshot(workdir)
  args = ["--config=configs/lm.py:b158-tiny", f"--workdir={workdir}", "--config.train.steps=12",
          "--config.train.eval_every=6", "--config.train.checkpoint_every=4", "--config.train.log_every=1",
          "--config.data.eval_batches=2", "--config.model.d_model=128"]
  out = _cli("bitnet_jax.train", *args)
  assert out.returncode == 1 and out.stderr.strip().splitlines() == [
      f"train: error: {workdir} holds a run (step 12) that this config would change: model.d_model: 64 -> 128; "
      f"to resume it pass --config.model.d_model=64, or use another --workdir"]
  debug = _cli("bitnet_jax.train", *args, "--debug")
  assert debug.returncode == 1 and "Traceback" in debug.stderr and "ResumeRefused" in debug.stderr
  assert _snapshot(workdir) == before


def test_ctrl_c_stops_with_one_line_and_the_newest_step_intact(tmp_path):
  proc = subprocess.Popen([sys.executable, "-m", "bitnet_jax.train", "--config=configs/lm.py:b158-tiny",
                           f"--workdir={tmp_path}", "--config.train.steps=2000", "--config.train.checkpoint_every=2",
                           "--config.train.log_every=1"], cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, env=ENV)
  deadline = time.time() + 240
  while time.time() < deadline and not (tmp_path / "checkpoints" / "4").exists():
    time.sleep(0.2)
  proc.send_signal(signal.SIGINT)
  err = proc.communicate(timeout=240)[1]
  assert proc.returncode == 130 and err.strip().splitlines()[-1] == "train: interrupted", err[-3000:]
  assert "Traceback" not in err and not (tmp_path / runs.LOCK_NAME).exists()
  train.load_checkpoint(tmp_path, step=_steps(tmp_path)[-1])   # the newest finalised step is whole: it verifies


def test_a_failed_save_stops_the_run_and_keeps_the_earlier_checkpoints(tmp_path):
  """A disk that fills up: writes past 200 kB fail (RLIMIT_FSIZE, EFBIG) after the first run saved steps 4, 8."""
  script = textwrap.dedent(f"""
      import resource, sys
      from bitnet_jax import cli, train
      from configs import lm
      config = lm.get_config("b158-tiny")
      config.train.update(steps=12, eval_every=6, checkpoint_every=4, log_every=1)
      config.data.eval_batches = 2
      train.train_and_evaluate(config, {str(tmp_path)!r}, progress=False, stop_at_step=8)
      resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
      cli.run("train", lambda _: train.train_and_evaluate(config, {str(tmp_path)!r}, progress=False), [])
      """)
  out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=ENV)
  assert out.returncode == 1, out.stderr[-3000:]
  lines = [line for line in out.stderr.splitlines() if "Warning" not in line and "lr_sched" not in line]
  assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]   # nothing but the error line
  assert lines[0].startswith("train: error: saving the checkpoint of step 12") and "File too large" in lines[0]
  assert "the last complete checkpoint is step 8" in lines[0]
  assert _steps(tmp_path) == [4, 8]
  summary = train.train_and_evaluate(_tiny(), tmp_path, progress=False)   # space is back: it resumes
  assert summary["resumed_from"] == 8 and _steps(tmp_path) == [4, 8, 12]
