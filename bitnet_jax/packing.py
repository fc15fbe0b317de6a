"""packing: low-bit storage of quantised weights (quant -> layers -> model -> packing -> generate).

Three storage formats for the integer codes of `quant.ternary_codes` / `quant.binary_codes` (bits per weight
from ../shared/PAPERS.md section 5, "Bits per weight of ternary storage formats"; log2(3) = 1.585 is the limit):

  | format  | codes        | values per byte | digit of a code | bits per weight |
  |---------|--------------|-----------------|-----------------|-----------------|
  | "2bit"  | {-1, 0, +1}  | 4               | code + 1        | 2.0             |
  | "base3" | {-1, 0, +1}  | 5 (3^5 = 243)   | code + 1        | 1.6             |
  | "1bit"  | {-1, +1}     | 8               | (code + 1) / 2  | 1.0             |

Bit layout (the same "planar" rule for every format): a packed axis of n codes becomes P = ceil(n / per_byte)
bytes, and element `i * P + j` is digit i of byte j, `byte = sum_i digit_i * radix^i` (radix 4, 3, 2). So digit
i of all bytes is the contiguous slice `[i * P, (i + 1) * P)`: a kernel decodes plane i with one shift and mask
and no interleaving. This is the layout the b1.58 2B4T checkpoint (PAPERS.md section 3) uses along the output
dimension; here any axis can be packed. The tail is padded with the digit of code 0 (ternary, so padding is
neutral in a matmul) or of code -1 (binary); `unpack_*` drops it given the original length n.

On top of the formats: `quantize_for_inference` (an nnx `Transformer` -> packed codes, float32 group scales and
bf16 non-quantised params), `dequantize`, `save_packed` / `load_packed` (one uncompressed numpy `.npz`: it has
no bfloat16, so bf16 leaves are stored as their uint16 bit pattern and the metadata as JSON), `packed_bytes`,
`inference_weight_bytes` (sizes via `jax.eval_shape`, nothing allocated) and `int_matmul`, the integer path of
the b1.58 FAQ's inference BitLinear (`y = lowbit_gemm(x_q, w_q) / w_scale / x_scale`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bitnet_jax import quant
from bitnet_jax.layers import BitLinear
from bitnet_jax.model import ModelConfig, Transformer

# format -> (codes per byte, radix of a digit, the valid codes, the code that pads the tail)
FORMATS: dict[str, tuple[int, int, tuple[int, ...], int]] = {
    "2bit": (4, 4, (-1, 0, 1), 0),
    "base3": (5, 3, (-1, 0, 1), 0),
    "1bit": (8, 2, (-1, 1), -1),
}
TERNARY_FORMATS = ("2bit", "base3")
# _BASE3_CODES[byte, i] = digit i of a base3 byte, minus 1: the code it holds (bytes 243..255 are never written).
_BASE3_CODES = np.array([[(v // 3 ** i) % 3 - 1 for i in range(5)] for v in range(256)], np.int8)

__all__ = [
    "FORMATS", "PackedTensor", "QuantizedLinear", "pack", "pack_2bit", "unpack_2bit", "pack_base3",
    "unpack_base3", "pack_1bit", "unpack_1bit", "quantize_for_inference", "dequantize", "save_packed",
    "load_packed", "packed_bytes", "inference_weight_bytes", "expand_blocks", "int_matmul", "weight_scale_grid",
    "k_partitions", "rescale_group_sums", "activation_scale_gm1",
]


# --------------------------------------------------------------------------------------------------------------
# Codes <-> bytes.
# --------------------------------------------------------------------------------------------------------------
def _is_concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _format(fmt: str) -> tuple[int, int, tuple[int, ...], int]:
  if fmt not in FORMATS:
    raise ValueError(f"fmt={fmt!r} is not a packing format; valid: {tuple(FORMATS)}")
  return FORMATS[fmt]


def _axis(axis: int, ndim: int, what: str) -> int:
  if ndim == 0:
    raise ValueError(f"{what}: expected an array with at least one dimension, got a scalar")
  if not isinstance(axis, int) or isinstance(axis, bool) or not -ndim <= axis < ndim:
    raise ValueError(f"{what}: axis={axis!r} is out of range for an array of rank {ndim}")
  return axis % ndim


def _digit(code: jax.Array, fmt: str) -> jax.Array:
  return (code + 1) // 2 if fmt == "1bit" else code + 1


def _pack(codes: jax.Array, fmt: str, axis: int) -> jax.Array:
  allowed = _format(fmt)[2]
  codes = jnp.asarray(codes)
  axis = _axis(axis, codes.ndim, f"pack_{fmt}")
  if _is_concrete(codes):   # eager input: reject codes the format cannot hold (skipped under jit)
    host = np.asarray(codes)
    bad = np.unique(host[~np.isin(host, allowed)])
    if bad.size:
      raise ValueError(f"pack_{fmt}: codes must be in {allowed}, got values {bad[:5].tolist()}")
  return _pack_core(codes, fmt, axis)


@functools.partial(jax.jit, static_argnums=(1, 2))   # one compilation per shape, not one per eager op
def _pack_core(codes: jax.Array, fmt: str, axis: int) -> jax.Array:
  per, radix, _, pad_code = FORMATS[fmt]
  n = codes.shape[axis]
  p = -(-n // per)                                                   # bytes along the packed axis
  digits = _digit(codes.astype(jnp.int32), fmt)
  widths = [(0, 0)] * codes.ndim
  widths[axis] = (0, per * p - n)
  digits = jnp.pad(digits, widths, constant_values=int(_digit(pad_code, fmt)))
  digits = digits.reshape(codes.shape[:axis] + (per, p) + codes.shape[axis + 1:])   # [..., per, P, ...]
  place = (radix ** jnp.arange(per, dtype=jnp.int32)).reshape((per,) + (1,) * (codes.ndim - axis))
  return jnp.sum(digits * place, axis=axis).astype(jnp.uint8)         # [..., P, ...]


def _unpack(packed: jax.Array, n: int, fmt: str, axis: int) -> jax.Array:
  per, radix, _, _ = _format(fmt)
  packed = jnp.asarray(packed)
  if packed.dtype != jnp.uint8:
    raise ValueError(f"unpack_{fmt}: packed must be uint8, got dtype {packed.dtype}")
  axis = _axis(axis, packed.ndim, f"unpack_{fmt}")
  p = packed.shape[axis]
  if not isinstance(n, (int, np.integer)) or n < 0 or -(-n // per) != p:
    raise ValueError(f"unpack_{fmt}: n={n!r} does not fit {p} packed bytes along axis {axis} "
                     f"(needs ceil(n / {per}) == {p})")
  if _is_concrete(packed) and packed.size:   # eager input: reject bytes no code packs to (skipped under jit)
    host = np.asarray(packed)
    top = int(host.max())
    digit3 = fmt == "2bit" and bool(np.any((host[..., None] >> np.arange(0, 8, 2, dtype=np.uint8)) & 3 == 3))
    if top >= radix ** per or digit3:
      raise ValueError(f"unpack_{fmt}: packed holds bytes that are not valid {fmt} digits (max byte {top})")
  return _unpack_core(packed, int(n), fmt, axis)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _unpack_core(packed: jax.Array, n: int, fmt: str, axis: int) -> jax.Array:
  per, radix, _, _ = FORMATS[fmt]
  b = packed.astype(jnp.int32)
  if radix in (2, 4):   # shift and mask for the power-of-two radices
    bits = radix.bit_length() - 1
    digits = jnp.concatenate([(b >> (bits * i)) & (radix - 1) for i in range(per)], axis=axis)   # [..., per*P, ...]
    codes = (2 * digits - 1 if fmt == "1bit" else digits - 1).astype(jnp.int8)
  else:
    # base3 through a 256-entry table: XLA:CPU takes seconds to compile the vectorised `b // 3^i % 3` (with the
    # narrowing to int8) for every new shape; a gather compiles in milliseconds and runs as fast.
    codes = jnp.moveaxis(jnp.asarray(_BASE3_CODES)[b], -1, axis)           # [..., per, P, ...]
    codes = codes.reshape(packed.shape[:axis] + (per * packed.shape[axis],) + packed.shape[axis + 1:])
  return jax.lax.slice_in_dim(codes, 0, n, axis=axis)                      # element i * P + j, padding dropped


def pack_2bit(codes: jax.Array, axis: int = -1) -> jax.Array:
  """Ternary int codes -> uint8, 4 per byte (digit code + 1 in bits 2i..2i+1); 2.0 bits per weight."""
  return _pack(codes, "2bit", axis)


def unpack_2bit(packed: jax.Array, n: int, axis: int = -1) -> jax.Array:
  """Inverse of `pack_2bit`: int8 codes in {-1, 0, 1}, `n` long along `axis`."""
  return _unpack(packed, n, "2bit", axis)


def pack_base3(codes: jax.Array, axis: int = -1) -> jax.Array:
  """Ternary int codes -> uint8, 5 per byte as `sum_i (code_i + 1) * 3^i` (3^5 = 243 <= 256); 1.6 bits/weight."""
  return _pack(codes, "base3", axis)


def unpack_base3(packed: jax.Array, n: int, axis: int = -1) -> jax.Array:
  """Inverse of `pack_base3`: int8 codes in {-1, 0, 1}, `n` long along `axis`."""
  return _unpack(packed, n, "base3", axis)


def pack_1bit(codes: jax.Array, axis: int = -1) -> jax.Array:
  """Binary codes {-1, +1} (BitNet's Sign) -> uint8, 8 per byte (bit i set for +1); 1.0 bit per weight."""
  return _pack(codes, "1bit", axis)


def unpack_1bit(packed: jax.Array, n: int, axis: int = -1) -> jax.Array:
  """Inverse of `pack_1bit`: int8 codes in {-1, +1}, `n` long along `axis`."""
  return _unpack(packed, n, "1bit", axis)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["data"], meta_fields=["fmt", "shape", "axis"])
