# ---
# jupyter:
#   colab:
#     name: 03_scaling_and_energy.ipynb
#     provenance: []
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: kernelspec,colab,accelerator,-jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/bitnet-jax/bitnet_jax/blob/main/colab/03_scaling_and_energy.ipynb)
#
# # 3. Scaling laws of BitNet and b1.58 against FP, and the papers' energy and memory models
#
# BitNet (section 3.3, "Inference-Optimal Scaling Law") fits the final loss of models of growing size to a
# power law with an irreducible term, $L(N) = aN^b + c$, and reports that BitNet's gap to an FP Transformer
# shrinks as $N$ grows; b1.58 (Table 1-2) reports that from 3B parameters it matches FP LLaMA.
#
# This notebook loads the results of our sweep (`experiments/scaling.py`: 7 sizes x {fp, bitnet, b158}, each
# point at its own variant's best learning rate, 10 training tokens per parameter, trained on the embedded
# corpus on a 2-core CPU and committed in `experiments/results/scaling.json`), re-fits the laws with 95%
# bootstrap bands, plots the gaps and the learning-rate curves, and then evaluates the papers' arithmetic-energy
# model (BitNet Tables 1-2) and memory model (b1.58 Table 1). Nothing here trains; it runs in seconds anywhere.

# %%
# Install. On Colab: clones the repository and pip-installs bitnet_jax with its requirements (once per runtime,
# a minute or two; jax gets the CUDA or TPU build when the runtime has a GPU or TPU). `pip install CLONE` builds
# and installs the wheel that tests/test_packaging.py builds and checks. From a checkout (this notebook opened
# inside the repository) it installs nothing and imports the checkout. If pip says it changed a package that was
# already imported, restart the session (Runtime > Restart session) and run again: this cell then skips the install.
import glob, importlib, importlib.util, os, re, shutil, subprocess, sys

REPO_URL = "https://github.com/bitnet-jax/bitnet_jax"
CLONE = os.path.abspath("bitnet_jax_src")


def find_checkout():
  """The repository root (bitnet_jax/ and configs/) when this notebook runs in a checkout, else None."""
  for d in (os.getcwd(), os.path.dirname(os.getcwd())):
    if os.path.isfile(os.path.join(d, "bitnet_jax", "__init__.py")) and os.path.isfile(
        os.path.join(d, "configs", "lm.py")):
      return d
  return None


