# ---
# jupyter:
#   accelerator: TPU
#   colab:
#     name: 04_sharding.ipynb
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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/bitnet-jax/bitnet_jax/blob/main/colab/04_sharding.ipynb)
#
# # 4. Sharding BitNet: per-shard statistics and collectives
#
# BitNet section 2.3: a quantised layer needs statistics of its weight (the mean for binary $\alpha$, the mean
# absolute value for $\beta$ or b1.58's $\gamma$) and of its input (the absmax). Over a weight split across
# devices, one global statistic would need an all-reduce in every layer. BitNet's answer is **group
# quantisation**: one statistic per shard, so that no device needs another device's values.
#
# This notebook builds a mesh of 8 devices, shows where the per-block scales of a sharded kernel live, and
# counts the collectives of compiled train steps: b1.58 against FP under tensor parallelism, and the bytes
# FSDP all-gathers. On a Colab **TPU** runtime with 8 cores (TPU v2-8) the 8 devices are real TPU cores; on
# a CPU or GPU runtime (and in the tests) XLA simulates 8 CPU devices, which compile the same sharded
# programs.

# %%
# 8 devices. On a Colab TPU v2-8 runtime jax sees 8 real TPU cores. Anywhere else (a CPU runtime, one GPU, this
# laptop) XLA simulates 8 CPU devices, which compile and run the same sharded programs. XLA reads the flag when
# jax starts, so this must run before jax is imported (restart the session if jax was imported before).
import glob, os

ON_TPU = bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")) or "COLAB_TPU_ADDR" in os.environ
if not ON_TPU:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
  os.environ["JAX_PLATFORMS"] = "cpu"

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

import jax
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown, display
from jax.sharding import NamedSharding

from bitnet_jax import quant, sharding, train
from configs import lm

if jax.device_count() < 8:
  raise RuntimeError(f"this notebook needs 8 devices, jax sees {jax.devices()}: use a CPU runtime or a TPU "
                     f"v2-8, and run the first cell before anything imports jax")
print(jax.device_count(), "devices:", jax.devices()[0].platform, "| SMALL =", SMALL)

# %% [markdown]
# ## A mesh and the rules table
#
# `sharding.make_mesh` builds a 3-D mesh with axes `data`, `fsdp` and `tensor`. Parameters carry logical axis
# names only (a BitLinear kernel of the FFN is `("embed", "mlp")`); one rules table,
# `sharding.DEFAULT_RULES`, maps them to mesh axes: `embed` (the d_model axis) over `fsdp`, `mlp` / `heads`
# over `tensor` (Megatron's column- and row-parallel layers).

# %%
mesh = sharding.make_mesh(dict(data=1, fsdp=2, tensor=4))
print("mesh:", dict(mesh.shape))
print("device grid (fsdp x tensor):\n", np.vectorize(lambda d: d.id)(mesh.devices[0]))
for logical, axes in sharding.DEFAULT_RULES:
  print(f"  {logical:12s} -> {axes}")
spec = sharding.logical_spec(sharding.DEFAULT_RULES, ("embed", "mlp"))
print("a kernel named ('embed', 'mlp') is sharded as", spec)

# %% [markdown]
# ## Per-shard statistics
#
# A kernel of shape [d_model, d_ff] sharded over (fsdp 2, tensor 4) gives each device one block. With
# `groups=(2, 4)`, the block grid of the shards, `quant.ternary_codes` computes one b1.58 scale
# $\gamma_g = \operatorname{mean}\lvert W^{(g)}\rvert$ per block (BitNet's group formulas of section 2.3, with
# b1.58's absmean). Compiled on the mesh, each device reduces its own block, and its scale stays on that
# device.

# %%
d_model, d_ff = (256, 512) if SMALL else (2048, 8192)
w = 0.02 * jax.random.normal(jax.random.key(0), (d_model, d_ff))
w = jax.device_put(w, NamedSharding(mesh, spec))
grid = (mesh.shape["fsdp"], mesh.shape["tensor"])

per_block = jax.jit(lambda w: quant.ternary_codes(w, groups=grid),
                    out_shardings=(NamedSharding(mesh, spec), NamedSharding(mesh, spec)))
codes, scale = per_block(w)
print("codes", codes.shape, codes.dtype, "| scales", scale.shape, scale.sharding.spec)

scale_on = {s.device.id: float(np.asarray(s.data).squeeze()) for s in scale.addressable_shards}
rows = ["| device | kernel block (rows, cols) | mean abs of the block, computed here "
        "| scale held by the device |", "|---|---|---|---|"]
for s in sorted(w.addressable_shards, key=lambda s: s.device.id):
  r, c = s.index
  rows.append(f"| {s.device.id} | {r.start}:{r.stop}, {c.start}:{c.stop} | "
              f"{float(np.abs(np.asarray(s.data)).mean()):.6f} | {scale_on[s.device.id]:.6f} |")
display(Markdown("\n".join(rows)))

global_stat = jax.jit(lambda w: quant.ternary_codes(w))   # one scale for the whole kernel
for label, fn in (("per-block scales (groups = shard grid)", per_block),
                  ("one global scale (groups = 1)", global_stat)):
  counts = sharding.collective_stats(fn.lower(w).compile().as_text())["counts"]
  print(f"{label:40s} collectives: {({k: v for k, v in counts.items() if v} or 'none')}")

