"""Tests for bitnet_jax/kernels/ternary_matmul.py: the Pallas kernel (interpret mode on CPU) against the XLA path."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax import packing, quant
from bitnet_jax.kernels import matmul, reference_matmul, ternary_matmul
from jaxprs import equations


def _problem(lead, k, n, groups, group_axis, act, seed=0):
  """Random ternary codes packed 2-bit along the output axis, positive group scales and activations."""
  rng = np.random.default_rng(seed)
  codes = rng.integers(-1, 2, size=(k, n)).astype(np.int8)
  scales = rng.uniform(0.5, 1.5, size=(1, groups) if group_axis == "out" else (groups, 1)).astype(np.float32)
  x = rng.normal(size=lead + (k,)).astype(np.float32) * 2
  if act == "int8":
    xc, xs = quant.activation_codes(jnp.asarray(x), groups=groups if group_axis == "in" else 1)
  else:
    xc, xs = jnp.asarray(x, act), None
  return codes, packing.pack_2bit(codes, axis=-1), scales, xc, xs


def _oracle(codes, scales, group_axis, xc, xs):
  """float64 `x @ (codes * scale)` (times the activation scale) with the groups written out one by one."""
  k, n = codes.shape
  g = scales.size
  w = codes.astype(np.float64) * (np.repeat(scales.reshape(1, g), n // g, axis=1) if group_axis == "out"
                                  else np.repeat(scales.reshape(g, 1), k // g, axis=0))
  x = np.asarray(xc, np.float64)
  if xs is None:
    return x @ w
  xs = np.broadcast_to(np.asarray(xs, np.float64), x.shape[:-1] + (np.asarray(xs).shape[-1],))
  xs = np.repeat(xs, k // xs.shape[-1], axis=-1)                  # per-element activation scale along K
  return (x * xs) @ w


CASES = [  # (lead shape, K, N, groups, group_axis, activations, kernel options)
    ((1,), 64, 70, 1, "out", jnp.bfloat16, {}),                     # batch 1; N is no multiple of 4 or the block
    ((1,), 100, 36, 2, "out", "int8", {}),                          # K is no multiple of the block
    ((3,), 96, 40, 2, "in", "int8", {}),                            # odd M, input-axis groups
    ((5,), 48, 24, 3, "out", jnp.bfloat16, {}),                     # three output groups
    ((2, 3), 128, 64, 4, "in", jnp.bfloat16, dict(block_k=16, k_steps=2)),   # 2 K splits per group, 2 steps each
    ((7,), 200, 36, 4, "out", "int8", dict(block_k=16, k_steps=3)),  # K padded from 200 to 240 inside
    ((17,), 32, 130, 1, "out", "int8", dict(block_m=16, block_n=16)),  # 2 row tiles, 3 column tiles
    ((2,), 64, 8, 2, "in", jnp.float32, {}),                        # float32 activations
    ((16,), 256, 64, 8, "out", jnp.bfloat16, {}),                   # batch 16, eight output groups
    ((1,), 40, 5, 1, "out", "int8", {}),                            # 5 outputs in 2 packed columns
    ((3,), 96, 40, 2, "out", "int8", dict(decode="shift")),         # the four-operation decode
    ((2,), 64, 70, 1, "out", jnp.bfloat16, dict(decode="shift", block_k=16, k_steps=2)),
    ((1,), 100, 36, 2, "out", "int8", dict(gemv=True)),             # CUDA-core rows, K padded
    ((5,), 128, 64, 4, "in", "int8", dict(gemv=True, block_k=16, k_steps=2)),   # 5 rows, input groups
    ((2,), 64, 70, 1, "out", jnp.float32, dict(gemv=True)),         # float rows
    ((3,), 384, 40, 1, "out", "int8", dict(block_n=10, block_k=128, k_steps=1)),   # TPU tiles: all of P, 3 splits
]


@pytest.mark.parametrize("lead,k,n,groups,group_axis,act,options", CASES)
def test_kernel_matches_reference_path(lead, k, n, groups, group_axis, act, options):
  codes, packed, scales, xc, xs = _problem(lead, k, n, groups, group_axis, act, seed=k + n)
  got = ternary_matmul(xc, packed, scales, n_out=n, group_axis=group_axis, x_scale=xs, interpret=True, **options)
  ref = reference_matmul(xc, packed, scales, n_out=n, group_axis=group_axis, x_scale=xs)
  assert got.shape == lead + (n,) and got.dtype == jnp.float32
  got, ref = np.asarray(got), np.asarray(ref)
  if act == "int8":   # int32 sums are exact, and the rescale is the same function: bit for bit
    np.testing.assert_array_equal(got, ref)
  else:               # float32 sums in another order
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
  want = _oracle(codes, scales, group_axis, xc, xs).reshape(got.shape)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def _slices_bytes(jaxpr) -> bool:
  """Whether the jaxpr (or one nested in it) dynamic-slices a uint8 array (copies weight bytes out of a stack)."""
  return any(eqn.primitive.name == "dynamic_slice" and eqn.outvars[0].aval.dtype == jnp.uint8
             for eqn in equations(jaxpr))


STACK_CASES = [  # as CASES, and whether the layer must be sliced out of the stack first (its weights need padding)
    ((1,), 128, 64, 1, "out", "int8", {}, False),                   # batch 1
    ((3,), 256, 128, 2, "in", "int8", {}, False),                   # odd M, two input groups
    ((2,), 128, 64, 2, "out", jnp.bfloat16, dict(block_k=16, k_steps=2), False),   # K splits
    ((1,), 128, 64, 1, "out", "int8", dict(gemv=True), False),      # CUDA-core rows
    ((2,), 64, 64, 1, "out", "int8", dict(decode="shift"), False),  # the four-operation decode
    ((3,), 384, 40, 1, "out", "int8", dict(block_n=10, block_k=128, k_steps=1), False),   # TPU tiles: all of P
    ((1,), 100, 36, 2, "out", "int8", {}, True),                    # K padded inside: sliced first
]


@pytest.mark.parametrize("via", ["offsets", "prefetch"])
@pytest.mark.parametrize("lead,k,n,groups,group_axis,act,options,sliced", STACK_CASES)
def test_a_layer_read_from_a_stack_equals_the_layer_on_its_own(lead, k, n, groups, group_axis, act, options, sliced,
                                                               via, monkeypatch):
  """`layer=`: the kernel reads one layer of stacked weights [L, K, P] in place (Triton-style load offsets, or
  the TPU's scalar-prefetched index map, both in the interpreter), for a layer index traced under jit: bit for
  bit the kernel on that layer alone, and the XLA path slicing the stack. No layer is sliced out of the stack
  unless its weights need padding."""
  problems = [_problem(lead, k, n, groups, group_axis, act, seed=k + n + i) for i in range(3)]
  stack = jnp.stack([prob[1] for prob in problems])                     # (3, K, P) uint8
  scales = jnp.stack([jnp.asarray(prob[2]) for prob in problems])       # (3, G_in, G_out)
  xc, xs = problems[0][3], problems[0][4]
  if via == "prefetch":
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  kernel = jax.jit(lambda w, s, layer: ternary_matmul(xc, w, s, n_out=n, group_axis=group_axis, x_scale=xs,
                                                       layer=layer, interpret=True, **options))
  assert _slices_bytes(jax.make_jaxpr(kernel)(stack, scales, jnp.int32(0)).jaxpr) == sliced
  for layer in range(3):
    got = np.asarray(kernel(stack, scales, jnp.int32(layer)))
    alone = np.asarray(kernel(stack[layer], scales[layer], None))
    np.testing.assert_array_equal(got, alone)
    via_xla = np.asarray(reference_matmul(xc, stack, scales, n_out=n, group_axis=group_axis, x_scale=xs, layer=layer))
    np.testing.assert_array_equal(via_xla, np.asarray(reference_matmul(xc, stack[layer], scales[layer], n_out=n,
                                                                       group_axis=group_axis, x_scale=xs)))
    np.testing.assert_allclose(got, via_xla, rtol=1e-5, atol=1e-5 * np.abs(via_xla).max())


def test_the_compiled_kernel_takes_the_whole_stack_with_no_copy_of_the_layer(monkeypatch):
  """Lowered for CUDA and for TPU (no accelerator needed): the kernel's operand is the whole stack of 8 layers
  (Triton: viewed as [8 K, P]; Mosaic: [8, K, P] with the layer in the index map), so XLA copies no layer out."""
  k, n, layers = 4096, 11008, 8
  args = (jax.ShapeDtypeStruct((1, k), jnp.int8), jax.ShapeDtypeStruct((layers, k, n // 4), jnp.uint8),
          jax.ShapeDtypeStruct((layers, 1, 1), jnp.float32), jax.ShapeDtypeStruct((), jnp.int32))
  for platform, call, operand in (("cuda", "xla.gpu.triton", f"tensor<{layers * k}x{n // 4}xui8>"),
                                  ("tpu", "tpu_custom_call", f"tensor<{layers}x{k}x{n // 4}xui8>")):
    monkeypatch.setattr(jax, "default_backend", lambda platform=platform: "gpu" if platform == "cuda" else "tpu")
    fn = jax.jit(lambda x, w, s, layer: ternary_matmul(x, w, s, n_out=n, x_scale=jnp.ones((1, 1)), layer=layer,
                                                       interpret=False))   # traced anew for each backend
    text = fn.trace(*args).lower(lowering_platforms=(platform,)).as_text()
    calls = [line for line in text.splitlines() if call in line]
    assert len(calls) == 1 and operand in calls[0].rsplit(" : ", 1)[-1], (platform, calls[0][-300:])
    assert f"tensor<{k}x{n // 4}xui8>" not in text, platform   # no single layer is sliced out anywhere


def test_bad_stacks_and_layer_indices_raise_value_error():
  _, packed, scales, xc, xs = _problem((2,), 64, 48, 1, "out", "int8")
  stack, stacked_scales = jnp.stack([packed, packed]), jnp.stack([scales, scales])
  with pytest.raises(ValueError, match=r"uint8 stack \[L, K, P\]"):
    ternary_matmul(xc, packed, scales, n_out=48, x_scale=xs, layer=0, interpret=True)
  with pytest.raises(ValueError, match="scales must be stacked too"):
    matmul(xc, stack, scales, n_out=48, x_scale=xs, layer=0)
  with pytest.raises(ValueError, match="layer=2 is outside the stack of 2 layers"):
    ternary_matmul(xc, stack, stacked_scales, n_out=48, x_scale=xs, layer=2, interpret=True)
  with pytest.raises(ValueError, match="layer must be an integer scalar"):
    reference_matmul(xc, stack, stacked_scales, n_out=48, x_scale=xs, layer=jnp.zeros(2, jnp.int32))
  with pytest.raises(ValueError, match="layer must be an integer scalar"):
    reference_matmul(xc, stack, stacked_scales, n_out=48, x_scale=xs, layer=0.5)


def test_per_tensor_activation_scale_and_padded_columns_are_neutral():
  codes, packed, scales, _, _ = _problem((4,), 64, 30, 2, "out", "int8", seed=7)
  x = jax.random.normal(jax.random.key(0), (4, 64))
  xc, xs = quant.activation_codes(x, per_token=False)             # one scale, shape (1, 1)
  got = ternary_matmul(xc, packed, scales, n_out=30, x_scale=xs, interpret=True)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(packing.int_matmul(
      xc, xs, packing.unpack_2bit(packed, 30), jnp.asarray(scales))))
  # Code 0 everywhere (the padding byte) gives exactly zero output.
  zero = packing.pack_2bit(np.zeros((64, 30), np.int8))
  assert not np.any(np.asarray(ternary_matmul(xc, zero, scales, n_out=30, x_scale=xs, interpret=True)))


def test_dispatcher_uses_xla_on_cpu_and_the_kernel_lowers_to_triton_for_gpus():
  assert jax.default_backend() == "cpu"
  _, packed, scales, xc, _ = _problem((2,), 64, 48, 1, "out", jnp.bfloat16)
  via_dispatch = jax.make_jaxpr(lambda x: matmul(x, packed, scales, n_out=48))(xc)
  via_kernel = jax.make_jaxpr(lambda x: ternary_matmul(x, packed, scales, n_out=48, interpret=True))(xc)
  assert "pallas_call" not in str(via_dispatch) and "pallas_call" in str(via_kernel)
  np.testing.assert_array_equal(np.asarray(matmul(xc, packed, scales, n_out=48)),
                                np.asarray(reference_matmul(xc, packed, scales, n_out=48)))
  # Compiled (not interpreted) lowering for CUDA, at a benchmark shape: a Triton custom call, no Mosaic GPU.
  for act, x_scale in ((jnp.bfloat16, None), (jnp.int8, jnp.ones((1, 1)))):
    x = jax.ShapeDtypeStruct((1, 4096), act)
    w = jax.ShapeDtypeStruct((4096, 11008 // 4), jnp.uint8)
    fn = jax.jit(lambda x, w: ternary_matmul(x, w, jnp.ones((1, 1)), n_out=11008, x_scale=x_scale, interpret=False))
    text = fn.trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
    assert "xla.gpu.triton" in text and "mosaic" not in text.lower(), act


TPU_SHAPES = [(4096, 11008), (11008, 4096), (8192, 28672), (3200, 8640), (8640, 3200), (64, 48)]


@pytest.mark.parametrize("k, n", TPU_SHAPES)
def test_tpu_tiles_follow_mosaic_block_rules_and_never_pad_the_weight_columns(k, n):
  tm = importlib.import_module("bitnet_jax.kernels.ternary_matmul")   # the module (the package exports the function)
  p = -(-n // 4)
  bn, bk, k_steps = tm._tpu_tiles(p, k, None, None, None)
  steps = -(-k // bk)
  assert p % bn == 0 and (bn % 128 == 0 or bn == p)               # lane blocks: 128-multiples or all of P
  assert bk % 128 == 0 and steps % k_steps == 0                    # the x block (bm, k_steps * bk) is too
  assert k_steps == 1 or k_steps * bk * bn <= tm.TPU_TILE_BYTES   # the weight tile fits the VMEM budget
  if k % 128 == 0:
    assert steps * bk == k                                         # K needs no padding either


def test_the_kernel_lowers_to_mosaic_for_tpus(monkeypatch):
  """Compiled (not interpreted) lowering for TPU with the TPU default tiles: a Mosaic custom call (never run on a
  TPU here: the Mosaic compile itself and the speed are unchecked)."""
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  for k, n in TPU_SHAPES[:3]:
    for act, x_scale in ((jnp.bfloat16, None), (jnp.int8, jnp.ones((1, 1)))):
      x = jax.ShapeDtypeStruct((1, k), act)
      w = jax.ShapeDtypeStruct((k, n // 4), jnp.uint8)
      fn = jax.jit(lambda x, w: matmul(x, w, jnp.ones((1, 1)), n_out=n, x_scale=x_scale))
      text = fn.trace(x, w).lower(lowering_platforms=("tpu",)).as_text()
      assert "tpu_custom_call" in text and "triton" not in text, (k, n, act)
  with pytest.raises(ValueError, match="gemv=True is a GPU"):
    ternary_matmul(jnp.ones((1, 64), jnp.bfloat16), jnp.zeros((64, 4), jnp.uint8), jnp.ones((1, 1)), n_out=16,
                   gemv=True)


def test_block_grid_of_scales_and_one_dimensional_scales():
  """A (G_in, G_out) = (2, 4) grid (FSDP x tensor groups), and G scales given as a vector with group_axis."""
  rng = np.random.default_rng(11)
  codes = rng.integers(-1, 2, size=(64, 40)).astype(np.int8)
  packed = packing.pack_2bit(codes, axis=-1)
  grid = rng.uniform(0.5, 1.5, size=(2, 4)).astype(np.float32)
  x = jax.random.normal(jax.random.key(1), (3, 64))
  xc, xs = quant.activation_codes(x)
  got = ternary_matmul(xc, packed, grid, n_out=40, x_scale=xs, interpret=True, block_k=16)
  w = codes * np.repeat(np.repeat(grid.astype(np.float64), 32, axis=0), 10, axis=1)
  want = (np.asarray(xc, np.float64) * np.asarray(xs, np.float64)) @ w
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
  np.testing.assert_array_equal(np.asarray(got), np.asarray(reference_matmul(xc, packed, grid, n_out=40, x_scale=xs)))
  vector = jnp.asarray([0.5, 2.0])
  np.testing.assert_array_equal(
      np.asarray(reference_matmul(xc, packed, vector, n_out=40, x_scale=xs, group_axis="in")),
      np.asarray(reference_matmul(xc, packed, vector.reshape(2, 1), n_out=40, x_scale=xs)))


def test_bad_arguments_raise_value_error():
  _, packed, scales, xc, xs = _problem((2,), 64, 48, 2, "out", "int8")
  with pytest.raises(ValueError, match="x_scale"):
    ternary_matmul(xc, packed, scales, n_out=48, interpret=True)
  with pytest.raises(ValueError, match="n_out=50"):
    ternary_matmul(xc, packed, scales, n_out=50, x_scale=xs, interpret=True)
  with pytest.raises(ValueError, match="uint8"):
    reference_matmul(xc, packed.astype(jnp.int32), scales, n_out=48, x_scale=xs)
  with pytest.raises(ValueError, match="groups=3"):
    ternary_matmul(xc, packed, scales, n_out=48, groups=3, x_scale=xs, interpret=True)
  with pytest.raises(ValueError, match=r"\(1, 5\).*do not divide"):
    matmul(xc, packed, jnp.ones((1, 5)), n_out=48, x_scale=xs)
  with pytest.raises(ValueError, match="not grouped along the 'in' axis"):
    matmul(xc, packed, scales, n_out=48, x_scale=xs, group_axis="in")
  with pytest.raises(ValueError, match="block_k=24 must be a power of two for the Triton"):   # checked, not compiled
    ternary_matmul(xc, packed, scales, n_out=48, x_scale=xs, block_k=24, interpret=False)
  with pytest.raises(ValueError, match="block_n=-4 must be a positive int"):
    ternary_matmul(xc, packed, scales, n_out=48, x_scale=xs, block_n=-4, interpret=True)
