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
  | "int3"     | 3-bit codes in [-4, 3], eight per three bytes, + one float32 scale | 0.4375 |

Quantiser (ours: the FAQ of "The Era of 1-bit LLMs" reports a 4-bit KV cache to be lossless without naming one):
absmax per token per head over the head dimension, the b1.58 activation quantiser (PAPERS.md section 2,
`quant.activation_codes`) applied to each [Dh] row of K and V: `s = q / max(max|x|, 1e-5)`, q = 2^(b-1) - 1
(127 or 7), `codes = clip(round(x * s), -q - 1, q)`, stored scale `1 / s`, read back as `codes * (1 / s)` in
float32. With absmax scaling the codes never reach -q - 1, so 4-bit codes use 15 of their 16 levels.
4-bit packing: feature 2j is the low nibble and feature 2j + 1 the high nibble of byte j, two's complement.

"int3" is BitNet a4.8's 3-bit KV cache (arXiv 2411.04965, section 3, low-bit attention: K and V quantised after
RoPE, the [bos] token's heads kept at 4 bits because they carry the outliers). Our reading, since the paper gives
no formula: the same absmax per token per head with q = 3 (codes -3 .. 3 used, 7 of 8 levels), and "the [bos]
token" taken as the first cached position, absolute position 0 (the attention sink, whatever token it holds; it is
[bos] where prompts start with one): that position is stored a second time as "int4" in `LayerKV.first`, a
one-position int4 cache, and read back in place of its 3-bit codes. `fake_quant(x, "int3")` rounds the first
position along x's sequence axis (axis 1 of [B, T, K, Dh]) the same way. 3-bit packing: eight codes, offset by
+4 to 0 .. 7, form one 24-bit little-endian word, code i in bits 3i .. 3i + 2, stored as three bytes; a head_dim
that is not a multiple of 8 (a48-3b's 100) is padded with zero codes to the next multiple (`LayerKV.head_dim`
cuts them off on reading). The first-position copy adds 2 * K * (Dh / 2 + 4) bytes per layer and sequence,
independent of the cache length.

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

KV_KINDS = ("float32", "bfloat16", "int8", "int4", "int3")   # how a KVCache stores K and V
KV_QUANT = ("none", "bfloat16", "int8", "int4", "int3")      # ModelConfig.kv_quant: rounding of K/V in the full forward
_BITS = {"int8": 8, "int4": 4, "int3": 3}
FIRST_POSITION = {"int3": "int4"}   # kinds that store absolute position 0 again at more bits (a4.8's [bos] heads)
PACK_MULTIPLE = {"int4": 2}   # head_dim must be a multiple of this to pack the kind's codes into bytes


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


def pack_int3(codes: jax.Array) -> jax.Array:
  """int8 codes in [-4, 3], last axis n -> uint8 [..., 3 ceil(n / 8)]: each run of eight codes (the last padded
  with zero codes), offset to 0 .. 7, is one 24-bit word (code i in bits 3i .. 3i + 2) stored as its three bytes,
  lowest first."""
  pad = (-codes.shape[-1]) % 8
  codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, pad)]) if pad else codes
  u = (codes.astype(jnp.int32) + 4).astype(jnp.uint32).reshape(*codes.shape[:-1], -1, 8)
  word = jnp.zeros(u.shape[:-1], jnp.uint32)
  for i in range(8):
    word = word | (u[..., i] << (3 * i))
  parts = jnp.stack([(word >> (8 * j)) & 0xFF for j in range(3)], axis=-1).astype(jnp.uint8)
  return parts.reshape(*codes.shape[:-1], -1)


def unpack_int3(packed: jax.Array) -> jax.Array:
  """uint8 [..., 3m] -> int8 codes [..., 8m] in [-4, 3]: the inverse of `pack_int3` (padding included)."""
  b = packed.astype(jnp.uint32).reshape(*packed.shape[:-1], -1, 3)
  word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
  u = jnp.stack([(word >> (3 * i)) & 0x7 for i in range(8)], axis=-1)
  return (u.astype(jnp.int32) - 4).astype(jnp.int8).reshape(*packed.shape[:-1], -1)


_PACKERS = {"int4": (pack_int4, unpack_int4), "int3": (pack_int3, unpack_int3)}


def encode(x: jax.Array, kind: str) -> tuple[jax.Array, jax.Array | None]:
  """K or V [..., Dh] -> (stored values, float32 scale [..., 1] or None for the float kinds)."""
  if kind in ("float32", "bfloat16"):
    return x.astype(kind), None
  codes, scale = quant.activation_codes(x, _BITS[kind], per_token=True)   # per row of Dh: per token per head
  return (_PACKERS[kind][0](codes) if kind in _PACKERS else codes), scale


def decode(stored: jax.Array, scale: jax.Array | None, kind: str, dtype, head_dim: int | None = None) -> jax.Array:
  """The inverse of `encode`: stored values (and scale) -> K or V [..., Dh] in `dtype`; `head_dim` cuts off the
  padding codes of int3 (None: keep every unpacked code)."""
  if scale is None:
    return stored.astype(dtype)
  codes = _PACKERS[kind][1](stored)[..., :head_dim] if kind in _PACKERS else stored
  return (codes.astype(jnp.float32) * scale).astype(dtype)


