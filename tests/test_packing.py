"""Tests for bitnet_jax/packing.py: layouts against a slow oracle, round trips, model packing, sizes, int_matmul."""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from bitnet_jax import packing, quant
from bitnet_jax.layers import BitLinear
from bitnet_jax.model import ModelConfig, Transformer, count_params, preset

PACK = {"2bit": (packing.pack_2bit, packing.unpack_2bit), "base3": (packing.pack_base3, packing.unpack_base3),
        "1bit": (packing.pack_1bit, packing.unpack_1bit)}
# format: (codes per byte, radix, valid codes): PAPERS.md section 5.
SPEC = {"2bit": (4, 4, (-1, 0, 1)), "base3": (5, 3, (-1, 0, 1)), "1bit": (8, 2, (-1, 1))}


def oracle_pack(codes: np.ndarray, fmt: str, axis: int) -> np.ndarray:
  """Slow, obvious packing: byte j along `axis` is sum_i digit(code[i * P + j]) * radix^i, P = ceil(n / per)."""
  per, radix, _ = SPEC[fmt]
  codes = np.moveaxis(np.asarray(codes, np.int64), axis, -1)
  n = codes.shape[-1]
  p = -(-n // per)
  out = np.zeros(codes.shape[:-1] + (p,), np.int64)
  pad_digit = 0 if fmt == "1bit" else 1
  for j in range(p):
    for i in range(per):
      e = i * p + j
      digit = pad_digit if e >= n else ((codes[..., e] + 1) // 2 if fmt == "1bit" else codes[..., e] + 1)
      out[..., j] += digit * radix ** i
  return np.moveaxis(out, -1, axis).astype(np.uint8)


def _codes(shape, fmt, seed):
  return np.random.default_rng(seed).choice(SPEC[fmt][2], size=shape).astype(np.int8)


# ---------------------------------------------------------------------------------------------------- layouts
def test_known_bytes_of_each_format():
  # 2bit: digits (2, 1, 0, 2) -> 2 + 1*4 + 0*16 + 2*64; base3: (2, 1, 0, 2, 1) -> 2 + 3 + 0 + 54 + 81.
  assert np.asarray(packing.pack_2bit(np.array([1, 0, -1, 1], np.int8))).tolist() == [134]
  assert np.asarray(packing.pack_base3(np.array([1, 0, -1, 1, 0], np.int8))).tolist() == [140]
  assert np.asarray(packing.pack_1bit(np.array([1, -1, -1, 1, 1, 1, -1, 1], np.int8))).tolist() == [185]
  # Planar: with 8 codes in 2 bytes, byte 0 holds elements 0, 2, 4, 6 and byte 1 elements 1, 3, 5, 7.
  assert np.asarray(packing.pack_2bit(np.array([1, -1, 1, -1, 1, -1, 1, -1], np.int8))).tolist() == [170, 0]


def test_padding_decodes_to_the_neutral_code():
  packed = packing.pack_base3(np.array([1, -1], np.int8))         # 2 codes + 3 pad in one byte
  np.testing.assert_array_equal(np.asarray(packing.unpack_base3(packed, 5)), [1, -1, 0, 0, 0])
  packed = packing.pack_2bit(np.array([[-1], [-1]], np.int8), axis=0)
  np.testing.assert_array_equal(np.asarray(packing.unpack_2bit(packed, 4, axis=0)), [[-1], [-1], [0], [0]])


@settings(max_examples=50, deadline=None)
@given(fmt=st.sampled_from(sorted(PACK)), shape=st.lists(st.integers(1, 13), min_size=1, max_size=3),
       axis_pick=st.integers(0, 5), seed=st.integers(0, 2 ** 16))
def test_round_trip_and_bytes_match_the_oracle(fmt, shape, axis_pick, seed):
  axis = [0, -1][axis_pick % 2] if axis_pick < 2 else axis_pick % len(shape)
  codes = _codes(tuple(shape), fmt, seed)
  pack_fn, unpack_fn = PACK[fmt]
  packed = pack_fn(codes, axis=axis)
  n, per = shape[axis], SPEC[fmt][0]
  assert packed.dtype == jnp.uint8 and packed.shape[axis] == -(-n // per)
  np.testing.assert_array_equal(np.asarray(packed), oracle_pack(codes, fmt, axis))
  back = unpack_fn(packed, n, axis=axis)
  assert back.dtype == jnp.int8
  np.testing.assert_array_equal(np.asarray(back), codes)
  tensor = packing.pack(jnp.asarray(codes), fmt, axis=axis)       # jax input, PackedTensor
  assert tensor.padding == per * packed.shape[axis] - n and tensor.shape == tuple(shape)
  np.testing.assert_array_equal(np.asarray(tensor.unpack()), codes)


@pytest.mark.parametrize("fmt", sorted(PACK))
def test_pack_and_unpack_jit(fmt):
  pack_fn, unpack_fn = PACK[fmt]
  codes = _codes((6, 11), fmt, seed=3)
  packed = jax.jit(pack_fn, static_argnames="axis")(codes, axis=0)
  np.testing.assert_array_equal(np.asarray(packed), oracle_pack(codes, fmt, 0))
  back = jax.jit(lambda p: unpack_fn(p, 6, axis=0))(packed)
  np.testing.assert_array_equal(np.asarray(back), codes)
  tensor = packing.pack(codes, fmt, axis=-1)                       # a pytree: data is the only leaf
  assert len(jax.tree.leaves(tensor)) == 1
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda t: t.unpack())(tensor)), codes)


