"""experiments/variants: b1.58's successors against b1.58 and FP, each at its own tuned learning rate (-> experiments).

    .venv/bin/python experiments/variants.py            # 2 sizes x 6 variants x 5+ learning rates: hours on 2 CPU cores
    .venv/bin/python experiments/variants.py --smoke    # the same code path in about two minutes
    .venv/bin/python experiments/variants.py --report   # the analysis of the runs finished so far, nothing trained

The question (docs/quantisers.md, "The successors"): at equal tokens, how much does each successor lose against
b1.58 (W1.58A8) and FP? The papers' answers at 400M-7B parameters and 100B tokens: v2 with 8-bit activations
matches b1.58, v2 with 4-bit activations and a4.8 lose a little (a4.8 Table 1; v2 Table 1).

Per size (`--sizes`, default s1 and s2 of experiments/sizes.py) and variant (`--variants`, default fp, b158, a48,
v2_a8, v2_a4, b158_seq), the runs are `lr_sweep.run_sweep`'s: the variant's `-small` recipe at this size with the
fixed-token runs' 1.2M tokens, data order and seed, the whole learning-rate schedule scaled to each peak of a factor-2
grid (`GRIDS`, around each recipe family's optimum in the committed learning-rate sweep). Where the best run sits
at an edge of its grid, the grid is extended by one factor-2 step on that side, up to `--extend` times, so that
the chosen rate is an interior minimum. a4.8 and v2-a4 train with their two-stage recipe (8-bit activations for
the first 95% of the steps, `configs/lm.py`). Every run resumes if interrupted and is skipped once finished;
diverged runs are recorded.

For each variant's best run, the report then measures on `--eval_batches` validation batches:
  * the eval loss (nats per byte) with its standard error over the sequences, in the papers' inference mode (per
    token activation scales: every variant here is per token);
  * the statistics that motivate v2's Hadamard transform, of the inputs of o_proj and down_proj after their norm:
    excess kurtosis and max|x| / mean|x| per token, as is and after the transform;
  * the train step's time, interleaved across the variants (median of `--time_steps` steps in each of 3 rounds).
Writes OUT/variants.json and OUT/variants.png and prints a markdown table; sizes already in OUT/variants.json that
this run does not measure (`--sizes s2` after an s1 run) are kept.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # run from a checkout: configs/ sits at the repository root

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bitnet_jax import cli, data, hadamard, train, weights  # noqa: E402
from bitnet_jax.layers import BitLinear  # noqa: E402


def _load(name: str):
  spec = importlib.util.spec_from_file_location(f"experiments_{name}", Path(__file__).resolve().with_name(f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


lr_sweep = _load("lr_sweep")
sizes = lr_sweep.sizes

VARIANTS = ("fp", "b158", "a48", "v2_a8", "v2_a4", "b158_seq")
LABELS = {"fp": "FP (LLaMA-like)", "b158": "b1.58 (W1.58A8)", "a48": "a4.8 (A4 + top-K A8)",
          "v2_a8": "v2 (Hadamard, A8)", "v2_a4": "v2 (Hadamard, A4)", "b158_seq": "b1.58, ParetoQ SEQ"}
COLORS = {"fp": "tab:blue", "b158": "tab:red", "a48": "tab:green", "v2_a8": "tab:purple", "v2_a4": "tab:brown",
          "b158_seq": "tab:olive"}
# Starting grids (factor 2) around the optima of the committed learning-rate sweep at s1: FP about 4e-3, b1.58
# about 3e-2 (docs/experiments.md); the quantised successors start from b1.58's.
GRIDS = {"fp": tuple(1e-3 * 2 ** k for k in range(5)), **{v: tuple(4e-3 * 2 ** k for k in range(5))
                                                          for v in VARIANTS if v != "fp"}}
SMOKE_GRID = (4e-3, 8e-3)
DEFAULT_SIZES = ("s1", "s2")


# --------------------------------------------------------------------------------------------------------------
# Training: the grid per variant, extended until the best rate is interior.
# --------------------------------------------------------------------------------------------------------------
def sweep(workdir: Path, size_name: str, size, variants, tokens: int, seed: int, smoke: bool, extend: int):
  runs = []
  for variant in variants:
    lrs = list(SMOKE_GRID if smoke else GRIDS[variant])
    vruns = lr_sweep.run_sweep(workdir / size_name, size, [variant], lrs, tokens, seed, smoke)
    for _ in range(extend):
      best = lr_sweep.optimum(vruns, variant)
      if not best["at_edge"]:
        break
      lr = best["lr"] * 2 if best["lr"] == max(lrs) else best["lr"] / 2
      lrs.append(lr)
      vruns += lr_sweep.run_sweep(workdir / size_name, size, [variant], [lr], tokens, seed, smoke)
    runs += [{**r, "size": size_name} for r in vruns]
  return runs


# --------------------------------------------------------------------------------------------------------------
# Measurements on each variant's best run.
# --------------------------------------------------------------------------------------------------------------
@nnx.jit
def _sequence_losses(model, batch):
  logits = model(batch[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean(axis=-1)   # per sequence


def _activation_stats(model, batches) -> dict:
  """Excess kurtosis and mean-over-tokens max|x|/mean|x| of the o_proj and down_proj inputs after their norm, as
  is and after the Hadamard transform, recorded from an eager forward."""
  targets = {id(b.attn.o_proj): "o_proj" for b in model.blocks} | {id(b.ffn.down_proj): "down_proj"
                                                                  for b in model.blocks}
  seen = {"o_proj": [], "down_proj": []}
  original = BitLinear.prepare_input

  def record(layer, x, normalized=None):
    if id(layer) in targets:
      xn = layer.norm(x.astype(layer.dtype)) if layer.norm is not None else x
      seen[targets[id(layer)]].append(np.asarray(xn, np.float32).reshape(-1, xn.shape[-1]))
    return original(layer, x, normalized)

  BitLinear.prepare_input = record
  try:
    for batch in batches:
      model(jnp.asarray(batch[:, :-1]))
  finally:
    BitLinear.prepare_input = original

  def stats(x):
    z = (x - x.mean(-1, keepdims=True)) / (x.std(-1, keepdims=True) + 1e-12)
    return {"excess_kurtosis": float(np.mean(np.mean(z ** 4, -1) - 3.0)),
            "max_over_mean": float(np.mean(np.abs(x).max(-1) / (np.abs(x).mean(-1) + 1e-12)))}

  out = {}
  for role, xs in seen.items():
    x = np.concatenate(xs)
    out[role] = {"as_is": stats(x), "hadamard": stats(np.asarray(hadamard.hadamard_transform(jnp.asarray(x))))}
  return out


def measure(run: dict, eval_batches: int) -> dict:
  """Eval loss with its standard error, and the activation statistics, of one finished run."""
  model, config = weights.load_checkpoint(run["workdir"])
  corpus = data.load_corpus(config.data.source, valid_fraction=config.data.valid_fraction,
                            text_key=config.data.text_key, tokenizer=config.data.tokenizer)
  batches = data.eval_batches(corpus.valid, batch_size=config.train.batch_size, seq_len=config.train.seq_len,
                              max_batches=eval_batches)
  losses = np.concatenate([np.asarray(_sequence_losses(model, jnp.asarray(b))) for b in batches])
  return {"eval_loss": float(losses.mean()), "eval_loss_se": float(losses.std(ddof=1) / math.sqrt(len(losses))),
          "eval_sequences": int(len(losses)), "eval_tokens": int(len(losses) * config.train.seq_len),
          "sequence_losses": [round(float(x), 6) for x in losses],
          "activations": _activation_stats(model, batches[:2])}


def paired_differences(rows: dict) -> None:
  """Adds each variant's loss minus b158's and minus fp's, with the standard error of the difference over the
  same validation sequences (paired: the sequences' own spread in difficulty, most of a single loss's standard
  error, cancels), in place."""
  for ref in ("b158", "fp"):
    base = rows.get(ref, {}).get("sequence_losses")
    for row in rows.values():
      mine = row.get("sequence_losses")
      if base is None or mine is None:
        continue
      d = np.asarray(mine) - np.asarray(base)
      row[f"minus_{ref}"] = float(d.mean())
      row[f"minus_{ref}_se"] = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0


def step_times(size, variants, tokens: int, seed: int, smoke: bool, steps: int) -> dict:
  """Median seconds per train step of each variant at this size, the variants interleaved over 3 rounds."""
  built = {}
  for v in variants:
    config = sizes.run_config(v, size, tokens, seed, smoke)
    model, optimizer = nnx.jit(train._model_and_optimizer(train.model_config_from(config), config.optim,
                                                          config.train.steps))()
    batch = jnp.zeros((config.train.batch_size, config.train.seq_len + 1), jnp.int32)
    jax.block_until_ready(train.train_step(model, optimizer, batch))   # compile
    built[v] = (model, optimizer, batch)
  times = {v: [] for v in variants}
  for _ in range(3):
    for v, (model, optimizer, batch) in built.items():
      for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(train.train_step(model, optimizer, batch))
        times[v].append(time.perf_counter() - t0)
  return {v: statistics.median(t) for v, t in times.items()}


# --------------------------------------------------------------------------------------------------------------
# Report.
# --------------------------------------------------------------------------------------------------------------
def plot(runs: list[dict], best: dict, out: Path) -> None:
  """Per size: each variant's final eval loss against the peak learning rate (the runs' own evaluation), and its
  best run's loss minus b158's on the report's validation sequences, with +-2 paired standard errors."""
  names = sorted({r["size"] for r in runs})
  fig, axes = plt.subplots(len(names), 2, figsize=(12, 4.5 * len(names)), squeeze=False)
  for (ax, bars), size in zip(axes, names):
    for variant in dict.fromkeys(r["variant"] for r in runs):
      rows = sorted((r for r in runs if r["size"] == size and r["variant"] == variant and not r["diverged"]),
                    key=lambda r: r["lr"])
      if rows:
        ax.plot([r["lr"] for r in rows], [r["eval_loss"] for r in rows], "o-", color=COLORS.get(variant),
                label=LABELS.get(variant, variant))
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final eval loss (nats / byte)")
    ax.set_title(f"size {size}: eval loss against the learning rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    rows = [(v, b) for v, b in best.get(size, {}).items() if b.get("minus_b158") is not None]
    if rows:
      x = np.arange(len(rows))
      bars.bar(x, [b["minus_b158"] for _, b in rows], yerr=[2 * b["minus_b158_se"] for _, b in rows],
               color=[COLORS.get(v) for v, _ in rows], capsize=4)
      bars.set_xticks(x, [v for v, _ in rows])
      bars.axhline(0, color="black", lw=0.8)
      bars.set_ylabel("loss minus b158's (nats / byte)")
      bars.set_title(f"size {size}: each variant at its best learning rate (+-2 paired s.e.)")
      bars.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)