@dataclasses.dataclass(frozen=True)
class PackedTensor:
  """Packed codes with what unpacking needs: the format, the unpacked shape and the packed axis (>= 0)."""
  data: jax.Array            # uint8, shape[axis] replaced by ceil(shape[axis] / per_byte)
  fmt: str                   # "2bit" | "base3" | "1bit"
  shape: tuple[int, ...]     # shape of the codes
  axis: int                  # the packed axis, normalised to be non-negative

  @property
  def padding(self) -> int:
    """Pad codes at the end of the packed axis (dropped by `unpack`)."""
    return FORMATS[self.fmt][0] * self.data.shape[self.axis] - self.shape[self.axis]

  def unpack(self) -> jax.Array:
    return _unpack(self.data, self.shape[self.axis], self.fmt, self.axis)


def pack(codes: jax.Array, fmt: str = "2bit", axis: int = -1) -> PackedTensor:
  """Packs int codes into a `PackedTensor` of format `fmt` along `axis` (see the module table)."""
  codes = jnp.asarray(codes)
  axis = _axis(axis, codes.ndim, f"pack({fmt!r})")
  return PackedTensor(_pack(codes, fmt, axis), fmt, tuple(codes.shape), axis)


# --------------------------------------------------------------------------------------------------------------
# A model's weights for inference.
# --------------------------------------------------------------------------------------------------------------
# The block-grid helpers and the integer matmul live in `quant` (layers use them); re-exported here.
expand_blocks = quant.expand_group_scale
int_matmul = quant.int_matmul
weight_scale_grid = quant.weight_scale_grid
k_partitions = quant.k_partitions
rescale_group_sums = quant.rescale_group_sums
activation_scale_gm1 = quant.activation_scale_gm1


