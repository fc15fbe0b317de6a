"""Tests for bitnet_jax/layers.py: BitLinear against the explicit formulas of BitNet eq. 11-12 and the FAQ code."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import oracles
from bitnet_jax import quant
from bitnet_jax.layers import BitLinear, Norm


def _x(shape, seed=0):
  return np.asarray(jax.random.normal(jax.random.key(seed), shape), np.float32) * np.float32(2.0)


def _kernel(layer):
  return np.asarray(layer.kernel[...])


def test_quantisation_off_is_a_plain_dense_layer_bitwise():
  layer = BitLinear(32, 48, weight_quant="none", act_bits=None, norm=None, rngs=nnx.Rngs(0))
  x = jnp.asarray(_x((4, 5, 32)))
  np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(jnp.einsum("...i,io->...o", x, layer.kernel[...])))
  np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(x) @ _kernel(layer), rtol=1e-5, atol=1e-5)


def test_b158_bitlinear_matches_the_faq_reference_forward():
  """FAQ reference: x_n = RMSNorm(x); y = activation_quant(x_n) @ weight_quant(W) (gain 1 at init)."""
  layer = BitLinear(64, 32, weight_quant="ternary", act_bits=8, norm="rms", rngs=nnx.Rngs(1))
  x = _x((3, 7, 64), seed=1)
  want = oracles.activations(oracles.rms_norm(x)) @ oracles.ternary(_kernel(layer))
  np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)


def test_bitnet_bitlinear_matches_paper_eq_11_12():
  """y = W~ Quant(LN(x)) * beta * gamma / Q_b, with per-tensor absmax and Sign(W - alpha)."""
  layer = BitLinear(64, 32, weight_quant="binary", act_bits=8, act_per_token=False, norm="layer",
                    rngs=nnx.Rngs(2))
  x = _x((3, 7, 64), seed=2)
  w = _kernel(layer)
  ln = oracles.layer_norm(x)
  gamma, q = np.abs(ln).max(), 127.0
  x_codes = np.clip(np.round(ln * (q / gamma)), -128, 127)
  w_codes = np.where(w - w.mean() > 0, 1.0, -1.0)
  want = (x_codes @ w_codes) * np.abs(w).mean() * gamma / q
  np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("weight_quant", ["ternary", "binary"])
def test_row_parallel_groups_equal_the_sum_of_independent_shards(weight_quant):
  """group_axis="in": each of G input-feature shards is normed, quantised and multiplied on its own, then summed
  (what a row-parallel layer computes with one partial matmul per device and no statistic exchange)."""
  G = 4
  layer = BitLinear(64, 24, weight_quant=weight_quant, act_bits=8, groups=G, group_axis="in", norm="rms",
                    norm_scale=False, rngs=nnx.Rngs(3))
  x, w = _x((2, 5, 64), seed=3), _kernel(layer)
  wq = oracles.ternary if weight_quant == "ternary" else oracles.binary
  want = sum(oracles.activations(oracles.rms_norm(xs)) @ wq(w[idx[-1]]) for idx, xs in oracles.groups_view(x, G, -1))
  np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)


def test_column_parallel_groups_equal_concatenated_shards():
  """group_axis="out": each output shard has its own weight scale; activations are shared (not grouped)."""
  G = 3
  layer = BitLinear(32, 48, weight_quant="ternary", act_bits=8, groups=G, group_axis="out", norm=None,
                    rngs=nnx.Rngs(4))
  x, w = _x((6, 32), seed=4), _kernel(layer)
  xq = oracles.activations(x)
  want = np.concatenate([xq @ oracles.ternary(ws) for _, ws in oracles.groups_view(w, G, -1)], axis=-1)
  np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)


def test_kernel_gradient_is_the_straight_through_estimator():
  """dL/dW = x_q^T dL/dy: the quantised input's outer product with the cotangent, as if W were unquantised."""
  layer = BitLinear(16, 8, weight_quant="ternary", act_bits=8, norm=None, rngs=nnx.Rngs(5))
  x, cot = _x((10, 16), seed=5), _x((10, 8), seed=6)
  grads = nnx.grad(lambda m: jnp.sum(m(jnp.asarray(x)) * cot))(layer)
  np.testing.assert_allclose(np.asarray(grads.kernel[...]), oracles.activations(x).T @ cot, rtol=1e-5, atol=1e-5)


def test_gradients_reach_kernel_and_norm_gain():
  layer = BitLinear(16, 8, weight_quant="binary", act_bits=8, norm="layer", rngs=nnx.Rngs(7))
  grads = nnx.grad(lambda m: jnp.sum(m(jnp.asarray(_x((4, 16), seed=7))) ** 2))(layer)
  assert float(jnp.abs(grads.kernel[...]).sum()) > 0
  assert float(jnp.abs(grads.norm.scale[...]).sum()) > 0


def test_bf16_compute_keeps_float32_latent_weights():
  layer = BitLinear(32, 16, dtype=jnp.bfloat16, norm="rms", rngs=nnx.Rngs(8))
  y = layer(jnp.asarray(_x((2, 32))))
  assert y.dtype == jnp.bfloat16 and layer.kernel[...].dtype == jnp.float32
  ref = BitLinear(32, 16, dtype=jnp.float32, norm="rms", rngs=nnx.Rngs(8))(jnp.asarray(_x((2, 32))))
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref), rtol=3e-2, atol=3e-2)


