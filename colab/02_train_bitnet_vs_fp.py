# ---
# jupyter:
#   accelerator: GPU
#   colab:
#     name: 02_train_bitnet_vs_fp.ipynb
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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/bitnet-jax/bitnet_jax/blob/main/colab/02_train_bitnet_vs_fp.ipynb)
#
# # 2. Train BitNet b1.58 and its FP baseline side by side
#
# This notebook trains two byte-level language models of the same shape on the embedded corpus (the
# Python standard library's own source, about 12 MB, no download): **b1.58** (ternary weights, 8-bit
# activations, the FAQ recipe) and the **FP** LLaMA-like baseline. Then it plots both loss curves, packs the
# b1.58 weights into 2 bits per weight and compares the memory with FP16, and generates text from both.
#
# Everything goes through the library entry points: `train.train_and_evaluate(config, workdir)` (the same
# function as `python -m bitnet_jax.train`), `train.load_checkpoint`, `packing.quantize_for_inference` and
# `generate.greedy`. With a GPU runtime (Runtime > Change runtime type) the default sizes take a few
# minutes; on a CPU they take about 8.

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

SMALL = os.environ.get("BITNET_SMALL") == "1"   # set by the tests: a shrunken run (about a minute on 2 CPU cores)

import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from absl import logging
from IPython.display import Markdown, display

from bitnet_jax import packing, train
from bitnet_jax.generate import greedy
from bitnet_jax.model import preset
from bitnet_jax.tokenizer import ByteTokenizer
from configs import lm

logging.set_verbosity(logging.WARNING)   # orbax logs every checkpoint save at INFO
SIZE = "tiny" if SMALL else "small"      # configs/lm.py variants: b158-tiny / fp-tiny, b158-small / fp-small
WORKDIR = Path(tempfile.mkdtemp(prefix="bitnet_colab_"))
print(jax.devices(), "| SMALL =", SMALL, "| runs in", WORKDIR)


# %% [markdown]
# ## Configs
#
# `configs/lm.py` names the variants: `b158-SIZE` uses b1.58's recipe (Adam 0.9/0.95, the two-stage linear
# schedule of the FAQ Table 2, peak learning rate 1.5e-3), `fp-SIZE` the LLaMA recipe (cosine decay, peak
# 2.5e-4). Same width, depth, heads and data order. `small` is the quickstart's size (400 steps); the
# shrunken test run trains `tiny` models for 40 steps.

# %%
def make_config(variant):
  config = lm.get_config(f"{variant}-{SIZE}")
  if SMALL:
    config.train.update(steps=40, eval_every=20, checkpoint_every=40, log_every=2)
    config.optim.warmup_steps = 4   # a tenth of the run, as for the full-length configs
    config.data.eval_batches = 2
  return config


configs = {v: make_config(v) for v in ("b158", "fp")}
c = configs["b158"]
print(f"model: d_model={c.model.d_model}, layers={c.model.n_layers}, heads={c.model.n_heads}; "
      f"train: {c.train.steps} steps x batch {c.train.batch_size} x {c.train.seq_len} bytes")

# %% [markdown]
# ## Train
#
# Each run writes `config.json`, `metrics.jsonl`, TensorBoard events, orbax checkpoints and `summary.json` in
# its own directory. Running the cell again resumes from the checkpoints (a finished run is not retrained).

# %%
summaries = {}
for variant, config in configs.items():
  summaries[variant] = train.train_and_evaluate(config, WORKDIR / variant)
  print(train.format_summary(summaries[variant]))

# %% [markdown]
# ## Loss curves
#
# Training loss at every logged step and held-out loss at each evaluation, in nats per byte (the
# cross-entropy of the next byte; divide by ln 2 for bits per byte).

# %%
fig, ax = plt.subplots(figsize=(8, 4.5))
for variant, color in (("b158", "tab:red"), ("fp", "tab:blue")):
  rows = train.read_metrics(WORKDIR / variant / "metrics.jsonl")
  ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], color=color, alpha=0.6,
          label=f"{variant} train")
  ev = [r for r in rows if "eval_loss" in r]
  ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o--", color=color, label=f"{variant} eval")
ax.set_title(f"BitNet b1.58 vs FP baseline ({SIZE} models, Python stdlib bytes)")
ax.set_xlabel("step")
ax.set_ylabel("cross-entropy (nats per byte)")
ax.grid(alpha=0.3)
ax.legend()
plt.show()

table = ["| run | eval loss (nats/byte) | eval ppl | tokens/s | parameters |", "|---|---|---|---|---|"]
for variant, s in summaries.items():
  table.append(f"| {s['name']} | {s['eval_loss']:.4f} | {s['eval_ppl']:.3f} | {s['tokens_per_s']:.0f} | "
               f"{s['params']['total']:,} |")
display(Markdown("\n".join(table)))

