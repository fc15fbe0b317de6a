"""quant: pure-jnp quantizers with straight-through gradients (quant -> layers -> model -> sharding -> train).

Every fake-quant function here returns the de-quantized value (codes times scale) in the input's dtype, and
its gradient is the straight-through estimator (STE): the cotangent passes through unchanged, exactly as the
reference code's `x + (q(x) - x).detach()` trick gives. Statistics are computed in float32 whatever the input
dtype. No Flax: these functions are jit-, vmap- and grad-safe and are tested in isolation
(`tests/test_quant.py`) against numpy oracles of the papers' formulas.

Formulas (see ../shared/PAPERS.md):
  * `binary_weights`      BitNet (2310.11453) eq. 1-4: `Sign(W - alpha) * beta`, alpha = mean(W), beta = mean|W|.
  * `ternary_weights`     BitNet b1.58 (2402.17764) eq. 1-3, bit-for-bit the FAQ reference `weight_quant`.
  * `quantize_activations` BitNet eq. 5-6 (absmax, and the zero-point form for non-negative inputs), per token
                          bit-for-bit the FAQ reference `activation_quant`.
  * `groups=G`            BitNet section 2.3, "model parallelism with group quantization": G independent groups,
                          each with its own alpha_g, beta_g, gamma_g, eta_g.

Two operation orders (`exact=`, a static keyword of every quantiser):
  * `exact=False`, the default: XLA may fuse and re-associate the statistics (`sum / n` becomes `sum * (1 / n)`,
    `codes / s` becomes `codes * (1 / s)`). Fast; the codes equal exact mode's except where a value sits on a
    rounding tie, and a scale differs by the rounding of a float32 sum in another order (`tests/test_quant.py`).
  * `exact=True`: the reference code's operation order, pinned with `optimization_barrier`s (`_pin`), so the
    result equals the FAQ reference bit for bit wherever the float32 reductions themselves agree (they can differ
    between CPUs and between jit and eager: XLA picks the summation order). The oracle tests run in this mode;
    a model takes it from `ModelConfig.exact_quant`.

Deviation from the BitNet text, named: the paper scales activations by `Q_b = 2^(b-1)` and clips to
`[-Q_b + eps, Q_b - eps]`, which after rounding would produce the code 2^(b-1), outside a signed b-bit integer.
We follow the b1.58 FAQ reference code instead: scale by `2^(b-1) - 1` (127 for 8 bits) and clip to
`[-2^(b-1), 2^(b-1) - 1]`. The zero-point form uses the same `2^(b-1) - 1`, so its codes fit a signed int8 too.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

# Clamp on the statistic before it is inverted, as in the FAQ reference code (`clamp_(min=1e-5)`).
EPS = 1e-5

__all__ = [
    "EPS",
    "straight_through",
    "binary_weights",
    "ternary_weights",
    "quantize_activations",
    "binary_codes",
    "ternary_codes",
    "activation_codes",
    "expand_group_scale",
    "int_matmul",
]


# --------------------------------------------------------------------------------------------------------------
# The straight-through estimator.
# --------------------------------------------------------------------------------------------------------------
def straight_through(fake_quant: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
  """Wraps `fake_quant(x, **static)` in a `jax.custom_vjp` whose backward is the identity (the STE).

  BitNet section 2.4: "the straight-through estimator (STE) to approximate the gradient ... bypasses the
  non-differentiable functions, such as the Sign and Clip functions". The identity holds through the scale
  too, matching the reference code's `w + (weight_quant(w) - w).detach()`.
  """

  @functools.wraps(fake_quant)
  def wrapped(x, **static):
    @jax.custom_vjp
    def op(x):
      return fake_quant(x, **static)

    def fwd(x):
      return fake_quant(x, **static), None

    def bwd(_, g):
      return (g,)

    op.defvjp(fwd, bwd)
    return op(x)

  return wrapped


# --------------------------------------------------------------------------------------------------------------
# Group layout helpers: split one axis of size n into (G, n / G) and reduce statistics per group.
# --------------------------------------------------------------------------------------------------------------
def _check_groups(shape: tuple[int, ...], groups: int, axis: int, what: str) -> int:
  """Validates `groups` against `shape[axis]` and returns the normalised (non-negative) axis."""
  if not shape:
    raise ValueError(f"{what}: expected an array with at least one dimension, got a scalar")
  if not isinstance(axis, int) or not -len(shape) <= axis < len(shape):
    raise ValueError(f"{what}: axis={axis!r} is out of range for shape {shape}")
  axis = axis % len(shape)
  if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
    raise ValueError(f"{what}: groups must be a positive int, got {groups!r}")
  if shape[axis] % groups:
    raise ValueError(
        f"{what}: groups={groups} does not divide dimension {axis} of shape {shape} (size {shape[axis]})")
  return axis


def _split(x: jax.Array, groups: int, axis: int) -> jax.Array:
  """[..., n, ...] -> [..., G, n/G, ...] with the group index at `axis` and the members at `axis + 1`."""
  s = x.shape
  return x.reshape(s[:axis] + (groups, s[axis] // groups) + s[axis + 1:])


def _mean(x: jax.Array, axis, keepdims: bool = True, *, exact: bool = True) -> jax.Array:
  """The mean. Exact: a sum, then one true division by the count, torch's `mean` rounding (`jnp.mean` multiplies
  by 1/n, which can differ in the last bit when n is not a power of two). Otherwise `jnp.mean`."""
  if not exact:
    return jnp.mean(x, axis=axis, keepdims=keepdims)
  axes = (axis,) if isinstance(axis, int) else axis
  count = 1
  for a in axes:
    count *= x.shape[a]
  total = jnp.sum(x, axis=axis, keepdims=keepdims)
  return total / _pin(jnp.full(total.shape, count, total.dtype), exact)   # see `_pin`: keeps it a true division


def _pin(stat: jax.Array, exact: bool) -> jax.Array:
  """In exact mode, stops XLA's algebraic simplifier from re-associating through a scale; otherwise the identity.

  XLA re-associates through scales (`x / (q / g)`, `w * (1 / m)`) and turns a division by a broadcast or a
  constant into a multiplication by its reciprocal (`sum / n` -> `sum * (1 / n)`); each rounds differently from
  the reference code's operation order. Values passed through this barrier are opaque to those rewrites, and to
  fusion: the barriers cost a fifth of a b158 train step on an Intel Xeon and 3-4% on an AMD EPYC
  (benchmarks/results/cpu.md), which is why they are opt-in.
  """
  return jax.lax.optimization_barrier(stat) if exact else stat


def _reduce_all_but(x: jax.Array, keep: int, fn) -> jax.Array:
  """Reduces every axis except `keep` with `fn` (`_mean` / jnp.max / jnp.min), keeping dims."""
  return fn(x, axis=tuple(i for i in range(x.ndim) if i != keep), keepdims=True)


def _weight_groups(shape: tuple[int, ...], groups, axis: int, what: str) -> tuple[int, ...]:
  """`groups` as one count per dimension: an int G groups `axis`; a tuple gives a block grid (one per dim)."""
  if isinstance(groups, (tuple, list)):
    if len(groups) != len(shape):
      raise ValueError(f"{what}: groups={tuple(groups)} needs one count per dimension of shape {shape}")
    for dim, g in enumerate(groups):
      _check_groups(shape, g, dim, what)
    return tuple(groups)
  axis = _check_groups(shape, groups, axis, what)
  return tuple(groups if d == axis else 1 for d in range(len(shape)))


def _split_blocks(x: jax.Array, groups: tuple[int, ...]) -> jax.Array:
  """[n0, n1, ...] -> [G0, n0/G0, G1, n1/G1, ...]: block (g0, g1, ...) at the even axes, members at the odd."""
  return x.reshape(tuple(d for n, g in zip(x.shape, groups) for d in (g, n // g)))


def _block_stat(xb: jax.Array, fn) -> jax.Array:
  """Reduces the member axes of a block-split array: [G0, n0/G0, G1, ...] -> [G0, 1, G1, 1, ...]."""
  return fn(xb, axis=tuple(range(1, xb.ndim, 2)), keepdims=True)


def _group_scale(stat: jax.Array, groups: tuple[int, ...]) -> jax.Array:
  """Drops the (size-1) member axes of a block statistic: [G0, 1, G1, 1, ...] -> [G0, G1, ...]."""
  return stat.reshape(groups)


def expand_group_scale(scale: jax.Array, shape: tuple[int, ...], axis: int | None = None) -> jax.Array:
  """Broadcasts a per-group scale to `shape` by repeating each group's value over its block.

  `scale` has the rank of `shape` with G_d groups along each dimension d (1 where it is not grouped, n_d for a
  per-row scale); `axis` is accepted for the older single-axis call form and not needed.
  `codes * expand_group_scale(scale, codes.shape)` is the de-quantized tensor.
  """
  del axis
  if scale.ndim != len(shape):
    raise ValueError(f"scale of shape {scale.shape} does not have the rank of {shape}")
  for d, (n, g) in enumerate(zip(shape, scale.shape)):
    if n % g:
      raise ValueError(f"scale with {g} groups on axis {d} does not fit shape {shape}")
    scale = jnp.repeat(scale, n // g, axis=d)
  return scale


# --------------------------------------------------------------------------------------------------------------
# Weights: BitNet binarisation and b1.58 absmean ternarisation.
# --------------------------------------------------------------------------------------------------------------
def _binary(w: jax.Array, groups: tuple[int, ...], exact: bool):
  """Codes in {-1, +1} (float32, block layout) and beta per group. BitNet eq. 1-4; Sign(0) = -1."""
  wb = _split_blocks(w.astype(jnp.float32), groups)
  mean = functools.partial(_mean, exact=exact)
  alpha = _block_stat(wb, mean)                             # alpha_g = (G / nm) sum W^(g)
  beta = _pin(_block_stat(jnp.abs(wb), mean), exact)        # beta_g = (G / nm) ||W^(g)||_1
  codes = jnp.where(wb - alpha > 0, 1.0, -1.0)
  return codes, beta


def _ternary(w: jax.Array, groups: tuple[int, ...], exact: bool):
  """Codes in {-1, 0, +1} (float32, block layout) and s = 1 / max(mean|W|, eps) per group.

  b1.58 eq. 1-3 written exactly as the FAQ reference `weight_quant`: `s = 1 / max(mean|w|, 1e-5)`,
  `round(w * s)` (half to even, as torch.round) clipped to [-1, 1]; the de-quantized value is codes / s.
  """
  wb = _split_blocks(w.astype(jnp.float32), groups)
  s = _pin(1.0 / jnp.maximum(_block_stat(jnp.abs(wb), functools.partial(_mean, exact=exact)), EPS), exact)
  codes = jnp.clip(jnp.round(wb * s), -1.0, 1.0)
  return codes, s


def _binary_fq(w, *, groups=1, axis: int = -1, exact: bool = False):
  codes, beta = _binary(w, _weight_groups(w.shape, groups, axis, "binary_weights"), exact)
  return (codes * beta).reshape(w.shape).astype(w.dtype)


def _ternary_fq(w, *, groups=1, axis: int = -1, exact: bool = False):
  codes, s = _ternary(w, _weight_groups(w.shape, groups, axis, "ternary_weights"), exact)
  return (codes / s).reshape(w.shape).astype(w.dtype)


_binary_ste = straight_through(_binary_fq)
_ternary_ste = straight_through(_ternary_fq)


def binary_weights(w: jax.Array, *, groups: int | tuple[int, ...] = 1, axis: int = -1,
                   exact: bool = False) -> jax.Array:
  """BitNet binarisation (2310.11453 eq. 1-4) with an STE gradient: `Sign(W - alpha) * beta`.

  alpha = mean(W), beta = mean(|W|) (of the uncentred W), Sign(w) = +1 if w > 0 else -1 (so Sign(0) = -1).
  With `groups=G` the weight is split into G equal groups along `axis` (for a Flax kernel [in, out], axis=-1
  is the output features) and each group has its own alpha_g and beta_g (BitNet section 2.3). Statistics are
  reduced over every other axis. A tuple `groups=(G0, G1)` splits the weight into a G0 x G1 grid of blocks with
  one statistic each: the layout that lets every device of a 2-D (FSDP x tensor) mesh quantise its own shard.
  `exact=True` pins the reference operation order (module docstring).
  """
  return _binary_ste(w, groups=groups, axis=axis, exact=exact)


def ternary_weights(w: jax.Array, *, groups: int | tuple[int, ...] = 1, axis: int = -1,
                    exact: bool = False) -> jax.Array:
  """b1.58 absmean ternarisation (2402.17764 eq. 1-3) with an STE gradient.

  `gamma = mean|W|`, `RoundClip(W / (gamma + eps), -1, 1) * gamma`, computed exactly as the FAQ reference
  `weight_quant`: `s = 1 / max(mean|w|, 1e-5)`, `clip(round(w * s), -1, 1) / s` (equal in float32).
  `groups`, `axis` and `exact` as in `binary_weights`.
  """
  return _ternary_ste(w, groups=groups, axis=axis, exact=exact)


def binary_codes(w: jax.Array, *, groups: int | tuple[int, ...] = 1, axis: int = -1,
                 exact: bool = False) -> tuple[jax.Array, jax.Array]:
  """Inference form of `binary_weights`: (int8 codes in {-1, +1} shaped like w, float32 beta per group).

  The scale has w's rank with G along `axis` (or G_d along each dimension for tuple groups) and 1 elsewhere;
  `codes * expand_group_scale(scale, w.shape)` equals `binary_weights(w, ...)` in float32 exactly.
  """
  gs = _weight_groups(w.shape, groups, axis, "binary_codes")
  codes, beta = _binary(w, gs, exact)
  return codes.reshape(w.shape).astype(jnp.int8), _group_scale(beta, gs)


def ternary_codes(w: jax.Array, *, groups: int | tuple[int, ...] = 1, axis: int = -1,
                  exact: bool = False) -> tuple[jax.Array, jax.Array]:
  """Inference form of `ternary_weights`: (int8 codes in {-1, 0, +1}, float32 scale = 1/s = mean|W| per group).

  Because every code is -1, 0 or +1, `codes * (1 / s)` equals the reference `codes / s` exactly. The scale has
  w's rank with the group counts along the grouped axes and 1 elsewhere.
  """
  gs = _weight_groups(w.shape, groups, axis, "ternary_codes")
  codes, s = _ternary(w, gs, exact)
  return codes.reshape(w.shape).astype(jnp.int8), _group_scale(1.0 / s, gs)


# --------------------------------------------------------------------------------------------------------------
# Activations: absmax, symmetric or with a zero point.
# --------------------------------------------------------------------------------------------------------------
def _check_bits(bits, what: str) -> int:
  if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
    raise ValueError(f"{what}: bits must be an int from 2 to 8, got {bits!r}")
  return bits


def _act_stat(xg: jax.Array, fn, per_token: bool) -> jax.Array:
  """Reduces a grouped activation [..., G, d/G]: per token over the members only, per tensor over all but G."""
  if per_token:
    return fn(xg, axis=-1, keepdims=True)
  return _reduce_all_but(xg, xg.ndim - 2, fn)


def _symmetric(x: jax.Array, bits: int, per_token: bool, groups: int, exact: bool):
  """Codes (float32, grouped [..., G, d/G]) and s = q / max(gamma, eps), q = 2^(b-1) - 1.

  Per token with 8 bits this is the FAQ reference `activation_quant`:
  `s = 127 / max(max|x|, 1e-5)`, `clip(round(x * s), -128, 127)`; the de-quantized value is codes / s.
  """
  q = 2.0 ** (bits - 1) - 1.0
  xg = _split(x.astype(jnp.float32), groups, x.ndim - 1)
  gamma = _act_stat(jnp.abs(xg), jnp.max, per_token)       # gamma_g = max |x^(g)|
  s = _pin(q / jnp.maximum(gamma, EPS), exact)
  codes = jnp.clip(jnp.round(xg * s), -q - 1.0, q)
  return codes, s


def _asymmetric(x: jax.Array, bits: int, per_token: bool, groups: int, exact: bool):
  """BitNet eq. 6, the zero-point form for inputs of a non-linearity: codes in [0, q], eta = min(x).

  `codes = clip(round((x - eta) * s), 0, q)` with `s = q / max(gamma, eps)`, gamma = max|x| (the paper's
  gamma), q = 2^(b-1) - 1; the de-quantized value is codes / s + eta. For non-negative x (after a ReLU) the
  range [eta, eta + gamma] covers every input; for inputs with negative values it clips the top.
  """
  q = 2.0 ** (bits - 1) - 1.0
  xg = _split(x.astype(jnp.float32), groups, x.ndim - 1)
  eta = _act_stat(xg, jnp.min, per_token)                  # eta_g = min x^(g)
  gamma = _act_stat(jnp.abs(xg), jnp.max, per_token)
  s = _pin(q / jnp.maximum(gamma, EPS), exact)
  codes = jnp.clip(jnp.round((xg - eta) * s), 0.0, q)
  return codes, s, eta


def _activations_fq(x, *, bits: int = 8, per_token: bool = True, groups: int = 1, asymmetric: bool = False,
                    exact: bool = False):
  _check_bits(bits, "quantize_activations")
  _check_groups(x.shape, groups, -1, "quantize_activations")
  if asymmetric:
    codes, s, eta = _asymmetric(x, bits, per_token, groups, exact)
  else:
    (codes, s), eta = _symmetric(x, bits, per_token, groups, exact), 0.0
  # XLA rewrites `codes / broadcast(s)` into `codes * broadcast(1 / s)`, one rounding off the reference's true
  # division for codes other than 0 and +-1. In exact mode, dividing by a materialised, pinned broadcast keeps it
  # a division. (The weight quantisers need no such care: their codes are -1, 0, +1, for which c / s == c * (1/s).)
  y = (codes / _pin(jnp.broadcast_to(s, codes.shape), True) if exact else codes / s) + eta
  return y.reshape(x.shape).astype(x.dtype)


_activations_ste = straight_through(_activations_fq)


def quantize_activations(x: jax.Array, bits: int = 8, *, per_token: bool = True, groups: int = 1,
                         asymmetric: bool = False, exact: bool = False) -> jax.Array:
  """Absmax activation fake-quantisation to `bits` (2..8) with an STE gradient. BitNet eq. 5-6.

  * `per_token=True`: one gamma per row over the last (feature) axis; with 8 bits, equal in float32 to the FAQ
    reference `activation_quant` (`s = 127 / max(max|x|, 1e-5)`, round, clip to [-128, 127], divide by s).
  * `per_token=False`: one gamma over the whole tensor (BitNet's training mode). Note that a per-tensor scale
    is computed over every position, so it lets later tokens influence earlier ones through one scalar.
  * `groups=G`: the feature axis is split into G groups with their own gamma (and eta) each.
  * `asymmetric=True`: the zero-point form for non-negative inputs, `(x - eta) * q / gamma` clipped to [0, q].
  * `exact=True`: the reference operation order, bit for bit (module docstring); the default lets XLA fuse.
  """
  return _activations_ste(x, bits=bits, per_token=per_token, groups=groups, asymmetric=asymmetric, exact=exact)


def activation_codes(x: jax.Array, bits: int = 8, *, per_token: bool = True, groups: int = 1,
                     exact: bool = False) -> tuple[jax.Array, jax.Array]:
  """Inference form of symmetric `quantize_activations`: (int8 codes, float32 scale = 1/s per row and group).

  The scale has shape x.shape[:-1] + (G,) per token, (1, ..., 1, G) per tensor. `codes * expand(scale)` equals
  the fake-quantised value to within one float32 rounding (the reference divides by s; a product with 1/s can
  differ in the last bit).
  """
  _check_bits(bits, "activation_codes")
  _check_groups(x.shape, groups, -1, "activation_codes")
  codes, s = _symmetric(x, bits, per_token, groups, exact)
  return codes.reshape(x.shape).astype(jnp.int8), jnp.squeeze(1.0 / s, axis=-1)


# --------------------------------------------------------------------------------------------------------------
# The integer matmul of the inference BitLinear (the FAQ's `lowbit_gemm` then one rescale).
# --------------------------------------------------------------------------------------------------------------
def weight_scale_grid(w_scale: jax.Array) -> jax.Array:
  """A weight scale as the float32 (G_in, G_out) grid `quant.*_codes` return; a scalar is the grid (1, 1)."""
  w_scale = jnp.asarray(w_scale, jnp.float32)
  if w_scale.ndim == 0:
    return w_scale.reshape(1, 1)
  if w_scale.ndim != 2:
    raise ValueError(f"w_scale must be a (G_in, G_out) grid as quant.ternary_codes returns, got shape "
                     f"{w_scale.shape}")
  return w_scale


def k_partitions(x_groups: int, w_scale_grid: jax.Array, k: int) -> int:
  """How many input-axis partitions must be summed separately: every activation group (Gx) and every weight
  row group (G_in) has its own scale, so the sums are split at both boundaries: lcm(Gx, G_in) parts."""
  parts = math.lcm(x_groups, w_scale_grid.shape[0])
  if k % parts:
    raise ValueError(f"activation groups ({x_groups}) and weight row groups ({w_scale_grid.shape[0]}) split the "
                     f"input size {k} into {parts} parts, which does not divide it")
  return parts


def rescale_group_sums(acc_pmn: jax.Array, x_scale_gm1: jax.Array, w_scale_grid: jax.Array) -> jax.Array:
  """`sum_p acc[p] * x_scale[p] * w_scale[p]`: one float32 rescale of integer (or float) partial sums.

  acc_pmn (P, M, N): the products summed within each of P equal input-axis partitions (`k_partitions`);
  x_scale_gm1 (Gx, M, 1) with Gx dividing P; w_scale_grid (G_in, G_out) with G_in dividing P and G_out N.
  """
  p, _, n = acc_pmn.shape
  xs = jnp.repeat(x_scale_gm1.astype(jnp.float32), p // x_scale_gm1.shape[0], axis=0)          # (P, M, 1)
  ws = expand_group_scale(w_scale_grid, (w_scale_grid.shape[0], n))                                # (G_in, N)
  ws = jnp.repeat(ws, p // w_scale_grid.shape[0], axis=0)[:, None, :]                         # (P, 1, N)
  return jnp.sum(acc_pmn.astype(jnp.float32) * xs * ws, axis=0)                                # (M, N)


def activation_scale_gm1(x_scale: jax.Array | None, lead: tuple[int, ...]) -> jax.Array:
  """x_scale (None, a scalar, lead + (Gx,) or broadcastable to it) -> (Gx, M, 1) for `rescale_group_sums`."""
  m = math.prod(lead)
  if x_scale is None:
    return jnp.ones((1, m, 1), jnp.float32)
  xs = jnp.asarray(x_scale, jnp.float32)
  xs = xs.reshape((1,) * (len(lead) + 1)) if xs.ndim == 0 else xs
  return jnp.broadcast_to(xs, lead + (xs.shape[-1],)).reshape(m, -1).T[..., None]


def int_matmul(x_codes: jax.Array, x_scale: jax.Array, w_codes: jax.Array, w_scale: jax.Array) -> jax.Array:
  """int8 activation codes [..., K] times int8 weight codes [K, N] -> float32 [..., N], with integer sums.

  The b1.58 FAQ inference BitLinear `y = lowbit_gemm(x_q, w_q) / w_scale / x_scale`, with the scales here as
  the multipliers `quant.activation_codes` / `quant.ternary_codes` (or `binary_codes`) return: the products
  accumulate exactly in int32 (`lax.dot_general(..., preferred_element_type=int32)`), then one float32 rescale.
  * x_scale: x.shape[:-1] + (Gx,) per token, (1, ..., 1, Gx) per tensor, or a scalar; Gx activation groups
    along K (BitNet section 2.3).
  * w_scale: the (G_in, G_out) grid. With groups along the output axis only, (1, G): one int32 sum per output,
    then one rescale by its column group's scale.
  * Groups along the input axis, (G, 1) (row-parallel layers; also activation groups Gx > 1): the scale
    changes along the summed axis, so one rescale after the sum is not possible. The products are summed per
    input group (a batched dot_general, (G, M, N) int32), each group sum is rescaled, then the groups are
    added: `y = sum_g acc_g * x_scale_g * w_scale_g`.
  """
  x_codes, w_codes = jnp.asarray(x_codes), jnp.asarray(w_codes)
  for name, a in (("x_codes", x_codes), ("w_codes", w_codes)):
    if a.dtype != jnp.int8:
      raise ValueError(f"int_matmul: {name} must be int8, got dtype {a.dtype}")
  if w_codes.ndim != 2 or x_codes.ndim < 1 or x_codes.shape[-1] != w_codes.shape[0]:
    raise ValueError(f"int_matmul: shapes x_codes {x_codes.shape} and w_codes {w_codes.shape} do not contract")
  *lead, k = x_codes.shape
  lead, n = tuple(lead), w_codes.shape[1]
  m = math.prod(lead)
  xs = activation_scale_gm1(x_scale, lead)                                 # (Gx, M, 1)
  ws = weight_scale_grid(w_scale)                                          # (G_in, G_out)
  parts = k_partitions(xs.shape[0], ws, k)
  x3 = x_codes.reshape(m, parts, k // parts).transpose(1, 0, 2)            # (P, M, K/P)
  w3 = w_codes.reshape(parts, k // parts, n)                               # (P, K/P, N)
  acc = jax.lax.dot_general(x3, w3, (((2,), (1,)), ((0,), (0,))), preferred_element_type=jnp.int32)  # (P, M, N)
  return rescale_group_sums(acc, xs, ws).reshape(lead + (n,))