def test_grouped_norm_normalises_each_group():
  x = _x((3, 12), seed=9)
  y = np.asarray(Norm(12, kind="rms", groups=3, use_scale=False)(jnp.asarray(x)))
  for idx, xs in oracles.groups_view(x, 3, -1):
    np.testing.assert_allclose(y[idx], oracles.rms_norm(xs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(weight_quant="quaternary"), "weight_quant must be one of"),
    (dict(act_bits=16), "act_bits must be None or an int from 2 to 8"),
    (dict(groups=5), r"groups=5 must divide the output features \(24\)"),
    (dict(groups=5, group_axis="in"), r"groups=5 must divide the input features \(16\)"),
    (dict(group_axis="rows"), "group_axis must be 'in' or 'out'"),
    (dict(norm="batch"), "Norm kind must be one of"),
])
def test_bad_bitlinear_arguments_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    BitLinear(16, 24, rngs=nnx.Rngs(0), **kwargs)


# ---------------------------------------------------------------- the integer (deployed) matmul
@pytest.mark.parametrize("kwargs", [
    dict(weight_quant="ternary"),
    dict(weight_quant="binary", act_per_token=False),
    dict(weight_quant="ternary", groups=4, group_axis="out", fsdp_groups=2),
    dict(weight_quant="ternary", groups=4, group_axis="in", norm="rms"),
])
def test_integer_matmul_equals_the_fake_quantised_layer(kwargs):
  layer = BitLinear(64, 32, rngs=nnx.Rngs(3), **kwargs)
  x = jax.random.normal(jax.random.key(4), (3, 5, 64)) * 2.0
  fake = layer(x)
  layer.integer = True
  got = layer(x)
  rel = float(jnp.max(jnp.abs(got - fake)) / jnp.max(jnp.abs(fake)))
  assert rel < 2e-6, rel   # int32 sums then one rescale vs float32 sums of de-quantised values


def test_integer_model_matches_the_training_forward():
  from bitnet_jax.layers import use_integer_matmul
  from bitnet_jax.model import ModelConfig, Transformer
  cfg = ModelConfig(variant="b158", vocab_size=264, d_model=64, n_layers=2, n_heads=4, max_seq_len=64)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (4, 32), 0, 264)
  fake = model(tokens)
  assert use_integer_matmul(model) == 7 * cfg.n_layers
  got = model(tokens)
  rel = float(jnp.max(jnp.abs(got - fake)) / jnp.max(jnp.abs(fake)))
  print(f"integer vs fake-quantised forward: max |logit diff| / max |logit| = {rel:.2e}")
  assert rel < 1e-5 and bool(jnp.all(jnp.argmax(got, -1) == jnp.argmax(fake, -1)))
  assert use_integer_matmul(model, on=False) == 7 * cfg.n_layers
  np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(fake))


def test_integer_matmul_refuses_an_unquantised_layer():
  layer = BitLinear(16, 8, weight_quant="none", act_bits=None, rngs=nnx.Rngs(0))
  layer.integer = True
  with pytest.raises(ValueError, match="integer matmul needs quantised weights"):
    layer(jnp.ones((2, 16)))


def test_quant_mix_moves_from_the_latent_to_the_quantised_forward_with_an_identity_gradient():
  from bitnet_jax.layers import mix_quantized, set_quant_mix
  x = jax.random.normal(jax.random.key(0), (4, 32))
  q = quant.quantize_activations(x, 8)
  for lam in (0.0, 0.25, 1.0):
    y = mix_quantized(x, q, jnp.float32(lam))
    np.testing.assert_allclose(np.asarray(y), np.asarray(x + lam * (q - x)), rtol=0, atol=1e-6)
    g = jax.grad(lambda v: jnp.sum(mix_quantized(v, quant.quantize_activations(v, 8), jnp.float32(lam)) * x))(x)
    np.testing.assert_allclose(np.asarray(g), np.asarray(x), rtol=1e-6)   # the straight-through identity
  np.testing.assert_array_equal(np.asarray(mix_quantized(x, q, jnp.float32(1.0))), np.asarray(q))   # exact at 1
  np.testing.assert_array_equal(np.asarray(mix_quantized(x, q, jnp.float32(0.0))), np.asarray(x))   # exact at 0
  # A BitLinear with a warm-up weight: lambda 1 is the quantised layer, lambda 0 the unquantised one, bitwise.
  mixed = BitLinear(32, 16, quant_mix=True, norm=None, rngs=nnx.Rngs(1))
  quantised = BitLinear(32, 16, norm=None, rngs=nnx.Rngs(1))
  plain = BitLinear(32, 16, weight_quant="none", act_bits=None, norm=None, rngs=nnx.Rngs(1))
  np.testing.assert_array_equal(np.asarray(mixed(x)), np.asarray(quantised(x)))
  assert set_quant_mix(mixed, 0.0) == 1
  np.testing.assert_array_equal(np.asarray(mixed(x)), np.asarray(plain(x)))
  assert BitLinear(32, 16, rngs=nnx.Rngs(1)).quant_mix is None   # off by default: no extra state
