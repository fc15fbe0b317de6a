"""experiments/scaling_report: the plot and the markdown tables of experiments/scaling.py's results (-> experiments).

`plot` draws test loss against N with the c-free fits, the gaps to FP with their paired errors, and validation
loss against the learning rate per size for each variant; `markdown` prints the tables the README and
docs/experiments.md quote.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments import scaling_fit as sf  # noqa: E402

COLORS = {"fp": "tab:blue", "bitnet": "tab:orange", "b158": "tab:red"}
LABELS = {"fp": "FP (LLaMA-like)", "bitnet": "BitNet (W1A8)", "b158": "BitNet b1.58 (W1.58A8)"}


def plot(records: list[dict], chosen: dict, analysis: dict, out: Path, base_seed: int = 0) -> None:
  """Top: test loss against N with the c-free fits; the gaps to fp against N. Bottom: validation loss against the
  learning rate per size, one panel per variant: the base seed's grid as lines, other seeds' runs as crosses."""
  variants = list(chosen)
  fig, axes = plt.subplots(2, max(len(variants), 2), figsize=(5 * max(len(variants), 2), 9), squeeze=False)
  ax = axes[0, 0]
  for v, rows in chosen.items():
    n = np.asarray([r["n_params"] for r in rows], float)
    ax.errorbar(n, [r["test_loss"] for r in rows], yerr=[2 * r["test_loss_se"] for r in rows], fmt="o",
                color=COLORS[v], label=LABELS[v])
    f = analysis["fits"].get(v, {}).get("free_c")
    if f:
      grid = np.geomspace(n.min() * 0.8, n.max() * 1.25, 100)
      ax.plot(grid, sf.law(grid, f["a"], f["b"], f["c"]), color=COLORS[v], lw=1.2,
              label=f"{f['a']:.3g} N^{f['b']:.3f} + {f['c']:.3f}")
  ax.set(xscale="log", xlabel="non-embedding parameters N", ylabel="test loss, nats per byte (inference mode)",
         title="each point at its variant's best learning rate")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7)
  ax = axes[0, 1]
  for v in variants:
    if v == "fp" or not analysis["gaps"]:
      continue
    g = analysis["gaps"]
    ax.errorbar([x["n_params"] for x in g], [x[f"{v}_minus_fp"] for x in g],
                yerr=[2 * x[f"{v}_minus_fp_se"] for x in g], fmt="o-", color=COLORS[v], label=f"{v} - fp")
  ax.axhline(0, color="k", lw=0.8)
  ax.set(xscale="log", xlabel="N", ylabel="test loss minus fp's (+-2 s.e.)", title="gap to FP")
  ax.grid(alpha=0.3, which="both")
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=7)
  for ax in axes[0, 2:]:
    ax.axis("off")
  cmap = plt.get_cmap("viridis")
  sizes = sorted({r["size"] for r in records})
  for ax, v in zip(axes[1], variants):
    for k, s in enumerate(sizes):
      rows = sorted((r for r in records if r["variant"] == v and r["size"] == s and not r["diverged"]),
                    key=lambda r: r["lr"])
      grid = [r for r in rows if r["seed"] == base_seed]
      other = [r for r in rows if r["seed"] != base_seed]
      color = cmap(k / max(len(sizes) - 1, 1))
      if grid:
        ax.plot([r["lr"] for r in grid], [r["val_loss"] for r in grid], "o-", ms=3, color=color, label=s)
      if other:
        ax.plot([r["lr"] for r in other], [r["val_loss"] for r in other], "x", ms=6, color=color)
    ax.set(xscale="log", xlabel="peak learning rate", ylabel="validation loss", title=LABELS[v])
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
  for ax in axes.flat:
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())   # no crowded minor labels on log axes
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)


def markdown(chosen: dict, analysis: dict) -> str:
  variants = list(chosen)
  by = {(r["variant"], r["size"]): r for rows in chosen.values() for r in rows}
  sizes = sorted({s for (_, s) in by}, key=lambda s: min(r["n_params"] for (v, t), r in by.items() if t == s))
  head = "| size | " + " | ".join(f"{v}: N / tokens / lr / test loss" for v in variants) + " |"
  lines = [head, "|---" * (len(variants) + 1) + "|"]
  for s in sizes:
    cells = []
    for v in variants:
      r = by.get((v, s))
      k = len(r.get("seeds") or [None]) if r else 0
      cells.append("not done" if r is None else f"{r['n_params']:,} / {r['tokens']:,} / {r['lr']:.4g} / "
                   f"{r['test_loss']:.4f} +- {r['test_loss_se']:.4f}" + (f" ({k} seeds)" if k > 1 else ""))
    lines.append(f"| {s} | " + " | ".join(cells) + " |")
  noise = analysis.get("seed_noise", {})
  if any(x["sd"] is not None for x in noise.values()):
    lines += ["", "training noise, the between-seed s.d. of a point's test loss (pooled over its sizes): " + ", ".join(
        f"{v} {x['sd']:.4f} ({x['points']} points)" for v, x in noise.items() if x["sd"] is not None)]
  iv = analysis.get("bootstrap_free_c", {}).get("intervals", {})
  fmt = lambda v, k: "n/a" if not iv.get(v, {}).get(k) else f"[{iv[v][k][0]:.3g}, {iv[v][k][1]:.3g}]"
  lines += ["", "| variant | fit (c free) | b 95% | c 95% | c identified | held-out largest (c free; c = 0) | "
            "fit (c = 0) |", "|---|---|---|---|---|---|---|"]
  for v, f in analysis["fits"].items():
    if "free_c" not in f:
      lines.append(f"| {v} | {f['note']} | | | | | |")
      continue
    a, z = f["free_c"], f["c_0"]
    held = "; ".join(f"{h['relative_error']:+.2%}" if "relative_error" in h else "n/a"
                     for h in (f["held_out"], f["held_out_c_0"]))
    lines.append(f"| {v} | {a['a']:.4g} N^{a['b']:.4f} + {a['c']:.4f} | {fmt(v, 'b')} | {fmt(v, 'c')} | "
                 f"{f.get('c_identified', 'n/a')} | {held} | {z['a']:.4g} N^{z['b']:.4f} |")
  if "gap_slope_per_decade" in analysis:
    bs = analysis["bootstrap_free_c"]["gaps"]
    lines += [""] + [f"{v} - fp: slope {s:+.4f} nats per decade of N (95% interval "
                     f"[{bs[v]['slope_interval'][0]:+.4f}, {bs[v]['slope_interval'][1]:+.4f}]); fitted gap at the "
                     f"largest size 95% interval [{bs[v]['at_largest_interval'][0]:+.4f}, "
                     f"{bs[v]['at_largest_interval'][1]:+.4f}]" for v, s in analysis["gap_slope_per_decade"].items()]
  return "\n".join(lines)
