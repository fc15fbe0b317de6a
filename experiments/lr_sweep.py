"""experiments/lr_sweep: final loss against the peak learning rate, FP against BitNet b1.58 (train -> experiments).

    .venv/bin/python experiments/lr_sweep.py                 # the default sweep: 20 runs, ~30 min on 2 idle CPU cores
    .venv/bin/python experiments/lr_sweep.py --smoke         # the same code path in well under a minute
    .venv/bin/python experiments/lr_sweep.py --variants fp b158 bitnet --lrs 1e-3 3e-3 1e-2 3e-2 1e-1

The claim tested (../shared/PAPERS.md, section "1. BitNet (binary weights, W1A8)"; the BitNet paper's "Model
Training" section, paragraph "Large learning rate", and its "Stability Test"): a 1-bit model needs a higher learning
rate than its FP16 counterpart to converge, and stays stable at learning rates where FP diverges. The b1.58 recipe
follows it: FAQ Table 2 (section "2. BitNet b1.58" of PAPERS.md) gives b1.58 a peak of 1.5e-3 against LLaMA's 2.5e-4
at 700M, 6x higher.

Trains one size of `experiments/sizes.py` (`--size`, default s1: d_model 64, 2 layers, 4 heads) per variant
(`--variants`, default fp and b158; bitnet allowed) at each peak learning rate of `--lrs` (default 10 values, 2.5e-4 to
0.128 in factors of 2: 512x around the recipes' own 2.5e-4 (fp) and 1.5e-3 (b158)). Every run is
`sizes.run_config` (the variant's `-small` recipe at this size and the fixed 1.2M-token budget, data order,
seed and warmup) with only the learning rate changed: the whole schedule is scaled by `lr / recipe lr` (the b158
second-stage peak `lr2`, and fp's cosine end value 0.1 x lr, move with it; warmup length, weight decay coefficient,
Adam and clipping are untouched; AdamW multiplies the decay by the current LR, as in every recipe). A run whose
training loss becomes NaN/Inf (`train.NonFiniteLossError`), or whose final eval loss is not finite or worse than a
uniform guess (above ln(vocab): blown up but finite), is recorded as diverged (loss null) and the sweep goes on.
Each run lives in `WORKDIR/<variant>-lr<lr>`, resumes if interrupted, and is skipped once finished (a run that
diverged leaves `diverged.json` and is skipped too).

Reports, per variant, the best learning rate (lowest final eval loss, nats per byte), the learning rates within
`TOLERANCE` (0.02 nats) of it, whether the best sits at an edge of the grid (then the optimum may lie outside it),
the largest stable learning rate and the loss given up there. Writes `OUT/lr_sweep.json` and `OUT/lr_sweep.png`,
and prints a markdown table and a sentence for the README.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # run from a checkout: configs/ sits at the repository root

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from bitnet_jax import cli, train  # noqa: E402
from bitnet_jax.model import count_params  # noqa: E402


from experiments import sizes  # noqa: E402  (experiments/ as a namespace package, from ROOT)

LRS = tuple(2.5e-4 * 2 ** k for k in range(10))       # 2.5e-4 ... 0.128: 512x
SMOKE_LRS = (1e-3, 4e-3, 1.6e-2)
DEFAULT_VARIANTS = ("fp", "b158")
TOLERANCE = 0.02                                      # nats per byte: "as good as the best" within this
TOKENS = sizes.TOKENS                                 # the fixed-token runs' budget, 1.2M
SMOKE_TOKENS = 4 * 32 * 4                             # 4 steps of the smoke batch (4 x 32), as sizes.SMOKE_*
LABELS = {"fp": "FP (LLaMA-like)", "bitnet": "BitNet (W1A8)", "b158": "BitNet b1.58 (W1.58A8)"}
COLORS = {"fp": "tab:blue", "bitnet": "tab:orange", "b158": "tab:red"}


# --------------------------------------------------------------------------------------------------------------
# Arguments.
# --------------------------------------------------------------------------------------------------------------
def check_lrs(lrs) -> list[float]:
  """The swept learning rates, sorted; ValueError unless there are at least 2, all finite, > 0 and distinct."""
  lrs = [float(x) for x in lrs]
  if len(lrs) < 2:
    raise ValueError(f"--lrs needs at least 2 learning rates to locate an optimum, got {lrs}")
  bad = [x for x in lrs if not (math.isfinite(x) and x > 0)]
  if bad:
    raise ValueError(f"--lrs must all be finite and > 0, got {bad} in {lrs}")
  if len({_lr_name(x) for x in lrs}) < len(lrs):
    raise ValueError(f"--lrs must be distinct (each names its own run directory), got {lrs}")
  return sorted(lrs)


def check_variants(variants) -> list[str]:
  variants = list(variants)
  unknown = [v for v in variants if v not in sizes.VARIANTS]
  if unknown or not variants:
    raise ValueError(f"--variants must be a non-empty subset of {sizes.VARIANTS}, got {variants}")
  if len(set(variants)) < len(variants):
    raise ValueError(f"--variants must be distinct, got {variants}")
  return variants


def _lr_name(lr: float) -> str:
  return f"{lr:.4g}"


# --------------------------------------------------------------------------------------------------------------
# Configs.
# --------------------------------------------------------------------------------------------------------------
def with_lr(config, lr: float):
  """`config` with its whole learning-rate schedule scaled so that its peak is `lr` (in place; returned).

  Every LR field of the recipe moves by the same factor `lr / config.optim.lr`: `lr`, the b158 second-stage peak
  `lr2` and `end_lr` (fp: 0.1 x lr; bitnet, b158: 0). Warmup steps, weight decay, Adam and clipping are unchanged.
  """
  if not (math.isfinite(lr) and lr > 0):
    raise ValueError(f"lr must be finite and > 0, got {lr!r}")
  old = config.optim.copy_and_resolve_references()
  factor = lr / old.lr
  config.optim.lr = lr
  for key in ("lr2", "end_lr"):
    if old.get(key) is not None:
      config.optim[key] = old[key] * factor
  config.name = f"{config.name}-lr{_lr_name(lr)}"
  return config


def _config_summary(config) -> dict:
  o = config.optim.copy_and_resolve_references()
  return {"d_model": config.model.d_model, "n_layers": config.model.n_layers, "n_heads": config.model.n_heads,
          "d_ff": config.model.d_ff, "steps": config.train.steps, "batch_size": config.train.batch_size,
          "seq_len": config.train.seq_len, "seed": config.train.seed, "recipe": o.recipe, "lr": o.lr, "lr2": o.lr2,
          "end_lr": o.end_lr, "warmup_steps": o.warmup_steps, "weight_decay": o.weight_decay,
          "clip_norm": o.clip_norm}


def _check_same_run(run_dir: Path, config) -> None:
  """Refuses to resume a run directory written by another config (another size, budget or seed in the same
  `--workdir`): resuming its checkpoint would mix two runs."""
  saved = run_dir / "config.json"
  if not saved.exists():
    return
  old = json.loads(saved.read_text())
  mine = {"model": {k: config.model[k] for k in ("d_model", "n_layers", "n_heads", "d_ff")},
          "train": {k: config.train[k] for k in ("steps", "batch_size", "seq_len", "seed")},
          "optim": {"lr": config.optim.lr}}
  for section, fields in mine.items():
    for key, value in fields.items():
      theirs = old.get(section, {}).get(key)
      if theirs != value and not (isinstance(value, float) and theirs is not None and math.isclose(theirs, value)):
        raise ValueError(f"{run_dir} holds a run with {section}.{key}={theirs!r}, this sweep wants {value!r}: pick "
                         f"another --workdir (or remove that directory)")


# --------------------------------------------------------------------------------------------------------------
# The sweep.
# --------------------------------------------------------------------------------------------------------------
def _finished(run_dir: Path, steps: int) -> dict | None:
  """The record of a finished run of `steps` steps in `run_dir` (`summary.json`, or `diverged.json`), else None."""
  for name in ("summary.json", "diverged.json"):
    path = run_dir / name
    if path.exists():
      record = json.loads(path.read_text())
      if record.get("steps") == steps:
        return record
  return None


def _train_one(config, run_dir: Path) -> dict:
  """Trains one run; a NaN/Inf training loss becomes a `diverged.json` record instead of an exception."""
  t0 = time.perf_counter()
  try:
    return train.train_and_evaluate(config, run_dir, progress=False)
  except train.NonFiniteLossError as e:
    at = re.search(r"at step (\d+)", str(e))
    record = {"diverged": True, "steps": config.train.steps, "diverged_at_step": int(at.group(1)) if at else None,
              "reason": str(e), "wall_s": time.perf_counter() - t0, "lr": config.optim.lr}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "diverged.json").write_text(json.dumps(record, indent=2))
    return record


def _diverged(summary: dict, uniform_loss: float) -> tuple[bool, str | None]:
  """(diverged?, why) for a run's summary: a NaN/Inf training loss (`diverged.json`), a final eval loss that is
  not finite, or one above `uniform_loss` = ln(vocab), the loss of a uniform guess (a blown-up run whose loss stayed
  finite, e.g. 5e6 nats)."""
  if summary.get("diverged"):
    return True, summary.get("reason")
  loss = summary.get("eval_loss")
  if loss is None or not math.isfinite(loss):
    return True, f"final eval loss is {loss}"
  if loss > uniform_loss:
    return True, f"final eval loss {loss:.4g} is above a uniform guess's ln(vocab) = {uniform_loss:.4f}"
  return False, None


def run_sweep(workdir: Path, size: tuple[int, int, int], variants: list[str], lrs: list[float], tokens: int,
              seed: int, smoke: bool) -> list[dict]:
  """Trains (or finds finished) every (variant, lr) run; returns one record per run, lr-major."""
  plan = [(v, lr, with_lr(sizes.run_config(v, size, tokens, seed, smoke), lr)) for lr in lrs for v in variants]
  cost = {id(c): count_params(train.model_config_from(c))["total"] * c.train.steps for _, _, c in plan}  # ~FLOPs
  runs = []
  with tqdm(total=sum(cost.values()), desc="lr sweep", unit="", unit_scale=True, dynamic_ncols=True,
            bar_format="{l_bar}{bar}| {percentage:.0f}% [{elapsed}<{remaining}] {postfix}") as bar:
    for variant, lr, config in plan:
      run_dir = workdir / f"{variant}-lr{_lr_name(lr)}"
      bar.set_postfix_str(run_dir.name)
      summary = _finished(run_dir, config.train.steps)
      if summary is None:
        _check_same_run(run_dir, config)
        summary = _train_one(config, run_dir)
      diverged, reason = _diverged(summary, math.log(config.model.vocab_size))
      runs.append({"variant": variant, "lr": lr, "eval_loss": None if diverged else float(summary["eval_loss"]),
                   "diverged": diverged, "diverged_at_step": summary.get("diverged_at_step"), "reason": reason,
                   "wall_s": summary["wall_s"], "tokens": config.train.steps * config.train.batch_size
                   * config.train.seq_len, "n_params": count_params(train.model_config_from(config))["non_embedding"],
                   "workdir": str(run_dir), "config": _config_summary(config)})
      bar.update(cost[id(config)])
  return runs


# --------------------------------------------------------------------------------------------------------------
# Analysis.
# --------------------------------------------------------------------------------------------------------------
def optimum(runs: list[dict], variant: str, tolerance: float = TOLERANCE) -> dict:
  """The best learning rate of `variant` (lowest final eval loss among the runs that did not diverge), the swept
  learning rates within `tolerance` nats of it, and how the largest ones fared."""
  rows = sorted((r for r in runs if r["variant"] == variant), key=lambda r: r["lr"])
  ok = [r for r in rows if not r["diverged"]]
  out = {"tolerance_nats": tolerance, "diverged_lrs": [r["lr"] for r in rows if r["diverged"]],
         "largest_stable_lr": ok[-1]["lr"] if ok else None}
  if not ok:
    return {**out, "lr": None, "eval_loss": None, "lrs_within_tolerance": [], "range_within_tolerance": None,
            "at_edge": None, "note": "every run diverged"}
  best = min(ok, key=lambda r: r["eval_loss"])
  near = [r["lr"] for r in ok if r["eval_loss"] <= best["eval_loss"] + tolerance]
  return {**out, "lr": best["lr"], "eval_loss": best["eval_loss"], "lrs_within_tolerance": near,
          "range_within_tolerance": [near[0], near[-1]],
          "at_edge": best["lr"] in (rows[0]["lr"], rows[-1]["lr"]),
          "largest_stable_lr_loss_minus_best": ok[-1]["eval_loss"] - best["eval_loss"]}


def plot(runs: list[dict], optima: dict, recipe_lr: dict, title: str, out: Path) -> None:
  fig, ax = plt.subplots(figsize=(7.5, 4.8))
  top = ax.get_xaxis_transform()            # x in data, y in axes fraction: diverged runs sit at the top
  for i, (variant, best) in enumerate(optima.items()):
    rows = sorted((r for r in runs if r["variant"] == variant), key=lambda r: r["lr"])
    color = COLORS[variant]
    ok = [r for r in rows if not r["diverged"]]
    ax.plot([r["lr"] for r in ok], [r["eval_loss"] for r in ok], "o-", color=color, label=LABELS[variant])
    bad = [r["lr"] for r in rows if r["diverged"]]
    if bad:
      ax.scatter(bad, [0.96 - 0.05 * i] * len(bad), marker="X", s=90, color=color, transform=top, clip_on=False,
                 zorder=4, label=f"{variant}: diverged (no final loss)")
    if best["lr"] is not None:
      ax.scatter([best["lr"]], [best["eval_loss"]], marker="*", s=260, color=color, edgecolor="black", zorder=5,
                 label=f"{variant} optimum: lr {best['lr']:.3g}, {best['eval_loss']:.4f}")
      lo, hi = best["range_within_tolerance"]
      ax.hlines(best["eval_loss"] + best["tolerance_nats"], lo, hi, color=color, lw=4, alpha=0.35,
                label=f"{variant}: within {best['tolerance_nats']} nats of its best")
    ax.axvline(recipe_lr[variant], color=color, ls=":", lw=1.2, label=f"{variant} recipe lr ({recipe_lr[variant]:.3g})")
  # The diverged markers live in axes coordinates, which do not stretch the autoscaled x range: set it from the grid.
  lrs = sorted({r["lr"] for r in runs})
  ax.set_xscale("log")
  ax.set_xlim(lrs[0] / 1.4, lrs[-1] * 1.4)
  if lrs[-1] / lrs[0] < 1e3:                  # a few decades: label the swept values themselves
    ax.set_xticks(lrs, [f"{lr:.3g}" for lr in lrs], fontsize=8)
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  ax.set_xlabel("peak learning rate (log scale; the whole schedule scales with it)")
  ax.set_ylabel("final eval loss (nats per byte)")
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out, dpi=130)
  plt.close(fig)


def markdown(runs: list[dict], optima: dict, recipe_lr: dict, setting: str) -> str:
  variants = list(optima)
  by = {(r["variant"], r["lr"]): r for r in runs}
  lines = ["| peak lr | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
  for lr in sorted({r["lr"] for r in runs}):
    cells = []
    for v in variants:
      r = by[(v, lr)]
      cell = "diverged" if r["diverged"] else f"{r['eval_loss']:.4f}"
      cells.append(f"**{cell}**" if lr == optima[v]["lr"] else cell)
    lines.append(f"| {lr:.3g} | " + " | ".join(cells) + " |")
  lines += ["", f"| variant | recipe lr | best lr | best loss | lrs within {TOLERANCE} nats | largest stable lr |",
            "|---|---|---|---|---|---|"]
  for v, o in optima.items():
    if o["lr"] is None:
      lines.append(f"| {v} | {recipe_lr[v]:.3g} | all diverged | | | |")
      continue
    lo, hi = o["range_within_tolerance"]
    edge = " (grid edge)" if o["at_edge"] else ""
    lines.append(f"| {v} | {recipe_lr[v]:.3g} | {o['lr']:.3g}{edge} | {o['eval_loss']:.4f} | {lo:.3g} to {hi:.3g} | "
                 f"{o['largest_stable_lr']:.3g} (+{o['largest_stable_lr_loss_minus_best']:.4f}) |")
  return "\n".join(lines + ["", readme_sentence(optima, setting)])


def readme_sentence(optima: dict, setting: str) -> str:
  """One sentence for the README: each variant's measured optimum, and how it compares with fp's."""
  parts = []
  for v, o in optima.items():
    if o["lr"] is None:
      parts.append(f"{v} diverged at every learning rate")
      continue
    lo, hi = o["range_within_tolerance"]
    near = f"within {TOLERANCE} nats from {lo:.3g} to {hi:.3g}" if lo != hi else f"no other lr within {TOLERANCE} nats"
    edge = ", at the edge of the grid" if o["at_edge"] else ""
    parts.append(f"{v} at lr {o['lr']:.3g} ({o['eval_loss']:.4f} nats/byte; {near}{edge})")
  sentence = f"At {setting}, the final eval loss is lowest for " + "; ".join(parts)
  fp = optima.get("fp", {}).get("lr")
  others = [(v, o["lr"]) for v, o in optima.items() if v != "fp" and o["lr"] is not None]
  if fp is not None and others:
    verdicts = []
    for v, lr in others:
      ratio = lr / fp
      how = ("higher than fp's, as the BitNet paper reports" if ratio > 1.001 else
             "lower than fp's, unlike the BitNet paper's claim" if ratio < 0.999 else
             "the same as fp's at this grid's resolution")
      verdicts.append(f"the {v} optimum is {ratio:.3g}x fp's ({how})")
    sentence += ": " + ", ".join(verdicts)
  return sentence + "."


# --------------------------------------------------------------------------------------------------------------
# main.
# --------------------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
  argv = cli.strip_debug(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="--debug shows the traceback of an error")
  parser.add_argument("--workdir", default=None,
                      help="one subdirectory per run (resumable); default runs/lr_sweep (--smoke: runs/lr_sweep-smoke)")
  parser.add_argument("--out", default=None, help="where lr_sweep.json and lr_sweep.png go; default "
                                                  "experiments/results (--smoke: the workdir, so the committed "
                                                  "results stay)")
  parser.add_argument("--size", default="s1", choices=list(sizes.SIZES),
                      help="model size from experiments/sizes.py SIZES (default s1: d_model 64, 2 layers, 4 heads)")
  parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), help=f"of {sizes.VARIANTS}")
  parser.add_argument("--lrs", nargs="+", type=float, default=None,
                      help=f"peak learning rates (default {', '.join(f'{x:.3g}' for x in LRS)}; --smoke: "
                           f"{', '.join(f'{x:.3g}' for x in SMOKE_LRS)})")
  parser.add_argument("--tokens", type=int, default=TOKENS, help="training tokens per run (every run)")
  parser.add_argument("--seed", type=int, default=0, help="model init and data order (every run)")
  parser.add_argument("--smoke", action="store_true", help="tiny size, 3 lrs, 4 steps: the same code path, < 1 min")
  args = parser.parse_args(argv)
  try:
    lrs = check_lrs(args.lrs if args.lrs is not None else (SMOKE_LRS if args.smoke else LRS))
    variants = check_variants(args.variants)
    if args.tokens < 1:
      raise ValueError(f"--tokens must be positive, got {args.tokens}")
  except ValueError as e:
    parser.error(str(e))
  size_name, size = ("smoke-s1", sizes.SMOKE_SIZES["s1"]) if args.smoke else (args.size, sizes.SIZES[args.size])
  tokens = SMOKE_TOKENS if args.smoke else args.tokens
  workdir = Path(args.workdir or ("runs/lr_sweep-smoke" if args.smoke else "runs/lr_sweep"))
  out = Path(args.out or (workdir if args.smoke else "experiments/results"))
  out.mkdir(parents=True, exist_ok=True)

  t0 = time.perf_counter()
  runs = run_sweep(workdir, size, variants, lrs, tokens, args.seed, args.smoke)
  optima = {v: optimum(runs, v) for v in variants}
  recipe_lr = {v: sizes.run_config(v, size, tokens, args.seed, args.smoke).optim.lr for v in variants}
  n_params = {v: next(r["n_params"] for r in runs if r["variant"] == v) for v in variants}
  n_text = ", ".join(f"{n:,} ({v})" for v, n in n_params.items())
  setting = (f"size {size_name} (d_model {size[0]}, {size[1]} layer{'s' * (size[1] != 1)}, {size[2]} heads; "
             f"{n_text} non-embedding parameters) and {runs[0]['tokens']:,} training tokens per run")
  ratios = {f"{v}/fp": optima[v]["lr"] / optima["fp"]["lr"] for v in variants
            if v != "fp" and "fp" in optima and optima[v]["lr"] and optima["fp"]["lr"]}
  result = {"runs": runs, "optimum": optima, "optimum_lr_ratio": ratios, "recipe_lr": recipe_lr, "lrs": lrs,
            "size": {"name": size_name, "d_model": size[0], "n_layers": size[1], "n_heads": size[2],
                     "n_params_non_embedding": n_params},
            "tokens_per_run": runs[0]["tokens"], "seed": args.seed, "smoke": args.smoke,
            "loss": "final eval loss, nats per byte (byte-level tokens)", "corpus": "stdlib (byte level)",
            "tolerance_nats": TOLERANCE, "sweep_wall_s": time.perf_counter() - t0,
            "readme": readme_sentence(optima, setting)}
  (out / "lr_sweep.json").write_text(json.dumps(result, indent=2, allow_nan=False))
  plot(runs, optima, recipe_lr, f"Final loss against peak learning rate: {size_name} (d_model {size[0]}, "
       f"{size[1]} layer{'s' * (size[1] != 1)}), {runs[0]['tokens']:,} tokens per run", out / "lr_sweep.png")
  print(markdown(runs, optima, recipe_lr, setting))
  print(f"\nwrote {out / 'lr_sweep.json'} and {out / 'lr_sweep.png'}")
  return result


if __name__ == "__main__":
  cli.run("lr_sweep", main)