def _fake_quant_fn(x: jax.Array, *, kind: str) -> jax.Array:
  y = decode(*encode(x, kind), kind, x.dtype, x.shape[-1])
  if kind in FIRST_POSITION:   # position 0 (axis 1 of [B, T, K, Dh]) as `LayerKV.first` stores it
    first = FIRST_POSITION[kind]
    y = y.at[:, :1].set(decode(*encode(x[:, :1], first), first, x.dtype, x.shape[-1]))
  return y


_fake_quant_ste = quant.straight_through(_fake_quant_fn)


def fake_quant(x: jax.Array, kind: str) -> jax.Array:
  """x rounded as a cache of `kind` stores it (`KV_QUANT`; "none" returns x itself), with an STE gradient.

  x: K or V, [..., Dh]; for the kinds of `FIRST_POSITION` ("int3"), [B, T, K, Dh] with T the positions from 0."""
  _check_kind(kind, KV_QUANT, "kv_quant")
  if kind in FIRST_POSITION and x.ndim != 4:
    raise ValueError(f"fake_quant({kind!r}) rounds position 0 at more bits: x must be [B, T, K, Dh], got shape "
                     f"{x.shape}")
  if kind in PACK_MULTIPLE and x.shape[-1] % PACK_MULTIPLE[kind]:
    raise ValueError(f"fake_quant({kind!r}): head_dim={x.shape[-1]} must be a multiple of "
                     f"{PACK_MULTIPLE[kind]} to pack the codes into bytes")
  return x if kind == "none" else _fake_quant_ste(x, kind=kind)


# --------------------------------------------------------------------------------------------------------------
# The cache: pytrees that jit, scan and fori_loop carry.
# --------------------------------------------------------------------------------------------------------------
@struct.dataclass
class LayerKV:
  """One layer's cache. k, v: [B, L, K, Dh] (uint8 [B, L, K, Dh / 2] for int4, [B, L, K, 3 ceil(Dh / 8)] for
  int3); scales [B, L, K, 1] float32 for the integer kinds, None for the float ones; `head_dim` Dh.

  A view of a stacked cache (`index` set, a layer number): the arrays hold every layer, [n_layers, B, L,
  ...], and `write` / `read` act on layer `index` alone.

  `first`: for the kinds of `FIRST_POSITION` ("int3"), a one-position cache of the higher-bit kind holding
  absolute position 0 again (same layout, L = 1); `read` returns its values at position 0. None otherwise."""
  k: jax.Array
  v: jax.Array
  k_scale: jax.Array | None
  v_scale: jax.Array | None
  kind: str = struct.field(pytree_node=False)
  index: jax.Array | None = None
  first: "LayerKV | None" = None
  head_dim: int | None = struct.field(pytree_node=False, default=None)

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
    first = self.first
    if first is not None:   # position 0 again at more bits, when this write holds it (start == 0)
      view = first.replace(index=self.index)
      written = view.write(k_btkd[:, :1], v_btkd[:, :1], jnp.zeros((), jnp.int32))
      at_zero = jnp.asarray(start) == 0
      first = jax.tree.map(lambda new, old: jnp.where(at_zero, new, old), written, view).replace(index=None)
    return self.replace(k=put(self.k, k), v=put(self.v, v), k_scale=put(self.k_scale, k_scale),
                        v_scale=put(self.v_scale, v_scale), first=first)

  def read(self, dtype) -> tuple[jax.Array, jax.Array]:
    """K and V of every cache position, [B, L, K, Dh] in `dtype` (positions not yet written read as zeros)."""
    take = ((lambda buf: buf) if self.index is None else
            (lambda buf: None if buf is None else jax.lax.dynamic_index_in_dim(buf, self.index, keepdims=False)))
    k = decode(take(self.k), take(self.k_scale), self.kind, dtype, self.head_dim)
    v = decode(take(self.v), take(self.v_scale), self.kind, dtype, self.head_dim)
    if self.first is not None:
      k0, v0 = self.first.replace(index=self.index).read(dtype)
      k, v = k.at[:, :1].set(k0), v.at[:, :1].set(v0)
    return k, v


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
  if kind in PACK_MULTIPLE and head_dim % PACK_MULTIPLE[kind]:
    raise ValueError(f"init_cache: head_dim={head_dim} must be a multiple of {PACK_MULTIPLE[kind]} to pack "
                     f"{kind} codes into bytes")
  lead = (n_layers,) if stacked else ()

  def layer(kind: str, length: int) -> LayerKV:
    shape = (*lead, batch, length, n_kv_heads, head_dim)
    if kind in ("float32", "bfloat16"):
      return LayerKV(k=jnp.zeros(shape, kind), v=jnp.zeros(shape, kind), k_scale=None, v_scale=None, kind=kind,
                     head_dim=head_dim)
    packed = {"int4": head_dim // 2, "int3": 3 * -(-head_dim // 8)}
    codes = (*shape[:-1], packed[kind]) if kind in packed else shape
    code_dtype = jnp.uint8 if kind in _PACKERS else jnp.int8
    scales = (*shape[:-1], 1)
    first = layer(FIRST_POSITION[kind], 1) if kind in FIRST_POSITION else None
    return LayerKV(k=jnp.zeros(codes, code_dtype), v=jnp.zeros(codes, code_dtype),
                   k_scale=jnp.zeros(scales, jnp.float32), v_scale=jnp.zeros(scales, jnp.float32), kind=kind,
                   first=first, head_dim=head_dim)

  layers = (layer(kind, max_len),) if stacked else tuple(layer(kind, max_len) for _ in range(n_layers))
  return KVCache(layers=layers, pos=jnp.zeros((), jnp.int32), stacked=stacked)
