# ---
# jupyter:
#   colab:
#     name: 01_quantizers.ipynb
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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/bitnet-jax/bitnet_jax/blob/main/colab/01_quantizers.ipynb)
#
# # 1. The quantisers of BitNet and BitNet b1.58
#
# BitNet ([arXiv 2310.11453](https://arxiv.org/abs/2310.11453)) trains transformers whose linear layers use
# **binary** weights {-1, +1}; BitNet b1.58 ([arXiv 2402.17764](https://arxiv.org/abs/2402.17764)) uses
# **ternary** weights {-1, 0, +1} (log2 3 = 1.58 bits). Both quantise the layer inputs to 8-bit integers with
# **absmax** scaling. This notebook applies the three quantisers of `bitnet_jax.quant` to a weight matrix and
# to activations of a small model, and plots the histograms before and after. It then shows what
# quantisation *groups* change, and how the *straight-through estimator* (STE) trains through the
# non-differentiable rounding, on a toy problem.
#
# Every function here is a pure `jnp` function; `quant.py` cites the equation each one implements.

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

if ROOT is not None and ROOT not in sys.path:
  sys.path.insert(0, ROOT)
print("bitnet_jax:", ROOT or "installed")

# %%
import os

SMALL = os.environ.get("BITNET_SMALL") == "1"   # set by the tests: a shrunken run (about a minute on 2 CPU cores)

import inspect
import json.decoder

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

from bitnet_jax import quant
from bitnet_jax.model import ModelConfig, Transformer
from bitnet_jax.tokenizer import ByteTokenizer

D_IN, D_OUT = (256, 512) if SMALL else (2048, 4096)   # the weight matrix [in, out] (Flax layout: y = x @ W)
print(jax.devices(), "| SMALL =", SMALL)


def rel_err(q, x):
  """||Q(x) - x|| / ||x||: the relative error of a quantised tensor."""
  return jnp.linalg.norm((q - x).ravel()) / jnp.linalg.norm(x.ravel())


def hist_before_after(ax, before, after, title):
  """The latent values (filled) and the quantised values (outline, spikes) on shared bins, log counts."""
  before, after = np.ravel(before), np.ravel(after)
  lim = float(max(np.quantile(np.abs(before), 0.9999), np.abs(after).max())) * 1.1   # the rarest 0.01% cut
  bins = np.linspace(-lim, lim, 161)
  ax.hist(before, bins=bins, alpha=0.5, label="before (float32)")
  ax.hist(after, bins=bins, histtype="step", lw=2, color="tab:red", label="after (quantised)")
  ax.set_yscale("log")
  ax.set_title(title)
  ax.set_xlabel("value")
  ax.set_ylabel("count (log scale)")
  ax.legend(fontsize=8)


# %% [markdown]
# ## The tensors
#
# **A weight.** Trained transformer weights are close to zero-mean, with tails heavier than a Gaussian's and
# a scale that differs between parts of the matrix (attention heads, for instance). We draw a stand-in:
# Student-t values (5 degrees of freedom, std 0.02, the models' initialisation) times a log-normal scale per
# block of 64 output columns (a "head").
#
# **Activations.** The inputs of a real layer: we run a small Transformer (the FP variant, freshly
# initialised) on the bytes of a Python source file and record the input of block 0's FFN
# down-projection, the SwiGLU product `silu(x W_gate) * (x W_up)`. A product of two roughly Gaussian
# values is heavy-tailed, like the activations of trained models.

