"""ternary_matmul: a Pallas matmul with 2-bit packed ternary weights decoded in the kernel (packing -> kernels).

Computes `y = x @ (unpack_2bit(packed_w, n_out) * scale)` for a weight packed by `packing.pack_2bit(codes,
axis=-1)`: `packed_w` is uint8 [K, P], P = ceil(n_out / 4), and (the planar layout of `bitnet_jax.packing`)
bit pair i of byte column j holds output column `i * P + j`. A grid program decodes a [bk, bn] tile of bytes
into four planes (one integer operation per weight, `_kernel`) and runs four dots with the same activation tile;
its four [bm, bn] results are output columns `i * P + j` for its j, written as [bm, 4, bn] so that the output
needs no transpose. This is the b1.58 paper's inference setting
(PAPERS.md section 2, "weights stored in 2 bits"; FAQ `y = lowbit_gemm(x_q, w_q) / w_scale / x_scale`).

Activations: bf16 (or f16 / f32) with float32 accumulation, or int8 codes (`quant.activation_codes`) with exact
int32 accumulation and a per-token `x_scale`. Weight scales: the (G_in, G_out) grid of `quant.ternary_codes`
(BitNet section 2.3): (1, G) is one scale per output-column group; with input-row groups (G_in > 1, or activation
groups) each program's K range lies inside one group, and the group sums are rescaled before they are added
(`packing.rescale_group_sums`, as `packing.int_matmul` documents).

Grid (M tiles, N tiles, K splits): each program loops over `k_steps` K chunks of `block_k` rows with
`lax.fori_loop` and writes its own partial sums; XLA adds the K splits and rescales once. No program revisits
an output block and nothing is accumulated across programs, so the kernel lowers through Triton on GPU (block
sizes are powers of two, rows padded to >= 16 for the tensor-core dot, no reshapes or concatenations inside).
Default blocks divide the shape where they can (`_default_block`); shapes that do not fit are padded in the
wrapper (padded weight bytes decode to code 0), which copies the weights in every call: pack such weights
padded instead.

Stacked weights: with `layer=i`, packed_w is a stack [L, K, P] (a stacked decoder's, one `lax.scan` over the
layers) and the kernel reads layer i's tiles in place: on GPU its loads are offset by i * K rows of the stack
(`_stacked_kernel`), on TPU the index, prefetched into SMEM, picks the weight block in the index map. XLA then
passes the whole stack to the kernel instead of copying layer i out of it in every call.

Tested on CPU (`tests/test_kernels.py`): values in interpret mode, and that the compiled form lowers for CUDA to
a Triton call and for TPU to a Mosaic call (`_tpu_tiles`: (8, 128)-aligned blocks, never padding P). Compiled
and timed on an H100 (`benchmarks/matvec.py`, `benchmarks/results/h100.md`): equal to the XLA path, 1.05-1.77x
faster than XLA's bf16 dot at batch 1 with int8 activations; decode-bound, not memory-bound. Never run on a
TPU: the Mosaic lowering is checked, not the Mosaic compile or the speed.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from bitnet_jax import packing

try:   # Triton's compiler parameters; passing them selects the Triton backend (jax 0.10 defaults to Mosaic GPU)
  from jax.experimental.pallas import triton as pltriton
except ImportError:   # pragma: no cover - a jax without the Triton backend
  pltriton = None
try:   # Mosaic TPU's compiler parameters (dimension semantics)
  from jax.experimental.pallas import tpu as pltpu
except ImportError:   # pragma: no cover
  pltpu = None

ACCELERATORS = ("gpu", "cuda", "rocm", "tpu")
PROGRAMS = 264             # programs to aim for when splitting K: two per SM of an H100 (132 SMs)
# Default tiles, from `benchmarks/matvec.py --sweep` on an H100 (int8 activations, batch 1 and 16): 32 packed
# byte columns (128 outputs) by 128 K rows, 4 warps, 2 stages was the fastest or within 10% on all three shapes.
BLOCK_N, BLOCK_K = 32, 128
# Mosaic TPU: a block's last two dimensions must be multiples of (8, 128) or the whole array dimension. The grid
# runs in sequence on a TensorCore, so a program holds as much of K as its weight tile allows (`_tpu_tiles`).
TPU_BLOCKS = (512, 256, 128)
TPU_TILE_BYTES = 4 << 20
_ZERO_BYTE = 0b01010101   # four codes 0 (digit 1 in every bit pair): padding that adds nothing


def _squeezed():
  return pl.squeezed if hasattr(pl, "squeezed") else None


def _pow2_at_least(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def _kernel(x_ref, w_ref, o_ref, *, block_k: int, k_steps: int, acc_dtype, decode: str):
  """x_ref (bm, k_steps * bk), w_ref (k_steps * bk, bn) uint8, o_ref (bm, 4, bn): four planes of partial sums
  (o_ref[:, i, j] is output column i * P + j, so the output needs no transpose).

  decode="shift": plane i's codes are `((w >> 2i) & 3) - 1`, four integer operations per weight before the dot.
  decode="mask": plane i is dotted as `w & (3 << 2i)` (the digit d = code + 1 times 4^i; plane 3 as `w >> 6`),
  one integer operation per weight; the sums are then divided by 4^i (exact: a power of two, and integer sums
  divisible by it) and the digit offset removed with the row sums of x: x . (d - 1) = x . d - sum(x).
  """
  _dot_body(x_ref, lambda k0: w_ref[pl.ds(k0, block_k), :], w_ref.shape[1], o_ref, block_k=block_k,
            k_steps=k_steps, acc_dtype=acc_dtype, decode=decode)


def _stacked_kernel(layer_ref, x_ref, w_ref, o_ref, *, body, k: int, block_n: int, block_k: int, k_steps: int,
                    **options):
  """`body` (`_dot_body` or `_gemv_body`) on layer `layer_ref[0]` of a whole stack w_ref [L * K, P] (GPU and the
  interpreter: no BlockSpec, so XLA passes the stack as it is and copies no layer out of it). This program's
  tiles start at row layer * K + s * (k_steps * block_k) and byte column j * block_n."""
  base = layer_ref[0] * k + pl.program_id(2) * (k_steps * block_k)
  col = pl.multiple_of(pl.program_id(1) * block_n, block_n)
  body(x_ref, lambda k0: w_ref[pl.ds(base + k0, block_k), pl.ds(col, block_n)], block_n, o_ref,
       block_k=block_k, k_steps=k_steps, **options)


def _dot_body(x_ref, load_w, bn: int, o_ref, *, block_k: int, k_steps: int, acc_dtype, decode: str):
  """`_kernel`'s loop, reading its (block_k, bn) byte tiles through `load_w(k0)`."""
  bm = x_ref.shape[0]
  mask = decode == "mask"

  def step(s, carry):
    accs, xsum = carry
    k0 = pl.multiple_of(s * block_k, block_k)
    x = x_ref[:, pl.ds(k0, block_k)]                                   # (bm, bk)
    w = load_w(k0)                                                     # (bk, bn) packed bytes
    out = []
    for i in range(4):                                                 # plane i: output columns i * P + j
      if mask:
        digits = (w >> 6) if i == 3 else (w & (3 << (2 * i)))          # uint8 d * 4^i (d = code + 1)
        codes = digits.astype(x.dtype)
      else:
        codes = (((w.astype(jnp.int32) >> (2 * i)) & 3) - 1).astype(x.dtype)   # (bk, bn) in {-1, 0, 1}
      out.append(accs[i] + jnp.dot(x, codes, preferred_element_type=acc_dtype))
    if mask:
      xsum = xsum + jnp.sum(x.astype(acc_dtype), axis=1, keepdims=True)
    return tuple(out), xsum

  zeros = tuple(jnp.zeros((bm, bn), acc_dtype) for _ in range(4))
  accs, xsum = jax.lax.fori_loop(0, k_steps, step, (zeros, jnp.zeros((bm, 1), acc_dtype)))
  for i in range(4):
    acc = accs[i]
    if mask:
      if i in (1, 2):   # exact: the products of plane i are multiples of 4^i
        acc = (acc >> (2 * i)) if acc_dtype == jnp.int32 else acc * (0.25 ** i)
      acc = acc - xsum
    o_ref[:, i, :] = acc