# %% [markdown]
# Each device's scale is the mean absolute value of the block it holds, and the per-block quantisation
# compiles to no collective at all, while a single global scale needs a reduction across devices.
#
# ## Collectives of whole train steps
#
# The model does this in every BitLinear: with `sharding.per_shard_groups=True` (the default),
# `train.setup_mesh` sets the model's `groups` to the tensor-parallel size and `fsdp_groups` to the FSDP size.
# `train.lower_train_step(config)` lowers the train step for the configured mesh from abstract state (nothing
# is allocated), and `sharding.collective_stats` counts the collectives in the compiled HLO. Five steps on two
# meshes of 8 devices:
#
# * **tensor parallel** (data 2 x tensor 4): FP, b1.58 with per-shard groups, and b1.58 with one global
#   statistic per weight (`per_shard_groups=False`, groups 1) as a control;
# * **FSDP** (data 2 x fsdp 4): FP and b1.58. FSDP all-gathers each weight before its matmul; a BitLinear
#   quantises its own shard first and gathers the int8 codes, not the float32 latent weight.

# %%
SIZE = "tiny" if SMALL else "small"
MESHES = {"tensor parallel": dict(data=2, fsdp=1, tensor=4), "FSDP": dict(data=2, fsdp=4, tensor=1)}
RUNS = [("tensor parallel", "fp", True), ("tensor parallel", "b158", True), ("tensor parallel", "b158", False),
        ("FSDP", "fp", True), ("FSDP", "b158", True)]


def step_collectives(mesh_name, variant, per_shard):
  config = lm.get_config(f"{variant}-{SIZE}")
  config.model.vocab_size = 264            # 259 byte ids padded to a multiple of the 4 tensor shards
  config.mesh = MESHES[mesh_name]
  config.sharding.per_shard_groups = per_shard
  config.train.update(batch_size=8, seq_len=32 if SMALL else 128)
  if SMALL:
    config.model.n_layers = 1              # compiling is most of the time on a CPU
  lowered, model_cfg, _ = train.lower_train_step(config)
  stats = sharding.collective_stats(lowered.compile().as_text())
  groups = (model_cfg.groups, model_cfg.fsdp_groups) if variant != "fp" else "-"   # fp: no quantisation
  return {**stats, "groups": groups}


results = {}
for mesh_name, variant, per_shard in RUNS:
  label = variant if per_shard else f"{variant}, global statistic"
  results[(mesh_name, label)] = step_collectives(mesh_name, variant, per_shard)

ops = sharding.COLLECTIVES
rows = ["| mesh | model | groups (tensor, fsdp) | " + " | ".join(ops) + " | all-gather bytes by dtype |",
        "|---|---|---|" + "---|" * len(ops) + "---|"]
for (mesh_name, label), r in results.items():
  by_dtype = ", ".join(f"{d} {b / 1e3:,.1f} KB" for d, b in sorted(r["bytes_by_dtype"]["all-gather"].items()))
  rows.append(f"| {mesh_name} | {label} | {r['groups']} | " + " | ".join(str(r["counts"][o]) for o in ops)
              + f" | {by_dtype or '-'} |")
display(Markdown("\n".join(rows)))

# %%
fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
tp = [k for k in results if k[0] == "tensor parallel"]
shown = [o for o in ops if any(results[k]["counts"][o] for k in tp)]
x = np.arange(len(shown))
for i, key in enumerate(tp):
  axes[0].bar(x + (i - 1) * 0.27, [results[key]["counts"][o] for o in shown], width=0.27, label=key[1])
axes[0].set_xticks(x, shown)
axes[0].set_title("Collectives per train step, tensor parallel (data 2 x tensor 4)")
axes[0].set_xlabel("collective")
axes[0].set_ylabel("count in the compiled step")
axes[0].legend()

fsdp = [k for k in results if k[0] == "FSDP"]
dtypes = sorted({d for k in fsdp for d in results[k]["bytes_by_dtype"]["all-gather"]})
bottom = np.zeros(len(fsdp))
for d in dtypes:
  vals = np.array([results[k]["bytes_by_dtype"]["all-gather"].get(d, 0.0) for k in fsdp]) / 1e3
  axes[1].bar([k[1] for k in fsdp], vals, bottom=bottom, label=d)
  bottom += vals
axes[1].set_title("All-gathered bytes per device, FSDP (data 2 x fsdp 4)")
axes[1].set_xlabel("model")
axes[1].set_ylabel("KB per step")
axes[1].legend(title="dtype")
plt.tight_layout()
plt.show()

# %% [markdown]
# Under tensor parallelism the b1.58 step with per-shard groups has exactly the collectives of the FP step
# (the all-reduces of Megatron tensor parallelism): quantisation adds no communication. The control
# with one global statistic needs extra all-reduces. Under FSDP the b1.58 step gathers the BitLinear weights
# as int8 codes (`s8`) instead of float32, 4x fewer bytes for those weights; the float32 that remains is the
# embedding, the head and the norm gains, which stay in high precision. The codes travel as int8, not yet
# 2-bit packed.
#
# To plan a real pod run the same way, `python -m bitnet_jax.train --config=configs/lm.py:b158-3b --dry_run
# --simulate_devices=64 --config.mesh.fsdp=4 --config.mesh.tensor=4 ...` prints the per-device memory and
# collectives without allocating anything (see the README).