@functools.partial(jax.tree_util.register_dataclass, data_fields=["codes", "scale"], meta_fields=["weight_quant"])
@dataclasses.dataclass(frozen=True)
class QuantizedLinear:
  """One BitLinear kernel [in, out] as packed codes and a float32 scale grid (G_in, G_out), as `quant.*_codes`
  return it: (1, G) for groups of output columns, (G, 1) for groups of input rows, both for block grids."""
  codes: PackedTensor
  scale: jax.Array
  weight_quant: str          # "ternary" | "binary"

  def kernel(self) -> jax.Array:
    """The de-quantised float32 kernel, `codes * scale` per block: equals `BitLinear.quantized_kernel()`."""
    return self.codes.unpack().astype(jnp.float32) * expand_blocks(self.scale, self.codes.shape)


def _name(path: tuple) -> str:
  return "/".join(str(k) for k in path)


def quantize_for_inference(model: nnx.Module, fmt: str = "2bit", dense_dtype=jnp.bfloat16) -> dict[str, dict]:
  """Packs every ternary / binary `BitLinear` of `model` and casts the remaining parameters to `dense_dtype`.

  Returns `{"linear": {path: QuantizedLinear}, "dense": {path: array}}`, paths like "blocks/0/attn/q_proj" and
  "embed". Ternary kernels are packed in `fmt` ("2bit" or "base3"), binary ones in "1bit", both along the output
  axis; the scales are those of `quant.ternary_codes` / `quant.binary_codes` with the layer's groups (b1.58
  eq. 1-3, BitNet eq. 1-4 and section 2.3; a (G_in, G_out) block grid for layers that have `weight_groups`).
  The embedding, head and norm gains stay 16-bit, as neither paper quantises them. Works under
  `jax.eval_shape` (then nothing is allocated).
  """
  if hasattr(model, "require_per_layer"):
    model.require_per_layer("quantize_for_inference")
  if fmt not in TERNARY_FORMATS:
    raise ValueError(f"quantize_for_inference: fmt={fmt!r} must be one of {TERNARY_FORMATS} (binary layers "
                     f"always use '1bit')")
  linear, kernels = {}, set()
  for path, node in nnx.iter_graph(model):
    if isinstance(node, BitLinear) and node.weight_quant in ("ternary", "binary", "ternary_seq"):
      codes, scale = node.weight_codes()   # ParetoQ SEQ: its learned scale per output channel, a (1, out) grid
      layer_fmt = "1bit" if node.weight_quant == "binary" else fmt
      linear[_name(path)] = QuantizedLinear(pack(codes, layer_fmt, axis=-1), scale.astype(jnp.float32),
                                            node.weight_quant)
      kernels.update({path + ("kernel",), path + ("weight_scale",)})
  dense = {_name(path): jnp.asarray(node[...]).astype(dense_dtype) for path, node in nnx.iter_graph(model)
           if isinstance(node, nnx.Param) and path not in kernels}
  return {"linear": linear, "dense": dense}