def _gemv_kernel(x_ref, w_ref, o_ref, *, block_k: int, k_steps: int, acc_dtype, decode: str):
  """One activation row (block_m = 1) without tensor cores: x_ref (1, k_steps * bk), w_ref (k_steps * bk, bn),
  o_ref (1, 4, bn). Each plane accumulates `x[:, None] * d` elementwise in a (bk, bn) register tile (no
  reduction inside the loop), reduced over K once at the end; digits and the row-sum offset as in `_kernel`."""
  _gemv_body(x_ref, lambda k0: w_ref[pl.ds(k0, block_k), :], w_ref.shape[1], o_ref, block_k=block_k,
             k_steps=k_steps, acc_dtype=acc_dtype, decode=decode)


def _gemv_body(x_ref, load_w, bn: int, o_ref, *, block_k: int, k_steps: int, acc_dtype, decode: str):
  """`_gemv_kernel`'s loop, reading its (block_k, bn) byte tiles through `load_w(k0)`."""
  del decode   # always the mask decode: digits d * 4^i, one integer operation per weight

  def step(s, carry):
    accs, xsum = carry
    k0 = pl.multiple_of(s * block_k, block_k)
    x = x_ref[0, pl.ds(k0, block_k)].astype(acc_dtype)[:, None]         # (bk, 1)
    w = load_w(k0).astype(jnp.int32)                                   # (bk, bn) packed bytes
    out = tuple(accs[i] + x * ((w >> 6) if i == 3 else (w & (3 << (2 * i)))).astype(acc_dtype)
                for i in range(4))
    return out, xsum + x

  zeros = tuple(jnp.zeros((block_k, bn), acc_dtype) for _ in range(4))
  accs, xsum = jax.lax.fori_loop(0, k_steps, step, (zeros, jnp.zeros((block_k, 1), acc_dtype)))
  total = jnp.sum(xsum)
  for i in range(4):
    acc = jnp.sum(accs[i], axis=0)                                     # (bn,)
    if i in (1, 2):
      acc = (acc >> (2 * i)) if acc_dtype == jnp.int32 else acc * (0.25 ** i)
    o_ref[0, i, :] = acc - total