@pytest.mark.parametrize("fmt,bits", [("2bit", 2.0), ("base3", 1.6), ("1bit", 1.0)])
def test_bits_per_weight_of_each_format(fmt, bits):
  """PAPERS.md section 5: 2.0 (4 per byte), 1.6 (3^5 = 243 <= 256), 1.0; 40 codes fill whole bytes in each."""
  packed = PACK[fmt][0](_codes((3, 40), fmt, seed=1))
  assert 8 * packed.size / (3 * 40) == pytest.approx(bits)


def test_invalid_input_raises_value_error():
  with pytest.raises(ValueError, match=r"codes must be in \(-1, 0, 1\).*\[2\]"):
    packing.pack_2bit(np.array([0, 2, 1], np.int8))
  with pytest.raises(ValueError, match=r"codes must be in \(-1, 1\).*\[0\]"):
    packing.pack_1bit(np.array([1, 0], np.int8))
  with pytest.raises(ValueError, match="n=9"):
    packing.unpack_2bit(packing.pack_2bit(np.zeros(8, np.int8)), 9)
  with pytest.raises(ValueError, match="uint8"):
    packing.unpack_base3(np.zeros(2, np.int32), 10)
  with pytest.raises(ValueError, match="not valid base3"):
    packing.unpack_base3(np.array([250], np.uint8), 5)
  with pytest.raises(ValueError, match="not valid 2bit"):
    packing.unpack_2bit(np.array([255], np.uint8), 4)               # digit 3 is no ternary code
  with pytest.raises(ValueError, match="axis=2"):
    packing.pack_2bit(np.zeros((2, 2), np.int8), axis=2)
  with pytest.raises(ValueError, match="scalar"):
    packing.pack_base3(np.int8(1))
  with pytest.raises(ValueError, match="fmt='4bit'"):
    packing.pack(np.zeros(4, np.int8), "4bit")


# ------------------------------------------------------------------------------------------------ model packing
def _model(variant="b158", groups=2, **kw):
  cfg = ModelConfig(variant=variant, vocab_size=64, d_model=80, n_heads=4, d_ff=160, n_layers=2, groups=groups,
                    **kw)
  return Transformer(cfg, rngs=nnx.Rngs(0))


def _bitlinears(model):
  return {"/".join(map(str, p)): n for p, n in nnx.iter_graph(model) if isinstance(n, BitLinear)}


@pytest.mark.parametrize("variant,fmt,want_fmt", [("b158", "2bit", "2bit"), ("b158", "base3", "base3"),
                                                  ("bitnet", "base3", "1bit")])