def markdown(best: dict, times: dict) -> str:
  lines = ["| size | variant | best lr | eval loss (+- s.e.) | minus b158 (+- paired s.e.) | o_proj in: kurtosis / "
           "max-mean (after Hadamard) | down_proj in: kurtosis / max-mean (after Hadamard) | step ms (x b158) |",
           "|---" * 8 + "|"]
  for size, rows in best.items():
    ref = rows.get("b158", {}).get("eval_loss")
    for v, b in rows.items():
      if b.get("eval_loss") is None:
        lines.append(f"| {size} | {v} | - | every run diverged | | | | |")
        continue
      act = b.get("activations", {})
      cell = lambda role: (f"{act[role]['as_is']['excess_kurtosis']:.1f} / {act[role]['as_is']['max_over_mean']:.1f} "
                           f"({act[role]['hadamard']['excess_kurtosis']:.1f} / "
                           f"{act[role]['hadamard']['max_over_mean']:.1f})") if role in act else ""
      t, t_ref = times.get(size, {}).get(v), times.get(size, {}).get("b158")
      speed = f"{1e3 * t:.0f} ({t / t_ref:.2f}x)" if t and t_ref else ""
      edge = " (edge)" if b.get("at_edge") else ""
      lines.append(f"| {size} | {v} | {b['lr']:.3g}{edge} | {b['eval_loss']:.4f} +- {b['eval_loss_se']:.4f} | "
                   f"{b.get('minus_b158', b['eval_loss'] - ref):+.4f} +- {b.get('minus_b158_se', float('nan')):.4f} | "
                   f"{cell('o_proj')} | {cell('down_proj')} | {speed} |"
                   if ref is not None else f"| {size} | {v} | {b['lr']:.3g}{edge} | {b['eval_loss']:.4f} | | | | |")
  return "\n".join(lines)


