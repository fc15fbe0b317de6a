"""experiments/scaling_fit: L(N) = a N^b + c fitted the way the scaling literature does (-> experiments/scaling).

The fit (Hoffmann et al. 2022, appendix D.2; kept by Besiroglu et al. 2024's replication): minimise the Huber
loss (delta 1e-3) of log-space residuals, log(a N^b + c) - log L, with L-BFGS-B from every point of a grid of
initialisations, keeping the best. The law is parameterised as log L = logsumexp(alpha - beta log N, e)
(a = e^alpha, b = -beta, c = e^e), so a, c > 0 hold by construction and beta is bounded to [0, 3] (loss falls
with N). `c` may be fixed (`fit(..., c=value)`) when the data cannot identify it.

Uncertainty: `bootstrap` resamples the sizes with replacement (the same sizes for every variant in a draw, so
differences between variants are paired), perturbs each resampled loss by its own standard error (a Gaussian
draw) when one is given, and refits from the full fit's optimum and the grid's three best starts. Draws with fewer than
`min_sizes` distinct sizes are redrawn. 95% intervals are the 2.5 and 97.5 percentiles.

`c` is reported as identified only if its interval stays clear of both ends of what it can be: above 1% and
below 99% of the smallest measured loss. Otherwise the caller reports the fit with c free and with c fixed.
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy.optimize import minimize
from scipy.special import huber

HUBER_DELTA = 1e-3
BETA_MAX = 3.0
_ALPHAS = tuple(range(-2, 9, 2))                 # a = e^alpha: 0.14 ... 3000
_BETAS = (0.05, 0.1, 0.2, 0.4, 0.8)
_C_FRACTIONS = (0.01, 0.3, 0.6, 0.9)             # c as a fraction of the smallest loss


def law(n, a: float, b: float, c: float) -> np.ndarray:
  """L(N) = a N^b + c."""
  return a * np.power(np.asarray(n, float), b) + c


def _check(n, loss) -> tuple[np.ndarray, np.ndarray]:
  n, loss = np.asarray(n, float), np.asarray(loss, float)
  if n.ndim != 1 or n.shape != loss.shape:
    raise ValueError(f"n and loss must be 1-D of one length, got shapes {n.shape} and {loss.shape}")
  if len(np.unique(n)) < 3:
    raise ValueError(f"a 3-parameter law needs at least 3 distinct sizes, got {len(np.unique(n))}")
  if not (np.isfinite(n).all() and np.isfinite(loss).all() and (n > 0).all() and (loss > 0).all()):
    raise ValueError("n and loss must be finite and positive")
  return n, loss


def _objective(theta: np.ndarray, logn: np.ndarray, logl: np.ndarray, delta: float, c: float | None):
  """Huber loss of log residuals and its gradient in (alpha, beta, e) (or (alpha, beta) with c fixed)."""
  u = theta[0] - theta[1] * logn                     # log(a N^b)
  if c is None:
    pred = np.logaddexp(u, theta[2])
    w = np.exp(u - pred)                               # d pred / d u; d pred / d e = 1 - w
  else:
    pred = np.logaddexp(u, np.log(c)) if c > 0 else u
    w = np.exp(u - pred)
  r = pred - logl
  g = np.clip(r, -delta, delta)                        # d huber / d r
  grad = [np.sum(g * w), -np.sum(g * w * logn)] + ([np.sum(g * (1 - w))] if c is None else [])
  return float(np.sum(huber(delta, r))), np.asarray(grad)


def _starts(loss: np.ndarray, c: float | None) -> list[np.ndarray]:
  es = [np.log(f * loss.min()) for f in _C_FRACTIONS]
  grid = itertools.product(_ALPHAS, _BETAS, es) if c is None else itertools.product(_ALPHAS, _BETAS)
  return [np.asarray(s, float) for s in grid]


def _screen(logn, logl, starts, c: float | None, k: int, delta: float = HUBER_DELTA) -> list[np.ndarray]:
  """The `k` starts with the lowest objective, evaluated at once (no optimisation): a bootstrap draw refits from
  these and the full fit's optimum instead of from the whole grid."""
  th = np.stack(starts)
  u = th[:, :1] - th[:, 1:2] * logn[None]
  pred = np.logaddexp(u, th[:, 2:3]) if c is None else (np.logaddexp(u, np.log(c)) if c > 0 else u)
  f = huber(delta, pred - logl[None]).sum(1)
  return [th[i] for i in np.argsort(f)[:k]]


def _minimise(logn, logl, loss_min, starts, delta, c) -> tuple[np.ndarray, float]:
  bounds = [(-30.0, 60.0), (0.0, BETA_MAX)] + ([(np.log(1e-6 * loss_min), np.log(loss_min))] if c is None else [])
  best, best_f = None, np.inf
  for s in starts:
    res = minimize(_objective, s, args=(logn, logl, delta, c), jac=True, method="L-BFGS-B", bounds=bounds)
    if np.isfinite(res.fun) and res.fun < best_f:
      best, best_f = res.x, float(res.fun)
  if best is None:
    raise RuntimeError("no start converged to a finite objective")
  return best, best_f


