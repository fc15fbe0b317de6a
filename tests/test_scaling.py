"""experiments/scaling: learning-rate choice per (variant, size) on validation, test-split losses in inference
mode, fits, resuming from the results file alone, report mode, bad arguments."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from bitnet_jax import train

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("experiments_scaling", ROOT / "experiments" / "scaling.py")
scaling = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scaling)


def _run(lr, loss, diverged=False):
  return {"lr": lr, "val_loss": None if diverged else loss, "diverged": diverged}


def test_lr_optimum_is_the_parabola_vertex_and_names_the_edge():
  runs = [_run(lr, (math.log2(lr) - math.log2(0.01)) ** 2 * 0.1 + 1.0) for lr in (0.004, 0.008, 0.016, 0.032)]
  opt = scaling.lr_optimum(runs)
  assert opt["lr"] == 0.008 and opt["at_edge"] is None
  assert opt["lr_star"] == pytest.approx(0.01, rel=1e-6)          # a quadratic in log2(lr): the vertex exactly
  assert scaling.lr_optimum(runs[:2])["at_edge"] == "high"              # still falling at the largest rate
  assert scaling.lr_optimum(runs[2:])["at_edge"] == "low"
  closed = runs[:2] + [_run(0.016, None, diverged=True)]            # a larger rate diverged: not an open edge
  assert scaling.lr_optimum(closed)["at_edge"] is None and scaling.lr_optimum(closed)["lr_star"] == 0.008
  assert scaling.lr_optimum([_run(0.1, None, True)])["at_edge"] == "low"   # all diverged: look lower


def test_grid_centre_follows_the_sizes_done_within_a_factor_2():
  assert scaling.grid_centre("fp", [], 1e4) == scaling.FIRST_LR["fp"]
  assert scaling.grid_centre("fp", [(1e4, 0.01)], 2e4) == 0.01
  # lr* ~ N^-0.5 through two sizes: extrapolated along the line
  assert scaling.grid_centre("fp", [(1e4, 0.02), (4e4, 0.01)], 1.6e5) == pytest.approx(0.005)
  assert scaling.grid_centre("fp", [(1e4, 0.1), (2e4, 0.01)], 1e6) == pytest.approx(0.005)   # clipped to last / 2


def test_smoke_sweep_chooses_on_validation_reports_test_and_resumes_from_the_results_file(tmp_path, monkeypatch):
  work, out = tmp_path / "runs", tmp_path / "out"
  argv = ["--smoke", "--variants", "fp", "bitnet", "--workdir", str(work), "--out", str(out)]
  result = scaling.main(argv)
  saved = json.loads((out / "scaling.json").read_text(), parse_constant=lambda c: pytest.fail(f"JSON has {c}"))
  assert (out / "scaling.png").stat().st_size > 10_000
  assert saved["done"] == {"fp": sorted(scaling.SMOKE_LADDER), "bitnet": sorted(scaling.SMOKE_LADDER)}
  for r in saved["runs"]:
    assert {"variant", "size", "n_params", "tokens", "lr", "diverged"} <= set(r)
    if not r["diverged"]:
      assert 0 < r["test_loss_se"] < r["test_loss"] and 0 < r["val_loss_se"] < r["val_loss"]
      assert ("test_loss_train_mode" in r) == (r["variant"] == "bitnet")   # BitNet's per-tensor loss beside
  for v in ("fp", "bitnet"):
    for size, opt in saved["lr_optima"][v].items():
      mine = [r for r in saved["runs"] if r["variant"] == v and r["size"] == size and not r["diverged"]]
      if mine:   # the chosen rate is the best on validation, not on test
        assert opt["lr"] == min(mine, key=lambda r: r["val_loss"])["lr"]
  analysis = saved["analysis"]
  assert set(analysis["fits"]) == {"fp", "bitnet"}
  assert analysis["common_sizes"] == sorted(scaling.SMOKE_LADDER)   # 4 sizes each: the bootstrap and gap trend run
  assert set(analysis["bootstrap_free_c"]["gaps"]) == {"bitnet"} and "bitnet" in analysis["gap_slope_per_decade"]
  assert analysis["bootstrap_c_0"]["draws"] == 20 and all(f["c_0"]["c"] == 0.0 for f in analysis["fits"].values())
  # The results file alone resumes the sweep: with the run directories gone nothing is trained again.
  shutil.rmtree(work)
  monkeypatch.setattr(train, "train_and_evaluate", lambda *a, **k: pytest.fail("a recorded run was trained again"))
  again = scaling.main(argv)
  assert again["runs"] == result["runs"]
  report = scaling.main([*argv, "--report"])
  assert report["lr_optima"] == result["lr_optima"]


@pytest.mark.parametrize("argv, match", [
    (["--variants", "fp", "fp"], "--variants must be distinct"),
    (["--sizes", "t9"], "--sizes must be of"),
    (["--tokens_per_param", "0"], "must be positive"),
    (["--tokens_per_param", "1000"], "the data would repeat"),
])
def test_bad_arguments_stop_before_any_training(argv, match, tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(train, "train_and_evaluate", lambda *a, **k: pytest.fail("trained despite bad arguments"))
  with pytest.raises(SystemExit):
    scaling.main(["--workdir", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), *argv])
  assert match in capsys.readouterr().err


def _point(seed, test_loss, seqs, lr=0.01, diverged=False):
  return {"variant": "fp", "size": "t0", "n_params": 100, "lr": lr, "seed": seed, "diverged": diverged,
          "test_loss": test_loss, "test_loss_se": 0.01, "test_sequence_losses": seqs}


def test_seed_replicates_are_averaged_and_their_spread_enters_the_errors():
  a, b = _point(0, 2.0, [1.9, 2.1, 2.0, 2.0]), _point(1, 2.2, [2.1, 2.3, 2.2, 2.2])
  p = scaling.merge_seeds([a, b, _point(2, None, None, diverged=True)])
  assert p["seeds"] == [0, 1] and p["seeds_diverged"] == [2] and p["test_loss"] == pytest.approx(2.1)
  assert p["test_sequence_losses"] == pytest.approx([2.0, 2.2, 2.1, 2.1])
  assert p["test_loss_se_sequences"] == pytest.approx(0.0816497 / 2, rel=1e-5)   # s.d. of the means / sqrt(4)
  # pooled over points, weighted by degrees of freedom: (0.02 x 1 + 0 x 2) / 3
  q = {"test_loss_by_seed": [1.0, 1.0, 1.0]}
  assert scaling.seed_variance([p, q, {"test_loss_by_seed": [5.0]}]) == {
      "var": pytest.approx(0.02 / 3), "sd": pytest.approx(math.sqrt(0.02 / 3)), "dof": 3, "points": 2}
  assert scaling.seed_variance([{"test_loss_by_seed": [5.0]}])["var"] is None   # one seed: noise not measured
  # selected(): the base seed's best run chooses the rate; replicates at other rates are ignored
  stray = _point(1, 9.0, [9.0] * 4, lr=0.02)
  chosen, noise = scaling.selected([a, b, stray], {"fp": {"t0": {"best": a}}}, ["fp"], base_seed=0)
  point = chosen["fp"][0]
  assert point["test_loss_by_seed"] == [2.0, 2.2] and noise["fp"]["var"] == pytest.approx(0.02)
  assert point["test_loss_se"] == pytest.approx(math.sqrt(point["test_loss_se_sequences"] ** 2 + 0.02 / 2))
  other = {**point, "seed_var_pooled": None, "seeds": [0]}
  assert scaling._paired_se(point, other) ** 2 == pytest.approx(
      np.var(np.subtract(point["test_sequence_losses"], other["test_sequence_losses"]), ddof=1) / 4 + 0.02 / 2)


def test_smoke_replicates_the_chosen_rate_at_a_second_seed_once(tmp_path, monkeypatch):
  argv = ["--smoke", "--sizes", "t0", "--variants", "fp", "--seeds", "2", "--workdir", str(tmp_path / "runs"),
          "--out", str(tmp_path / "out")]
  result = scaling.main(argv)
  grid = [r for r in result["runs"] if r["seed"] == 0]
  reps = [r for r in result["runs"] if r["seed"] == 1]
  best = min(grid, key=lambda r: r["val_loss"])
  assert len(grid) == 2 and len(reps) == 1 and reps[0]["lr"] == best["lr"]
  point = result["points"]["fp"][0]
  assert point["seeds"] == [0, 1]
  assert point["test_loss"] == pytest.approx((best["test_loss"] + reps[0]["test_loss"]) / 2)
  assert reps[0]["test_loss"] != best["test_loss"]   # another initialisation and data order: another model
  monkeypatch.setattr(train, "train_and_evaluate", lambda *a, **k: pytest.fail("a recorded run was trained again"))
  assert scaling.main(argv)["runs"] == result["runs"]
