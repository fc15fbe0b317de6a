"""Tests for bitnet_jax/train.py, configs/lm.py and bitnet_jax/compare.py: runs, exact resume, NaN stop, errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax import compare, generate, train
from configs import lm
from configs.common import parse_arg

ROOT = Path(__file__).resolve().parents[1]


def _tiny(variant="b158-tiny", **train_overrides):
  config = lm.get_config(variant)
  config.train.update({**dict(steps=12, eval_every=6, checkpoint_every=4, log_every=1), **train_overrides})
  config.data.eval_batches = 2
  return config


def _rows(workdir):
  return [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines() if l.strip()]


# ---------------------------------------------------------------- a run and its outputs
def test_tiny_run_writes_metrics_checkpoints_and_summary(tmp_path):
  summary = train.train_and_evaluate(_tiny(), tmp_path, progress=False)
  rows = _rows(tmp_path)
  assert [r["step"] for r in rows] == list(range(1, 13))
  for r in rows:
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(r) and np.isfinite(r["loss"])
  evals = [r for r in rows if "eval_loss" in r]
  assert [r["step"] for r in evals] == [6, 12]
  assert evals[-1]["eval_ppl"] == pytest.approx(np.exp(evals[-1]["eval_loss"]))
  assert rows[-1]["loss"] < rows[0]["loss"]
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [4, 8, 12]
  data_record = json.loads((tmp_path / "data.json").read_text())
  assert len(data_record["fingerprint"]) == 64
  assert summary["eval_loss"] == pytest.approx(evals[-1]["eval_loss"], rel=1e-6)
  mem = summary["weight_memory"]
  assert mem["packed_1.6bit_mb"] < mem["packed_2bit_mb"] < mem["trained_mb"] / 2


def _tensorboard_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
  """Reads TFRecord-framed Event protos (u64 length, u32 crc, payload, u32 crc) from the event files."""
  from tensorboardX.proto import event_pb2
  out: dict[str, list[tuple[int, float]]] = {}
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    buf, pos = path.read_bytes(), 0
    while pos < len(buf):
      n = int.from_bytes(buf[pos:pos + 8], "little")
      event = event_pb2.Event.FromString(buf[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      for v in event.summary.value:
        out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


def test_tensorboard_events_mirror_metrics(tmp_path):
  train.train_and_evaluate(_tiny(), tmp_path, progress=False)
  scalars = _tensorboard_scalars(tmp_path / "tensorboard")
  rows = _rows(tmp_path)
  assert [s for s, _ in scalars["train/loss"]] == [r["step"] for r in rows]
  np.testing.assert_allclose([v for _, v in scalars["train/loss"]], [r["loss"] for r in rows], rtol=1e-6)
  assert [s for s, _ in scalars["eval/eval_loss"]] == [6, 12]
  assert {"train/lr", "train/grad_norm", "train/tokens_per_s", "eval/eval_ppl"} <= set(scalars)


def test_finished_run_is_not_retrained(tmp_path):
  train.train_and_evaluate(_tiny(), tmp_path, progress=False)
  before = (tmp_path / "metrics.jsonl").read_text()
  summary = train.train_and_evaluate(_tiny(), tmp_path, progress=False)
  assert summary["resumed_from"] == 12 and (tmp_path / "metrics.jsonl").read_text() == before


def test_resume_in_process_matches_uninterrupted(tmp_path):
  """Stop after 8 steps, continue to 12: every later loss equals the straight 12-step run's, bitwise."""
  train.train_and_evaluate(_tiny(), tmp_path / "straight", progress=False)
  train.train_and_evaluate(_tiny(), tmp_path / "resumed", progress=False, stop_at_step=8)
  summary = train.train_and_evaluate(_tiny(), tmp_path / "resumed", progress=False)
  assert summary["resumed_from"] == 8
  straight, resumed = _rows(tmp_path / "straight"), _rows(tmp_path / "resumed")
  assert [(r["step"], r["loss"]) for r in resumed] == [(r["step"], r["loss"]) for r in straight]