def test_dequantized_kernels_equal_quantized_kernel_exactly(variant, fmt, want_fmt):
  model = _model(variant)
  tree = packing.quantize_for_inference(model, fmt=fmt)
  layers = _bitlinears(model)
  assert set(tree["linear"]) == set(layers) and len(layers) == 2 * (7 if variant == "b158" else 6)
  assert {l.group_axis for l in layers.values()} == {"in", "out"}        # both group layouts are covered
  kernels = packing.dequantize(tree)
  for name, layer in layers.items():
    assert tree["linear"][name].codes.fmt == want_fmt and tree["linear"][name].codes.data.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(kernels[name]), np.asarray(layer.quantized_kernel()), err_msg=name)
  # Everything else is 16-bit and equals the parameter rounded to bf16.
  assert {"embed", "head", "final_norm/scale", "blocks/0/attn/q_proj/norm/scale"} <= set(tree["dense"])
  assert not any(name.endswith("kernel") for name in tree["dense"])
  assert all(v.dtype == jnp.bfloat16 for v in tree["dense"].values())
  np.testing.assert_array_equal(np.asarray(tree["dense"]["embed"]), np.asarray(model.embed[...], jnp.bfloat16))


def test_full_precision_model_keeps_every_kernel_dense():
  tree = packing.quantize_for_inference(_model("fp", groups=1))
  assert tree["linear"] == {} and "blocks/1/ffn/down_proj/kernel" in tree["dense"]


@pytest.mark.skipif("fsdp_groups" not in ModelConfig.__dataclass_fields__,
                    reason="this ModelConfig has no FSDP weight groups")
def test_block_grid_scales_of_fsdp_groups_dequantize_exactly():
  model = _model("b158", groups=2, fsdp_groups=4)
  tree = packing.quantize_for_inference(model, fmt="2bit")
  kernels = packing.dequantize(tree)
  for name, layer in _bitlinears(model).items():
    assert tree["linear"][name].scale.shape == tuple(layer.weight_groups), name      # e.g. (4, 2) or (2, 4)
    np.testing.assert_array_equal(np.asarray(kernels[name]), np.asarray(layer.quantized_kernel()), err_msg=name)


def test_save_and_load_round_trip(tmp_path):
  tree = packing.quantize_for_inference(_model(), fmt="base3")
  path = os.path.join(tmp_path, "packed.npz")
  packing.save_packed(tree, path)
  loaded = packing.load_packed(path)
  assert jax.tree.structure(loaded) == jax.tree.structure(tree)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(tree)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for name, kernel in packing.dequantize(loaded).items():
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(tree["linear"][name].kernel()))
  size, total = os.path.getsize(path), packing.packed_bytes(tree)["total_bytes"]
  assert total <= size <= total + 20_000, (size, total)            # stored packed; only npz headers on top


@pytest.mark.parametrize("variant,fmt,bits", [("b158", "2bit", 2.0), ("b158", "base3", 1.6), ("bitnet", "2bit", 1.0)])
def test_measured_bits_per_weight(variant, fmt, bits):
  """All output sizes (80, 160) are multiples of 4, 5 and 8, so the formats reach their nominal rate exactly."""
  model = _model(variant)
  sizes = packing.packed_bytes(packing.quantize_for_inference(model, fmt=fmt))
  n = sum(math.prod(l.kernel.shape) for l in _bitlinears(model).values())
  assert sizes["quantized_weights"] == n and sizes["bits_per_weight"] == pytest.approx(bits)
  assert sizes["scale_bytes"] == 4 * 2 * len(_bitlinears(model))                  # G = 2 float32 scales a layer
  assert sizes["dense_bytes"] == 2 * sizes["dense_params"]
  assert sizes["quantized_weights"] + sizes["dense_params"] == count_params(model.cfg)["total"]