def accelerator_jax(root):
  """The requirements' jax range with the CUDA / TPU extra when this machine has a GPU / TPU, else None."""
  kind = ("cuda12" if shutil.which("nvidia-smi") else
          "tpu" if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*") else None)
  if kind is None:
    return None
  spec = next(l.split("#")[0].strip() for l in open(os.path.join(root, "requirements.txt"))
              if re.match(r"jax\s*[<>=]", l))
  return spec.replace("jax", f"jax[{kind}]", 1)


ROOT = find_checkout()
if ROOT is None and importlib.util.find_spec("bitnet_jax") is None:   # Colab, first run
  if not os.path.isdir(CLONE):
    subprocess.run(["git", "clone", "--depth=1", REPO_URL, CLONE], check=True)
  extra = [accelerator_jax(CLONE)] if accelerator_jax(CLONE) else []
  subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", CLONE, *extra], check=True)
  importlib.invalidate_caches()

if ROOT is None:   # configs/ (the training configs) is not part of the installed package: take it from the clone
  if not os.path.isdir(CLONE):
    subprocess.run(["git", "clone", "--depth=1", REPO_URL, CLONE], check=True)
  ROOT = CLONE
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
print("repository:", ROOT)

# %%
import os

SMALL = os.environ.get("BITNET_SMALL") == "1"   # set by the tests: fewer bootstrap draws

import json

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown, display

from bitnet_jax import energy
from experiments import scaling_fit as sf   # the fit the sweep itself used (experiments/ from the checkout)
# %matplotlib inline

results = json.load(open(os.path.join(ROOT, "experiments", "results", "scaling.json")))
runs, setting = results["runs"], results["setting"]
print(f"{len(runs)} runs ({sum(r['diverged'] for r in runs)} diverged); {setting['tokens_per_param']:g} training "
      f"tokens per non-embedding parameter; finished points: " +
      ", ".join(f"{v} {len(s)}" for v, s in results["done"].items()))
VARIANTS = [v for v in ("fp", "bitnet", "b158") if results["done"].get(v)]


# Each point: the learning rate with the best validation loss (seed 0), its test loss averaged over the seeds
# trained at that rate, and a standard error that holds the seeds' spread as well as the test sample's.
points = {v: {p["size"]: p for p in results["points"][v]} for v in VARIANTS}
rows = ["| variant | size | N (non-embedding) | tokens | lr (best on validation) | seeds | test loss (nats/byte) |",
        "|---|---|---|---|---|---|---|"]
for v in VARIANTS:
  for p in points[v].values():
    rows.append(f"| {v} | {p['size']} | {p['n_params']:,} | {p['tokens']:,} | {p['lr']:.4g} | {len(p['seeds'])} | "
                f"{p['test_loss']:.4f} +- {p['test_loss_se']:.4f} |")
display(Markdown("\n".join(rows)))

# %% [markdown]
# ## Fitting $L(N) = aN^b + c$ with bootstrap bands
#
# Per variant: the Huber loss of log residuals from a grid of starts (`experiments/scaling_fit.py`, as in the
# Chinchilla replication literature) on the test loss of each size's chosen point. The band is a paired 95%
# bootstrap: resample the sizes with replacement (the same sizes for every variant), perturb each loss by its
# standard error, re-fit, and take the 2.5 and 97.5 percentiles of the fitted curves at every $N$. The crosses
# are the held-out check: a fit on all sizes but the largest, predicting the largest.

# %%
DRAWS = 30 if SMALL else 300
COLORS = {"fp": "tab:blue", "bitnet": "tab:orange", "b158": "tab:red"}
LABELS = {"fp": "FP (LLaMA-like)", "bitnet": "BitNet (W1A8)", "b158": "BitNet b1.58 (W1.58A8)"}
sizes = results["analysis"]["common_sizes"]   # the sizes every variant has finished, N ascending
n = np.array([points["fp"][s]["n_params"] for s in sizes], float)
loss = {v: np.array([points[v][s]["test_loss"] for s in sizes]) for v in VARIANTS}
se = {v: np.array([points[v][s]["test_loss_se"] for s in sizes]) for v in VARIANTS}
boot = sf.bootstrap(n, loss, se, draws=DRAWS, seed=0, keep_samples=True, screen=10 if SMALL else None)

fig, ax = plt.subplots(figsize=(8, 5))
grid = np.geomspace(n.min() * 0.8, n.max() * 1.25, 80)
for v in VARIANTS:
  f = boot["fits"][v]
  curves = np.array([sf.law(grid, *abc) for abc in boot["samples"][v]])
  lo, hi = np.percentile(curves, [2.5, 97.5], axis=0)
  ax.fill_between(grid, lo, hi, color=COLORS[v], alpha=0.15)
  ax.plot(grid, sf.law(grid, f["a"], f["b"], f["c"]), color=COLORS[v],
          label=f"{LABELS[v]}: {f['a']:.3g} N^{f['b']:.3f} + {f['c']:.3f}")
  ax.errorbar(n, loss[v], yerr=2 * se[v], fmt="o", color=COLORS[v], zorder=3)
  held = sf.held_out(n, loss[v], screen=10 if SMALL else None)
  ax.scatter([n[-1]], [held["predicted"]], marker="x", s=80, color=COLORS[v], zorder=4)
  committed = results["analysis"]["fits"][v]["free_c"]
  print(f"{v:7s} a={f['a']:.4g} b={f['b']:.4f} c={f['c']:.4f} (committed b={committed['b']:.4f}); b 95% "
        f"[{boot['intervals'][v]['b'][0]:.3f}, {boot['intervals'][v]['b'][1]:.3f}], c 95% "
        f"[{boot['intervals'][v]['c'][0]:.3f}, {boot['intervals'][v]['c'][1]:.3f}]; held-out largest: predicted "
        f"{held['predicted']:.4f}, measured {held['measured']:.4f} ({held['relative_error']:+.1%})")
ax.set_xscale("log")
ax.set_xlabel("non-embedding parameters N (log scale)")
ax.set_ylabel("test loss (nats per byte), +-2 s.e.")
ax.set_title("L(N) = a N^b + c at tuned learning rates, 95% bootstrap bands (x: held-out prediction)")
ax.grid(alpha=0.3, which="both")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## The gap to FP, size by size
#
# The papers' claim is a positive gap (quantised loss above FP) that shrinks towards zero as $N$ grows. Each
# gap's error bar is two paired standard errors: the two models are scored on the same test sequences, so the
# sequences' own spread in difficulty cancels, and both models' seed-to-seed spread is added. The slope is the
# least-squares change of the gap per decade of $N$, with its bootstrap interval.

# %%
fig, ax = plt.subplots(figsize=(7, 4))
for v in VARIANTS:
  if v == "fp":
    continue
  gaps = results["analysis"]["gaps"]   # per size, with the paired standard error the sweep computed
  gap = np.array([g[f"{v}_minus_fp"] for g in gaps])
  paired_se = np.array([g[f"{v}_minus_fp_se"] for g in gaps])
  lo, hi = boot["gaps"][v]["slope_interval"]
  ax.errorbar(n, gap, yerr=2 * paired_se, fmt="o-", color=COLORS[v],
              label=f"{LABELS[v]} - FP: {sf.gap_slope(n, gap):+.3f} per decade (95% [{lo:+.3f}, {hi:+.3f}])")
ax.axhline(0, color="k", lw=0.8)
ax.set_xscale("log")
ax.set_xlabel("non-embedding parameters N (log scale)")
ax.set_ylabel("test loss gap to FP (nats per byte)")
ax.set_title("Quantised minus FP test loss (below 0: the quantised model is ahead)")
ax.grid(alpha=0.3, which="both")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## The learning-rate curves behind each point
#
# Every size's grid of learning rates per variant (a factor-2 grid around a predicted optimum, extended until
# the best rate is inside it); the chosen rate is the one with the lowest validation loss. Each variant's
# optimum moves with $N$, and quantised models prefer rates several times FP's: a sweep at the recipes' fixed
# rates would compare untuned FP with untuned BitNet.

# %%
fig, axes = plt.subplots(1, len(VARIANTS), figsize=(5 * len(VARIANTS), 4), sharey=True)
order = sorted({r["size"] for r in runs})
for ax, v in zip(np.atleast_1d(axes), VARIANTS):
  for k, size in enumerate(order):
    pts = sorted((r for r in runs if r["variant"] == v and r["size"] == size and not r["diverged"]),
                 key=lambda r: r["lr"])
    if pts:
      ax.plot([r["lr"] for r in pts], [r["val_loss"] for r in pts], "o-", ms=3,
              color=plt.get_cmap("viridis")(k / max(len(order) - 1, 1)), label=size)
  ax.set(xscale="log", xlabel="peak learning rate", title=LABELS[v])
  ax.grid(alpha=0.3, which="both")
np.atleast_1d(axes)[0].set_ylabel("validation loss (nats per byte)")
np.atleast_1d(axes)[0].legend(fontsize=7, ncol=2)
plt.show()

# %% [markdown]
# ## The arithmetic-energy model (BitNet Tables 1-2)
#
# BitNet counts, per matmul of an $m \times n$ input by an $n \times p$ weight, $mnp$ multiplications and
# $m(n-1)p$ additions for FP; BitNet's binary weights turn the multiplications into INT8 additions, and its
# only multiplications are the scalings. Each operation costs the per-operation energy of Table 2 (45nm and
# 7nm). `energy.table1_comparison()` computes every cell of Table 1 (6.7B, 13B, 30B at 512 tokens) next to the
# paper's.

# %%
cells = energy.table1_comparison()
rows = ["| size | variant | process | op | ours (J) | paper (J) | rel. error |", "|---|---|---|---|---|---|---|"]
for c in cells:
  rows.append(f"| {c['size']} | {c['variant']} | {c['process']} | {c['op']} | {c['ours_j']:.3f} | "
              f"{c['paper_j']:.3f} | {c['rel_error']:+.1%} |")
within = sum(c["within_10pct"] for c in cells)
display(Markdown("\n".join(rows) + f"\n\n{within} of {len(cells)} cells within 10% of the paper."))

sizes = ["6.7b", "13b", "30b"]
fig, ax = plt.subplots(figsize=(7, 4))
width = 0.25
for i, variant in enumerate(("fp32", "fp16", "bitnet")):
  total = [sum(c["ours_j"] for c in cells if c["size"] == s and c["variant"] == variant and c["process"] == "7nm")
           for s in sizes]
  ax.bar(np.arange(3) + (i - 1) * width, total, width, label=variant)
ax.set_yscale("log")
ax.set_xticks(range(3), [s.upper() for s in sizes])
ax.set_xlabel("model (BitNet Table 1 configs)")
ax.set_ylabel("matmul energy, 512 tokens (J, log scale)")
ax.set_title("Arithmetic energy at 7nm: multiplications + additions")
ax.legend()
plt.show()
ratio = energy.b158_energy_ratio()
print("b1.58's 71.4x (FP16 vs INT8 per-operation energy at 7nm):", round(ratio["per_op"], 1))

# %% [markdown]
# ## The memory model (b1.58 Table 1)
#
# Weights at 2 bits (the paper measured with a 2-bit kernel) with 16-bit embeddings, against LLaMA in FP16,
# next to the GPU memory the paper measured. The paper's figures also hold activations, the KV cache and the
# runtime's own buffers, so the model is a lower bound; the ratios are what to compare.

# %%
rows = ["| model | size | weights (GB, ours) | paper (GB) | reduction vs LLaMA (ours) | paper |", "|---|---|---|---|---|---|"]
for r in energy.memory_comparison():
  rows.append(f"| {r['model']} | {r['size']} | {r['weights_gb']:.2f} | {r['paper_gb']:.2f} | "
              f"{r['reduction_vs_llama']:.2f}x | {r['paper_reduction_vs_llama']:.2f}x |")
display(Markdown("\n".join(rows)))

# %% [markdown]
# Where the numbers above disagree with the papers, the README says by how much and why; nothing here is
# tuned to agree. To extend the sweep (more sizes, variants or tokens per parameter), run
# `python experiments/scaling.py --help` in a checkout: it resumes from the results file and never retrains a
# recorded run.