def test_sigkill_at_an_arbitrary_step_then_resume_is_bitwise_exact(tmp_path):
  """A real SIGKILL of the CLI mid-run; the restarted run's losses equal an uninterrupted run's at every step."""
  args = ["--config=configs/lm.py:b158-tiny", "--config.train.steps=120", "--config.train.checkpoint_every=10",
          "--config.train.log_every=1", "--config.train.eval_every=60", "--config.data.eval_batches=2"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}

  def run(workdir, **kw):
    return subprocess.Popen([sys.executable, "-m", "bitnet_jax.train", f"--workdir={workdir}", *args], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)

  straight = run(tmp_path / "straight")
  victim = run(tmp_path / "killed")
  metrics = tmp_path / "killed" / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline:   # kill once it is past its second checkpoint, between checkpoints
    n = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    if n >= 27 or victim.poll() is not None:
      break
    time.sleep(0.005)
  assert victim.poll() is None, "the run finished before it could be killed"
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  killed_at = len(metrics.read_text().splitlines())
  assert 27 <= killed_at < 120
  resumed = run(tmp_path / "killed")
  for p in (straight, resumed):
    assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-3000:]
  a, b = _rows(tmp_path / "straight"), _rows(tmp_path / "killed")
  assert [r["step"] for r in b] == list(range(1, 121))
  assert [(r["step"], r["loss"]) for r in b] == [(r["step"], r["loss"]) for r in a]
  assert [r.get("eval_loss") for r in b] == [r.get("eval_loss") for r in a]


def test_non_finite_loss_stops_without_checkpointing_the_bad_state(tmp_path, monkeypatch):
  real_step, calls = train.train_step, {"n": 0}

  def poisoned(model, optimizer, batch, **kwargs):
    calls["n"] += 1
    loss, grad_norm, lr = real_step(model, optimizer, batch, **kwargs)
    return (jnp.float32(jnp.nan) if calls["n"] == 6 else loss), grad_norm, lr

  monkeypatch.setattr(train, "train_step", poisoned)
  with pytest.raises(train.NonFiniteLossError,
                     match=r"loss is nan \(gradient norm .*\) at step 6.*last checkpoint, step 4, holds finite state"):
    train.train_and_evaluate(_tiny(), tmp_path, progress=False)
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [4]
  assert max(r["step"] for r in _rows(tmp_path)) == 5


# ---------------------------------------------------------------- bad input
# ---------------------------------------------------------------- quantisation warm-up
def test_quant_warmup_ramps_lambda_and_checkpoints_it(tmp_path, monkeypatch):
  from flax import nnx

  from bitnet_jax import optim
  from bitnet_jax.layers import BitLinear
  from bitnet_jax.model import Transformer

  config = _tiny(steps=4, eval_every=4, checkpoint_every=4, quant_warmup_steps=2)
  model_cfg = train.model_config_from(config)
  assert model_cfg.quant_warmup
  model = Transformer(model_cfg, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optim.make_optimizer(config.optim, 4), wrt=nnx.Param)
  layers = [m for _, m in nnx.iter_graph(model) if isinstance(m, BitLinear) and m.weight_quant != "none"]
  batch = jnp.zeros((2, 17), jnp.int32)
  seen = []
  for _ in range(4):
    train.train_step(model, optimizer, batch, quant_warmup_steps=2)
    values = {float(layer.quant_mix[...]) for layer in layers}
    assert len(values) == 1
    seen.append(values.pop())
  assert seen == [0.0, 0.5, 1.0, 1.0]   # lambda at the update's step: FP forward first, quantised from step 2
  # Through the trainer: the run finishes fully quantised, and its checkpoint restores lambda.
  summary = train.train_and_evaluate(config, tmp_path, progress=False)
  assert np.isfinite(summary["eval_loss"])
  read = []   # what load_checkpoint asks orbax for: the model alone, not the optimiser state beside it
  real_restore = train.ocp.CheckpointManager.restore
  monkeypatch.setattr(train.ocp.CheckpointManager, "restore",
                      lambda self, *a, **k: read.append(real_restore(self, *a, **k)) or read[-1])
  restored, _ = train.load_checkpoint(tmp_path)
  assert [set(r.state) for r in read if "state" in r.keys()] == [{"model"}]   # (and the step's checksums)
  assert {float(m.quant_mix[...]) for _, m in nnx.iter_graph(restored)
          if isinstance(m, BitLinear) and m.quant_mix is not None} == {1.0}


