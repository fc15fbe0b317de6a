"""experiments/scaling_fit: the Huber multi-start fit of L(N) = a N^b + c recovers known laws, resists an outlier,
fixes c on request, predicts a held-out size, and its paired bootstrap covers the truth; bad input is refused."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("experiments_scaling_fit", ROOT / "experiments" / "scaling_fit.py")
sf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sf)

N = np.geomspace(2e4, 8e5, 6)          # 6 sizes over 40x, as the sweep's
FP = (5.0, -0.2, 1.2)                  # a, b, c
Q = (8.0, -0.25, 1.25)                 # a quantised variant whose gap to FP shrinks with N


def test_fit_recovers_an_exact_law_from_the_grid_of_starts():
  f = sf.fit(N, sf.law(N, *FP))
  np.testing.assert_allclose([f["a"], f["b"], f["c"]], FP, rtol=2e-2)
  assert not f["c_fixed"] and not f["c_at_bound"] and f["objective"] < 1e-9


def test_screened_starts_reach_the_full_grids_optimum():
  loss = sf.law(N, *FP) * (1 + 0.002 * np.sin(np.arange(6)))   # not exactly on the law: a real minimum
  full, fast = sf.fit(N, loss), sf.fit(N, loss, screen=10)
  assert fast["objective"] <= full["objective"] * (1 + 1e-3)         # the same minimum, to L-BFGS-B's tolerance
  np.testing.assert_allclose(sf.law(N, fast["a"], fast["b"], fast["c"]), sf.law(N, full["a"], full["b"], full["c"]),
                             rtol=1e-4)


def test_one_outlier_moves_the_huber_fit_less_than_a_least_squares_fit():
  loss = sf.law(N, *FP)
  bad = loss.copy()
  bad[2] *= 1.10                                   # one run 10% off (a bad seed, a diverging spike)
  huber = sf.fit(N, bad)
  squares = sf.fit(N, bad, delta=10.0)             # delta far above every residual: the Huber loss is r^2 / 2
  err = lambda f: np.abs(sf.law(N, f["a"], f["b"], f["c"]) - loss)[[0, 1, 3, 4, 5]].max()
  assert err(huber) < 0.5 * err(squares), (err(huber), err(squares))
  assert err(huber) < 0.01 * loss.min()            # the other five sizes still lie on the fitted curve


def test_c_fixed_at_a_stated_value_and_its_bad_values():
  pure = sf.law(N, 3.0, -0.1, 0.0)
  f = sf.fit(N, pure, c=0.0)
  assert f["c_fixed"] and f["c"] == 0.0
  np.testing.assert_allclose([f["a"], f["b"]], [3.0, -0.1], rtol=1e-3)
  with pytest.raises(ValueError, match="fixed c must be in"):
    sf.fit(N, pure, c=float(pure.min()))


def test_held_out_prediction_of_the_largest_size():
  h = sf.held_out(N, sf.law(N, *FP))
  assert h["n_params"] == N.max() and abs(h["relative_error"]) < 2e-3, h
  assert "error" in sf.held_out(N[:3], sf.law(N[:3], *FP))        # two sizes below the largest: no prediction


@pytest.mark.parametrize("n, loss, match", [
    (N[:2], [2.0, 1.9], "at least 3 distinct sizes"),
    ([1e4, 1e4, 1e4, 1e5], [2.0, 2.0, 2.0, 1.9], "at least 3 distinct sizes"),
    (N, -sf.law(N, *FP), "finite and positive"),
    (N, np.full(6, np.nan), "finite and positive"),
    (N, np.ones(5), "1-D of one length"),
])
def test_bad_input_is_refused_with_a_named_problem(n, loss, match):
  with pytest.raises(ValueError, match=match):
    sf.fit(n, loss)


def test_paired_bootstrap_covers_the_true_parameters_and_the_true_gap():
  rng = np.random.default_rng(0)
  se = 0.003
  losses = {"fp": sf.law(N, *FP) + rng.normal(size=6) * se, "b158": sf.law(N, *Q) + rng.normal(size=6) * se}
  bs = sf.bootstrap(N, losses, {"fp": np.full(6, se), "b158": np.full(6, se)}, draws=40, seed=1)
  assert bs["draws"] == 40 and set(bs["intervals"]) == {"fp", "b158"} and set(bs["gaps"]) == {"b158"}
  for v, truth in (("fp", FP), ("b158", Q)):
    lo, hi = bs["intervals"][v]["b"]
    assert lo <= truth[1] <= hi, (v, lo, hi)
    lo, hi = bs["intervals"][v]["at_largest"]
    assert lo - 2 * se <= sf.law(N.max(), *truth) <= hi + 2 * se
  true_gap = sf.law(N.max(), *Q) - sf.law(N.max(), *FP)
  lo, hi = bs["gaps"]["b158"]["at_largest_interval"]
  assert lo - 2 * se <= true_gap <= hi + 2 * se
  true_slope = sf.gap_slope(N, sf.law(N, *Q) - sf.law(N, *FP))
  lo, hi = bs["gaps"]["b158"]["slope_interval"]
  assert lo <= true_slope <= hi and hi < 0                         # the gap shrinks, and the interval says so


def test_bootstrap_keeps_its_draws_on_request_and_they_make_its_intervals():
  losses = {"fp": sf.law(N, *FP), "b158": sf.law(N, *Q)}
  ses = {"fp": np.full(6, 0.003), "b158": np.full(6, 0.003)}
  plain = sf.bootstrap(N, losses, ses, draws=15, seed=2)
  kept = sf.bootstrap(N, losses, ses, draws=15, seed=2, keep_samples=True)
  assert "samples" not in plain and kept["intervals"] == plain["intervals"]   # the same draws either way
  for v in losses:
    abc = np.asarray(kept["samples"][v])
    assert abc.shape == (15, 3)
    assert kept["intervals"][v]["b"] == pytest.approx(list(np.percentile(abc[:, 1], [2.5, 97.5])))


def test_gap_slope_and_the_identification_rule_for_c():
  assert sf.gap_slope([1e4, 1e5, 1e6], [0.3, 0.2, 0.1]) == pytest.approx(-0.1)
  assert sf.c_identified([0.5, 1.0], loss_min=1.5)
  assert not sf.c_identified([0.001, 1.0], loss_min=1.5)           # reaches 0: the data do not bound c below
  assert not sf.c_identified([0.5, 1.49], loss_min=1.5)            # reaches the smallest loss
  assert not sf.c_identified(None, loss_min=1.5)