# %%
k_z, k_chi, k_scale = jax.random.split(jax.random.key(0), 3)
z = jax.random.normal(k_z, (D_IN, D_OUT))
chi2 = jnp.mean(jnp.square(jax.random.normal(k_chi, (5, D_IN, D_OUT))), axis=0)   # chi^2(5) / 5
t5 = z / jnp.sqrt(chi2) / jnp.sqrt(5 / 3)                                        # Student t(5), unit variance
head_scale = jnp.exp(0.5 * jax.random.normal(k_scale, (1, D_OUT // 64)))       # log-normal per 64 columns
W = 0.02 * t5 * jnp.repeat(head_scale, 64, axis=1)

cfg = ModelConfig(variant="fp", vocab_size=ByteTokenizer.vocab_size, d_model=64 if SMALL else 256,
                  n_layers=1, n_heads=4, max_seq_len=128)
model = nnx.jit(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))()
text_ids = ByteTokenizer().encode(inspect.getsource(json.decoder))
B, T = 8, 128
tokens = jnp.asarray(text_ids[: B * T].reshape(B, T))                          # (B, T) bytes of real code


class Tap(nnx.Module):
  """Wraps a layer and keeps the last input it was called with."""

  def __init__(self, layer):
    self.layer = layer
    self.seen = nnx.Variable(jnp.zeros(()))

  def __call__(self, x, **kwargs):
    self.seen.set_value(x)
    return self.layer(x, **kwargs)


ffn = model.blocks[0].ffn
ffn.down_proj = Tap(ffn.down_proj)           # the down-projection's input is silu(x W_gate) * (x W_up)
nnx.jit(lambda model, tokens: model(tokens))(model, tokens)   # the model's own forward pass
X = ffn.down_proj.seen.get_value()           # (B, T, d_ff)
print("weight", W.shape, "activations", X.shape)
print(f"excess kurtosis: weight {float(jnp.mean((W / W.std()) ** 4)) - 3:.1f}, "
      f"activations {float(jnp.mean((X / X.std()) ** 4)) - 3:.1f} (a Gaussian has 0)")

# %% [markdown]
# ## Binary weights (BitNet eq. 1-4)
#
# BitNet centres the weight and takes its sign:
#
# $$\widetilde W = \mathrm{Sign}(W - \alpha), \qquad
#   \mathrm{Sign}(W_{ij}) = \begin{cases} +1 & W_{ij} > 0 \\ -1 & W_{ij} \le 0 \end{cases}, \qquad
#   \alpha = \frac{1}{nm}\sum_{ij} W_{ij}$$
#
# and rescales the output by $\beta = \frac{1}{nm}\lVert W\rVert_1$, the mean absolute value of the
# uncentred $W$. The de-quantised weight is $\beta\,\widetilde W$: every entry becomes $\pm\beta$.
# `quant.binary_weights(w)` returns that fake-quantised tensor (with an STE gradient, below);
# `quant.binary_codes(w)` returns the int8 codes and $\beta$.

# %%
Wb = quant.binary_weights(W)
codes_b, beta = quant.binary_codes(W)
print("codes:", dict(zip(*map(np.ndarray.tolist, np.unique(np.asarray(codes_b), return_counts=True)))),
      "| beta =", float(beta.squeeze()), "| mean|W| =", float(jnp.abs(W).mean()))
print(f"relative error ||Q(W) - W|| / ||W|| = {float(rel_err(Wb, W)):.3f}")
fig, ax = plt.subplots(figsize=(7, 3.5))
hist_before_after(ax, W, Wb, "Binary weights (BitNet eq. 1-4): every entry becomes ±β")
plt.show()

# %% [markdown]
# ## Ternary weights (b1.58 eq. 1-3)
#
# BitNet b1.58 scales by the mean absolute value and rounds to the nearest of {-1, 0, +1}:
#
# $$\widetilde W = \mathrm{RoundClip}\Big(\frac{W}{\gamma + \epsilon}, -1, 1\Big), \qquad
#   \mathrm{RoundClip}(x, a, b) = \max(a, \min(b, \mathrm{round}(x))), \qquad
#   \gamma = \frac{1}{nm}\sum_{ij} \lvert W_{ij}\rvert$$
#
# The de-quantised weight is $\gamma\,\widetilde W$. Entries with $\lvert W_{ij}\rvert < \gamma/2$ become 0, so
# the layer also learns which weights to switch off (the paper's argument for ternary over binary). The code
# follows the FAQ reference `weight_quant`: `s = 1 / max(mean|w|, 1e-5)`, `clip(round(w * s), -1, 1) / s`.

# %%
Wt = quant.ternary_weights(W)
codes_t, gamma = quant.ternary_codes(W)
values, counts = np.unique(np.asarray(codes_t), return_counts=True)
print("code shares:", {int(v): f"{c / codes_t.size:.1%}" for v, c in zip(values, counts)},
      "| gamma =", float(gamma.squeeze()))
print(f"relative error: ternary {float(rel_err(Wt, W)):.3f}, binary {float(rel_err(Wb, W)):.3f}")

fig, axes = plt.subplots(1, 2, figsize=(12, 3.5))
hist_before_after(axes[0], W, Wt, "Ternary weights (b1.58 eq. 1-3): 0 or ±γ")
for x in (-0.5, 0.5):
  axes[0].axvline(x * float(gamma.squeeze()), color="k", ls=":", lw=1)
axes[0].plot([], [], "k:", label="rounding thresholds ±γ/2")
axes[0].legend(fontsize=8)
axes[1].bar(["-1", "0", "+1"], counts / codes_t.size, color=["tab:blue", "tab:gray", "tab:orange"],
            label="ternary codes")
axes[1].bar(["-1", "+1"], np.unique(np.asarray(codes_b), return_counts=True)[1] / codes_b.size,
            fill=False, edgecolor="k", lw=1.5, label="binary codes")
axes[1].set_title("Share of each code")
axes[1].set_xlabel("code")
axes[1].set_ylabel("share of weights")
axes[1].legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Absmax activations (BitNet eq. 5)
#
# The inputs of each BitLinear are quantised to $b$ bits by their absolute maximum:
#
# $$\widetilde x = \mathrm{Clip}\Big(x \times \frac{Q_b}{\gamma}, -Q_b + \epsilon, Q_b - \epsilon\Big), \qquad
#   \gamma = \lVert x\rVert_\infty, \qquad Q_b = 2^{b-1}$$
#
# We follow the b1.58 FAQ reference code, which uses $Q_b = 127$ for 8 bits ($2^{b-1}-1$ in general) and
# clips to [-128, 127], so codes fit int8. $\gamma$ is taken **per token** (one scale per row, b1.58 and
# BitNet at inference) or **per tensor** (one scale for the whole batch, BitNet's training mode). At 8 bits
# the after-histogram would sit on top of the before one, so the plot uses 4 bits, where the 15 levels show.

# %%
rows = []
for bits in (8, 4):
  for per_token in (True, False):
    q = quant.quantize_activations(X, bits, per_token=per_token)
    rows.append((bits, "per token" if per_token else "per tensor", float(rel_err(q, X))))
for bits, mode, err in rows:
  print(f"{bits} bits, {mode:10s}: relative error {err:.4f}")

codes_x, scale_x = quant.activation_codes(X, 8)   # int8 codes and one float32 scale (1/s) per token
print("int8 codes in", int(codes_x.min()), "..", int(codes_x.max()), "| scales", scale_x.shape)

fig, axes = plt.subplots(1, 2, figsize=(12, 3.5))
hist_before_after(axes[0], X, quant.quantize_activations(X, 4), "Activations, 4-bit absmax per token")
axes[1].hist(np.ravel(codes_x), bins=np.arange(-128.5, 128.5), color="tab:green", label="8-bit codes")
axes[1].set_yscale("log")
axes[1].set_title("8-bit absmax codes of the same activations")
axes[1].set_xlabel("int8 code")
axes[1].set_ylabel("count (log scale)")
axes[1].legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# Most codes sit near 0: with heavy tails, the maximum that sets $\gamma$ is far out, so the bulk of the
# values uses few of the 256 levels. This is why the activation scale's granularity matters.
#
# ## Groups (BitNet section 2.3)
#
# For model parallelism BitNet splits a weight into $G$ groups along the partitioned dimension and gives
# each group its own statistics, so that no device needs another device's values:
#
# $$\alpha_g = \frac{G}{nm}\sum_{ij} W^{(g)}_{ij}, \qquad \beta_g = \frac{G}{nm}\lVert W^{(g)}\rVert_1,
#   \qquad \gamma_g = \lVert x^{(g)}\rVert_\infty$$
#
# (the ternary $\gamma$ of b1.58 likewise per group). Notebook 4 shows the sharding side. Here is the
# numerical side: when the scale varies across the weight, per-group scales follow it. `groups=G` splits the
# output axis of the kernel into $G$ contiguous groups; our weight has a different scale per block of 64
# columns, so groups help most once they are that fine ($G$ = columns / 64), and $G$ = the number of columns
# is one scale per output channel.

# %%
G_list = sorted({1, 2, 4, D_OUT // 256, D_OUT // 64, D_OUT // 16, D_OUT})
codes_g, scale_g = quant.ternary_codes(W, groups=D_OUT // 64)
print(f"{D_OUT // 64} groups: codes", codes_g.shape, codes_g.dtype, "| one scale per group:", scale_g.shape)

# Activations: one feature block with 20x larger values (LLMs grow such outlier dimensions when trained).
F = X.shape[-1]
X_out = X.at[..., : F // 8].multiply(20.0)
Ga_list = [1, 2, 4, 8, 16]


@jax.jit   # one compilation for the whole sweep (the group counts are Python ints, fixed at trace time)
def sweep(W, X_out):
  err_b = [rel_err(quant.binary_weights(W, groups=g), W) for g in G_list]
  err_t = [rel_err(quant.ternary_weights(W, groups=g), W) for g in G_list]
  qs = [quant.quantize_activations(X_out, 8, groups=g) for g in Ga_list]
  err_a = [rel_err(q, X_out) for q in qs]
  err_a_bulk = [rel_err(q[..., F // 8:], X_out[..., F // 8:]) for q in qs]
  return err_b, err_t, err_a, err_a_bulk


err_b, err_t, err_a, err_a_bulk = map(np.asarray, sweep(W, X_out))

fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
axes[0].plot(G_list, err_b, "o-", label="binary (BitNet)")
axes[0].plot(G_list, err_t, "s-", label="ternary (b1.58)")
axes[0].set_xscale("log", base=2)
axes[0].set_title("Weight error vs number of groups")
axes[0].set_xlabel("groups G along the output axis (log scale)")
axes[0].set_ylabel("||Q(W) - W|| / ||W||")
axes[0].legend()
axes[1].plot(Ga_list, err_a, "o-", label="all features")
axes[1].plot(Ga_list, err_a_bulk, "s-", label="features outside the outlier block")
axes[1].set_xscale("log", base=2)
axes[1].set_yscale("log")
axes[1].set_title("8-bit per-token activations with an outlier block")
axes[1].set_xlabel("groups G along the feature axis (log scale)")
axes[1].set_ylabel("relative error (log scale)")
axes[1].legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# The weight error drops once the groups are as fine as the 64-column blocks whose scales differ; finer
# groups gain little more. With one activation scale, the outlier block sets $\gamma$ for every feature and
# the other features lose most of their levels; with $G \ge 8$ groups the outlier block has its own scale and
# the error of the other features falls to that of the plain activations. The papers use one weight scale
# per tensor; groups cost one extra float each, and they are what makes the statistics local to a device.
#
# ## The straight-through estimator on a toy problem
#
# `round` and `Sign` have zero gradient almost everywhere, so plain backpropagation cannot change which code
# a weight gets. BitNet (section 2.2) trains the latent float weights with the straight-through estimator:
# the forward pass uses the quantised weight, the backward pass treats the quantiser as the identity. In
# code (the FAQ's BitLinear and `quant.straight_through`):
#
# $$W_q = W + \mathrm{stop\_gradient}\big(Q(W) - W\big) \quad\Rightarrow\quad
#   W_q = Q(W), \qquad \frac{\partial W_q}{\partial W} = I$$
#
# First, the gradients themselves:

# %%
w = jax.random.normal(jax.random.key(1), (4, 3))
c = jax.random.normal(jax.random.key(2), (4, 3))


def naive_ternary(w):
  """b1.58 eq. 1-3 written without the STE: the gradient only flows through gamma."""
  g = jnp.mean(jnp.abs(w))
  return jnp.clip(jnp.round(w / g), -1, 1) * g


g_ste = jax.grad(lambda w: jnp.sum(quant.ternary_weights(w) * c))(w)
g_naive = jax.grad(lambda w: jnp.sum(naive_ternary(w) * c))(w)
print("STE gradient == upstream gradient c:", bool(jnp.allclose(g_ste, c)))
print("naive gradient (through round):\n", np.round(np.asarray(g_naive), 3))

# %% [markdown]
# The naive gradient has the same magnitude for every entry, with the sign of $W$: it only says whether
# $\gamma$ should grow or shrink, nothing about which code each weight should have. Now a toy regression:
# learn a linear map $Y = X W_* + \text{noise}$ that a b1.58 layer can represent exactly, a ternary
# *teacher* $W_* = s\,T$ with $T \in \{-1, 0, +1\}$, with a ternary student trained by Adam on its latent
# weights through `quant.ternary_weights`. We compare
#
# * **FP**: the least-squares solution in float32;
# * **PTQ**: post-training quantisation, ternarising that float solution with b1.58's absmean;
# * **STE**: quantisation-aware training through the straight-through estimator (how b1.58 trains);
# * **naive**: the same training with the naive gradient above.

# %%
n, d_in, d_out = 1024, 64, 32
kx, kt, k0, kn = jax.random.split(jax.random.key(3), 4)
Xt = jax.random.normal(kx, (n, d_in))
T_codes = jax.random.choice(kt, jnp.array([-1.0, 0.0, 1.0]), (d_in, d_out))   # the teacher's codes
W_star = T_codes / jnp.sqrt(d_in)                                                # s = 1 / sqrt(d_in)
Yt = Xt @ W_star + 0.01 * jax.random.normal(kn, (n, d_out))                      # noise floor: mse 1e-4
mse = lambda Wq: float(jnp.mean((Xt @ Wq - Yt) ** 2))

W_fp = jnp.linalg.solve(Xt.T @ Xt, Xt.T @ Yt)                                   # least squares
steps = 300 if SMALL else 1000
tx = optax.adam(optax.cosine_decay_schedule(5e-3, steps))


def fit(quantiser):
  """Adam on the latent weight of `quantiser(w)`, all steps in one compiled `lax.scan`."""
  def step(carry, _):
    w, opt_state = carry
    loss, grad = jax.value_and_grad(lambda w: jnp.mean((Xt @ quantiser(w) - Yt) ** 2))(w)
    updates, opt_state = tx.update(grad, opt_state, w)
    return (optax.apply_updates(w, updates), opt_state), loss

  w0 = 0.02 * jax.random.normal(k0, (d_in, d_out))
  (w, _), curve = jax.jit(lambda w: jax.lax.scan(step, (w, tx.init(w)), length=steps))(w0)
  return w, np.asarray(curve)


w_ste, curve_ste = fit(quant.ternary_weights)
w_naive, curve_naive = fit(naive_ternary)
results = {"FP (least squares)": W_fp, "PTQ (ternarised FP)": quant.ternary_weights(W_fp),
           "STE training": quant.ternary_weights(w_ste), "naive training": naive_ternary(w_naive)}
for k, Wq in results.items():
  print(f"{k:20s} mse {mse(Wq):.5f} | largest |W| {float(jnp.abs(Wq).max()):.4f}")
print(f"teacher: s = {d_in ** -0.5:.4f}")
agree = lambda w: float(jnp.mean(quant.ternary_codes(w)[0] == T_codes))
print(f"codes equal to the teacher's: PTQ {agree(W_fp):.1%}, STE {agree(w_ste):.1%}, "
      f"naive {agree(w_naive):.1%}")

fig, ax = plt.subplots(figsize=(7, 4))
ax.plot(curve_ste, label="STE (ternary forward, identity backward)")
ax.plot(curve_naive, label="naive gradient through round")
ax.axhline(mse(results["PTQ (ternarised FP)"]), color="k", ls="--", label="PTQ: ternarised least squares")
ax.axhline(mse(W_fp), color="tab:green", ls=":", label="FP least squares")
ax.set_yscale("log")
ax.set_title("Fitting a ternary teacher with a ternary student")
ax.set_xlabel("Adam step")
ax.set_ylabel("mean squared error (log scale)")
ax.legend()
plt.show()

# %% [markdown]
# The float solution recovers the teacher, and ternarising it gets the codes right but not the magnitude:
# absmean sets $\gamma = \operatorname{mean}\lvert W\rvert$, about two thirds of the teacher's $s$ because a
# third of the entries are 0, so PTQ's error stays far above the noise floor. Through the STE, training moves
# the latent weights until their quantisation *is* the teacher, codes and scale, and the error reaches the
# noise floor. The naive gradient carries no information about the codes: they stay those of the random
# initialisation, and so does its error. This is the recipe of both papers: latent weights, gradients and
# optimiser state in high precision, quantised weights in the forward pass, the STE in between.
#
# Next: notebook 2 trains a b1.58 language model and its FP baseline.
