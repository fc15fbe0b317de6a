"""experiments/lr_sweep: the smoke sweep end to end, resume/skip, divergence handling, the optimum, bad arguments."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from bitnet_jax import optim, train

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
  spec = importlib.util.spec_from_file_location(f"experiments_{name}", ROOT / "experiments" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


lr_sweep = _load("lr_sweep")


def _strict_json(path: Path) -> dict:
  """The file as JSON, refusing NaN / Infinity (the results must be plain JSON)."""
  def refuse(constant):
    raise ValueError(f"{path} holds {constant}")
  return json.loads(path.read_text(), parse_constant=refuse)


def _refuse_training(*args, **kwargs):
  raise AssertionError("a finished run was trained again")


def test_smoke_sweep_writes_results_skips_finished_runs_and_survives_a_real_divergence(tmp_path, monkeypatch):
  work, out = tmp_path / "runs", tmp_path / "out"
  result = lr_sweep.main(["--smoke", "--workdir", str(work), "--out", str(out)])
  saved = _strict_json(out / "lr_sweep.json")
  assert (out / "lr_sweep.png").stat().st_size > 10_000
  variants, lrs = list(lr_sweep.DEFAULT_VARIANTS), sorted(lr_sweep.SMOKE_LRS)
  assert sorted((r["variant"], r["lr"]) for r in saved["runs"]) == sorted((v, lr) for v in variants for lr in lrs)
  for run in saved["runs"]:
    assert {"variant", "lr", "eval_loss", "diverged", "wall_s", "tokens", "config"} <= set(run)
    assert not run["diverged"] and np.isfinite(run["eval_loss"]) and run["tokens"] > 0
    assert run["config"]["lr"] == run["lr"] and Path(run["workdir"]).name == f"{run['variant']}-lr{run['lr']:.4g}"
  # every run has the same budget, size, seed and warmup: only the learning rate differs
  same = {json.dumps({k: v for k, v in r["config"].items() if k not in ("lr", "lr2", "end_lr")}, sort_keys=True)
          for r in saved["runs"] if r["variant"] == "fp"}
  assert len(same) == 1 and len({r["tokens"] for r in saved["runs"]}) == 1
  for variant in variants:
    best = saved["optimum"][variant]
    losses = {r["lr"]: r["eval_loss"] for r in saved["runs"] if r["variant"] == variant}
    assert best["lr"] in lrs and best["eval_loss"] == min(losses.values()) == losses[best["lr"]]
    assert best["lrs_within_tolerance"] == sorted(lr for lr, loss in losses.items() if loss <= best["eval_loss"] + 0.02)
    assert best["range_within_tolerance"][0] <= best["lr"] <= best["range_within_tolerance"][1]
  assert saved["readme"].startswith("At size smoke-s1")

  # finished runs are skipped: training is never called again and the results are the same
  monkeypatch.setattr(lr_sweep.train, "train_and_evaluate", _refuse_training)
  again = lr_sweep.main(["--smoke", "--workdir", str(work), "--out", str(out)])
  assert [r["eval_loss"] for r in again["runs"]] == [r["eval_loss"] for r in result["runs"]]
  monkeypatch.undo()

  # an absurd learning rate really diverges (NaN loss -> NonFiniteLossError); only that run trains, the sweep goes on
  calls = []
  real = lr_sweep.train.train_and_evaluate
  monkeypatch.setattr(lr_sweep.train, "train_and_evaluate",
                      lambda config, workdir, **kw: calls.append(config.optim.lr) or real(config, workdir, **kw))
  lrs_plus = [*map(str, lrs), "1e30"]
  wild = lr_sweep.main(["--smoke", "--variants", "b158", "--lrs", *lrs_plus, "--workdir", str(work),
                        "--out", str(out)])
  assert calls == [1e30]
  (bad,) = [r for r in wild["runs"] if r["lr"] == 1e30]
  assert bad["diverged"] and bad["eval_loss"] is None and "nan" in bad["reason"].lower()
  assert wild["optimum"]["b158"]["lr"] == saved["optimum"]["b158"]["lr"]
  assert wild["optimum"]["b158"]["diverged_lrs"] == [1e30] and wild["optimum"]["b158"]["largest_stable_lr"] == lrs[-1]
  assert _strict_json(out / "lr_sweep.json")["runs"][-1]["eval_loss"] is None


def _fake_trainer(losses: dict, calls: list):
  """A stand-in for train.train_and_evaluate: the loss of each lr from `losses` (None: NaN training loss)."""
  def fake(config, workdir, **kwargs):
    lr = config.optim.lr
    calls.append(lr)
    if losses[lr] is None:
      raise train.NonFiniteLossError("loss is nan at step 3: stopping; the last checkpoint (step None) holds ...")
    workdir.mkdir(parents=True, exist_ok=True)
    summary = {"steps": config.train.steps, "eval_loss": losses[lr], "wall_s": 1.0,
               "tokens": config.train.steps * config.train.batch_size * config.train.seq_len}
    (workdir / "summary.json").write_text(json.dumps(summary))
    return summary
  return fake


def test_diverged_runs_are_recorded_skipped_on_rerun_and_the_optimum_is_the_minimum(tmp_path, monkeypatch):
  # a U-shaped curve with its minimum at 2e-3, a NaN training loss at 1.6e-2, a NaN final eval loss at 3.2e-2
  # and a blown-up finite eval loss (5e6 nats, above ln(vocab)) at 6.4e-2
  lrs = [2.5e-4 * 2 ** k for k in range(9)]
  losses = {lr: 1.5 + 0.01 * math.log2(lr / 2e-3) ** 2 for lr in lrs[:6]}
  losses.update({lrs[6]: None, lrs[7]: float("nan"), lrs[8]: 5e6})
  calls = []
  monkeypatch.setattr(lr_sweep.train, "train_and_evaluate", _fake_trainer(losses, calls))
  work, out = tmp_path / "runs", tmp_path / "out"
  args = ["--smoke", "--variants", "fp", "--lrs", *map(str, lrs), "--workdir", str(work), "--out", str(out)]
  result = lr_sweep.main(args)
  assert sorted(calls) == lrs
  saved = _strict_json(out / "lr_sweep.json")
  by = {r["lr"]: r for r in saved["runs"]}
  for lr in lrs[6:]:
    assert by[lr]["diverged"] and by[lr]["eval_loss"] is None and by[lr]["reason"], by[lr]
  assert by[lrs[6]]["diverged_at_step"] == 3 and (work / f"fp-lr{lrs[6]:.4g}" / "diverged.json").exists()
  assert "above a uniform guess" in by[lrs[8]]["reason"]
  assert not any(by[lr]["diverged"] for lr in lrs[:6])
  best = saved["optimum"]["fp"]
  assert best["lr"] == 2e-3 and best["eval_loss"] == pytest.approx(1.5) and not best["at_edge"]
  # within 0.02 nats of 1.5: 1e-3, 2e-3, 4e-3 (0.01 above); 5e-4 and 8e-3 are 0.04 above
  assert best["lrs_within_tolerance"] == [1e-3, 2e-3, 4e-3] and best["range_within_tolerance"] == [1e-3, 4e-3]
  assert best["diverged_lrs"] == lrs[6:] and best["largest_stable_lr"] == lrs[5]
  assert (out / "lr_sweep.png").stat().st_size > 10_000
  # re-run: every run, the diverged ones included, is finished and skipped
  calls.clear()
  again = lr_sweep.main(args)
  assert calls == [] and again["runs"] == result["runs"] and again["optimum"] == result["optimum"]


def test_with_lr_scales_the_whole_schedule():
  for variant in ("fp", "b158", "bitnet"):
    base = lr_sweep.sizes.run_config(variant, (64, 2, 4), 1_200_000, 0, False)
    steps = base.train.steps
    lr0 = base.optim.lr
    before = optim.learning_rate_schedule(base.optim.copy_and_resolve_references(), steps)
    scaled = lr_sweep.with_lr(lr_sweep.sizes.run_config(variant, (64, 2, 4), 1_200_000, 0, False), 8 * lr0)
    after = optim.learning_rate_schedule(scaled.optim.copy_and_resolve_references(), steps)
    grid = np.arange(0, steps + 1, 7)
    np.testing.assert_allclose([float(after(s)) for s in grid], [8 * float(before(s)) for s in grid], rtol=1e-5,
                               err_msg=variant)
    assert scaled.optim.warmup_steps == base.optim.warmup_steps and scaled.train.steps == steps


@pytest.mark.parametrize("lrs, match", [
    ([1e-3], "at least 2"),
    ([], "at least 2"),
    ([1e-3, 0.0], "> 0"),
    ([1e-3, -1e-3], "> 0"),
    ([1e-3, float("nan")], "finite"),
    ([1e-3, 1e-3], "distinct"),
])
def test_bad_learning_rates_raise_a_clear_value_error(lrs, match):
  with pytest.raises(ValueError, match=match) as info:
    lr_sweep.check_lrs(lrs)
  assert "--lrs" in str(info.value)


@pytest.mark.parametrize("argv, match", [
    (["--lrs", "1e-3"], "--lrs needs at least 2"),
    (["--lrs", "1e-3", "-0.002"], "--lrs must all be finite and > 0"),
    (["--variants", "fp", "fp"], "--variants must be distinct"),
    (["--variants", "int4"], "--variants must be a non-empty subset"),
    (["--tokens", "0"], "--tokens must be positive"),
])
def test_bad_arguments_stop_main_before_any_training(argv, match, tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(lr_sweep.train, "train_and_evaluate", _refuse_training)
  with pytest.raises(SystemExit) as info:
    lr_sweep.main(["--smoke", "--workdir", str(tmp_path / "runs"), *argv])
  assert info.value.code == 2 and match in capsys.readouterr().err
  assert not (tmp_path / "runs").exists()