def fit(n, loss, *, c: float | None = None, delta: float = HUBER_DELTA, starts=None, screen: int | None = None) -> dict:
  """The best fit of L(N) = a N^b + c over the grid of starts: {"a", "b", "c", "objective", "c_fixed",
  "c_at_bound"} (c_at_bound: the fitted c sits at either bound of its range, so the data do not pin it).
  `screen`: optimise only from the grid's `screen` starts of lowest objective (a fast mode for smoke runs)."""
  n, loss = _check(n, loss)
  if c is not None and not 0 <= c < loss.min():
    raise ValueError(f"a fixed c must be in [0, the smallest loss {loss.min():.4g}), got {c!r}")
  logn, logl = np.log(n), np.log(loss)
  if starts is None:
    starts = _starts(loss, c) if screen is None else _screen(logn, logl, _starts(loss, c), c, screen, delta)
  theta, f = _minimise(logn, logl, loss.min(), starts, delta, c)
  out = {"a": float(np.exp(theta[0])), "b": float(-theta[1]), "objective": f, "c_fixed": c is not None}
  if c is None:
    out["c"] = float(np.exp(theta[2]))
    out["c_at_bound"] = bool(theta[2] <= np.log(1e-6 * loss.min()) + 1e-6 or theta[2] >= np.log(loss.min()) - 1e-6)
    out["theta"] = [float(t) for t in theta]
  else:
    out["c"], out["c_at_bound"], out["theta"] = float(c), False, [float(t) for t in theta]
  return out


def held_out(n, loss, *, c: float | None = None, screen: int | None = None) -> dict:
  """Fit on every size but the largest, predict the largest: predicted, measured, relative error."""
  n, loss = _check(n, loss)
  order = np.argsort(n)
  n, loss = n[order], loss[order]
  if len(np.unique(n[:-1])) < 3:
    return {"error": "fewer than 3 distinct sizes below the largest", "measured": float(loss[-1])}
  f = fit(n[:-1], loss[:-1], c=c, screen=screen)
  pred = float(law(n[-1], f["a"], f["b"], f["c"]))
  return {"n_params": float(n[-1]), "predicted": pred, "measured": float(loss[-1]),
          "relative_error": pred / float(loss[-1]) - 1.0}


def gap_slope(n, gap) -> float:
  """Least-squares slope of a loss gap against log10 N (nats per decade)."""
  return float(np.polyfit(np.log10(np.asarray(n, float)), np.asarray(gap, float), 1)[0])


def c_identified(interval, loss_min: float) -> bool:
  """c's 95% interval stays above 1% and below 99% of the smallest loss."""
  return interval is not None and interval[0] > 0.01 * loss_min and interval[1] < 0.99 * loss_min


def _interval(values) -> list[float] | None:
  v = np.asarray(values, float)
  return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if len(v) else None


def bootstrap(n, losses: dict, ses: dict | None = None, *, draws: int = 1000, seed: int = 0, c: float | None = None,
              ref: str | None = "fp", min_sizes: int = 4, screen: int | None = None,
              keep_samples: bool = False) -> dict:
  """Paired bootstrap over sizes. `n`: [S] sizes; `losses`: variant -> [S] losses at those sizes; `ses`:
  variant -> [S] standard errors (or None). Returns per variant the 95% intervals of a, b, c and of the loss
  predicted at the largest size; with `ref`, per other variant the intervals of its fitted gap to `ref` at the
  largest size and of the measured gap's slope per decade; and the count of draws kept and redrawn.
  `keep_samples`: also every draw's (a, b, c) per variant, under "samples" (for bands of the fitted curve)."""
  n = np.asarray(n, float)
  full = {v: fit(n, l, c=c, screen=screen) for v, l in losses.items()}
  rng = np.random.default_rng(seed)
  samples = {v: [] for v in losses}
  gaps = {v: {"at_largest": [], "slope": []} for v in losses if ref is not None and v != ref and ref in losses}
  kept = redrawn = 0
  n_max = n.max()
  while kept < draws and redrawn < 20 * draws:
    idx = rng.integers(0, len(n), len(n))
    if len(np.unique(n[idx])) < min(min_sizes, len(np.unique(n))):
      redrawn += 1
      continue
    try:
      draw = {}
      for v, l in losses.items():
        y = np.asarray(l, float)[idx]
        if ses is not None and ses.get(v) is not None:
          y = np.maximum(y + rng.normal(size=len(idx)) * np.asarray(ses[v], float)[idx], 1e-6)
        starts = [np.asarray(full[v]["theta"])] + _screen(np.log(n[idx]), np.log(y), _starts(y, c), c, 3)
        draw[v] = (fit(n[idx], y, c=c, starts=starts), y)
    except (RuntimeError, ValueError):
      redrawn += 1
      continue
    kept += 1
    for v, (f, _) in draw.items():
      samples[v].append((f["a"], f["b"], f["c"], float(law(n_max, f["a"], f["b"], f["c"]))))
    for v in gaps:
      fv, yv = draw[v]
      fr, yr = draw[ref]
      gaps[v]["at_largest"].append(float(law(n_max, fv["a"], fv["b"], fv["c"]) - law(n_max, fr["a"], fr["b"],
                                                                                      fr["c"])))
      if len(np.unique(n[idx])) >= 2:
        gaps[v]["slope"].append(gap_slope(n[idx], yv - yr))
  out = {"draws": kept, "redrawn": redrawn, "fits": full, "intervals": {}, "gaps": {}}
  for v, s in samples.items():
    arr = np.asarray(s).reshape(-1, 4)
    out["intervals"][v] = {k: _interval(arr[:, i]) for i, k in enumerate(("a", "b", "c", "at_largest"))}
  for v, g in gaps.items():
    out["gaps"][v] = {"at_largest_interval": _interval(g["at_largest"]), "slope_interval": _interval(g["slope"])}
  if keep_samples:
    out["samples"] = {v: [list(x[:3]) for x in s] for v, s in samples.items()}
  return out