def test_fine_tuning_an_fp_run_into_b158_with_warmup(tmp_path):
  from bitnet_jax.interop import hf

  fp_dir, hf_dir = tmp_path / "fp", tmp_path / "fp-hf"
  train.train_and_evaluate(_tiny("fp-tiny", steps=12), fp_dir, progress=False)
  fp_model, _ = train.load_checkpoint(fp_dir)
  hf.save(fp_model, hf_dir)   # the LLaMA layout: the same weights through the HF route
  from_hf = train.load_init_source(f"hf:{hf_dir}")
  target = train.load_init_source(f"run:{fp_dir}")
  np.testing.assert_array_equal(np.asarray(from_hf.blocks[0].ffn.up_proj.kernel[...]),
                                np.asarray(target.blocks[0].ffn.up_proj.kernel[...]))
  scratch = _rows(tmp_path / "scratch") if train.train_and_evaluate(
      _tiny(steps=6, eval_every=6, checkpoint_every=6), tmp_path / "scratch", progress=False) else None
  tuned_dir = tmp_path / "tuned"
  config = _tiny(steps=6, eval_every=6, checkpoint_every=6, quant_warmup_steps=3, init_from=f"hf:{hf_dir}")
  summary = train.train_and_evaluate(config, tuned_dir, progress=False)
  tuned = _rows(tuned_dir)
  # Starting from the trained FP weights (lambda 0: the FP forward but for the new o/down input norms) beats a
  # random start, and the loss falls while lambda ramps to 1.
  assert tuned[0]["loss"] < scratch[0]["loss"] and tuned[-1]["loss"] < tuned[0]["loss"]
  assert np.isfinite(summary["eval_loss"])
  model, _ = train.load_checkpoint(tuned_dir)
  assert float(model.blocks[0].attn.q_proj.quant_mix[...]) == 1.0   # fully quantised by the end
  with pytest.raises(ValueError, match="must be 'hf:DIR' or 'run:WORKDIR'"):
    train.load_init_source("s3://bucket")
  with pytest.raises(ValueError, match="does not fit this config"):   # the b158 run is no FP source for fp
    train.train_and_evaluate(_tiny("fp-tiny", steps=2, init_from=f"run:{tuned_dir}"), tmp_path / "bad",
                             progress=False)


def test_quant_warmup_needs_a_quantised_variant_and_a_non_negative_int(tmp_path):
  with pytest.raises(ValueError, match="needs a quantised variant"):
    train.train_and_evaluate(_tiny("fp-tiny", quant_warmup_steps=3), tmp_path, progress=False)
  with pytest.raises(ValueError, match="quant_warmup_steps must be a non-negative int"):
    train.train_and_evaluate(_tiny(quant_warmup_steps=-1), tmp_path, progress=False)


def test_sequence_longer_than_the_model_is_refused(tmp_path):
  config = _tiny()
  config.train.seq_len = config.model.max_seq_len + 1
  with pytest.raises(ValueError, match=r"seq_len=129 is longer than the model's maximum"):
    train.train_and_evaluate(config, tmp_path, progress=False)


def test_batch_not_divisible_by_devices_is_refused():
  code = ("import sys; sys.path.insert(0, '.'); from bitnet_jax import train; from configs import lm\n"
          "c = lm.get_config('b158-tiny'); c.train.batch_size = 6\n"
          "try:\n  train.train_and_evaluate(c, '/tmp/never', progress=False)\n"
          "except ValueError as e:\n  print('ERR', e)\n")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert "ERR config.train.batch_size=6 is not divisible by the 4 data-parallel shards" in out.stdout, out.stderr


def test_missing_corpus_is_refused(tmp_path):
  config = _tiny()
  config.data.source = f"text_dir:{tmp_path / 'nowhere'}"
  with pytest.raises(ValueError, match="nowhere"):
    train.train_and_evaluate(config, tmp_path / "run", progress=False)


