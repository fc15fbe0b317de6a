"""experiments/scaling: L(N) = a N^b + c for BitNet, BitNet b1.58 and the FP baseline (train -> experiments).

    .venv/bin/python experiments/scaling.py                    # the default sweep, about 2 hours on 2 CPU cores
    .venv/bin/python experiments/scaling.py --smoke            # the same code path in under 2 minutes

Trains every size in `SIZES` (6 sizes, about 57x in non-embedding parameters) in three variants (fp, bitnet,
b158) on the embedded corpus (the standard library's source, byte level) through `train.train_and_evaluate`,
with the same data order, seed and token budget for every run: a fixed number of training tokens per run
(`--tokens`), so the curves are L(N) at fixed data, not compute-optimal ones. Each run lives in
`WORKDIR/<variant>-<size>`, resumes if interrupted, and is skipped once finished.

Fits, per variant, `L(N) = a * N^b + c` (scipy `curve_fit`) to the final eval loss in nats per byte against
non-embedding parameters N, with 95% bootstrap intervals for a, b, c (resampling the sizes' runs with
replacement; a resample with fewer than 4 distinct sizes, or whose fit fails, is redrawn), and a held-out check
(fit on all sizes but the largest, predict the largest). Reports the bitnet-fp and b158-fp gaps per size and the
slope of each gap against log10 N. Writes `OUT/scaling.json` and `OUT/scaling.png`, and prints the tables for
the README.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # run from a checkout: configs/ sits at the repository root

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from scipy.optimize import curve_fit  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from bitnet_jax import cli, train  # noqa: E402
from bitnet_jax.model import count_params  # noqa: E402
from configs import lm  # noqa: E402

VARIANTS = ("fp", "bitnet", "b158")
# name: (d_model, n_layers, n_heads)
SIZES = {
    "s0": (48, 2, 4),
    "s1": (64, 2, 4),
    "s2": (96, 3, 4),
    "s3": (128, 3, 4),
    "s4": (192, 4, 4),
    "s5": (256, 4, 4),
}
SMOKE_SIZES = {"s1": (32, 1, 2), "s2": (48, 1, 2), "s3": (64, 2, 4)}
SEQ_LEN, BATCH = 128, 16


def law(n: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
  """L(N) = a N^b + c."""
  return a * np.power(n, b) + c


def run_config(variant: str, size: tuple[int, int, int], tokens: int, seed: int, smoke: bool):
  """The training config of one run: the variant's `-small` recipe with this size and the sweep's budget."""
  d_model, n_layers, n_heads = size
  config = lm.get_config(lm.config_name(variant, "small"))   # any model variant (experiments/variants.py)
  config.name = f"{variant}-d{d_model}-l{n_layers}"
  config.model.d_model, config.model.n_layers = d_model, n_layers
  config.model.n_heads = config.model.n_kv_heads = n_heads
  config.model.d_ff = 4 * d_model if variant == "bitnet" else 64 * math.ceil(8 * d_model / 3 / 64)
  batch, seq = (4, 32) if smoke else (BATCH, SEQ_LEN)
  steps = max(tokens // (batch * seq), 2)
  config.train.batch_size, config.train.seq_len, config.train.steps = batch, seq, steps
  config.model.max_seq_len = max(config.model.max_seq_len, seq)
  config.train.eval_every = config.train.checkpoint_every = steps if smoke else max(steps // 4, 1)
  config.train.log_every = max(steps // 20, 1)
  config.train.seed = seed
  config.optim.warmup_steps = max(steps // 10, 1)
  if smoke:
    config.data.eval_batches = 1
  return config


def _model_cfg(config):
  return train.model_config_from(config)


def run_sweep(workdir: Path, sizes: dict, tokens: int, seed: int, smoke: bool) -> list[dict]:
  """Trains (or finds finished) every run; returns one record per run."""
  plan = [(v, name, run_config(v, size, tokens, seed, smoke)) for name, size in sizes.items() for v in VARIANTS]
  cost = {id(c): count_params(_model_cfg(c))["total"] * c.train.steps for _, _, c in plan}   # ~FLOPs for the ETA
  runs = []
  with tqdm(total=sum(cost.values()), desc="scaling sweep", unit="", unit_scale=True, dynamic_ncols=True,
            bar_format="{l_bar}{bar}| {percentage:.0f}% [{elapsed}<{remaining}] {postfix}") as bar:
    for variant, name, config in plan:
      run_dir = workdir / f"{variant}-{name}"
      bar.set_postfix_str(f"{variant}-{name}")
      summary_path = run_dir / "summary.json"
      done = summary_path.exists() and json.loads(summary_path.read_text()).get("steps") == config.train.steps
      summary = json.loads(summary_path.read_text()) if done else train.train_and_evaluate(config, run_dir,
                                                                                           progress=False)
      params = count_params(_model_cfg(config))
      runs.append({"variant": variant, "size": name, "n_params": params["non_embedding"],
                   "n_params_total": params["total"], "eval_loss": summary["eval_loss"],
                   "tokens": summary["tokens"], "wall_s": summary["wall_s"], "workdir": str(run_dir),
                   "config": {"d_model": config.model.d_model, "n_layers": config.model.n_layers,
                              "n_heads": config.model.n_heads, "d_ff": config.model.d_ff,
                              "steps": config.train.steps, "batch_size": config.train.batch_size,
                              "seq_len": config.train.seq_len, "lr": config.optim.lr, "seed": config.train.seed}})
      bar.update(cost[id(config)])
  return runs


def fit_law(n: np.ndarray, loss: np.ndarray) -> tuple[float, float, float]:
  """Least-squares fit of a N^b + c, started from a power law through the extremes with c below the minimum."""
  c0 = float(loss.min()) * 0.9
  b0 = float(np.log((loss[-1] - c0) / (loss[0] - c0)) / np.log(n[-1] / n[0])) if len(n) > 1 else -0.3
  b0 = b0 if np.isfinite(b0) and b0 < 0 else -0.3
  a0 = float((loss[0] - c0) / n[0] ** b0)
  # Bounds: a > 0, -3 < b < 0 (loss falls with N), 0 <= c <= min loss (the irreducible loss is a loss).
  hi_c = float(loss.min())
  p0 = (max(a0, 1e-12), min(max(b0, -2.9), -1e-6), min(max(c0, 0.0), hi_c))
  (a, b, c), _ = curve_fit(law, n, loss, p0=p0, bounds=([0.0, -3.0, 0.0], [np.inf, 0.0, hi_c]), maxfev=20000)
  return float(a), float(b), float(c)


def bootstrap(n: np.ndarray, loss: np.ndarray, draws: int, seed: int) -> dict:
  """95% intervals of (a, b, c), resampling the runs (one per size) with replacement."""
  rng = np.random.default_rng(seed)
  samples, failed = [], 0
  while len(samples) < draws and failed < 20 * draws:
    idx = np.sort(rng.integers(0, len(n), len(n)))
    if len(set(idx.tolist())) < min(4, len(n)):
      failed += 1
      continue
    try:
      samples.append(fit_law(n[idx], loss[idx]))
    except (RuntimeError, ValueError, FloatingPointError):
      failed += 1
  arr = np.asarray(samples)
  out = {key: [float(np.percentile(arr[:, i], 2.5)), float(np.percentile(arr[:, i], 97.5))] if len(arr) else None
         for i, key in enumerate("abc")}
  out["draws"], out["rejected"] = len(arr), failed
  return out


def analyse(runs: list[dict], draws: int, seed: int) -> tuple[dict, list[dict]]:
  fits = {}
  for variant in VARIANTS:
    rows = sorted((r for r in runs if r["variant"] == variant), key=lambda r: r["n_params"])
    n = np.asarray([r["n_params"] for r in rows], float)
    loss = np.asarray([r["eval_loss"] for r in rows], float)
    entry = {"sizes": len(rows)}
    try:
      a, b, c = fit_law(n, loss)
      entry.update(a=a, b=b, c=c, intervals=bootstrap(n, loss, draws, seed))
    except (RuntimeError, ValueError) as e:
      entry["error"] = f"fit failed: {e}"
    try:
      if len(n) < 4:
        raise ValueError(f"{len(n) - 1} sizes left: a 3-parameter fit needs at least 3 and a check needs a 4th")
      ha, hb, hc = fit_law(n[:-1], loss[:-1])
      entry["held_out"] = {"n_params": float(n[-1]), "predicted": float(law(n[-1], ha, hb, hc)),
                           "measured": float(loss[-1])}
    except (RuntimeError, ValueError) as e:
      entry["held_out"] = {"error": f"fit failed: {e}", "measured": float(loss[-1])}
    # the loss used, for the record
    entry["loss"] = "final eval loss, nats per byte"
    fits[variant] = entry
  gaps = []
  by = {(r["variant"], r["size"]): r for r in runs}
  for size in sorted({r["size"] for r in runs}, key=lambda s: by[("fp", s)]["n_params"]):
    fp = by[("fp", size)]["eval_loss"]
    gaps.append({"size": size, "n_params": by[("fp", size)]["n_params"],
                 **{f"{v}_minus_fp": by[(v, size)]["eval_loss"] - fp for v in ("bitnet", "b158")}})
  return fits, gaps


def gap_trend(gaps: list[dict]) -> dict:
  """Slope of each gap (variant loss - fp loss) against log10 N. A positive gap with a negative slope shrinks with
  scale, as the papers report; a negative gap (the quantised model ahead) with a negative slope grows."""
  x = np.log10([g["n_params"] for g in gaps])
  return {key: float(np.polyfit(x, [g[key] for g in gaps], 1)[0]) for key in ("bitnet_minus_fp", "b158_minus_fp")}


def plot(runs: list[dict], fits: dict, out: Path) -> None:
  fig, ax = plt.subplots(figsize=(7.5, 4.8))
  colors = {"fp": "tab:blue", "bitnet": "tab:orange", "b158": "tab:red"}
  labels = {"fp": "FP (LLaMA-like)", "bitnet": "BitNet (W1A8)", "b158": "BitNet b1.58 (W1.58A8)"}
  for variant in VARIANTS:
    rows = sorted((r for r in runs if r["variant"] == variant), key=lambda r: r["n_params"])
    n = np.asarray([r["n_params"] for r in rows], float)
    ax.scatter(n, [r["eval_loss"] for r in rows], color=colors[variant], zorder=3, label=labels[variant])
    f = fits[variant]
    if "a" in f:
      grid = np.geomspace(n.min() * 0.8, n.max() * 1.25, 100)
      ax.plot(grid, law(grid, f["a"], f["b"], f["c"]), color=colors[variant], lw=1.5,
              label=f"fit: {f['a']:.3g} N^{f['b']:.3f} + {f['c']:.3f}")
    h = f.get("held_out", {})
    if "predicted" in h:
      ax.scatter([h["n_params"]], [h["predicted"]], marker="x", s=80, color=colors[variant], zorder=4,
                 label=f"{variant}: held-out prediction of the largest")
  ax.set_xscale("log")
  ax.set_xlabel("non-embedding parameters N (log scale)")
  ax.set_ylabel("final eval loss (nats per byte)")
  ax.set_title("Scaling at a fixed token budget: L(N) = a N^b + c")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out, dpi=130)
  plt.close(fig)


def markdown(runs: list[dict], fits: dict, gaps: list[dict], trend: dict) -> str:
  lines = ["| size | N (non-emb.) | fp | bitnet | b158 | bitnet - fp | b158 - fp |", "|---|---|---|---|---|---|---|"]
  by = {(r["variant"], r["size"]): r for r in runs}
  for g in gaps:
    s = g["size"]
    lines.append(f"| {s} | {g['n_params']:,} | {by[('fp', s)]['eval_loss']:.4f} | "
                 f"{by[('bitnet', s)]['eval_loss']:.4f} | {by[('b158', s)]['eval_loss']:.4f} | "
                 f"{g['bitnet_minus_fp']:+.4f} | {g['b158_minus_fp']:+.4f} |")
  lines += ["", f"gap slope per decade of N: bitnet - fp {trend['bitnet_minus_fp']:+.4f}, "
                f"b158 - fp {trend['b158_minus_fp']:+.4f} (the papers' claim: a positive gap that falls toward 0 with N)", "",
            "| variant | a | b | c | b 95% interval | held-out largest: predicted / measured |", "|---|---|---|---|---|---|"]
  for v, f in fits.items():
    if "a" not in f:
      lines.append(f"| {v} | fit failed | | | | |")
      continue
    bi = f["intervals"]["b"]
    h = f["held_out"]
    held = f"{h['predicted']:.4f} / {h['measured']:.4f}" if "predicted" in h else f"failed / {h['measured']:.4f}"
    lines.append(f"| {v} | {f['a']:.4g} | {f['b']:.4f} | {f['c']:.4f} | "
                 f"{'n/a' if bi is None else f'[{bi[0]:.3f}, {bi[1]:.3f}]'} | {held} |")
  return "\n".join(lines)


def main(argv=None) -> dict:
  argv = cli.strip_debug(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="--debug shows the traceback of an error")
  parser.add_argument("--workdir", default="runs/scaling", help="one subdirectory per run (resumable)")
  parser.add_argument("--out", default="experiments/results", help="where scaling.json and scaling.png go")
  parser.add_argument("--tokens", type=int, default=1_200_000, help="training tokens per run (every run)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples per fit")
  parser.add_argument("--smoke", action="store_true", help="tiny sizes and budget: the same code path, < 2 min")
  args = parser.parse_args(argv)
  sizes, tokens = (SMOKE_SIZES, 4 * 32 * 4) if args.smoke else (SIZES, args.tokens)
  if tokens < 1:
    parser.error("--tokens must be positive")
  workdir, out = Path(args.workdir), Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  runs = run_sweep(workdir, sizes, tokens, args.seed, args.smoke)
  fits, gaps = analyse(runs, 50 if args.smoke else args.bootstrap, args.seed)
  trend = gap_trend(gaps)
  result = {"runs": runs, "fits": fits, "gaps": gaps, "gap_slope_per_decade": trend, "tokens_per_run": tokens,
            "smoke": args.smoke, "corpus": "stdlib (byte level)", "sweep_wall_s": time.perf_counter() - t0,
            "bootstrap": "resample the sizes' runs with replacement (one seed per run)"}
  (out / "scaling.json").write_text(json.dumps(result, indent=2))
  plot(runs, fits, out / "scaling.png")
  print(markdown(runs, fits, gaps, trend))
  print(f"\nwrote {out / 'scaling.json'} and {out / 'scaling.png'}")
  return result


if __name__ == "__main__":
  cli.run("scaling", main)
