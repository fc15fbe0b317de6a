"""colab/_build.py: writes the Colab notebooks in this folder from the cell sources below.

    .venv/bin/python colab/_build.py          # rewrites colab/*.ipynb (no outputs), then commit both

The notebooks are generated so that a review reads Python, not JSON; `tests/test_notebooks.py` checks that the
committed .ipynb files are what this script writes, that they carry no outputs, and executes each one top to
bottom with `BITNET_SMALL=1`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from textwrap import dedent

import nbformat

HERE = Path(__file__).resolve().parent
OWNER = "bitnet-jax"   # placeholder GitHub owner of the repository; the badges and the install cell use it
REPO_URL = f"https://github.com/{OWNER}/bitnet_jax"


def badge(name: str) -> str:
  url = f"https://colab.research.google.com/github/{OWNER}/bitnet_jax/blob/main/colab/{name}.ipynb"
  return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"


def md(text: str) -> str:
  return "md:" + dedent(text).strip()


def code(*parts: str) -> str:
  """A code cell from parts, each dedented on its own (shared cells are written flush left)."""
  return "code:" + "\n\n".join(dedent(p).strip("\n") for p in parts).strip()


# --------------------------------------------------------------------------------------------------------------
# Shared cells.
# --------------------------------------------------------------------------------------------------------------
INSTALL = f'''
# Install. On Colab: clones the repository and pip-installs bitnet_jax with its requirements (once per runtime,
# a minute or two; jax gets the CUDA or TPU build when the runtime has a GPU or TPU). From a checkout (this
# notebook opened inside the repository) it installs nothing and imports the checkout. If pip says it changed a
# package that was already imported, restart the session (Runtime > Restart session) and run again: this cell
# then skips the install.
import glob, importlib, importlib.util, os, re, shutil, subprocess, sys

REPO_URL = "{REPO_URL}"
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
              if re.match(r"jax\\s*[<>=]", l))
  return spec.replace("jax", f"jax[{{kind}}]", 1)


ROOT = find_checkout()
if ROOT is None and importlib.util.find_spec("bitnet_jax") is None:   # Colab, first run
  if not os.path.isdir(CLONE):
    subprocess.run(["git", "clone", "--depth=1", REPO_URL, CLONE], check=True)
  extra = [accelerator_jax(CLONE)] if accelerator_jax(CLONE) else []
  subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", CLONE, *extra], check=True)
  importlib.invalidate_caches()
'''
# Notebooks that read configs/ (not part of the installed package) take it from the clone.
WITH_CONFIGS = '''
if ROOT is None:   # configs/ (the training configs) is not part of the installed package: take it from the clone
  if not os.path.isdir(CLONE):
    subprocess.run(["git", "clone", "--depth=1", REPO_URL, CLONE], check=True)
  ROOT = CLONE
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
print("repository:", ROOT)
'''
WITHOUT_CONFIGS = '''
if ROOT is not None and ROOT not in sys.path:
  sys.path.insert(0, ROOT)
print("bitnet_jax:", ROOT or "installed")
'''

SMALL = '''
import os

SMALL = os.environ.get("BITNET_SMALL") == "1"   # set by the tests: a shrunken run (about a minute on 2 CPU cores)
'''

# The first code cell of notebook 04 sets the device count before anything imports jax.
DEVICES_FIRST = '''
# 8 devices. On a Colab TPU v2-8 runtime jax sees 8 real TPU cores. Anywhere else (a CPU runtime, one GPU, this
# laptop) XLA simulates 8 CPU devices, which compile and run the same sharded programs. XLA reads the flag when
# jax starts, so this must run before jax is imported (restart the session if jax was imported before).
import glob, os

ON_TPU = bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")) or "COLAB_TPU_ADDR" in os.environ
if not ON_TPU:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
  os.environ["JAX_PLATFORMS"] = "cpu"
'''


# --------------------------------------------------------------------------------------------------------------
# 01: the quantisers.
# --------------------------------------------------------------------------------------------------------------
def nb01() -> list[str]:
  name = "01_quantizers"
  return [
      md(f"""
      {badge(name)}

      # 1. The quantisers of BitNet and BitNet b1.58

      BitNet ([arXiv 2310.11453](https://arxiv.org/abs/2310.11453)) trains transformers whose linear layers use
      **binary** weights {{-1, +1}}; BitNet b1.58 ([arXiv 2402.17764](https://arxiv.org/abs/2402.17764)) uses
      **ternary** weights {{-1, 0, +1}} (log2 3 = 1.58 bits). Both quantise the layer inputs to 8-bit integers with
      **absmax** scaling. This notebook applies the three quantisers of `bitnet_jax.quant` to a weight matrix and
      to activations of a small model, and plots the histograms before and after. It then shows what
      quantisation *groups* change, and how the *straight-through estimator* (STE) trains through the
      non-differentiable rounding, on a toy problem.

      Every function here is a pure `jnp` function; `quant.py` cites the equation each one implements.
      """),
      code(INSTALL + WITHOUT_CONFIGS),
      code(SMALL, '''
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
      '''),
      md("""
      ## The tensors

      **A weight.** Trained transformer weights are close to zero-mean, with tails heavier than a Gaussian's and
      a scale that differs between parts of the matrix (attention heads, for instance). We draw a stand-in:
      Student-t values (5 degrees of freedom, std 0.02, the models' initialisation) times a log-normal scale per
      block of 64 output columns (a "head").

      **Activations.** The inputs of a real layer: we run a small Transformer (the FP variant, freshly
      initialised) on the bytes of a Python source file and record the input of block 0's FFN
      down-projection, the SwiGLU product `silu(x W_gate) * (x W_up)`. A product of two roughly Gaussian
      values is heavy-tailed, like the activations of trained models.
      """),
      code('''
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
      '''),
      md(r"""
      ## Binary weights (BitNet eq. 1-4)

      BitNet centres the weight and takes its sign:

      $$\widetilde W = \mathrm{Sign}(W - \alpha), \qquad
        \mathrm{Sign}(W_{ij}) = \begin{cases} +1 & W_{ij} > 0 \\ -1 & W_{ij} \le 0 \end{cases}, \qquad
        \alpha = \frac{1}{nm}\sum_{ij} W_{ij}$$

      and rescales the output by $\beta = \frac{1}{nm}\lVert W\rVert_1$, the mean absolute value of the
      uncentred $W$. The de-quantised weight is $\beta\,\widetilde W$: every entry becomes $\pm\beta$.
      `quant.binary_weights(w)` returns that fake-quantised tensor (with an STE gradient, below);
      `quant.binary_codes(w)` returns the int8 codes and $\beta$.
      """),
      code('''
      Wb = quant.binary_weights(W)
      codes_b, beta = quant.binary_codes(W)
      print("codes:", dict(zip(*map(np.ndarray.tolist, np.unique(np.asarray(codes_b), return_counts=True)))),
            "| beta =", float(beta.squeeze()), "| mean|W| =", float(jnp.abs(W).mean()))
      print(f"relative error ||Q(W) - W|| / ||W|| = {float(rel_err(Wb, W)):.3f}")
      fig, ax = plt.subplots(figsize=(7, 3.5))
      hist_before_after(ax, W, Wb, "Binary weights (BitNet eq. 1-4): every entry becomes ±β")
      plt.show()
      '''),
      md(r"""
      ## Ternary weights (b1.58 eq. 1-3)

      BitNet b1.58 scales by the mean absolute value and rounds to the nearest of {-1, 0, +1}:

      $$\widetilde W = \mathrm{RoundClip}\Big(\frac{W}{\gamma + \epsilon}, -1, 1\Big), \qquad
        \mathrm{RoundClip}(x, a, b) = \max(a, \min(b, \mathrm{round}(x))), \qquad
        \gamma = \frac{1}{nm}\sum_{ij} \lvert W_{ij}\rvert$$

      The de-quantised weight is $\gamma\,\widetilde W$. Entries with $\lvert W_{ij}\rvert < \gamma/2$ become 0, so
      the layer also learns which weights to switch off (the paper's argument for ternary over binary). The code
      follows the FAQ reference `weight_quant`: `s = 1 / max(mean|w|, 1e-5)`, `clip(round(w * s), -1, 1) / s`.
      """),
      code('''
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
      '''),
      md(r"""
      ## Absmax activations (BitNet eq. 5)

      The inputs of each BitLinear are quantised to $b$ bits by their absolute maximum:

      $$\widetilde x = \mathrm{Clip}\Big(x \times \frac{Q_b}{\gamma}, -Q_b + \epsilon, Q_b - \epsilon\Big), \qquad
        \gamma = \lVert x\rVert_\infty, \qquad Q_b = 2^{b-1}$$

      We follow the b1.58 FAQ reference code, which uses $Q_b = 127$ for 8 bits ($2^{b-1}-1$ in general) and
      clips to [-128, 127], so codes fit int8. $\gamma$ is taken **per token** (one scale per row, b1.58 and
      BitNet at inference) or **per tensor** (one scale for the whole batch, BitNet's training mode). At 8 bits
      the after-histogram would sit on top of the before one, so the plot uses 4 bits, where the 15 levels show.
      """),
      code('''
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
      '''),
      md(r"""
      Most codes sit near 0: with heavy tails, the maximum that sets $\gamma$ is far out, so the bulk of the
      values uses few of the 256 levels. This is why the activation scale's granularity matters.

      ## Groups (BitNet section 2.3)

      For model parallelism BitNet splits a weight into $G$ groups along the partitioned dimension and gives
      each group its own statistics, so that no device needs another device's values:

      $$\alpha_g = \frac{G}{nm}\sum_{ij} W^{(g)}_{ij}, \qquad \beta_g = \frac{G}{nm}\lVert W^{(g)}\rVert_1,
        \qquad \gamma_g = \lVert x^{(g)}\rVert_\infty$$

      (the ternary $\gamma$ of b1.58 likewise per group). Notebook 4 shows the sharding side. Here is the
      numerical side: when the scale varies across the weight, per-group scales follow it. `groups=G` splits the
      output axis of the kernel into $G$ contiguous groups; our weight has a different scale per block of 64
      columns, so groups help most once they are that fine ($G$ = columns / 64), and $G$ = the number of columns
      is one scale per output channel.
      """),
      code('''
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
      '''),
      md(r"""
      The weight error drops once the groups are as fine as the 64-column blocks whose scales differ; finer
      groups gain little more. With one activation scale, the outlier block sets $\gamma$ for every feature and
      the other features lose most of their levels; with $G \ge 8$ groups the outlier block has its own scale and
      the error of the other features falls to that of the plain activations. The papers use one weight scale
      per tensor; groups cost one extra float each, and they are what makes the statistics local to a device.

      ## The straight-through estimator on a toy problem

      `round` and `Sign` have zero gradient almost everywhere, so plain backpropagation cannot change which code
      a weight gets. BitNet (section 2.2) trains the latent float weights with the straight-through estimator:
      the forward pass uses the quantised weight, the backward pass treats the quantiser as the identity. In
      code (the FAQ's BitLinear and `quant.straight_through`):

      $$W_q = W + \mathrm{stop\_gradient}\big(Q(W) - W\big) \quad\Rightarrow\quad
        W_q = Q(W), \qquad \frac{\partial W_q}{\partial W} = I$$

      First, the gradients themselves:
      """),
      code('''
      w = jax.random.normal(jax.random.key(1), (4, 3))
      c = jax.random.normal(jax.random.key(2), (4, 3))


      def naive_ternary(w):
        """b1.58 eq. 1-3 written without the STE: the gradient only flows through gamma."""
        g = jnp.mean(jnp.abs(w))
        return jnp.clip(jnp.round(w / g), -1, 1) * g


      g_ste = jax.grad(lambda w: jnp.sum(quant.ternary_weights(w) * c))(w)
      g_naive = jax.grad(lambda w: jnp.sum(naive_ternary(w) * c))(w)
      print("STE gradient == upstream gradient c:", bool(jnp.allclose(g_ste, c)))
      print("naive gradient (through round):\\n", np.round(np.asarray(g_naive), 3))
      '''),
      md(r"""
      The naive gradient has the same magnitude for every entry, with the sign of $W$: it only says whether
      $\gamma$ should grow or shrink, nothing about which code each weight should have. Now a toy regression:
      learn a linear map $Y = X W_* + \text{noise}$ that a b1.58 layer can represent exactly, a ternary
      *teacher* $W_* = s\,T$ with $T \in \{-1, 0, +1\}$, with a ternary student trained by Adam on its latent
      weights through `quant.ternary_weights`. We compare

      * **FP**: the least-squares solution in float32;
      * **PTQ**: post-training quantisation, ternarising that float solution with b1.58's absmean;
      * **STE**: quantisation-aware training through the straight-through estimator (how b1.58 trains);
      * **naive**: the same training with the naive gradient above.
      """),
      code('''
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
      '''),
      md(r"""
      The float solution recovers the teacher, and ternarising it gets the codes right but not the magnitude:
      absmean sets $\gamma = \operatorname{mean}\lvert W\rvert$, about two thirds of the teacher's $s$ because a
      third of the entries are 0, so PTQ's error stays far above the noise floor. Through the STE, training moves
      the latent weights until their quantisation *is* the teacher, codes and scale, and the error reaches the
      noise floor. The naive gradient carries no information about the codes: they stay those of the random
      initialisation, and so does its error. This is the recipe of both papers: latent weights, gradients and
      optimiser state in high precision, quantised weights in the forward pass, the STE in between.

      Next: notebook 2 trains a b1.58 language model and its FP baseline.
      """),
  ]


# --------------------------------------------------------------------------------------------------------------
# 02: training b1.58 against FP.
# --------------------------------------------------------------------------------------------------------------
def nb02() -> list[str]:
  name = "02_train_bitnet_vs_fp"
  return [
      md(f"""
      {badge(name)}

      # 2. Train BitNet b1.58 and its FP baseline side by side

      This notebook trains two byte-level language models of the same shape on the embedded corpus (the
      Python standard library's own source, about 12 MB, no download): **b1.58** (ternary weights, 8-bit
      activations, the FAQ recipe) and the **FP** LLaMA-like baseline. Then it plots both loss curves, packs the
      b1.58 weights into 2 bits per weight and compares the memory with FP16, and generates text from both.

      Everything goes through the library entry points: `train.train_and_evaluate(config, workdir)` (the same
      function as `python -m bitnet_jax.train`), `train.load_checkpoint`, `packing.quantize_for_inference` and
      `generate.greedy`. With a GPU runtime (Runtime > Change runtime type) the default sizes take a few
      minutes; on a CPU they take about 8.
      """),
      code(INSTALL + WITH_CONFIGS),
      code(SMALL, '''
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
      '''),
      md("""
      ## Configs

      `configs/lm.py` names the variants: `b158-SIZE` uses b1.58's recipe (Adam 0.9/0.95, the two-stage linear
      schedule of the FAQ Table 2, peak learning rate 1.5e-3), `fp-SIZE` the LLaMA recipe (cosine decay, peak
      2.5e-4). Same width, depth, heads and data order. `small` is the quickstart's size (400 steps); the
      shrunken test run trains `tiny` models for 40 steps.
      """),
      code('''
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
      '''),
      md("""
      ## Train

      Each run writes `config.json`, `metrics.jsonl`, TensorBoard events, orbax checkpoints and `summary.json` in
      its own directory. Running the cell again resumes from the checkpoints (a finished run is not retrained).
      """),
      code('''
      summaries = {}
      for variant, config in configs.items():
        summaries[variant] = train.train_and_evaluate(config, WORKDIR / variant)
        print(train.format_summary(summaries[variant]))
      '''),
      md(r"""
      ## Loss curves

      Training loss at every logged step and held-out loss at each evaluation, in nats per byte (the
      cross-entropy of the next byte; divide by ln 2 for bits per byte).
      """),
      code('''
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
      display(Markdown("\\n".join(table)))
      '''),
      md("""
      These are short runs with each paper's own recipe: b1.58 trains at a learning rate six times higher than
      the LLaMA recipe, so early on it is usually ahead. Neither number says anything about the converged gap;
      that needs the scaling experiment.

      ## Pack the b1.58 weights

      For inference only the codes and scales of each BitLinear are needed. `packing.quantize_for_inference`
      takes every ternary kernel's codes (`quant.ternary_codes`, b1.58 eq. 1-3) and packs four codes per byte
      (`"2bit"`, code + 1 in two bits) or five per byte (`"base3"`, 3^5 = 243 <= 256: 1.6 bits, a little more
      when a row's length is not a multiple of 5), with one float32 scale per group. The embedding, the output
      head and the norm gains stay 16-bit, as neither paper quantises them. The packed kernels de-quantise
      exactly to the kernels the trained model computes with.
      """),
      code('''
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
      display(Markdown("\\n".join(table)))

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
      '''),
      md("""
      The linear layers shrink 8x (16 bits to 2), but the embedding, the head and the norms stay 16-bit and
      set a floor; in a small byte-level model they are a large share of the weights. Their share falls as models
      grow. Here is the same computation (from shapes, `jax.eval_shape`, nothing allocated) for the paper's 700M
      and 3B configurations. The b1.58 paper measured 2.60x and 3.55x less GPU memory there (its Table 1, with
      everything else the runtime holds besides the weights).
      """),
      code('''
      for name in ("b158-700m", "b158-3b"):
        sz = packing.inference_weight_bytes(preset(name), fmt="2bit")
        print(f"{name}: FP16 {sz['fp16_bytes'] / 1e9:.2f} GB, 2-bit packed {sz['total_bytes'] / 1e9:.2f} GB "
              f"({sz['fp16_bytes'] / sz['total_bytes']:.2f}x smaller)")
      '''),
      md("""
      ## Generate

      Greedy decoding from both restored checkpoints (`generate.greedy`: the most likely next byte at every
      step), with the prompt `def `. After so few steps expect Python-looking fragments at best.
      """),
      code('''
      tokenizer = ByteTokenizer()
      prompt = jnp.asarray(tokenizer.encode("def "))[None]        # (1, P) byte ids
      n_new = 40 if SMALL else 120
      for variant, model in models.items():
        out = greedy(model, prompt, n_new)                       # (1, P + n_new)
        print(f"--- {variant} ---")
        print(tokenizer.decode(np.asarray(out[0])))
      '''),
  ]


# --------------------------------------------------------------------------------------------------------------
# 03: scaling laws and the energy / memory models.
# --------------------------------------------------------------------------------------------------------------
def nb03() -> list[str]:
  name = "03_scaling_and_energy"
  return [
      md(f"""
      {badge(name)}

      # 3. Scaling laws of BitNet and b1.58 against FP, and the papers' energy and memory models

      BitNet (section 3.3, "Inference-Optimal Scaling Law") fits the final loss of models of growing size to a
      power law with an irreducible term, $L(N) = aN^b + c$, and reports that BitNet's gap to an FP Transformer
      shrinks as $N$ grows; b1.58 (Table 1-2) reports that from 3B parameters it matches FP LLaMA.

      This notebook loads the results of our sweep (`experiments/scaling.py`: 6 sizes x {{fp, bitnet, b158}},
      the same data, seed and token budget, trained on the embedded corpus on a 2-core CPU and committed in
      `experiments/results/scaling.json`), re-fits the laws with 95% bootstrap bands, plots the gaps, and then
      evaluates the papers' arithmetic-energy model (BitNet Tables 1-2) and memory model (b1.58 Table 1). Nothing
      here trains; it runs in seconds anywhere.
      """),
      code(INSTALL + WITH_CONFIGS),
      code(SMALL, '''
      import importlib.util
      import json

      import matplotlib.pyplot as plt
      import numpy as np
      from IPython.display import Markdown, display

      from bitnet_jax import energy

      spec = importlib.util.spec_from_file_location("scaling", os.path.join(ROOT, "experiments", "scaling.py"))
      scaling = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(scaling)   # law, fit_law: the functions the sweep itself fitted with
      %matplotlib inline

      results = json.load(open(os.path.join(ROOT, "experiments", "results", "scaling.json")))
      runs = results["runs"]
      print(len(runs), "runs;", "tokens per run:", sorted({r["tokens"] for r in runs}))
      rows = ["| variant | size | N (non-embedding) | eval loss (nats/byte) | wall (s) |", "|---|---|---|---|---|"]
      for r in sorted(runs, key=lambda r: (r["variant"], r["n_params"])):
        rows.append(f"| {r['variant']} | {r['size']} | {r['n_params']:,} | {r['eval_loss']:.4f} | {r['wall_s']:.0f} |")
      display(Markdown("\\n".join(rows)))
      '''),
      md("""
      ## Fitting $L(N) = aN^b + c$ with bootstrap bands

      Per variant: least squares (`scipy.optimize.curve_fit`, $a > 0$, $-3 < b < 0$, $0 \\le c \\le \\min L$) on
      the final eval loss against non-embedding parameters. The band is a 95% bootstrap: resample the runs (one
      per size) with replacement, re-fit, and take the 2.5 and 97.5 percentiles of the fitted curves at every $N$.
      The crosses are the held-out check: a fit on all sizes but the largest, predicting the largest.
      """),
      code('''
      DRAWS = 100 if SMALL else 1000
      COLORS = {"fp": "tab:blue", "bitnet": "tab:orange", "b158": "tab:red"}
      LABELS = {"fp": "FP (LLaMA-like)", "bitnet": "BitNet (W1A8)", "b158": "BitNet b1.58 (W1.58A8)"}


      def series(variant):
        rows = sorted((r for r in runs if r["variant"] == variant), key=lambda r: r["n_params"])
        return np.array([r["n_params"] for r in rows], float), np.array([r["eval_loss"] for r in rows], float)


      def band(n, loss, grid, draws, seed=0):
        rng, curves = np.random.default_rng(seed), []
        for _ in range(50 * draws):
          if len(curves) == draws:
            break
          idx = np.sort(rng.integers(0, len(n), len(n)))
          if len(set(idx.tolist())) < min(4, len(n)):   # a 3-parameter fit needs 4 distinct sizes to say much
            continue
          try:
            curves.append(scaling.law(grid, *scaling.fit_law(n[idx], loss[idx])))
          except (RuntimeError, ValueError):
            continue
        return np.percentile(curves, [2.5, 97.5], axis=0)


      fig, ax = plt.subplots(figsize=(8, 5))
      refit = {}
      for variant in ("fp", "bitnet", "b158"):
        n, loss = series(variant)
        a, b, c = scaling.fit_law(n, loss)
        refit[variant] = (a, b, c)
        grid = np.geomspace(n.min() * 0.8, n.max() * 1.25, 80)
        lo, hi = band(n, loss, grid, DRAWS)
        ax.fill_between(grid, lo, hi, color=COLORS[variant], alpha=0.15)
        ax.plot(grid, scaling.law(grid, a, b, c), color=COLORS[variant], label=f"{LABELS[variant]}: {a:.3g} N^{b:.3f} + {c:.3f}")
        ax.scatter(n, loss, color=COLORS[variant], zorder=3)
        held = scaling.law(n[-1], *scaling.fit_law(n[:-1], loss[:-1]))
        ax.scatter([n[-1]], [held], marker="x", s=80, color=COLORS[variant], zorder=4)
        committed = results["fits"][variant]
        print(f"{variant:7s} a={a:.4g} b={b:.4f} c={c:.4f} (committed b={committed['b']:.4f}); "
              f"held-out largest: predicted {held:.4f}, measured {loss[-1]:.4f}")
      ax.set_xscale("log")
      ax.set_xlabel("non-embedding parameters N (log scale)")
      ax.set_ylabel("final eval loss (nats per byte)")
      ax.set_title("L(N) = a N^b + c at a fixed token budget, 95% bootstrap bands (x: held-out prediction)")
      ax.grid(alpha=0.3, which="both")
      ax.legend(fontsize=8)
      plt.show()
      '''),
      md("""
      ## The gap to FP, size by size

      The papers' claim is a positive gap (quantised loss above FP) that shrinks towards zero as $N$ grows. The
      slope below is the least-squares change of each gap per decade of $N$; read it with the sizes' spread in
      mind: six points on one seed.
      """),
      code('''
      n_fp, loss_fp = series("fp")
      fig, ax = plt.subplots(figsize=(7, 4))
      for variant in ("bitnet", "b158"):
        n, loss = series(variant)
        gap = loss - loss_fp
        slope = np.polyfit(np.log10(n), gap, 1)[0]
        ax.plot(n, gap, "o-", color=COLORS[variant], label=f"{LABELS[variant]} - FP (slope {slope:+.3f} per decade)")
      ax.axhline(0, color="k", lw=0.8)
      ax.set_xscale("log")
      ax.set_xlabel("non-embedding parameters N (log scale)")
      ax.set_ylabel("eval loss gap to FP (nats per byte)")
      ax.set_title("Quantised minus FP eval loss (below 0: the quantised model is ahead)")
      ax.grid(alpha=0.3, which="both")
      ax.legend(fontsize=8)
      plt.show()
      '''),
      md("""
      ## The arithmetic-energy model (BitNet Tables 1-2)

      BitNet counts, per matmul of an $m \\times n$ input by an $n \\times p$ weight, $mnp$ multiplications and
      $m(n-1)p$ additions for FP; BitNet's binary weights turn the multiplications into INT8 additions, and its
      only multiplications are the scalings. Each operation costs the per-operation energy of Table 2 (45nm and
      7nm). `energy.table1_comparison()` computes every cell of Table 1 (6.7B, 13B, 30B at 512 tokens) next to the
      paper's.
      """),
      code('''
      cells = energy.table1_comparison()
      rows = ["| size | variant | process | op | ours (J) | paper (J) | rel. error |", "|---|---|---|---|---|---|---|"]
      for c in cells:
        rows.append(f"| {c['size']} | {c['variant']} | {c['process']} | {c['op']} | {c['ours_j']:.3f} | "
                    f"{c['paper_j']:.3f} | {c['rel_error']:+.1%} |")
      within = sum(c["within_10pct"] for c in cells)
      display(Markdown("\\n".join(rows) + f"\\n\\n{within} of {len(cells)} cells within 10% of the paper."))

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
      '''),
      md("""
      ## The memory model (b1.58 Table 1)

      Weights at 2 bits (the paper measured with a 2-bit kernel) with 16-bit embeddings, against LLaMA in FP16,
      next to the GPU memory the paper measured. The paper's figures also hold activations, the KV cache and the
      runtime's own buffers, so the model is a lower bound; the ratios are what to compare.
      """),
      code('''
      rows = ["| model | size | weights (GB, ours) | paper (GB) | reduction vs LLaMA (ours) | paper |", "|---|---|---|---|---|---|"]
      for r in energy.memory_comparison():
        rows.append(f"| {r['model']} | {r['size']} | {r['weights_gb']:.2f} | {r['paper_gb']:.2f} | "
                    f"{r['reduction_vs_llama']:.2f}x | {r['paper_reduction_vs_llama']:.2f}x |")
      display(Markdown("\\n".join(rows)))
      '''),
      md("""
      Where the numbers above disagree with the papers, the README says by how much and why; nothing here is
      tuned to agree. To extend the sweep (more sizes, seeds or tokens), run `python experiments/scaling.py
      --help` in a checkout: it resumes and skips finished runs.
      """),
  ]


# --------------------------------------------------------------------------------------------------------------
# 04: sharding.
# --------------------------------------------------------------------------------------------------------------
def nb04() -> list[str]:
  name = "04_sharding"
  return [
      md(f"""
      {badge(name)}

      # 4. Sharding BitNet: per-shard statistics and collectives

      BitNet section 2.3: a quantised layer needs statistics of its weight (the mean for binary $\\alpha$, the mean
      absolute value for $\\beta$ or b1.58's $\\gamma$) and of its input (the absmax). Over a weight split across
      devices, one global statistic would need an all-reduce in every layer. BitNet's answer is **group
      quantisation**: one statistic per shard, so that no device needs another device's values.

      This notebook builds a mesh of 8 devices, shows where the per-block scales of a sharded kernel live, and
      counts the collectives of compiled train steps: b1.58 against FP under tensor parallelism, and the bytes
      FSDP all-gathers. On a Colab **TPU** runtime with 8 cores (TPU v2-8) the 8 devices are real TPU cores; on
      a CPU or GPU runtime (and in the tests) XLA simulates 8 CPU devices, which compile the same sharded
      programs.
      """),
      code(DEVICES_FIRST, INSTALL + WITH_CONFIGS),
      code(SMALL, '''
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
      '''),
      md("""
      ## A mesh and the rules table

      `sharding.make_mesh` builds a 3-D mesh with axes `data`, `fsdp` and `tensor`. Parameters carry logical axis
      names only (a BitLinear kernel of the FFN is `("embed", "mlp")`); one rules table,
      `sharding.DEFAULT_RULES`, maps them to mesh axes: `embed` (the d_model axis) over `fsdp`, `mlp` / `heads`
      over `tensor` (Megatron's column- and row-parallel layers).
      """),
      code('''
      mesh = sharding.make_mesh(dict(data=1, fsdp=2, tensor=4))
      print("mesh:", dict(mesh.shape))
      print("device grid (fsdp x tensor):\\n", np.vectorize(lambda d: d.id)(mesh.devices[0]))
      for logical, axes in sharding.DEFAULT_RULES:
        print(f"  {logical:12s} -> {axes}")
      spec = sharding.logical_spec(sharding.DEFAULT_RULES, ("embed", "mlp"))
      print("a kernel named ('embed', 'mlp') is sharded as", spec)
      '''),
      md(r"""
      ## Per-shard statistics

      A kernel of shape [d_model, d_ff] sharded over (fsdp 2, tensor 4) gives each device one block. With
      `groups=(2, 4)`, the block grid of the shards, `quant.ternary_codes` computes one b1.58 scale
      $\gamma_g = \operatorname{mean}\lvert W^{(g)}\rvert$ per block (BitNet's group formulas of section 2.3, with
      b1.58's absmean). Compiled on the mesh, each device reduces its own block, and its scale stays on that
      device.
      """),
      code('''
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
      display(Markdown("\\n".join(rows)))

      global_stat = jax.jit(lambda w: quant.ternary_codes(w))   # one scale for the whole kernel
      for label, fn in (("per-block scales (groups = shard grid)", per_block),
                        ("one global scale (groups = 1)", global_stat)):
        counts = sharding.collective_stats(fn.lower(w).compile().as_text())["counts"]
        print(f"{label:40s} collectives: {({k: v for k, v in counts.items() if v} or 'none')}")
      '''),
      md("""
      Each device's scale is the mean absolute value of the block it holds, and the per-block quantisation
      compiles to no collective at all, while a single global scale needs a reduction across devices.

      ## Collectives of whole train steps

      The model does this in every BitLinear: with `sharding.per_shard_groups=True` (the default),
      `train.setup_mesh` sets the model's `groups` to the tensor-parallel size and `fsdp_groups` to the FSDP size.
      `train.lower_train_step(config)` lowers the train step for the configured mesh from abstract state (nothing
      is allocated), and `sharding.collective_stats` counts the collectives in the compiled HLO. Five steps on two
      meshes of 8 devices:

      * **tensor parallel** (data 2 x tensor 4): FP, b1.58 with per-shard groups, and b1.58 with one global
        statistic per weight (`per_shard_groups=False`, groups 1) as a control;
      * **FSDP** (data 2 x fsdp 4): FP and b1.58. FSDP all-gathers each weight before its matmul; a BitLinear
        quantises its own shard first and gathers the int8 codes, not the float32 latent weight.
      """),
      code('''
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
      display(Markdown("\\n".join(rows)))
      '''),
      code('''
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
      '''),
      md("""
      Under tensor parallelism the b1.58 step with per-shard groups has exactly the collectives of the FP step
      (the all-reduces of Megatron tensor parallelism): quantisation adds no communication. The control
      with one global statistic needs extra all-reduces. Under FSDP the b1.58 step gathers the BitLinear weights
      as int8 codes (`s8`) instead of float32, 4x fewer bytes for those weights; the float32 that remains is the
      embedding, the head and the norm gains, which stay in high precision. The codes travel as int8, not yet
      2-bit packed.

      To plan a real pod run the same way, `python -m bitnet_jax.train --config=configs/lm.py:b158-3b --dry_run
      --simulate_devices=64 --config.mesh.fsdp=4 --config.mesh.tensor=4 ...` prints the per-device memory and
      collectives without allocating anything (see the README).
      """),
  ]


# --------------------------------------------------------------------------------------------------------------
# Writing.
# --------------------------------------------------------------------------------------------------------------
NOTEBOOKS = {
    "01_quantizers": (nb01, None),
    "02_train_bitnet_vs_fp": (nb02, "GPU"),
    "03_scaling_and_energy": (nb03, None),
    "04_sharding": (nb04, "TPU"),
}


def build(name: str) -> nbformat.NotebookNode:
  """The notebook `name` without outputs, with stable cell ids (so regenerating it changes nothing)."""
  make, accelerator = NOTEBOOKS[name]
  nb = nbformat.v4.new_notebook()
  for i, cell in enumerate(make()):
    kind, source = cell.split(":", 1)
    new = nbformat.v4.new_markdown_cell if kind == "md" else nbformat.v4.new_code_cell
    nb.cells.append(new(source, id=f"{name[:2]}-{i:02d}"))
  nb.metadata = {
      "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
      "language_info": {"name": "python"},
      "colab": {"provenance": [], "name": f"{name}.ipynb"},
  }
  if accelerator:
    nb.metadata["accelerator"] = accelerator
  nbformat.validate(nb)
  return nb


def render(name: str) -> str:
  return nbformat.writes(build(name)) + "\n"


def main(argv: list[str]) -> None:
  for name in argv or NOTEBOOKS:
    path = HERE / f"{name}.ipynb"
    path.write_text(render(name))
    print("wrote", path)


if __name__ == "__main__":
  main(sys.argv[1:])