def dequantize(tree: dict[str, dict]) -> dict[str, jax.Array]:
  """`{path: de-quantised float32 kernel}` for every packed layer of a `quantize_for_inference` tree."""
  return {name: layer.kernel() for name, layer in tree["linear"].items()}


def save_packed(tree: dict[str, dict], path: str | os.PathLike) -> None:
  """Writes a `quantize_for_inference` tree to one uncompressed `.npz` (packed bytes stay packed on disk)."""
  arrays, meta = {}, {"linear": {}, "dense": {}}
  for name, layer in tree["linear"].items():
    arrays[f"linear/{name}/codes"] = np.asarray(layer.codes.data)
    arrays[f"linear/{name}/scale"] = np.asarray(layer.scale, np.float32)
    meta["linear"][name] = dict(fmt=layer.codes.fmt, shape=list(layer.codes.shape), axis=layer.codes.axis,
                                weight_quant=layer.weight_quant)
  for name, value in tree["dense"].items():
    value = np.asarray(value)
    meta["dense"][name] = str(value.dtype)
    arrays[f"dense/{name}"] = value.view(np.uint16) if value.dtype == jnp.bfloat16 else value
  arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
  with open(path, "wb") as f:
    np.savez(f, **arrays)


def load_packed(path: str | os.PathLike) -> dict[str, dict]:
  """Reads a `save_packed` file back into the same tree (jax arrays)."""
  with np.load(path) as data:
    meta = json.loads(data["meta"].tobytes().decode())
    linear = {}
    for name, m in meta["linear"].items():
      codes = PackedTensor(jnp.asarray(data[f"linear/{name}/codes"]), m["fmt"], tuple(m["shape"]), m["axis"])
      linear[name] = QuantizedLinear(codes, jnp.asarray(data[f"linear/{name}/scale"]), m["weight_quant"])
    dense = {}
    for name, dtype in meta["dense"].items():
      value = data[f"dense/{name}"]
      dense[name] = jnp.asarray(value.view(jnp.bfloat16) if dtype == "bfloat16" else value)
  return {"linear": linear, "dense": dense}


