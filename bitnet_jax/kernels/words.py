"""kernels/words: the word-interleaved 2-bit layout for int8 dot-product kernels (packing -> kernels).

The layout the fast W2A8 kernels use (microsoft/BitNet's CUDA GEMV, BitBLAS's int2 x int8): the codes of a
ternary weight [K, N] (K the reduction axis, codes in {-1, 0, +1}, digit = code + 1 in {0, 1, 2}) are stored
output-major as uint32 words [N, ceil(K / 16)], each word holding 16 consecutive k of one output column, laid
out so that one shift and one mask give four int8 weights that line up with one 32-bit word of int8
activations:

    word j of column n, bit pair i of byte b   <->   k = 16 j + 4 i + b        (i, b in 0..3)
    (word >> 2 i) & 0x03030303                  =    the digits of k = 16 j + 4 i + 0..3, one per byte

So a kernel computes sum_k x[k] * code[k] for 16 k with four shift-and-masks and four 4-way int8 dot products
(`dp4a`) against the activation words x[16 j + 4 i : 16 j + 4 i + 4], accumulating in int32, and removes the
code offset once: sum x * code = sum x * digit - sum x. A column's words are contiguous in memory (16-byte
loads of 64 weights), and the tail of K is padded with digit 1 (code 0), so with zero-padded activations the
padding adds nothing.

`pack_words` / `unpack_words` convert codes [..., K, N] (leading axes: stacked layers) to words and back;
`word_matvec` is the integer arithmetic of such a kernel written in plain `jnp` (the same words, shifts, masks,
4-element products and offset removal), an oracle for a GPU kernel: it equals `x_codes @ codes` in int32
exactly. No GPU kernel uses this layout yet (issue 20: it needs a GPU to build and time).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

K_PER_WORD = 16
MASK = 0x03030303

__all__ = ["K_PER_WORD", "MASK", "pack_words", "unpack_words", "word_matvec"]


def _n_words(k: int) -> int:
  return -(-k // K_PER_WORD)


def pack_words(codes: jax.Array) -> jax.Array:
  """Ternary codes [..., K, N] (an integer dtype, values in {-1, 0, 1}) -> uint32 words [..., N, ceil(K / 16)]."""
  codes = jnp.asarray(codes)
  if not jnp.issubdtype(codes.dtype, jnp.integer) or codes.ndim < 2:
    raise ValueError(f"pack_words: codes must be an integer array [..., K, N], got {codes.dtype} {codes.shape}")
  if not isinstance(codes, jax.core.Tracer):   # under jit the values are not known: checked where concrete
    bad = np.asarray((codes < -1) | (codes > 1))
    if bad.any():
      raise ValueError(f"pack_words: codes must be in {{-1, 0, 1}}; {int(bad.sum())} of {bad.size} are not")
  k = codes.shape[-2]
  pad = _n_words(k) * K_PER_WORD - k
  digits = (jnp.swapaxes(codes, -1, -2).astype(jnp.int32) + 1).astype(jnp.uint32)        # [..., N, K]
  digits = jnp.pad(digits, [(0, 0)] * (digits.ndim - 1) + [(0, pad)], constant_values=1)  # code 0
  digits = digits.reshape(*digits.shape[:-1], -1, 4, 4)                                  # [..., N, W, i, b]
  i = jnp.arange(4, dtype=jnp.uint32)[:, None]
  b = jnp.arange(4, dtype=jnp.uint32)[None, :]
  shifted = digits << (2 * i + 8 * b)                 # bit pair i of byte b: 2 i + 8 b
  return jnp.sum(shifted, axis=(-2, -1), dtype=jnp.uint32)   # disjoint bits: the sum is the bitwise or


def _digits(words: jax.Array) -> jax.Array:
  """uint32 words [..., N, W] -> digits [..., N, W, 4 (i), 4 (b)] as int32, by shift-and-mask then bytes."""
  i = jnp.arange(4, dtype=jnp.uint32)
  masked = (words[..., None] >> (2 * i)) & jnp.uint32(MASK)              # [..., N, W, i]: 4 digits, one per byte
  b = jnp.arange(4, dtype=jnp.uint32)
  return ((masked[..., None] >> (8 * b)) & jnp.uint32(0xFF)).astype(jnp.int32)


def unpack_words(words: jax.Array, k: int) -> jax.Array:
  """uint32 words [..., N, ceil(k / 16)] -> int8 codes [..., k, N] (the padding dropped)."""
  words = jnp.asarray(words)
  if words.dtype != jnp.uint32 or words.ndim < 2:
    raise ValueError(f"unpack_words: words must be uint32 [..., N, W], got {words.dtype} {words.shape}")
  if not isinstance(k, (int, np.integer)) or k < 1 or _n_words(k) != words.shape[-1]:
    raise ValueError(f"unpack_words: k={k!r} needs {_n_words(k) if isinstance(k, int) and k > 0 else '?'} words "
                     f"per column, the array has {words.shape[-1]}")
  d = _digits(words)
  codes = d.reshape(*d.shape[:-3], -1)[..., :k] - 1                       # [..., N, K]
  return jnp.swapaxes(codes, -1, -2).astype(jnp.int8)


def word_matvec(x_codes: jax.Array, words: jax.Array, k: int) -> jax.Array:
  """int32 [M, N] = x_codes [M, k] (int8) @ codes, computed the way a dp4a kernel does from the words: per word
  and shift i, the four digit bytes times the four activation bytes x[16 j + 4 i + b], summed in int32; then the
  code offset removed once with the activation sum (sum x * (digit - 1) = sum x * digit - sum x)."""
  x_codes = jnp.asarray(x_codes)
  if x_codes.dtype != jnp.int8 or x_codes.ndim != 2 or x_codes.shape[1] != k:
    raise ValueError(f"word_matvec: x_codes must be int8 [M, k={k}], got {x_codes.dtype} {x_codes.shape}")
  if words.dtype != jnp.uint32 or words.ndim != 2 or words.shape[1] != _n_words(k):
    raise ValueError(f"word_matvec: words must be uint32 [N, {_n_words(k)}], got {words.dtype} {words.shape}")
  x = jnp.pad(x_codes.astype(jnp.int32), [(0, 0), (0, _n_words(k) * K_PER_WORD - k)])   # padded activations: 0
  x = x.reshape(x.shape[0], 1, -1, 4, 4)                                  # [M, 1, W, i, b]
  d = _digits(words)[None]                                                # [1, N, W, i, b]
  dot4 = jnp.sum(d * x, axis=-1, dtype=jnp.int32)                         # one dp4a per (word, shift)
  acc = jnp.sum(dot4, axis=(-2, -1), dtype=jnp.int32)                     # [M, N]
  return acc - jnp.sum(x_codes.astype(jnp.int32), axis=1, keepdims=True)
