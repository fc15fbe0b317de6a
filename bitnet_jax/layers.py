"""layers: Flax NNX norms and BitLinear (quant -> layers -> model -> sharding -> train).

`BitLinear` is the papers' drop-in replacement for a dense layer:

    y = Quant_w(W) . Quant_x(Norm(x))                        (BitNet eq. 11-12; b1.58 FAQ reference BitLinear)

with the sub-layer norm (BitNet's SubLN LayerNorm, or b1.58's RMSNorm) applied before the activation
quantisation, the weight quantised from float32 latent weights, and straight-through gradients from
`bitnet_jax.quant`. With `weight_quant="none"`, `act_bits=None` and `norm=None` it is a plain dense layer
`x @ W` (tested bit for bit).

Parameters carry logical axis names only (`("embed", "mlp")`, ...); `bitnet_jax.sharding` maps them to mesh
axes. Outside a mesh context they are plain arrays, and `logical_constraint` is the identity.

Under FSDP a BitLinear quantises the shard of its latent kernel that each device holds (the statistics are per
block, aligned with the shards), and what is all-gathered for the matmul is the int8 code tensor plus one
float32 scale per block, not the float32 latent kernel: 4x fewer bytes on the wire.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd

from bitnet_jax import hadamard, quant
from bitnet_jax import quant_successors as qs

WEIGHT_QUANTIZERS: dict[str, Callable[..., jax.Array] | None] = {
    "ternary": quant.ternary_weights,   # b1.58 absmean, {-1, 0, +1}
    "binary": quant.binary_weights,     # BitNet sign, {-1, +1}
    "ternary_seq": qs.seq_ternary_weights,   # ParetoQ SEQ, {-2/3, 0, 2/3} x a learned scale per output channel
    "none": None,                       # full precision
}
WEIGHT_CODES = {"ternary": quant.ternary_codes, "binary": quant.binary_codes}   # statistic-based: (w, groups=)
LEARNED_SCALE = {"ternary_seq": qs.seq_ternary_codes}   # (w, alpha): the layer holds alpha (`weight_scale`)
NORM_KINDS = ("rms", "layer")


class ActQuant(NamedTuple):
  """One named activation quantiser: its bits, the fake-quant (STE) and the integer code form, each called as
  `fn(x, groups=G, exact=...)` on the feature axis, per token."""
  bits: int
  fake: Callable[..., jax.Array]
  codes: Callable[..., tuple[jax.Array, jax.Array]]


def _topk_then(fn, fraction: float):
  return lambda x, **kw: fn(qs.topk_sparsify(x, fraction, groups=kw["groups"]), **kw)


# Named activation quantisers (`BitLinear(act_quant=...)`, `ModelConfig.act_quant`). Without a name a layer keeps
# the configurable absmax of `act_bits` / `act_per_token` / `act_asymmetric` (BitNet, b1.58).
ACT_QUANTIZERS: dict[str, ActQuant] = {
    # per-token absmax INT8: b1.58 FAQ `activation_quant`, a4.8 eq. 3, v2 eq. 5
    "absmax8": ActQuant(8, lambda x, **kw: quant.quantize_activations(x, 8, **kw),
                        lambda x, **kw: quant.activation_codes(x, 8, **kw)),
    # per-token absmean INT4, codes [-8, 7], scale sqrt(7) / mean|x|: a4.8 eq. 7, v2 eq. 6
    "absmean4": ActQuant(4, lambda x, **kw: qs.absmean_activations(x, 4, **kw),
                         lambda x, **kw: qs.absmean_activation_codes(x, 4, **kw)),
    # a4.8 eq. 1: the top 50% of |x| per token kept, then per-token absmax INT8 (attention output projection)
    "topk50_absmax8": ActQuant(8, _topk_then(lambda x, **kw: quant.quantize_activations(x, 8, **kw), 0.5),
                               _topk_then(lambda x, **kw: quant.activation_codes(x, 8, **kw), 0.5)),
}
INPUT_TRANSFORMS = ("hadamard",)   # applied after the layer's norm, before activation quantisation (v2 eq. 7)


def transform_input(x: jax.Array, transform: str | None, groups: int) -> jax.Array:
  """The layer's input transform (None, or "hadamard": v2's H-BitLinear), within each of `groups` groups."""
  return hadamard.hadamard_transform(x, groups=groups) if transform == "hadamard" else x


def input_codes(x: jax.Array, *, act_quant: str | None, act_bits: int, per_token: bool, groups: int,
                exact: bool) -> tuple[jax.Array, jax.Array]:
  """(int8 codes, float32 scale) of a prepared input: the named quantiser's code form, else symmetric absmax."""
  if act_quant is not None:
    return ACT_QUANTIZERS[act_quant].codes(x, groups=groups, exact=exact)
  return quant.activation_codes(x, act_bits, per_token=per_token, groups=groups, exact=exact)


