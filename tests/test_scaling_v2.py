"""experiments/scaling_v2: learning-rate choice per (variant, size) on validation, test-split losses in inference
mode, fits, resuming from the results file alone, report mode, bad arguments."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest

from bitnet_jax import train

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("experiments_scaling_v2", ROOT / "experiments" / "scaling_v2.py")
sv2 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sv2)


def _run(lr, loss, diverged=False):
  return {"lr": lr, "val_loss": None if diverged else loss, "diverged": diverged}


def test_lr_optimum_is_the_parabola_vertex_and_names_the_edge():
  runs = [_run(lr, (math.log2(lr) - math.log2(0.01)) ** 2 * 0.1 + 1.0) for lr in (0.004, 0.008, 0.016, 0.032)]
  opt = sv2.lr_optimum(runs)
  assert opt["lr"] == 0.008 and opt["at_edge"] is None
  assert opt["lr_star"] == pytest.approx(0.01, rel=1e-6)          # a quadratic in log2(lr): the vertex exactly
  assert sv2.lr_optimum(runs[:2])["at_edge"] == "high"              # still falling at the largest rate
  assert sv2.lr_optimum(runs[2:])["at_edge"] == "low"
  closed = runs[:2] + [_run(0.016, None, diverged=True)]            # a larger rate diverged: not an open edge
  assert sv2.lr_optimum(closed)["at_edge"] is None and sv2.lr_optimum(closed)["lr_star"] == 0.008
  assert sv2.lr_optimum([_run(0.1, None, True)])["at_edge"] == "low"   # all diverged: look lower


def test_grid_centre_follows_the_sizes_done_within_a_factor_2():
  assert sv2.grid_centre("fp", [], 1e4) == sv2.FIRST_LR["fp"]
  assert sv2.grid_centre("fp", [(1e4, 0.01)], 2e4) == 0.01
  # lr* ~ N^-0.5 through two sizes: extrapolated along the line
  assert sv2.grid_centre("fp", [(1e4, 0.02), (4e4, 0.01)], 1.6e5) == pytest.approx(0.005)
  assert sv2.grid_centre("fp", [(1e4, 0.1), (2e4, 0.01)], 1e6) == pytest.approx(0.005)   # clipped to last / 2


def test_smoke_sweep_chooses_on_validation_reports_test_and_resumes_from_the_results_file(tmp_path, monkeypatch):
  work, out = tmp_path / "runs", tmp_path / "out"
  argv = ["--smoke", "--variants", "fp", "bitnet", "--workdir", str(work), "--out", str(out)]
  result = sv2.main(argv)
  saved = json.loads((out / "scaling_v2.json").read_text(), parse_constant=lambda c: pytest.fail(f"JSON has {c}"))
  assert (out / "scaling_v2.png").stat().st_size > 10_000
  assert saved["done"] == {"fp": sorted(sv2.SMOKE_LADDER), "bitnet": sorted(sv2.SMOKE_LADDER)}
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
  assert analysis["common_sizes"] == sorted(sv2.SMOKE_LADDER)   # 4 sizes each: the bootstrap and gap trend run
  assert set(analysis["bootstrap_free_c"]["gaps"]) == {"bitnet"} and "bitnet" in analysis["gap_slope_per_decade"]
  assert analysis["bootstrap_c_0"]["draws"] == 20 and all(f["c_0"]["c"] == 0.0 for f in analysis["fits"].values())
  # The results file alone resumes the sweep: with the run directories gone nothing is trained again.
  shutil.rmtree(work)
  monkeypatch.setattr(train, "train_and_evaluate", lambda *a, **k: pytest.fail("a recorded run was trained again"))
  again = sv2.main(argv)
  assert again["runs"] == result["runs"]
  report = sv2.main([*argv, "--report"])
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
    sv2.main(["--workdir", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), *argv])
  assert match in capsys.readouterr().err