def _nbytes(x) -> int:
  return math.prod(x.shape) * np.dtype(x.dtype).itemsize


def packed_bytes(tree: dict[str, dict]) -> dict[str, float]:
  """Storage of a `quantize_for_inference` tree (arrays or `jax.eval_shape` shapes), with measured bits per
  quantised weight, without and with the float32 group scales."""
  weights = sum(math.prod(layer.codes.shape) for layer in tree["linear"].values())
  code_bytes = sum(_nbytes(layer.codes.data) for layer in tree["linear"].values())
  scale_bytes = sum(_nbytes(layer.scale) for layer in tree["linear"].values())
  dense_params = sum(math.prod(v.shape) for v in tree["dense"].values())
  dense_bytes = sum(_nbytes(v) for v in tree["dense"].values())
  return dict(quantized_weights=weights, code_bytes=code_bytes, scale_bytes=scale_bytes,
              dense_params=dense_params, dense_bytes=dense_bytes, total_bytes=code_bytes + scale_bytes + dense_bytes,
              bits_per_weight=8 * code_bytes / max(weights, 1),
              bits_per_weight_with_scales=8 * (code_bytes + scale_bytes) / max(weights, 1))


def inference_weight_bytes(cfg: ModelConfig, fmt: str = "base3", embed_bits: int = 16) -> dict[str, float]:
  """Packed weight bytes of a config, from `jax.eval_shape` of `quantize_for_inference` (nothing allocated).

  Quantised kernels in `fmt` (binary ones in "1bit") plus float32 group scales; every other parameter
  (embedding, head, norm gains; all kernels of an fp variant) at `embed_bits` bits. Also returns the FP16
  size, 2 bytes for every parameter, the baseline of the b1.58 paper's Table 1 memory column.
  """
  if not isinstance(embed_bits, int) or isinstance(embed_bits, bool) or embed_bits < 1:
    raise ValueError(f"inference_weight_bytes: embed_bits must be a positive int, got {embed_bits!r}")
  tree = jax.eval_shape(lambda: quantize_for_inference(Transformer(cfg, rngs=nnx.Rngs(0)), fmt=fmt))
  sizes = packed_bytes(tree)
  params = sizes["quantized_weights"] + sizes["dense_params"]
  dense_bytes = sizes["dense_params"] * embed_bits / 8
  total = sizes["code_bytes"] + sizes["scale_bytes"] + dense_bytes
  return {**sizes, "dense_bytes": dense_bytes, "total_bytes": total, "params": params, "fp16_bytes": 2 * params}