def _splits(steps: int, tiles: int) -> int:
  """K splits for `tiles` output tiles: the largest divisor of the K chunks giving at most ~PROGRAMS programs."""
  want = -(-PROGRAMS // tiles)
  return max(d for d in range(1, min(steps, want) + 1) if steps % d == 0)


def _default_block(n: int, cap: int) -> int:
  """The largest power of two in [16, cap] that divides n (then the weights need no padding inside the call,
  which would copy them); if none does, the smallest power of two >= min(n, cap), at least 16."""
  for b in (cap >> i for i in range(cap.bit_length())):
    if b >= 16 and n % b == 0:
      return b
  return max(16, min(cap, _pow2_at_least(n)))


def _compiler_params(interpret: bool, num_warps: int, num_stages: int):
  """Triton parameters for a compiled GPU kernel (they also select the Triton backend), Mosaic's for a TPU (every
  grid axis parallel: no program revisits an output block); None in the interpreter."""
  if interpret:
    return None
  if jax.default_backend() == "tpu":
    return None if pltpu is None else pltpu.CompilerParams(dimension_semantics=("parallel",) * 3)
  return None if pltriton is None else pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _tpu_tiles(p: int, kgs: int, block_n, block_k, k_steps) -> tuple[int, int, int]:
  """(block_n, block_k, k_steps) for Mosaic TPU: byte columns in blocks of 512, 256 or 128 that divide P, else
  P whole (the weights are never padded along P); K steps of 512, 256 or 128 rows that divide the K rows of a
  scale group where one does (else 128, padding K); as many K steps per program as keep the weight tile under
  TPU_TILE_BYTES (the whole K range when it fits), the rest as K splits whose partial sums XLA adds."""
  bn = block_n or next((b for b in TPU_BLOCKS if p % b == 0), p)
  bk = block_k or next((b for b in TPU_BLOCKS if kgs % b == 0), TPU_BLOCKS[-1])
  steps = -(-kgs // bk)
  k_steps = k_steps or max(d for d in range(1, steps + 1)
                           if steps % d == 0 and (d == 1 or d * bk * bn <= TPU_TILE_BYTES))
  return bn, bk, k_steps


def select_layer(packed_w: jax.Array, scales: jax.Array, layer) -> tuple[jax.ShapeDtypeStruct, jax.Array, jax.Array]:
  """For a stack of layers' weights (packed_w uint8 [L, K, P], scales [L, ...]) and a layer index: (the shape of
  one layer's packed_w, that layer's scales, the index as int32 [1] clamped to [0, L)). ValueError on a stack
  or an index that does not fit; a concrete index outside [0, L) is refused rather than clamped."""
  if packed_w.dtype != jnp.uint8 or packed_w.ndim != 3:
    raise ValueError(f"with layer=, packed_w must be a uint8 stack [L, K, P], got {packed_w.dtype} {packed_w.shape}")
  n = packed_w.shape[0]
  if scales.ndim < 1 or scales.shape[0] != n:
    raise ValueError(f"with layer=, scales must be stacked too (leading axis of {n}), got shape {scales.shape}")
  index = jnp.asarray(layer)
  if index.ndim != 0 or not jnp.issubdtype(index.dtype, jnp.integer):
    raise ValueError(f"layer must be an integer scalar, got {index.dtype} of shape {index.shape}")
  if not isinstance(layer, jax.core.Tracer) and not 0 <= int(layer) < n:
    raise ValueError(f"layer={int(layer)} is outside the stack of {n} layers")
  layer = jnp.clip(index.astype(jnp.int32), 0, n - 1)
  return (jax.ShapeDtypeStruct(packed_w.shape[1:], jnp.uint8),
          jax.lax.dynamic_index_in_dim(scales, layer, 0, keepdims=False), layer.reshape(1))


def _check(x, packed_w, scales, n_out, groups, group_axis, x_scale) -> jax.Array:
  """Validates the common arguments; returns the weight scales as a float32 (G_in, G_out) grid."""
  if not isinstance(n_out, int) or isinstance(n_out, bool) or n_out < 1:
    raise ValueError(f"n_out must be a positive int, got {n_out!r}")
  if packed_w.dtype != jnp.uint8 or packed_w.ndim != 2:
    raise ValueError(f"packed_w must be uint8 [K, ceil(n_out / 4)], got {packed_w.dtype} {packed_w.shape}")
  if x.ndim < 1 or x.shape[-1] != packed_w.shape[0] or packed_w.shape[1] != -(-n_out // 4):
    raise ValueError(f"x {x.shape}, packed_w {packed_w.shape} and n_out={n_out} do not fit "
                     f"(need x [..., K], packed_w [K, {-(-n_out // 4)}])")
  if group_axis not in (None, "in", "out"):
    raise ValueError(f"group_axis={group_axis!r} must be None, 'in' or 'out'")
  if groups is not None and groups != scales.size:
    raise ValueError(f"groups={groups} does not match the {scales.size} scales given")
  if scales.ndim == 2:      # the grid as quant.ternary_codes returns it
    grid = scales.astype(jnp.float32)
    if group_axis is not None and grid.shape[0 if group_axis == "out" else 1] != 1:
      raise ValueError(f"scales of shape {scales.shape} are not grouped along the {group_axis!r} axis only")
  elif scales.ndim <= 1:    # G scales along group_axis (default: output columns)
    grid = scales.reshape((-1, 1) if group_axis == "in" else (1, -1)).astype(jnp.float32)
  else:
    raise ValueError(f"scales must be G values or a (G_in, G_out) grid, got shape {scales.shape}")
  if grid.size < 1 or x.shape[-1] % grid.shape[0] or n_out % grid.shape[1]:
    raise ValueError(f"scales of shape {scales.shape} ({grid.shape[0]} x {grid.shape[1]} groups) do not divide "
                     f"the weight [K={x.shape[-1]}, N={n_out}]")
  if jnp.issubdtype(x.dtype, jnp.integer):
    if x.dtype != jnp.int8:
      raise ValueError(f"integer activations must be int8 codes, got dtype {x.dtype}")
    if x_scale is None:
      raise ValueError("int8 activations need x_scale (the per-token scales of quant.activation_codes)")
  return grid


def ternary_matmul(x: jax.Array, packed_w: jax.Array, scales: jax.Array, *, n_out: int, groups: int | None = None,
                   group_axis: str | None = None, x_scale: jax.Array | None = None, interpret: bool | None = None,
                   block_m: int | None = None, block_n: int | None = None, block_k: int | None = None,
                   k_steps: int | None = None, num_warps: int = 4, num_stages: int = 2,
                   decode: str = "mask", gemv: bool = False, layer: jax.Array | int | None = None) -> jax.Array:
  """`x @ (unpack_2bit(packed_w, n_out) * scales)` (times `x_scale`) with the weights decoded in a Pallas kernel.

  Args:
    x: [..., K] activations, float (bf16 is the fast path) or int8 codes (then `x_scale` is required).
    packed_w: uint8 [K, ceil(n_out / 4)], `packing.pack_2bit(codes, axis=-1)` of int8 codes [K, n_out].
    scales: float32 weight scales: the (G_in, G_out) grid of `quant.ternary_codes` ((1, G): output groups), or
      G values along `group_axis`.
    n_out: output features N. groups: the number of scales, checked if given.
    group_axis: for 1-D scales, "out" (default: G groups of output columns) or "in" (G groups of input rows);
      for a grid, a check that it is grouped along that axis only.
    x_scale: activation scales, x.shape[:-1] + (Gx,) or broadcastable to it (Gx activation groups along K).
    interpret: run the kernel in the Pallas interpreter; None: only on CPU.
    block_m, block_n, block_k: rows of x, packed byte columns of w (4 * block_n outputs) and K rows per inner
      step, powers of two (>= 16) for Triton; k_steps: inner steps per program (K splits = K / (k_steps bk)).
      Defaults: `_default_block` and K splits towards PROGRAMS on GPU, `_tpu_tiles` on TPU.
    num_warps, num_stages: Triton launch parameters (GPU only).
    decode: how the kernel turns bytes into dot operands: "mask" (one integer operation per weight, the
      default) or "shift" (four); see `_kernel`. Both give the same sums (exactly, for int8 activations).
    gemv: one activation row per program without tensor cores (`_gemv_kernel`; block_m is then 1).
    layer: for a stack of layers' weights (packed_w uint8 [L, K, P], scales stacked [L, ...]), the layer to
      multiply by (an int32 scalar, traced under a `lax.scan` over layers; clamped to [0, L) as XLA's dynamic
      slices are): the kernel reads that layer's tiles straight from the stack, where slicing it first in XLA
      would copy the layer's weights in every call. Layers whose weights need padding are sliced first.
  Returns:
    float32 [..., n_out].
  """
  x, packed_w, scales = jnp.asarray(x), jnp.asarray(packed_w), jnp.asarray(scales)
  stack = None
  if layer is not None:   # check the layer's slice; the kernel reads it from the stack
    stack, (packed_w, scales, layer) = packed_w, select_layer(packed_w, scales, layer)
  grid = _check(x, packed_w, scales, n_out, groups, group_axis, x_scale)
  if interpret is None:
    interpret = jax.default_backend() not in ACCELERATORS
  for name, b in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k), ("k_steps", k_steps)):
    if b is not None and (not isinstance(b, int) or isinstance(b, bool) or b < 1):
      raise ValueError(f"{name}={b!r} must be a positive int")
  *lead, k = x.shape
  lead = tuple(lead)
  m, p = math.prod(lead), packed_w.shape[1]
  xs = packing.activation_scale_gm1(x_scale, lead)                      # (Gx, M, 1)
  kg = packing.k_partitions(xs.shape[0], grid, k)                        # K parts with their own scales
  kgs = k // kg                                                          # K rows per part
  is_int = x.dtype == jnp.int8
  acc_dtype = jnp.int32 if is_int else jnp.float32

  # Tiles: powers of two, >= 16 (Triton's dot); K splits chosen to give the GPU enough programs. TPU: `_tpu_tiles`.
  bm = 1 if gemv else (block_m or max(16, min(64, _pow2_at_least(m))))
  tpu = not interpret and jax.default_backend() == "tpu"
  if tpu:
    if gemv:
      raise ValueError("gemv=True is a GPU (CUDA-core) variant; the TPU kernel always uses the MXU dot")
    block_n, block_k, k_steps = _tpu_tiles(p, kgs, block_n, block_k, k_steps)
  bn = block_n or _default_block(p, BLOCK_N)
  bk = None
  if block_k is None and k_steps is None:   # a smaller K block where it allows enough K splits without padding
    tiles = (-(-m // bm)) * (-(-p // bn)) * kg
    bk = max((b for b in (BLOCK_K >> i for i in range(4)) if kgs % b == 0),
             key=lambda b: (min(tiles * _splits(kgs // b, tiles), PROGRAMS // 2), b), default=None)
  bk = block_k or bk or _default_block(kgs, BLOCK_K)
  if decode not in ("mask", "shift"):
    raise ValueError(f"decode={decode!r} must be 'mask' or 'shift'")
  for name, b in (("block_m", bm), ("block_n", bn), ("block_k", bk)):
    if b & (b - 1) and not (interpret or tpu):   # Triton's tiles; Mosaic takes a whole P of any size
      raise ValueError(f"{name}={b} must be a power of two for the Triton (GPU) kernel")
  mp, pp = -(-m // bm) * bm, -(-p // bn) * bn
  steps = -(-kgs // bk)                                                  # K chunks per group
  if k_steps is None:   # K splits towards PROGRAMS programs, dividing the K chunks: the weights are not padded
    k_steps = steps // _splits(steps, (mp // bm) * (pp // bn) * kg)
  splits = -(-steps // k_steps)                                          # programs along K per group
  kgp = splits * k_steps * bk                                            # padded K rows per group

  # Pad (a no-op when the shapes fit the blocks): x with zeros, weight bytes with code 0. A stacked layer is
  # copied out of its stack first (the copy `layer=` avoids otherwise) if it would need padding, or if the stack
  # has 2^31 bytes or more on GPU (the Triton kernel's loads are offset in int32).
  x3 = x.reshape(m, kg, kgs)                                             # (M, Gk, K/Gk)
  if (mp, kgp) != (m, kgs):
    x3 = jnp.pad(x3, ((0, mp - m), (0, 0), (0, kgp - kgs)))
  x2 = x3.reshape(mp, kg * kgp)
  if stack is not None and ((kgp, pp) != (kgs, p) or (stack.size >= 2 ** 31 and not tpu)):
    packed_w, stack = jax.lax.dynamic_index_in_dim(stack, layer[0], 0, keepdims=False), None
  if stack is None:
    w3 = packed_w.reshape(kg, kgs, p)                                    # (Gk, K/Gk, P)
    if (kgp, pp) != (kgs, p):
      w3 = jnp.pad(w3, ((0, 0), (0, kgp - kgs), (0, pp - p)), constant_values=_ZERO_BYTE)
    w2 = w3.reshape(kg * kgp, pp)
  kc = k_steps * bk                                                      # K rows per program

  options = dict(block_k=bk, k_steps=k_steps, acc_dtype=acc_dtype, decode=decode)
  call = functools.partial(
      pl.pallas_call, out_shape=jax.ShapeDtypeStruct((kg * splits, mp, 4, pp), acc_dtype), interpret=interpret,
      compiler_params=_compiler_params(interpret, num_warps, num_stages), name="ternary_matmul_2bit")
  program_grid = (mp // bm, pp // bn, kg * splits)
  x_block, w_block, o_block = (bm, kc), (kc, bn), (_squeezed(), bm, 4, bn)
  if stack is None:
    partial = call(functools.partial(_gemv_kernel if gemv else _kernel, **options), grid=program_grid,
                   in_specs=[pl.BlockSpec(x_block, lambda i, j, s: (i, s)),
                             pl.BlockSpec(w_block, lambda i, j, s: (s, j))],
                   out_specs=pl.BlockSpec(o_block, lambda i, j, s: (s, i, 0, j)))(x2, w2)
  elif jax.default_backend() == "tpu":   # Mosaic: the layer index, prefetched to SMEM, picks the weight block
    kernel = functools.partial(_gemv_kernel if gemv else _kernel, **options)
    partial = call(lambda layer_ref, *refs: kernel(*refs), grid_spec=pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=program_grid,
        in_specs=[pl.BlockSpec(x_block, lambda i, j, s, layer: (i, s)),
                  pl.BlockSpec((_squeezed(),) + w_block, lambda i, j, s, layer: (layer[0], s, j))],
        out_specs=pl.BlockSpec(o_block, lambda i, j, s, layer: (s, i, 0, j))))(layer, x2, stack)
  else:       # Triton and the interpreter: the kernel offsets its loads by the layer (`_stacked_kernel`)
    body = _gemv_body if gemv else _dot_body
    partial = call(functools.partial(_stacked_kernel, body=body, k=k, block_n=bn, **options), grid=program_grid,
                   in_specs=[pl.BlockSpec((1,), lambda i, j, s: (0,)),
                             pl.BlockSpec(x_block, lambda i, j, s: (i, s)),
                             pl.BlockSpec(memory_space=pl.ANY)],
                   out_specs=pl.BlockSpec(o_block, lambda i, j, s: (s, i, 0, j)))(
                       layer, x2, stack.reshape(stack.shape[0] * k, p))   # (Gk * S, Mp, 4, Pp)
  acc = partial.reshape(kg, splits, mp, 4, pp)
  acc = (acc[:, 0] if splits == 1 else acc.sum(axis=1))[:, :m, :, :p]     # (Gk, M, 4, P)
  acc = acc.reshape(kg, m, 4 * p)[:, :, :n_out]                           # (Gk, M, N): column i * P + j
  y = packing.rescale_group_sums(acc, xs, grid)
  return y.reshape(lead + (n_out,))


def reference_matmul(x: jax.Array, packed_w: jax.Array, scales: jax.Array, *, n_out: int,
                     groups: int | None = None, group_axis: str | None = None,
                     x_scale: jax.Array | None = None, layer: jax.Array | int | None = None) -> jax.Array:
  """The XLA path of `ternary_matmul`: unpack the codes, one dot per input group, the same rescale. With
  `layer`, packed_w and scales are stacks [L, ...] and the layer is sliced out of them (XLA:CPU fuses the
  slice into the unpacking).

  int8 activations: exactly `packing.int_matmul` (int32 sums, bit-identical to the kernel's int8 path).
  Float activations: codes cast to x's dtype and a float32-accumulated dot (equal to the kernel up to the
  order of float32 additions).
  """
  x, packed_w, scales = jnp.asarray(x), jnp.asarray(packed_w), jnp.asarray(scales)
  if layer is not None:
    _, scales, layer = select_layer(packed_w, scales, layer)
    packed_w = jax.lax.dynamic_index_in_dim(packed_w, layer[0], 0, keepdims=False)
  grid = _check(x, packed_w, scales, n_out, groups, group_axis, x_scale)
  *lead, k = x.shape
  lead = tuple(lead)
  m = math.prod(lead)
  codes = packing.unpack_2bit(packed_w, n_out, axis=-1)                 # (K, N) int8
  xs = packing.activation_scale_gm1(x_scale, lead)
  kg = packing.k_partitions(xs.shape[0], grid, k)
  x3 = x.reshape(m, kg, k // kg).transpose(1, 0, 2)                       # (Gk, M, K/Gk)
  w3 = codes.reshape(kg, k // kg, n_out).astype(x.dtype)                  # (Gk, K/Gk, N)
  acc_dtype = jnp.int32 if x.dtype == jnp.int8 else jnp.float32
  acc = jax.lax.dot_general(x3, w3, (((2,), (1,)), ((0,), (0,))), preferred_element_type=acc_dtype)
  return packing.rescale_group_sums(acc, xs, grid).reshape(lead + (n_out,))


def matmul(x: jax.Array, packed_w: jax.Array, scales: jax.Array, *, n_out: int, groups: int | None = None,
           group_axis: str | None = None, x_scale: jax.Array | None = None, layer: jax.Array | int | None = None,
           **kernel_options) -> jax.Array:
  """`ternary_matmul` on GPU/TPU (`jax.default_backend()`), `reference_matmul` (XLA) elsewhere; `layer` picks
  one layer of stacked weights (see `ternary_matmul`).

  On CPU the Pallas kernel would run in the interpreter, far slower than XLA's dot, hence the fallback.
  """
  if jax.default_backend() in ACCELERATORS:
    return ternary_matmul(x, packed_w, scales, n_out=n_out, groups=groups, group_axis=group_axis,
                          x_scale=x_scale, layer=layer, **kernel_options)
  return reference_matmul(x, packed_w, scales, n_out=n_out, groups=groups, group_axis=group_axis,
                          x_scale=x_scale, layer=layer)