# %% [markdown]
# These are short runs with each paper's own recipe: b1.58 trains at a learning rate six times higher than
# the LLaMA recipe, so early on it is usually ahead. Neither number says anything about the converged gap;
# that needs the scaling experiment.
#
# ## Pack the b1.58 weights
#
# For inference only the codes and scales of each BitLinear are needed. `packing.quantize_for_inference`
# takes every ternary kernel's codes (`quant.ternary_codes`, b1.58 eq. 1-3) and packs four codes per byte
# (`"2bit"`, code + 1 in two bits) or five per byte (`"base3"`, 3^5 = 243 <= 256: 1.6 bits, a little more
# when a row's length is not a multiple of 5), with one float32 scale per group. The embedding, the output
# head and the norm gains stay 16-bit, as neither paper quantises them. The packed kernels de-quantise
# exactly to the kernels the trained model computes with.

# %%
models = {v: train.load_checkpoint(WORKDIR / v)[0] for v in ("b158", "fp")}
packed = {fmt: packing.quantize_for_inference(models["b158"], fmt) for fmt in ("2bit", "base3")}
sizes = {fmt: packing.packed_bytes(tree) for fmt, tree in packed.items()}

layer = models["b158"].blocks[0].attn.q_proj
same = np.array_equal(np.asarray(packed["2bit"]["linear"]["blocks/0/attn/q_proj"].kernel()),
                      np.asarray(layer.quantized_kernel()))
print("packed q_proj of block 0 de-quantises to the trained model's kernel exactly:", same)
print(f"measured bits per quantised weight: 2bit {sizes['2bit']['bits_per_weight']:.3f}, "
      f"base3 {sizes['base3']['bits_per_weight']:.3f} (log2 3 = 1.585 is the limit)")

params_fp = summaries["fp"]["params"]["total"]
s2 = sizes["2bit"]
linear = s2["quantized_weights"]   # parameters in the linear layers (the same shapes in both models)
bars = {   # name -> (linear-layer weights, scales, everything else) in bytes
    "FP baseline, FP16": (2 * linear, 0, 2 * (params_fp - linear)),
    "b1.58 latent, FP32 (training)": (4 * s2["quantized_weights"], 0, 4 * s2["dense_params"]),
    "b1.58 packed, 2-bit": (s2["code_bytes"], s2["scale_bytes"], s2["dense_bytes"]),
    "b1.58 packed, base-3": (sizes["base3"]["code_bytes"], sizes["base3"]["scale_bytes"],
                             sizes["base3"]["dense_bytes"]),
}
table = ["| weights | linear layers | scales | embedding, head, norms | total | FP16 size / this |",
         "|---|---|---|---|---|---|"]
for k, (a, b, d) in bars.items():
  table.append(f"| {k} | {a / 1e3:,.1f} KB | {b / 1e3:,.2f} KB | {d / 1e3:,.1f} KB | "
               f"{(a + b + d) / 1e3:,.1f} KB | {2 * params_fp / (a + b + d):.2f}x |")
display(Markdown("\n".join(table)))

fig, ax = plt.subplots(figsize=(8, 3.8))
names = list(bars)
parts = np.array([bars[k] for k in names]) / 1e6
left = np.zeros(len(names))
for i, label in enumerate(("linear layers (BitLinear)", "group scales", "embedding, head, norms")):
  ax.barh(names, parts[:, i], left=left, label=label)
  left += parts[:, i]
ax.invert_yaxis()
ax.set_title("Weight memory of the trained models")
ax.set_xlabel("MB")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# The linear layers shrink 8x (16 bits to 2), but the embedding, the head and the norms stay 16-bit and
# set a floor; in a small byte-level model they are a large share of the weights. Their share falls as models
# grow. Here is the same computation (from shapes, `jax.eval_shape`, nothing allocated) for the paper's 700M
# and 3B configurations. The b1.58 paper measured 2.60x and 3.55x less GPU memory there (its Table 1, with
# everything else the runtime holds besides the weights).

# %%
for name in ("b158-700m", "b158-3b"):
  sz = packing.inference_weight_bytes(preset(name), fmt="2bit")
  print(f"{name}: FP16 {sz['fp16_bytes'] / 1e9:.2f} GB, 2-bit packed {sz['total_bytes'] / 1e9:.2f} GB "
        f"({sz['fp16_bytes'] / sz['total_bytes']:.2f}x smaller)")

# %% [markdown]
# ## Generate
#
# Greedy decoding from both restored checkpoints (`generate.greedy`: the most likely next byte at every
# step), with the prompt `def `. After so few steps expect Python-looking fragments at best.

# %%
tokenizer = ByteTokenizer()
prompt = jnp.asarray(tokenizer.encode("def "))[None]        # (1, P) byte ids
n_new = 40 if SMALL else 120
for variant, model in models.items():
  out = greedy(model, prompt, n_new)                       # (1, P + n_new)
  print(f"--- {variant} ---")
  print(tokenizer.decode(np.asarray(out[0])))
