"""quant_successors: the quantisers of b1.58's successors, pure jnp with their gradients (quant -> layers -> ...).

Sources (formulas as written in the papers; where a paper leaves a choice open, the reading we chose is named):
  * `absmean_activations`  BitNet a4.8 (2411.04965) eq. 7 and BitNet v2 (2504.18415) eq. 6, the INT4 activations:
        Q_INT4(X) = beta / sqrt(7) * RoundClip(sqrt(7) / (beta + eps) * X, -8, 7),   beta = mean|X|,
    per token (v2 section 2.1: "per-token absmax and absmean"; a4.8 does not say, we take v2's word). For other
    bit widths b we use sqrt(q), q = 2^(b-1) - 1, and codes in [-q - 1, q] (our generalisation: only b = 4 is in
    the papers). As in `quant`, eps is a clamp `max(beta, 1e-5)` (the FAQ code's form), not an added term; beta
    is also clamped below 1e38, so that the scale never underflows (inputs near the float32 maximum).
  * `topk_sparsify`        a4.8 eq. 1's mask: per token, the top K = fraction * d entries of |X| are kept (a4.8
    section 3: "topK as 50% for the output projection of attention"); the rest are set to 0. The axis (per token,
    over the features) is our reading; a4.8 follows Q-Sparse, which masks per activation vector. Entries tied
    with the K-th largest |x| are all kept. Backward: the identity (a4.8 section 2.2, "we directly bypass ...
    the top-K sparsification function during the backward propagation").
  * `seq_ternary_weights`  ParetoQ (2502.02631) stretched elastic quantisation (SEQ) for 1.58 bits, as its official
    code writes it (`StretchedElasticQuant`, w_bits=0; the paper's general formula read with k = 3 levels gives
    four levels, so the code is the reference here): with a learnable scale alpha per output channel,
        u = W / alpha,   q = round(clip(u, -0.99, 0.99) * 1.5) / 1.5   in {-2/3, 0, +2/3},   W_q = alpha * q.
    Gradients (LSQ-style, the code's backward): dW = g * [|u| <= 0.99]; d alpha = sum over the channel of
    g * (q - u) inside the clip range and g * sign(u) outside, times 1 / sqrt(W.size) (the whole matrix's count).
    alpha starts at max|W| of its channel (`seq_init_scale`).

Every function takes `groups=G` like `quant`'s activation quantisers (the feature axis split into G groups with
their own statistics, aligned with tensor-parallel shards), so statistics never cross a shard.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from bitnet_jax import quant
# The grouping and operation-order helpers of the core quantisers (same layout, same exact mode).
from bitnet_jax.quant import EPS, _check_bits, _check_groups, _mean, _pin, _split

__all__ = ["absmean_activations", "absmean_activation_codes", "topk_sparsify", "topk_count", "SEQ_CLIP",
           "seq_ternary_weights", "seq_ternary_codes", "seq_init_scale"]


# --------------------------------------------------------------------------------------------------------------
# Absmean activations (a4.8 eq. 7, v2 eq. 6).
# --------------------------------------------------------------------------------------------------------------
BETA_MAX = 1e38   # the largest mean|x| the scale takes (see `_absmean`)

def _absmean(x: jax.Array, bits: int, groups: int, exact: bool):
  """Codes (float32, grouped [..., G, d/G]) and s = sqrt(q) / max(mean|x|, eps) per token and group."""
  q = 2.0 ** (bits - 1) - 1.0
  xg = _split(x.astype(jnp.float32), groups, x.ndim - 1)
  # beta_g = mean |x^(g)| per token. The terms are scaled by 2^-k >= 1/n first and the mean by 2^k after: exact
  # power-of-two scalings, so the result is the plain mean's bit for bit, but a sum of n values near the float32
  # maximum cannot overflow to inf (which would make the scale 0 and the output NaN).
  k = math.ceil(math.log2(xg.shape[-1]))
  beta = _mean(jnp.abs(xg) * 2.0 ** -k, -1, exact=exact) * 2.0 ** k
  # beta is clamped to [eps, 1e38] so that s stays a normal float32: XLA flushes subnormals to zero, and s = 0
  # would make the output 0 / 0 for inputs near the float32 maximum.
  s = _pin(math.sqrt(q) / jnp.clip(beta, EPS, BETA_MAX), exact)
  codes = jnp.clip(jnp.round(xg * s), -q - 1.0, q)
  return codes, s


def _absmean_fq(x, *, bits: int = 4, groups: int = 1, exact: bool = False):
  _check_bits(bits, "absmean_activations")
  _check_groups(x.shape, groups, -1, "absmean_activations")
  codes, s = _absmean(x, bits, groups, exact)
  y = codes / _pin(jnp.broadcast_to(s, codes.shape), True) if exact else codes / s
  return y.reshape(x.shape).astype(x.dtype)


_absmean_ste = quant.straight_through(_absmean_fq)


def absmean_activations(x: jax.Array, bits: int = 4, *, groups: int = 1, exact: bool = False) -> jax.Array:
  """Per-token absmean fake-quantisation (a4.8 eq. 7; 4 bits: codes in [-8, 7], scale sqrt(7) / mean|x|), STE.

  Values beyond sqrt(7) * mean|x| (about 2.65x the mean magnitude) clip: the quantiser suits inputs without
  outliers, which is why the papers use it only where the inputs are close to Gaussian (after RMSNorm, or after
  a Hadamard rotation). `groups` and `exact` as in `quant.quantize_activations`.
  """
  return _absmean_ste(x, bits=bits, groups=groups, exact=exact)


def absmean_activation_codes(x: jax.Array, bits: int = 4, *, groups: int = 1,
                             exact: bool = False) -> tuple[jax.Array, jax.Array]:
  """Inference form: (int8 codes in [-2^(b-1), 2^(b-1) - 1], float32 scale 1/s of shape x.shape[:-1] + (G,))."""
  _check_bits(bits, "absmean_activation_codes")
  _check_groups(x.shape, groups, -1, "absmean_activation_codes")
  codes, s = _absmean(x, bits, groups, exact)
  return codes.reshape(x.shape).astype(jnp.int8), jnp.squeeze(1.0 / s, axis=-1)


# --------------------------------------------------------------------------------------------------------------
# Top-K sparsification (a4.8 eq. 1).
# --------------------------------------------------------------------------------------------------------------
def topk_count(width: int, fraction: float) -> int:
  """K, the entries kept of `width`: round(fraction * width), at least 1."""
  if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0.0 < fraction <= 1.0:
    raise ValueError(f"topk_sparsify: fraction must be in (0, 1], got {fraction!r}")
  return max(1, round(fraction * width))


def _topk_fq(x, *, fraction: float = 0.5, groups: int = 1):
  _check_groups(x.shape, groups, -1, "topk_sparsify")
  xg = _split(x, groups, x.ndim - 1)                                   # (..., G, d/G)
  k = topk_count(xg.shape[-1], fraction)
  if k == xg.shape[-1]:
    return x
  mag = jnp.abs(xg.astype(jnp.float32))
  # The K-th largest |x| per token and group, from a sort along the members: unlike `lax.top_k`, which XLA's
  # partitioner all-gathers when the group axis is tensor-sharded, a sort stays on each shard.
  d = mag.shape[-1]
  kth = jnp.sort(mag, axis=-1)[..., d - k:d - k + 1]
  return jnp.where(mag >= kth, xg, jnp.zeros_like(xg)).reshape(x.shape)


_topk_ste = quant.straight_through(_topk_fq)


def topk_sparsify(x: jax.Array, fraction: float = 0.5, *, groups: int = 1) -> jax.Array:
  """Keeps the top `fraction` of |x| per token (and per group of the last axis), zeroes the rest; STE backward."""
  return _topk_ste(x, fraction=fraction, groups=groups)


# --------------------------------------------------------------------------------------------------------------
# ParetoQ's stretched elastic quantiser for ternary weights, with a learnable per-output-channel scale.
# --------------------------------------------------------------------------------------------------------------
SEQ_CLIP = 0.99      # the official code's clip_val: |W / alpha| is clipped just inside 1
_SEQ_LEVELS = 1.5    # k / 2 for k = 3 levels: codes round(1.5 u) in {-1, 0, 1}, de-quantised as codes / 1.5


def _seq_parts(w: jax.Array, alpha: jax.Array):
  """(u = W / alpha, codes in {-1, 0, 1}) in float32; alpha broadcasts against the [in, out] kernel as [1, out]."""
  a = jnp.maximum(alpha.astype(jnp.float32), EPS)[None, :]
  u = w.astype(jnp.float32) / a
  return u, a, jnp.round(jnp.clip(u, -SEQ_CLIP, SEQ_CLIP) * _SEQ_LEVELS)


def _check_seq(w: jax.Array, alpha: jax.Array) -> None:
  if w.ndim != 2 or alpha.shape != (w.shape[1],):
    raise ValueError(f"seq_ternary_weights: expects a kernel [in, out] and one scale per output channel, got "
                     f"kernel {w.shape} and alpha {alpha.shape}")


@jax.custom_vjp
def _seq(w: jax.Array, alpha: jax.Array) -> jax.Array:
  _, a, codes = _seq_parts(w, alpha)
  return (codes * (a / _SEQ_LEVELS)).astype(w.dtype)   # equal to the codes form; the code's (c / 1.5) * a within 1 ulp


def _seq_fwd(w, alpha):
  return _seq(w, alpha), (w, alpha)


def _seq_bwd(res, g):
  w, alpha = res
  u, _, codes = _seq_parts(w, alpha)
  g32 = g.astype(jnp.float32)
  inside = jnp.abs(u) <= SEQ_CLIP
  dw = jnp.where(inside, g32, 0.0)
  top = 1.0   # the top level (n_levels - shift) / n_levels of the ternary grid, where u is clipped
  step = jnp.where(inside, codes / _SEQ_LEVELS - u, jnp.sign(u) * top)
  dalpha = jnp.sum(g32 * step, axis=0) / math.sqrt(w.size)
  return dw.astype(w.dtype), dalpha.astype(alpha.dtype)


_seq.defvjp(_seq_fwd, _seq_bwd)


def seq_ternary_weights(w: jax.Array, alpha: jax.Array) -> jax.Array:
  """ParetoQ SEQ ternary fake-quantisation of a kernel [in, out] with scales alpha [out] (module docstring).

  Levels {-2/3, 0, +2/3} * alpha: three equal bins of [-alpha, alpha], each mapped to its centre. Gradients
  reach both the kernel (masked to the clip range) and alpha (LSQ-style, scaled by 1 / sqrt(W.size)).
  """
  _check_seq(w, alpha)
  return _seq(w, alpha)


def seq_ternary_codes(w: jax.Array, alpha: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Inference form: (int8 codes in {-1, 0, 1} shaped like w, float32 scale grid (1, out) = 2/3 alpha), the
  layout of `quant.ternary_codes` with one group per output channel, so `quant.int_matmul` and the packed
  kernels take it as is."""
  _check_seq(w, alpha)
  _, a, codes = _seq_parts(w, alpha)
  return codes.astype(jnp.int8), a / _SEQ_LEVELS


def seq_init_scale(w: jax.Array) -> jax.Array:
  """alpha's initial value: max|W| of each output channel (the official code's init for ternary), float32."""
  return jnp.max(jnp.abs(w.astype(jnp.float32)), axis=0)
