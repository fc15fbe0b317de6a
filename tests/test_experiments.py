"""The experiment scripts: scaling-law fits on synthetic data, and the sweep's smoke run end to end."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
  spec = importlib.util.spec_from_file_location(f"experiments_{name}", ROOT / "experiments" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


scaling = _load("scaling")


def test_fit_recovers_a_known_power_law():
  n = np.geomspace(1e5, 1e7, 6)
  truth = (40.0, -0.25, 1.2)
  a, b, c = scaling.fit_law(n, scaling.law(n, *truth))
  np.testing.assert_allclose((a, b, c), truth, rtol=1e-3)


def test_bootstrap_intervals_cover_the_truth_under_noise():
  rng = np.random.default_rng(0)
  n = np.geomspace(1e5, 1e7, 8)
  truth = (40.0, -0.25, 1.2)
  loss = scaling.law(n, *truth) + rng.normal(0, 0.002, n.size)
  ci = scaling.bootstrap(n, loss, draws=200, seed=0)
  assert ci["draws"] == 200
  lo, hi = ci["b"]
  assert lo <= truth[1] <= hi and hi - lo < 0.2, ci["b"]


def test_gap_trend_sign():
  gaps = [{"n_params": n, "bitnet_minus_fp": 0.3 - 0.1 * np.log10(n / 1e5), "b158_minus_fp": 0.1}
          for n in (1e5, 1e6, 1e7)]
  trend = scaling.gap_trend(gaps)
  assert trend["bitnet_minus_fp"] == pytest.approx(-0.1) and trend["b158_minus_fp"] == pytest.approx(0.0, abs=1e-9)


def test_smoke_sweep_writes_results_and_skips_finished_runs(tmp_path):
  work, out = tmp_path / "runs", tmp_path / "out"
  result = scaling.main(["--smoke", "--workdir", str(work), "--out", str(out)])
  saved = json.loads((out / "scaling.json").read_text())
  assert (out / "scaling.png").stat().st_size > 10_000
  assert len(saved["runs"]) == 3 * len(scaling.SMOKE_SIZES)
  for run in saved["runs"]:
    assert {"variant", "n_params", "eval_loss", "tokens", "wall_s", "config"} <= set(run)
    assert np.isfinite(run["eval_loss"]) and run["tokens"] > 0
  sizes = sorted({r["n_params"] for r in saved["runs"] if r["variant"] == "fp"})
  assert sizes[-1] / sizes[0] > 5
  for variant in scaling.VARIANTS:
    fit = saved["fits"][variant]
    assert {"a", "b", "c", "intervals", "held_out"} <= set(fit) and fit["b"] <= 0
    assert fit["held_out"]["measured"] == max((r for r in saved["runs"] if r["variant"] == variant),
                                              key=lambda r: r["n_params"])["eval_loss"]
  assert set(saved["gap_slope_per_decade"]) == {"bitnet_minus_fp", "b158_minus_fp"}
  # finished runs are skipped: their metrics files are not touched again
  stamp = {p: p.stat().st_mtime_ns for p in work.glob("*/metrics.jsonl")}
  again = scaling.main(["--smoke", "--workdir", str(work), "--out", str(out)])
  assert {p: p.stat().st_mtime_ns for p in work.glob("*/metrics.jsonl")} == stamp
  assert [r["eval_loss"] for r in again["runs"]] == [r["eval_loss"] for r in result["runs"]]