def test_inference_weight_bytes_agrees_with_a_real_packing():
  cfg = ModelConfig(vocab_size=96, d_model=64, n_heads=4, d_ff=96, n_layers=2, groups=2)
  real = packing.packed_bytes(packing.quantize_for_inference(Transformer(cfg, rngs=nnx.Rngs(0)), fmt="base3"))
  est = packing.inference_weight_bytes(cfg, fmt="base3", embed_bits=16)
  for key in ("quantized_weights", "code_bytes", "scale_bytes", "dense_bytes", "total_bytes"):
    assert est[key] == real[key], key
  assert packing.inference_weight_bytes(cfg, embed_bits=8)["dense_bytes"] == real["dense_params"]


def test_b158_3b_fits_in_1_1_gb_in_base3():
  """b1.58 3B (FAQ Table 1): base3 codes + fp32 scales + 16-bit embedding/head/norms <= 1.1 GB; FP16 = 2 B/param."""
  cfg = preset("b158-3b")
  base3 = packing.inference_weight_bytes(cfg, fmt="base3", embed_bits=16)
  two_bit = packing.inference_weight_bytes(cfg, fmt="2bit", embed_bits=16)
  params = count_params(cfg)
  msg = (f"b158-3b: base3 {base3['total_bytes'] / 1e9:.3f} GB ({base3['bits_per_weight_with_scales']:.4f} bits per "
         f"quantised weight), 2bit {two_bit['total_bytes'] / 1e9:.3f} GB, FP16 {base3['fp16_bytes'] / 1e9:.3f} GB "
         f"(non-embedding {2 * params['non_embedding'] / 1e9:.3f} GB), params {base3['params'] / 1e9:.3f} B")
  print(msg)
  assert base3["total_bytes"] <= 1.1e9, msg
  assert base3["params"] == params["total"], msg
  assert base3["fp16_bytes"] == 2 * params["total"] and 6.0e9 <= base3["fp16_bytes"] <= 7.5e9, msg
  assert base3["bits_per_weight"] == pytest.approx(1.6) and two_bit["bits_per_weight"] == pytest.approx(2.0), msg
  assert base3["total_bytes"] < two_bit["total_bytes"] < base3["fp16_bytes"] / 4, msg


# ------------------------------------------------------------------------------------------------- int_matmul
INT_CASES = [  # (lead shape, K, N, groups, group_axis, per_token, weights)
    ((1,), 64, 48, 1, "out", True, "ternary"),
    ((3, 5), 96, 40, 4, "out", True, "ternary"),
    ((7,), 128, 33, 1, "out", False, "ternary"),
    ((2, 3), 120, 64, 2, "in", True, "ternary"),
    ((5,), 256, 24, 8, "in", False, "ternary"),
    ((4,), 64, 32, 2, "out", True, "binary"),
    ((9,), 1000, 17, 1, "out", True, "ternary"),
]