def keep_other_sizes(path: Path, result: dict) -> dict:
  """`result` plus the sizes of the results file at `path` that this run did not measure (same tokens and mode).

  Sizes are measured in separate sessions (s2 takes hours); each size's rows keep their own record of when they
  were measured, under "measured" (wall seconds, report-only or not, jax version).
  """
  stamp = {"wall_s": result["wall_s"], "report_only": result["report_only"], "jax": result["jax"]}
  result["measured"] = {size: stamp for size in result["best"]}
  if not path.exists():
    return result
  old = json.loads(path.read_text())
  if old.get("tokens_per_run") != result["tokens_per_run"] or old.get("smoke") != result["smoke"]:
    return result   # another budget or the smoke mode: nothing comparable to keep
  old_stamp = {k: old.get(k) for k in stamp}
  for size in sorted(set(old["best"]) - set(result["best"])):
    result["best"][size] = old["best"][size]
    result["step_seconds"][size] = old["step_seconds"][size]
    result["runs"] += [r for r in old["runs"] if r["size"] == size]
    result["measured"][size] = old.get("measured", {}).get(size, old_stamp)
  result["best"] = dict(sorted(result["best"].items()))
  result["step_seconds"] = dict(sorted(result["step_seconds"].items()))
  return result


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--workdir", default="runs/variants", help="one folder per size, one run per (variant, lr)")
  parser.add_argument("--out", default="experiments/results", help="where variants.json and variants.png go")
  parser.add_argument("--sizes", nargs="+", default=list(DEFAULT_SIZES), help=f"of {tuple(sizes.SIZES)}")
  parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"of {VARIANTS}")
  parser.add_argument("--tokens", type=int, default=1_200_000, help="training tokens per run")
  parser.add_argument("--extend", type=int, default=3, help="grid extensions while the best rate is at an edge")
  parser.add_argument("--eval_batches", type=int, default=32, help="validation batches for the reported losses")
  parser.add_argument("--time_steps", type=int, default=5, help="timed train steps per variant and round")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--smoke", action="store_true", help="tiny sizes and budget: the same code path")
  parser.add_argument("--report", action="store_true", help="analyse the finished runs only; train nothing")
  args = parser.parse_args(argv)
  unknown = [v for v in args.variants if v not in VARIANTS]
  if unknown or len(set(args.variants)) < len(args.variants):
    parser.error(f"--variants must be distinct names of {VARIANTS}, got {args.variants}")
  size_table = sizes.SMOKE_SIZES if args.smoke else sizes.SIZES
  bad = [s for s in args.sizes if s not in size_table]
  if bad:
    parser.error(f"--sizes must be of {tuple(size_table)}, got {bad}")
  if args.tokens < 1 or args.eval_batches < 1 or args.time_steps < 1 or args.extend < 0:
    parser.error("--tokens, --eval_batches and --time_steps must be positive, --extend non-negative")
  tokens = lr_sweep.SMOKE_TOKENS if args.smoke else args.tokens
  eval_batches = 2 if args.smoke else args.eval_batches
  workdir, out = Path(args.workdir), Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  runs, best, times = [], {}, {}
  for size_name in args.sizes:
    size = size_table[size_name]
    if args.report:   # only what is already finished on disk
      found = []
      for v in args.variants:
        for d in sorted((workdir / size_name).glob(f"{v}-lr*")):
          if (d / "summary.json").exists() or (d / "diverged.json").exists():
            lr = float(d.name.split("-lr", 1)[1])
            found += lr_sweep.run_sweep(workdir / size_name, size, [v], [lr], tokens, args.seed, args.smoke)
      size_runs = [{**r, "size": size_name} for r in found]
    else:
      size_runs = sweep(workdir, size_name, size, args.variants, tokens, args.seed, args.smoke, args.extend)
    runs += size_runs
    best[size_name] = {}
    for v in args.variants:
      if not any(r["variant"] == v for r in size_runs):
        continue
      opt = lr_sweep.optimum(size_runs, v)
      row = {"lr": opt["lr"], "at_edge": opt["at_edge"], "train_eval_loss": opt["eval_loss"], "eval_loss": None}
      if opt["lr"] is not None:
        run = next(r for r in size_runs if r["variant"] == v and r["lr"] == opt["lr"])
        row |= measure(run, eval_batches)
      best[size_name][v] = row
    paired_differences(best[size_name])
    done = [v for v in args.variants if any(r["variant"] == v for r in size_runs)]
    times[size_name] = step_times(size, done, tokens, args.seed, args.smoke, 2 if args.smoke else args.time_steps)
  result = {"runs": runs, "best": best, "step_seconds": times, "tokens_per_run": tokens, "smoke": args.smoke,
            "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()})", "jax": jax.__version__,
            "report_only": args.report, "wall_s": time.perf_counter() - t0}
  result = keep_other_sizes(out / "variants.json", result)
  tmp = out / "variants.json.tmp"   # written whole, then renamed: a killed run leaves the old file intact
  tmp.write_text(json.dumps(result, indent=2))
  tmp.replace(out / "variants.json")
  plot(result["runs"], result["best"], out / "variants.png")
  print(markdown(result["best"], result["step_seconds"]))
  print(f"\nwrote {out / 'variants.json'} and {out / 'variants.png'}")
  return result


if __name__ == "__main__":
  cli.run("variants", main)