# ---------------------------------------------------------------- configs
def test_config_variants_and_arg_parsing():
  for name, variant in [("b158-tiny", "b158"), ("fp-small", "fp"), ("bitnet-tiny", "bitnet")]:
    config = lm.get_config(name)
    assert config.model.variant == variant and config.train.steps > 0
  assert lm.get_config("b158-tiny,steps=7,batch=4").train.steps == 7
  assert lm.get_config("fp-tiny,smoke").train.steps == 20
  big = lm.get_config("b158-700m")
  assert (big.model.d_model, big.model.n_layers, big.optim.lr, big.optim.lr2) == (1536, 24, 1.5e-3, 1e-3)
  assert lm.get_config("bitnet-1.3b").optim.lr == 8e-4   # BitNet Table 5
  with pytest.raises(ValueError, match="unknown key 'stepz'"):
    lm.get_config("b158-tiny,stepz=3")
  with pytest.raises(ValueError, match="unknown config variant 'b158-huge'"):
    lm.get_config("b158-huge")
  assert parse_arg("x,flag", variant="a", flag=False).to_dict() == {"variant": "x", "flag": True}


def test_cli_runs_and_accepts_overrides(tmp_path):
  out = subprocess.run([sys.executable, "-m", "bitnet_jax.train", "--config=configs/lm.py:fp-tiny",
                        f"--workdir={tmp_path}", "--config.train.steps=4", "--config.train.eval_every=4",
                        "--config.data.eval_batches=1"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-3000:]
  assert "fp-tiny (fp): 4 steps" in out.stdout and "eval loss" in out.stdout
  bad = subprocess.run([sys.executable, "-m", "bitnet_jax.train", "--config=configs/lm.py:fp-tiny",
                        f"--workdir={tmp_path}/b", "--config.train.stepz=4"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert bad.returncode != 0 and "stepz" in bad.stderr


def test_compare_job_prints_a_table_and_plots(tmp_path, capsys):
  result = compare.main([f"--workdir={tmp_path}", "--size=tiny", "--steps=6", "--sample-tokens=8"])
  out = capsys.readouterr().out
  assert set(result) == {"b158-tiny", "fp-tiny"}
  assert "| b158-tiny |" in out and "| fp-tiny |" in out and "sample (temperature 0.8, top-p 0.95, seed 0)" in out
  assert (tmp_path / "loss_curves.png").stat().st_size > 10_000
  assert result["b158-tiny"]["sample"].startswith(compare.PROMPT) and len(result["b158-tiny"]["sample"]) > 0
  # the same seed gives the same text; temperature 0 is greedy decoding
  run = tmp_path / "b158-tiny"
  assert compare.sample(run, 8) == result["b158-tiny"]["sample"]
  greedy = compare.sample(run, 8, temperature=0.0)
  model, tok = generate.load_run(run)
  reference = generate.greedy(model, jnp.asarray(tok.encode(compare.PROMPT), jnp.int32)[None], 8)
  assert greedy == tok.decode(np.asarray(reference[0]))


def test_compiler_options_give_ynnpack_dots_only_on_cpu_and_yield_to_xla_flags(monkeypatch):
  """The train and eval steps hand XLA:CPU's library fusions dots only (`train.compiler_options`); nothing on other
  backends, and nothing when XLA_FLAGS already sets the option (the user's choice wins)."""
  train.compiler_options.cache_clear()
  opts = train.compiler_options("cpu")
  assert opts == {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
  assert train.compiler_options("gpu") == {} and train.compiler_options("tpu") == {}
  train.compiler_options.cache_clear()
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise")
  assert train.compiler_options("cpu") == {}
  train.compiler_options.cache_clear()
  # A reduction compiled with the options is not a library (ynn) fusion; the dot still is.
  f = jax.jit(lambda x, w: jnp.sum(jnp.square(x @ w), axis=-1), compiler_options=opts)
  x = jnp.ones((64, 32), jnp.float32)
  hlo = f.lower(x, x.T).compile().as_text()
  ynn = [line for line in hlo.splitlines() if "__ynn_fusion" in line and " fusion(" in line]
  assert ynn and all("dot" in line for line in ynn), ynn