@pytest.mark.parametrize("lead,k,n,groups,group_axis,per_token,weights", INT_CASES)
def test_int_matmul_equals_fake_quant_matmul(lead, k, n, groups, group_axis, per_token, weights):
  x = jax.random.normal(jax.random.key(k), lead + (k,)) * 3
  w = jax.random.normal(jax.random.key(n), (k, n)) * 0.02
  x_groups = groups if group_axis == "in" else 1        # BitLinear: activation groups follow input-axis groups
  w_axis = 0 if group_axis == "in" else -1
  fq_w, to_codes = ((quant.ternary_weights, quant.ternary_codes) if weights == "ternary"
                    else (quant.binary_weights, quant.binary_codes))

  @jax.jit   # one compilation per case instead of one per eager op
  def both(x, w):
    want = quant.quantize_activations(x, per_token=per_token, groups=x_groups) @ fq_w(w, groups=groups, axis=w_axis)
    xc, xs = quant.activation_codes(x, per_token=per_token, groups=x_groups)
    wc, ws = to_codes(w, groups=groups, axis=w_axis)
    return want, packing.int_matmul(xc, xs, wc, ws), xc, xs, wc, ws

  want, got, xc, xs, wc, ws = jax.tree.map(np.asarray, both(x, w))
  assert got.shape == lead + (n,) and got.dtype == np.float32
  err = float(np.max(np.abs(got - want)))
  scale = float(np.max(np.abs(want)))
  print(f"int_matmul {lead} x [{k}, {n}] G={groups} {group_axis} per_token={per_token} {weights}: "
        f"max |diff| {err:.3g}, relative to max |y| {err / scale:.3g}")
  assert scale > 0 and err <= 2e-6 * scale, (err, scale)
  # And exactly the integer product, rescaled once, against a float64 oracle.
  xg = np.asarray(xc, np.float64).reshape(-1, x_groups if group_axis == "in" else 1, k // max(x_groups, 1))
  if group_axis == "out":
    exact = (np.asarray(xc, np.float64).reshape(-1, k) @ np.asarray(wc, np.float64)
             * np.broadcast_to(np.asarray(xs), lead + (1,)).reshape(-1, 1)
             * np.repeat(np.asarray(ws, np.float64).reshape(-1), n // groups)[None])
  else:
    wg = np.asarray(wc, np.float64).reshape(groups, k // groups, n)
    sx = np.broadcast_to(np.asarray(xs), lead + (groups,)).reshape(-1, groups)
    exact = sum((xg[:, g] @ wg[g]) * sx[:, g:g + 1] * float(np.asarray(ws).reshape(-1)[g]) for g in range(groups))
  np.testing.assert_allclose(got.reshape(-1, n), exact, rtol=1e-6, atol=1e-6 * scale)


def test_int_matmul_is_one_int8_dot_with_int32_result():
  xc = jax.ShapeDtypeStruct((4, 64), jnp.int8)
  wc = jax.ShapeDtypeStruct((64, 32), jnp.int8)
  jaxpr = jax.make_jaxpr(lambda a, b: packing.int_matmul(a, jnp.ones((4, 1)), b, jnp.ones((1, 2))))(xc, wc)
  dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
  assert len(dots) == 1
  assert [v.aval.dtype for v in dots[0].invars] == [jnp.int8, jnp.int8] and dots[0].outvars[0].aval.dtype == jnp.int32


def test_int_matmul_with_a_block_grid_of_weight_scales():
  """A (G_in, G_out) = (4, 2) grid with 2 activation groups: sums split into lcm(2, 4) = 4 parts along K."""
  rng = np.random.default_rng(5)
  xc = rng.integers(-128, 128, size=(3, 64)).astype(np.int8)
  wc = rng.integers(-1, 2, size=(64, 10)).astype(np.int8)
  xs = rng.uniform(0.01, 0.02, size=(3, 2)).astype(np.float32)
  ws = rng.uniform(0.5, 1.5, size=(4, 2)).astype(np.float32)
  x_full = xc * np.repeat(xs.astype(np.float64), 32, axis=1)                     # per-element scales
  w_full = wc * np.repeat(np.repeat(ws.astype(np.float64), 16, axis=0), 5, axis=1)
  got = np.asarray(packing.int_matmul(jnp.asarray(xc), xs, jnp.asarray(wc), ws))
  np.testing.assert_allclose(got, x_full @ w_full, rtol=1e-6, atol=1e-6 * np.abs(x_full @ w_full).max())


def test_int_matmul_rejects_bad_input():
  xc, wc = jnp.zeros((2, 8), jnp.int8), jnp.zeros((8, 4), jnp.int8)
  with pytest.raises(ValueError, match="w_codes must be int8"):
    packing.int_matmul(xc, 1.0, wc.astype(jnp.float32), jnp.ones((1, 1)))
  with pytest.raises(ValueError, match="do not contract"):
    packing.int_matmul(xc, 1.0, jnp.zeros((6, 4), jnp.int8), jnp.ones((1, 1)))
  with pytest.raises(ValueError, match="grid"):
    packing.int_matmul(xc, 1.0, wc, jnp.ones((1, 1, 1)))
  with pytest.raises(ValueError, match="6 parts"):            # lcm(3 activation groups, 2 row groups) = 6 !| 8
    packing.int_matmul(xc, jnp.ones((2, 3)), wc, jnp.ones((2, 1)))
