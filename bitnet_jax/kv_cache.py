"""kv_cache: the decoding KV cache and its quantisers (quant -> kv_cache -> model -> generate).

Autoregressive decoding keeps every layer's keys and values so that each new token costs one position of work
instead of a forward over the whole prefix. A `KVCache` holds, per layer, K and V of shape [B, L, K, Dh]
(batch, cache length, kv heads, head dim) and `pos`, the number of positions written so far (= the absolute
position of the next token). `model.Transformer.decode` writes the new tokens' K/V at `pos` and attends over the
whole cache with later positions masked.

Storage kinds (`KV_KINDS`; bytes per cached value for Dh = 64 in the last column):

  | kind       | K and V stored as                                                  | bytes  |
  |------------|--------------------------------------------------------------------|--------|
  | "float32"  | float32                                                            | 4      |
  | "bfloat16" | bfloat16 (the default of `generate`)                              | 2      |
  | "int8"     | int8 codes in [-128, 127] + one float32 scale per token per head   | 1.0625 |
  | "int4"     | 4-bit codes in [-8, 7], two per byte, + one float32 scale          | 0.5625 |

Quantiser (ours: the FAQ of "The Era of 1-bit LLMs" reports a 4-bit KV cache to be lossless without naming one):
absmax per token per head over the head dimension, the b1.58 activation quantiser (PAPERS.md section 2,
`quant.activation_codes`) applied to each [Dh] row of K and V: `s = q / max(max|x|, 1e-5)`, q = 2^(b-1) - 1
(127 or 7), `codes = clip(round(x * s), -q - 1, q)`, stored scale `1 / s`, read back as `codes * (1 / s)` in
float32. With absmax scaling the codes never reach -q - 1, so 4-bit codes use 15 of their 16 levels.
4-bit packing: feature 2j is the low nibble and feature 2j + 1 the high nibble of byte j, two's complement.

Layouts: per layer (`KVCache.layers` holds one `LayerKV` per layer, for the unrolled blocks) or stacked
(`stacked=True`: one `LayerKV` whose arrays carry a leading layer axis, [n_layers, B, L, K, Dh], for the blocks of
an inference form stored stacked, `Transformer.stack_layers`). A scanned decode step carries the stacked arrays
through its `lax.scan` over layers and hands block i the view `stack.replace(index=i)`: `write` updates only
the new tokens' positions of layer i in place (a `dynamic_update_slice` into the carried buffer) and `read`
takes layer i's slice (which XLA fuses into its de-quantisation), and the compiled program holds one block body.

`fake_quant(x, kind)` rounds a tensor exactly as a cache of that kind stores and reads it (same functions,
straight-through gradient); `ModelConfig.kv_quant` applies it to K and V in the full forward, so the loss with a
quantised KV cache can be measured teacher-forced, and cached decoding with kind X computes the function of the
full forward with `kv_quant=X` (tested).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from bitnet_jax import quant

KV_KINDS = ("float32", "bfloat16", "int8", "int4")   # how a KVCache stores K and V
KV_QUANT = ("none", "bfloat16", "int8", "int4")      # ModelConfig.kv_quant: rounding of K/V in the full forward
_BITS = {"int8": 8, "int4": 4}


def _check_kind(kind: str, allowed: tuple[str, ...], what: str) -> str:
  if kind not in allowed:
    raise ValueError(f"{what} must be one of {allowed}, got {kind!r}")
  return kind


# --------------------------------------------------------------------------------------------------------------
# 4-bit packing and the quantiser: pure jnp.
# --------------------------------------------------------------------------------------------------------------
def pack_int4(codes: jax.Array) -> jax.Array:
  """int8 codes in [-8, 7], last axis of even length n -> uint8 [..., n / 2] (even feature in the low nibble)."""
  lo = codes[..., 0::2].astype(jnp.uint8) & 0x0F
  hi = codes[..., 1::2].astype(jnp.uint8) << 4
  return lo | hi


def unpack_int4(packed: jax.Array) -> jax.Array:
  """uint8 [..., n / 2] -> int8 codes [..., n]: each nibble sign-extended by an arithmetic right shift."""
  lo = jax.lax.bitcast_convert_type(packed << 4, jnp.int8) >> 4             # low nibble moved up, shifted back
  hi = jax.lax.bitcast_convert_type(packed, jnp.int8) >> 4
  return jnp.stack([lo, hi], axis=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def encode(x: jax.Array, kind: str) -> tuple[jax.Array, jax.Array | None]:
  """K or V [..., Dh] -> (stored values, float32 scale [..., 1] or None for the float kinds)."""
  if kind in ("float32", "bfloat16"):
    return x.astype(kind), None
  codes, scale = quant.activation_codes(x, _BITS[kind], per_token=True)   # per row of Dh: per token per head
  return (pack_int4(codes) if kind == "int4" else codes), scale


def decode(stored: jax.Array, scale: jax.Array | None, kind: str, dtype) -> jax.Array:
  """The inverse of `encode`: stored values (and scale) -> K or V [..., Dh] in `dtype`."""
  if scale is None:
    return stored.astype(dtype)
  codes = unpack_int4(stored) if kind == "int4" else stored
  return (codes.astype(jnp.float32) * scale).astype(dtype)


def _fake_quant_fn(x: jax.Array, *, kind: str) -> jax.Array:
  return decode(*encode(x, kind), kind, x.dtype)


_fake_quant_ste = quant.straight_through(_fake_quant_fn)


def fake_quant(x: jax.Array, kind: str) -> jax.Array:
  """x rounded as a cache of `kind` stores it (`KV_QUANT`; "none" returns x itself), with an STE gradient."""
  _check_kind(kind, KV_QUANT, "kv_quant")
  return x if kind == "none" else _fake_quant_ste(x, kind=kind)


# --------------------------------------------------------------------------------------------------------------
# The cache: pytrees that jit, scan and fori_loop carry.
# --------------------------------------------------------------------------------------------------------------
@struct.dataclass
class LayerKV:
  """One layer's cache. k, v: [B, L, K, Dh] (int4: uint8 [B, L, K, Dh / 2]); scales [B, L, K, 1] float32 for the
  integer kinds, None for the float ones.

  A view of a stacked cache (`index` set, a layer number): the arrays hold every layer, [n_layers, B, L,
  ...], and `write` / `read` act on layer `index` alone."""
  k: jax.Array
  v: jax.Array
  k_scale: jax.Array | None
  v_scale: jax.Array | None
  kind: str = struct.field(pytree_node=False)
  index: jax.Array | None = None

  def write(self, k_btkd: jax.Array, v_btkd: jax.Array, start: jax.Array) -> "LayerKV":
    """The cache with the new tokens' K and V [B, T, K, Dh] stored at positions start .. start + T - 1.

    `start + T` must not exceed the cache length (`dynamic_update_slice` would clamp the start and overwrite
    earlier positions): callers check it before tracing, as `generate` does."""
    (k, k_scale), (v, v_scale) = encode(k_btkd, self.kind), encode(v_btkd, self.kind)
    if self.index is None:
      put = lambda buf, new: None if buf is None else jax.lax.dynamic_update_slice_in_dim(buf, new, start, axis=1)
    else:   # into layer `index` of the stacked buffer, in place: [1, B, T, ...] at (index, 0, start, 0, 0)
      zero = jnp.zeros((), jnp.int32)
      put = lambda buf, new: None if buf is None else jax.lax.dynamic_update_slice(
          buf, new[None].astype(buf.dtype), (jnp.asarray(self.index, jnp.int32), zero,
                                             jnp.asarray(start, jnp.int32), zero, zero))
    return self.replace(k=put(self.k, k), v=put(self.v, v), k_scale=put(self.k_scale, k_scale),
                        v_scale=put(self.v_scale, v_scale))

  def read(self, dtype) -> tuple[jax.Array, jax.Array]:
    """K and V of every cache position, [B, L, K, Dh] in `dtype` (positions not yet written read as zeros)."""
    take = ((lambda buf: buf) if self.index is None else
            (lambda buf: None if buf is None else jax.lax.dynamic_index_in_dim(buf, self.index, keepdims=False)))
    return (decode(take(self.k), take(self.k_scale), self.kind, dtype),
            decode(take(self.v), take(self.v_scale), self.kind, dtype))


@struct.dataclass
class KVCache:
  """Every layer's `LayerKV` and `pos`, an int32 scalar: positions written so far, the next token's position.

  `stacked`: `layers` is one LayerKV holding every layer along a leading axis (module docstring, Layouts)."""
  layers: tuple[LayerKV, ...]
  pos: jax.Array
  stacked: bool = struct.field(pytree_node=False, default=False)

  @property
  def kind(self) -> str:
    return self.layers[0].kind

  @property
  def n_layers(self) -> int:
    return self.layers[0].k.shape[0] if self.stacked else len(self.layers)

  @property
  def max_len(self) -> int:
    return self.layers[0].k.shape[2 if self.stacked else 1]

  @property
  def nbytes(self) -> int:
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(self.layers))


def init_cache(*, n_layers: int, batch: int, max_len: int, n_kv_heads: int, head_dim: int,
               kind: str = "bfloat16", stacked: bool = False) -> KVCache:
  """An empty cache (zeros, pos = 0) of `kind` (`KV_KINDS`) for `max_len` positions; `stacked`: one LayerKV
  with a leading layer axis instead of one per layer (same bytes)."""
  _check_kind(kind, KV_KINDS, "kv cache kind")
  for name, value in (("n_layers", n_layers), ("batch", batch), ("max_len", max_len), ("n_kv_heads", n_kv_heads),
                      ("head_dim", head_dim)):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"init_cache: {name} must be a positive int, got {value!r}")
  if kind == "int4" and head_dim % 2:
    raise ValueError(f"init_cache: head_dim={head_dim} must be even to pack two 4-bit codes per byte")
  lead = (n_layers,) if stacked else ()
  shape = (*lead, batch, max_len, n_kv_heads, head_dim)

  def layer() -> LayerKV:
    if kind in ("float32", "bfloat16"):
      return LayerKV(k=jnp.zeros(shape, kind), v=jnp.zeros(shape, kind), k_scale=None, v_scale=None, kind=kind)
    codes = (*shape[:-1], head_dim // 2) if kind == "int4" else shape
    code_dtype = jnp.uint8 if kind == "int4" else jnp.int8
    scales = (*shape[:-1], 1)
    return LayerKV(k=jnp.zeros(codes, code_dtype), v=jnp.zeros(codes, code_dtype),
                   k_scale=jnp.zeros(scales, jnp.float32), v_scale=jnp.zeros(scales, jnp.float32), kind=kind)

  layers = (layer(),) if stacked else tuple(layer() for _ in range(n_layers))
  return KVCache(layers=layers, pos=jnp.zeros((), jnp.int32), stacked=stacked)