def make_param(value: jax.Array, axes: Sequence[str | None]) -> nnx.Param:
  """A float parameter annotated with logical axis names; sharded eagerly only inside a mesh context."""
  in_mesh = not jax.sharding.get_abstract_mesh().empty
  return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=in_mesh)


def logical_constraint(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` by logical axis names, resolved through the active `nnx.logical_axis_rules`.

  The identity outside a mesh context or without rules, so single-device code pays nothing.
  """
  if jax.sharding.get_abstract_mesh().empty or not spmd.get_logical_axis_rules():
    return x
  return jax.lax.with_sharding_constraint(x, spmd.get_pspec(jax.sharding.PartitionSpec(*axes)))


class Norm(nnx.Module):
  """RMSNorm (b1.58, LLaMA) or LayerNorm without bias (BitNet's SubLN, eq. 12), optionally per group.

  `rms`:   x * rsqrt(mean(x^2) + eps) * scale
  `layer`: (x - E[x]) * rsqrt(Var(x) + eps) * scale
  With `groups=G` the feature axis is split into G groups normalised separately (BitNet section 2.3: "the
  LayerNorm is computed per group too"), so a tensor-parallel shard never needs the others' statistics.
  Statistics in float32; the result has the input's dtype. `use_scale=False` is the paper's parameter-free form.
  """

  def __init__(self, dim: int, *, kind: str = "rms", eps: float = 1e-5, use_scale: bool = True, groups: int = 1,
               axis_name: str | None = "embed", param_dtype=jnp.float32):
    if kind not in NORM_KINDS:
      raise ValueError(f"Norm kind must be one of {NORM_KINDS}, got {kind!r}")
    if groups < 1 or dim % groups:
      raise ValueError(f"Norm: groups={groups} must divide the feature size {dim}")
    self.kind, self.eps, self.groups = kind, eps, groups
    self.scale = make_param(jnp.ones((dim,), param_dtype), (axis_name,)) if use_scale else None

  def normalize(self, x: jax.Array) -> jax.Array:
    """The normalisation without the gain, in float32. Layers that share an input share this result."""
    *lead, d = x.shape
    xg = x.astype(jnp.float32).reshape(*lead, self.groups, d // self.groups)   # (..., G, d/G)
    if self.kind == "layer":
      xg = xg - jnp.mean(xg, axis=-1, keepdims=True)
    y = xg * jax.lax.rsqrt(jnp.mean(jnp.square(xg), axis=-1, keepdims=True) + self.eps)
    return y.reshape(x.shape)

  def apply_gain(self, normalized: jax.Array, dtype) -> jax.Array:
    y = normalized * self.scale[...] if self.scale is not None else normalized
    return y.astype(dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.apply_gain(self.normalize(x), x.dtype)


class QuantMix(nnx.Variable):
  """The quantisation warm-up weight lambda of a BitLinear (state, not trained; `set_quant_mix`)."""


def mix_quantized(x: jax.Array, q: jax.Array, lam: jax.Array) -> jax.Array:
  """The quantisation warm-up of Hugging Face's 1.58-bit fine-tuning work, `x + lambda * stop_gradient(q - x)`:
  the forward moves from x (lambda 0) to q (lambda 1) and the gradient stays the identity at every lambda.

  `q` must be a straight-through fake quantiser of x (dq/dx = 1, as every quantiser in `quant` is), so it is
  computed as `(1 - lambda) x + lambda q`: the same value and gradient, and exactly x at 0 and exactly q at 1
  (`x + (q - x)` can differ from q in the last bit)."""
  lam = lam.astype(x.dtype)
  return (1 - lam) * x + lam * q


class BitLinear(nnx.Module):
  """The BitNet / b1.58 linear layer: sub-layer norm -> activation quant -> matmul with quantised weights.

  Args:
    in_features, out_features: kernel shape [in, out] (Flax layout; `x @ kernel`).
    weight_quant: "ternary" (b1.58 absmean), "binary" (BitNet sign), "ternary_seq" (ParetoQ SEQ, with a learned
      scale per output channel, the parameter `weight_scale`, initialised to max|W| of its column), or "none".
    act_bits: activation bits (2..8), or None for no activation quantisation.
    act_per_token: absmax per token (b1.58, BitNet at inference) or per tensor (BitNet training).
    act_asymmetric: BitNet's zero-point form for inputs of a non-linearity (eq. 6).
    act_quant: a named activation quantiser of `ACT_QUANTIZERS` ("absmax8", "absmean4", "topk50_absmax8"); it
      replaces act_bits / act_per_token / act_asymmetric (per token, symmetric). None: those three decide.
    input_transform: "hadamard" makes the layer BitNet v2's H-BitLinear (eq. 7): `Q(Hadamard(Norm(x)))`, the
      normalised Hadamard transform of `bitnet_jax.hadamard`, block-diagonal within each activation group.
    groups: G quantisation groups (BitNet section 2.3), aligned with the tensor-parallel shards.
    group_axis: "out" groups the kernel's output features (column-parallel layers: the input is whole on
      every shard, so only the weight statistics are grouped); "in" groups its input features, and then the
      activation absmax and the norm are per group too (row-parallel layers, whose input is feature-sharded).
    fsdp_groups: groups along the kernel's other axis (the d_model axis that FSDP shards), for the weight
      statistics only, so that each FSDP shard is quantised on its own device. The weight statistic is then
      one per block of a (G_in, G_out) grid.
    norm: "rms", "layer" or None: the norm inside the layer (b1.58 reference and BitNet SubLN put it here).
    norm_scale: whether that norm has a learnable gain (initialised to 1, so at init it equals the
      parameter-free `RMSNorm(x)` of the FAQ reference code).
    dtype: compute dtype of the matmul; the latent kernel stays `param_dtype` (float32).
    axes: logical axis names of the kernel, e.g. ("embed", "mlp").
    quant_mix: give the layer a quantisation warm-up weight lambda (`QuantMix`, initially 1): the forward then
      uses `x + lambda * stop_gradient(q(x) - x)` for the weights and the activations (`mix_quantized`);
      the trainer ramps lambda from 0 to 1 (`config.train.quant_warmup_steps`). Off (None): no extra state.
    exact: quantise in the reference operation order, bit for bit (`quant`'s `exact=True`); the default lets
      XLA fuse the quantisers (codes equal except at rounding ties, scales within float32 summation order).
  """

  def __init__(self, in_features: int, out_features: int, *, weight_quant: str = "ternary",
               act_bits: int | None = 8, act_per_token: bool = True, act_asymmetric: bool = False,
               act_quant: str | None = None, input_transform: str | None = None, groups: int = 1,
               group_axis: str = "out", fsdp_groups: int = 1, norm: str | None = None, norm_eps: float = 1e-5,
               norm_scale: bool = True, dtype=jnp.float32, param_dtype=jnp.float32, init_std: float = 0.02,
               axes: Sequence[str | None] = ("embed", "mlp"), quant_mix: bool = False, exact: bool = False,
               rngs: nnx.Rngs):
    if weight_quant not in WEIGHT_QUANTIZERS:
      raise ValueError(f"BitLinear weight_quant must be one of {tuple(WEIGHT_QUANTIZERS)}, got {weight_quant!r}")
    if act_bits is not None and (not isinstance(act_bits, int) or not 2 <= act_bits <= 8):
      raise ValueError(f"BitLinear act_bits must be None or an int from 2 to 8, got {act_bits!r}")
    if act_quant is not None:
      if act_quant not in ACT_QUANTIZERS:
        raise ValueError(f"BitLinear act_quant must be None or one of {tuple(ACT_QUANTIZERS)}, got {act_quant!r}")
      act_bits, act_per_token, act_asymmetric = ACT_QUANTIZERS[act_quant].bits, True, False
    if input_transform not in (None, *INPUT_TRANSFORMS):
      raise ValueError(f"BitLinear input_transform must be None or one of {INPUT_TRANSFORMS}, "
                       f"got {input_transform!r}")
    if group_axis not in ("in", "out"):
      raise ValueError(f"BitLinear group_axis must be 'in' or 'out', got {group_axis!r}")
    grouped = in_features if group_axis == "in" else out_features
    if not isinstance(groups, int) or groups < 1 or grouped % groups:
      raise ValueError(f"BitLinear groups={groups} must divide the {group_axis}put features "
                       f"({grouped}) of kernel [{in_features}, {out_features}]")
    other = out_features if group_axis == "in" else in_features
    if not isinstance(fsdp_groups, int) or fsdp_groups < 1 or other % fsdp_groups:
      raise ValueError(f"BitLinear fsdp_groups={fsdp_groups} must divide the "
                       f"{'out' if group_axis == 'in' else 'in'}put features ({other}) of kernel "
                       f"[{in_features}, {out_features}]")
    self.weight_quant, self.act_bits = weight_quant, act_bits
    self.act_per_token, self.act_asymmetric = act_per_token, act_asymmetric
    self.groups, self.group_axis, self.fsdp_groups, self.dtype = groups, group_axis, fsdp_groups, dtype
    self.axes, self.exact = tuple(axes), bool(exact)
    self.act_quant, self.input_transform = act_quant, input_transform
    self.integer = False   # inference: int8 x int8 -> int32 matmul (`use_integer_matmul`)
    in_groups = groups if group_axis == "in" else 1
    self.norm = (Norm(in_features, kind=norm, eps=norm_eps, use_scale=norm_scale, groups=in_groups,
                      axis_name=axes[0], param_dtype=param_dtype) if norm else None)
    kernel = jax.random.normal(rngs.params(), (in_features, out_features), param_dtype) * init_std
    self.kernel = make_param(kernel, axes)
    self.weight_scale = (make_param(qs.seq_init_scale(kernel), axes[1:]) if weight_quant in LEARNED_SCALE
                         else None)
    self.quant_mix = QuantMix(jnp.ones((), jnp.float32)) if quant_mix else None

  @property
  def weight_groups(self) -> tuple[int, int]:
    """The (G_in, G_out) block grid of the weight statistics."""
    if self.group_axis == "in":
      return (self.groups, self.fsdp_groups)
    return (self.fsdp_groups, self.groups)

  def _gathered_axes(self) -> tuple[str | None, str | None]:
    """The kernel's logical axes with the FSDP-sharded one (the axis `fsdp_groups` splits) left whole."""
    i_fsdp = 1 if self.group_axis == "in" else 0
    return tuple(None if i == i_fsdp else a for i, a in enumerate(self.axes))

  def quantized_kernel(self) -> jax.Array:
    """The de-quantised kernel the forward uses (float32, STE gradient to the latent kernel).

    Each device quantises its own block of the latent kernel (codes and one scale per block); only then are the
    int8 codes and the scales made whole along the FSDP axis (an all-gather of int8, under a mesh) and
    de-quantised. codes * scale equals the reference's codes / s exactly (see `quant.ternary_codes`).
    """
    w = self.kernel[...]
    if self.weight_quant == "none":
      return w
    if self.weight_quant in LEARNED_SCALE:   # elementwise given alpha: no statistic, nothing to align with shards
      return WEIGHT_QUANTIZERS[self.weight_quant](w, self.weight_scale[...])
    return _gathered_fake_quant(w, kind=self.weight_quant, groups=self.weight_groups, axes=self.axes,
                                gathered=self._gathered_axes(), exact=self.exact)

  @property
  def act_groups(self) -> int:
    return self.groups if self.group_axis == "in" else 1

  def prepare_input(self, x: jax.Array, normalized: jax.Array | None = None) -> jax.Array:
    """The matmul's input in the compute dtype: the layer's norm (if any), then the activation quantiser (with
    the warm-up mix). `normalized`, if given, is `self.norm.normalize(x)` computed once for several layers that
    read the same x (q/k/v, gate/up): only this layer's gain is applied to it."""
    x = x.astype(self.dtype)
    if self.norm is not None:
      x = self.norm.apply_gain(self.norm.normalize(x) if normalized is None else normalized, self.dtype)
    x = transform_input(x, self.input_transform, self.act_groups)
    if self.act_bits is None or self.integer:
      return x
    if self.act_quant is not None:
      xq = ACT_QUANTIZERS[self.act_quant].fake(x, groups=self.act_groups, exact=self.exact)
    else:
      xq = quant.quantize_activations(x, self.act_bits, per_token=self.act_per_token, groups=self.act_groups,
                                      asymmetric=self.act_asymmetric, exact=self.exact)
    return xq if self.quant_mix is None else mix_quantized(x, xq, self.quant_mix[...])

  def effective_kernel(self) -> jax.Array:
    """The kernel the training forward multiplies by, in the compute dtype: quantised (with the warm-up mix)."""
    w = self.quantized_kernel()
    if self.quant_mix is not None and self.weight_quant != "none":
      w = mix_quantized(self.kernel[...], w, self.quant_mix[...])
    return w.astype(self.dtype)

  def __call__(self, x: jax.Array, *, normalized: jax.Array | None = None) -> jax.Array:
    """y = Quant_w(W) . Quant_x(Norm(x)); `normalized` as in `prepare_input`."""
    x = self.prepare_input(x, normalized)
    if self.integer:
      return self._integer_matmul(x, self.act_groups)
    return dense(x, self.effective_kernel())

  def _integer_matmul(self, x: jax.Array, act_groups: int) -> jax.Array:
    """The deployed form (b1.58 FAQ inference BitLinear): int8 activation codes times the int8 weight codes with
    int32 accumulation, then one float32 rescale. Equal to the fake-quantised forward up to float32 rounding."""
    if self.weight_quant == "none" or self.act_bits is None or self.act_asymmetric:
      raise ValueError("BitLinear integer matmul needs quantised weights and symmetric quantised activations "
                       f"(weight_quant={self.weight_quant!r}, act_bits={self.act_bits!r}, "
                       f"act_asymmetric={self.act_asymmetric})")
    x_codes, x_scale = self.activation_codes(x, act_groups)
    w_codes, w_scale = self.weight_codes()
    return quant.int_matmul(x_codes, x_scale, w_codes, w_scale).astype(self.dtype)

  def activation_codes(self, x: jax.Array, act_groups: int | None = None) -> tuple[jax.Array, jax.Array]:
    """(int8 codes, float32 scale) of the prepared (normed, transformed) input x, by this layer's quantiser."""
    return input_codes(x, act_quant=self.act_quant, act_bits=self.act_bits, per_token=self.act_per_token,
                       groups=self.act_groups if act_groups is None else act_groups, exact=self.exact)

  def weight_codes(self) -> tuple[jax.Array, jax.Array]:
    """(int8 codes shaped like the kernel, float32 (G_in, G_out) scale grid): the quantised kernel's integer form."""
    if self.weight_quant in LEARNED_SCALE:
      return LEARNED_SCALE[self.weight_quant](self.kernel[...], self.weight_scale[...])
    return WEIGHT_CODES[self.weight_quant](self.kernel[...], groups=self.weight_groups, exact=self.exact)


@jax.custom_vjp
def dense(x: jax.Array, w: jax.Array) -> jax.Array:
  """`x @ w` over the last axis of x ([..., K] x [K, N] -> [..., N]), with its backward written out.

  The same function and gradients as `jnp.einsum("...i,io->...o", x, w)`; the weight gradient is formed as one
  [M, K]^T [M, N] contraction of the flattened tokens. Left to autodiff, XLA:CPU made each weight gradient of a
  b158 (FAQ form) train step a transposed copy plus a slower dot: this form took that step from 1.14x to 1.06x
  of fp in one run (AMD EPYC, benchmarks/results/cpu.md); fp steps are unchanged."""
  return jnp.einsum("...i,io->...o", x, w)


def _dense_fwd(x, w):
  return dense(x, w), (x, w)


def _dense_bwd(res, dy):
  x, w = res
  dx = jnp.einsum("...o,io->...i", dy, w)
  dw = jnp.einsum("ki,ko->io", x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]))
  return dx.astype(x.dtype), dw.astype(w.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


def set_quant_mix(module: nnx.Module, lam: jax.Array | float) -> int:
  """Sets the quantisation warm-up weight of every BitLinear that has one (inside or outside jit); returns how
  many."""
  n = 0
  for _, layer in nnx.iter_graph(module):
    if isinstance(layer, BitLinear) and layer.quant_mix is not None:
      layer.quant_mix[...] = jnp.asarray(lam, jnp.float32)
      n += 1
  return n


def set_act_quant(layer: BitLinear, name: str) -> None:
  """Switches a BitLinear that uses a named activation quantiser to another one (`ACT_QUANTIZERS`); the layer's
  parameters are unchanged (activation quantisers have none), so its compiled step is traced once more."""
  if layer.act_quant is None or name not in ACT_QUANTIZERS:
    raise ValueError(f"set_act_quant: the layer's act_quant is {layer.act_quant!r} and the new one {name!r}; both must "
                     f"be one of {tuple(ACT_QUANTIZERS)}")
  layer.act_quant, layer.act_bits = name, ACT_QUANTIZERS[name].bits


def use_integer_matmul(module: nnx.Module, on: bool = True) -> int:
  """Switches every quantised BitLinear in `module` to (or back from) the integer matmul; returns how many."""
  n = 0
  for _, layer in nnx.iter_graph(module):
    if isinstance(layer, BitLinear) and layer.weight_quant != "none" and layer.act_bits is not None \
        and not layer.act_asymmetric:
      layer.integer, n = bool(on), n + 1
  return n


def _gathered_fake_quant_fn(w: jax.Array, *, kind: str, groups: tuple[int, int], axes, gathered,
                            exact: bool = False) -> jax.Array:
  codes, scale = WEIGHT_CODES[kind](w, groups=groups, exact=exact)
  if jax.sharding.get_abstract_mesh().empty:   # one device: nothing to gather, let XLA fuse the de-quantisation
    return (codes.astype(jnp.float32) * quant.expand_group_scale(scale, codes.shape)).astype(w.dtype)
  # The int8 codes are pinned to the latent kernel's own sharding (each device quantises its shard), then made
  # whole along the FSDP axis: the all-gather moves int8. Without the first constraint and the barrier, sharding
  # propagation would gather the float32 codes before the convert to int8.
  codes = jax.lax.optimization_barrier(logical_constraint(codes, axes))
  # The scale grid is sharded like the codes along its grouped axes and whole along the others.
  scale = logical_constraint(scale, tuple(a if g > 1 else None for a, g in zip(gathered, groups)))
  codes = logical_constraint(codes, gathered)
  return (codes.astype(jnp.float32) * quant.expand_group_scale(scale, codes.shape)).astype(w.dtype)


_gathered_fake_quant = quant.straight_through(_gathered_fake_quant_fn)
