"""Tests for b1.58's successors: bitnet_jax/quant_successors.py (a4.8 / v2 absmean INT4 and top-K, ParetoQ SEQ),
bitnet_jax/hadamard.py (v2's H-BitLinear transform), their layer options and the a48 / v2_a8 / v2_a4 / b158_seq
variants, against the numpy oracles of tests/oracles.py."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from flax import nnx

import oracles
from bitnet_jax import data, hadamard, packing, train, weights
from bitnet_jax import quant_successors as qs
from bitnet_jax.interop import gguf, hf
from bitnet_jax.layers import ACT_QUANTIZERS, BitLinear, use_integer_matmul
from bitnet_jax.model import ModelConfig, Transformer
from bitnet_jax.step import _check_config, set_activation_stage
from configs import lm

SUCCESSORS = ("a48", "v2_a8", "v2_a4", "b158_seq")


def _normal(shape, seed=0, scale=1.0):
  return np.asarray(jax.random.normal(jax.random.key(seed), shape), np.float32) * np.float32(scale)


def _dyadic(shape, seed=0):
  """k / 64 with |k| <= 64: float32 sums of these are exact in any order, so means agree bit for bit."""
  return np.random.default_rng(seed).integers(-64, 65, size=shape).astype(np.float32) / np.float32(64)


# ---------------------------------------------------------------- the Hadamard transform (v2 eq. 3-4, 8)
@pytest.mark.parametrize("n", [1, 2, 4, 64, 256])
def test_hadamard_is_sylvesters_matrix_over_sqrt_n(n):
  x = _normal((3, n), seed=n)
  want = x.astype(np.float64) @ scipy.linalg.hadamard(n) / np.sqrt(n)
  np.testing.assert_allclose(np.asarray(hadamard.hadamard_transform(jnp.asarray(x))), want, rtol=0,
                             atol=4e-7 * np.abs(want).max() * np.log2(2 * n))


def test_hadamard_is_its_own_inverse_and_keeps_norms():
  x = _normal((4, 5, 128), seed=1, scale=3.0)
  y = hadamard.hadamard_transform(jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(hadamard.hadamard_transform(y)), x, rtol=0, atol=2e-6 * np.abs(x).max())
  np.testing.assert_allclose(np.linalg.norm(np.asarray(y), axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


@pytest.mark.parametrize("n, groups, block", [(1408, 1, 128), (96, 1, 32), (96, 3, 32), (128, 2, 64), (48, 2, 8)])
def test_other_widths_and_groups_are_block_diagonal_in_powers_of_two(n, groups, block):
  assert hadamard.block_size(n, groups) == block
  m = np.asarray(hadamard.hadamard_matrix(n, groups))
  want = scipy.linalg.block_diag(*[scipy.linalg.hadamard(block) / np.sqrt(block)] * (n // block))
  np.testing.assert_allclose(m, want, rtol=0, atol=1e-6)   # no block crosses a group (a tensor shard)
  np.testing.assert_allclose(m @ m, np.eye(n), rtol=0, atol=1e-5)


def test_hadamard_gradient_is_the_transform_of_the_cotangent():
  x, g = _normal((2, 64), seed=2), _normal((2, 64), seed=3)
  _, vjp = jax.vjp(hadamard.hadamard_transform, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(g))[0]), g @ scipy.linalg.hadamard(64) / 8, rtol=0,
                             atol=1e-5)


def test_hadamard_keeps_the_dtype_and_refuses_bad_input():
  x = jnp.asarray(_normal((2, 32)), jnp.bfloat16)
  assert hadamard.hadamard_transform(x).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="scalar"):
    hadamard.hadamard_transform(jnp.float32(1.0))
  with pytest.raises(ValueError, match="groups=3 must be a positive int dividing the width 32"):
    hadamard.hadamard_transform(x, groups=3)


def test_hadamard_spreads_an_outlier_channel():
  """What v2 uses it for: one channel 100x the others becomes a near-flat vector (max/mean |x| drops)."""
  x = _normal((8, 256), seed=4)
  x[:, 7] = 100.0
  y = np.asarray(hadamard.hadamard_transform(jnp.asarray(x)))
  ratio = lambda a: (np.abs(a).max(-1) / np.abs(a).mean(-1)).mean()
  assert ratio(x) > 50 and ratio(y) < 3, (ratio(x), ratio(y))


# ---------------------------------------------------------------- absmean INT4 activations (a4.8 eq. 7, v2 eq. 6)
@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("groups", [1, 2, 8])
def test_absmean_activations_equal_the_oracle_bitwise(bits, groups):
  x = _dyadic((3, 7, 64), seed=bits + groups)
  got = qs.absmean_activations(jnp.asarray(x), bits, groups=groups, exact=True)
  np.testing.assert_array_equal(np.asarray(got), oracles.absmean_activations(x, bits, groups))


def test_absmean4_codes_are_int4_with_scale_mean_over_sqrt7_and_clip_outliers():
  x = _normal((4, 128), seed=5)
  x[0, 3] = 50.0                                                     # an outlier far beyond sqrt(7) mean|x|
  codes, scale = qs.absmean_activation_codes(jnp.asarray(x))
  codes = np.asarray(codes)
  assert codes.dtype == np.int8 and codes.min() >= -8 and codes.max() <= 7 and scale.shape == (4, 1)
  np.testing.assert_allclose(np.asarray(scale)[:, 0], np.abs(x).mean(-1) / np.sqrt(7), rtol=1e-5)
  assert codes[0, 3] == 7
  fake = np.asarray(qs.absmean_activations(jnp.asarray(x)))
  np.testing.assert_allclose(codes * np.asarray(scale), fake, rtol=2 ** -22, atol=0)


def test_absmean_default_mode_equals_exact_mode_but_at_ties():
  x = _normal((16, 256), seed=6, scale=2.0)
  exact = np.asarray(qs.absmean_activations(jnp.asarray(x), exact=True))
  fast = np.asarray(qs.absmean_activations(jnp.asarray(x)))
  step = np.abs(x).mean(-1, keepdims=True) / np.sqrt(7)
  differ = ~np.isclose(fast, exact, rtol=1e-5, atol=0)
  assert differ.mean() < 0.01                                        # only values on a rounding tie move ...
  assert np.all(np.abs(fast - exact) <= step * (1 + 1e-4))           # ... and by one step


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_absmean_gradient_is_identity_and_edge_values_are_finite(dtype):
  x = jnp.asarray(_normal((2, 3, 32), seed=7), dtype)
  g = jax.grad(lambda x: jnp.sum(qs.absmean_activations(x).astype(jnp.float32) * 3.0))(x)
  assert g.dtype == dtype and np.all(np.asarray(g, np.float32) == 3.0)
  edge = jnp.asarray(np.stack([np.zeros(32), np.full(32, 1e-30), np.full(32, 3e38), np.r_[1e4, np.zeros(31)]]),
                     jnp.float32)
  out = np.asarray(qs.absmean_activations(edge))
  assert np.all(np.isfinite(out)) and np.all(out[0] == 0)


def test_absmean_refuses_bad_bits_and_groups():
  with pytest.raises(ValueError, match="bits must be an int from 2 to 8"):
    qs.absmean_activations(jnp.ones((2, 8)), 9)
  with pytest.raises(ValueError, match="groups=3 does not divide"):
    qs.absmean_activations(jnp.ones((2, 8)), groups=3)


# ---------------------------------------------------------------- top-K sparsification (a4.8 eq. 1)
@pytest.mark.parametrize("fraction, groups", [(0.5, 1), (0.5, 4), (0.25, 1), (1.0, 1)])
def test_topk_keeps_the_largest_magnitudes_per_token_and_group(fraction, groups):
  x = _normal((3, 5, 64), seed=8)
  got = np.asarray(qs.topk_sparsify(jnp.asarray(x), fraction, groups=groups))
  np.testing.assert_array_equal(got, oracles.topk(x, fraction, groups))
  kept = (got != 0).reshape(3, 5, groups, -1).sum(-1)
  assert np.all(kept == round(fraction * 64 / groups))


def test_topk_gradient_reaches_the_dropped_entries_too():
  """a4.8 section 2.2: the top-K function is bypassed in the backward pass (STE)."""
  x = jnp.asarray(_normal((2, 16), seed=9))
  g = jax.grad(lambda x: jnp.sum(qs.topk_sparsify(x) * 2.0))(x)
  assert np.all(np.asarray(g) == 2.0)


def test_topk_refuses_a_bad_fraction():
  for bad in (0.0, 1.5, -0.5, True):
    with pytest.raises(ValueError, match="fraction must be in"):
      qs.topk_sparsify(jnp.ones((2, 8)), bad)


def test_topk50_absmax8_is_topk_then_per_token_absmax():
  x = _normal((4, 64), seed=10, scale=2.0)
  got = ACT_QUANTIZERS["topk50_absmax8"].fake(jnp.asarray(x), groups=2, exact=True)
  np.testing.assert_array_equal(np.asarray(got), oracles.activations(oracles.topk(x, 0.5, 2), 8, True, 2))


# ---------------------------------------------------------------- ParetoQ SEQ ternary weights
def test_seq_values_and_codes_follow_the_official_formula():
  w = _normal((48, 16), seed=11, scale=0.02)
  alpha = jnp.asarray(np.abs(w).max(0) * np.linspace(0.3, 1.2, 16, dtype=np.float32))   # some clip, some not
  got = np.asarray(qs.seq_ternary_weights(jnp.asarray(w), alpha))
  np.testing.assert_allclose(got, oracles.seq_ternary(w, alpha), rtol=1e-6, atol=0)
  codes, scale = qs.seq_ternary_codes(jnp.asarray(w), alpha)
  assert set(np.unique(np.asarray(codes))) <= {-1, 0, 1} and scale.shape == (1, 16)
  np.testing.assert_allclose(np.asarray(scale)[0], np.asarray(alpha) * 2 / 3, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(codes) * np.asarray(scale), got)     # the codes form is exact
  # three equal bins of [-alpha, alpha], each mapped to its centre: thresholds at alpha / 3
  u = w / np.asarray(alpha)
  np.testing.assert_array_equal(np.asarray(codes), np.where(u > 1 / 3, 1, np.where(u < -1 / 3, -1, 0)))


def test_seq_gradients_are_the_masked_ste_and_the_lsq_scale_gradient():
  w = _normal((32, 8), seed=12, scale=0.05)
  alpha = jnp.asarray(np.abs(w).max(0) * 0.7)
  g = _normal((32, 8), seed=13)
  _, vjp = jax.vjp(qs.seq_ternary_weights, jnp.asarray(w), alpha)
  dw, dalpha = vjp(jnp.asarray(g))
  _, want_dw, want_dalpha = oracles.seq_ternary(w, alpha, g)
  np.testing.assert_array_equal(np.asarray(dw), want_dw.astype(np.float32))
  np.testing.assert_allclose(np.asarray(dalpha), want_dalpha, rtol=1e-5, atol=1e-7)
  assert np.any(np.asarray(dw) == 0) and np.any(np.asarray(dw) != 0)   # alpha 0.7 max|W| clips some weights


def test_seq_scale_learns_on_a_toy_regression():
  """Training W and alpha by gradient descent fits a target made of a ternary matrix (the STE and the alpha
  gradient together reduce the loss; alpha moves away from its max|W| start)."""
  rng = np.random.default_rng(0)
  target = rng.integers(-1, 2, size=(16, 4)).astype(np.float32) * 0.1
  x = jnp.asarray(rng.standard_normal((256, 16)).astype(np.float32))
  w0 = jnp.asarray(rng.standard_normal((16, 4)).astype(np.float32) * 0.05)
  params = {"w": w0, "alpha": qs.seq_init_scale(w0)}
  loss = lambda p: jnp.mean((x @ qs.seq_ternary_weights(p["w"], p["alpha"]) - x @ target) ** 2)
  step = jax.jit(lambda p: jax.tree.map(lambda a, b: a - 0.05 * b, p, jax.grad(loss)(p)))
  first = float(loss(params))
  for _ in range(300):
    params = step(params)
  assert float(loss(params)) < 0.1 * first
  assert not np.allclose(np.asarray(params["alpha"]), np.asarray(qs.seq_init_scale(w0)))


def test_seq_refuses_mismatched_scales_and_survives_a_zero_scale():
  with pytest.raises(ValueError, match="one scale per output channel"):
    qs.seq_ternary_weights(jnp.ones((4, 3)), jnp.ones((4,)))
  out = qs.seq_ternary_weights(jnp.ones((4, 3)), jnp.zeros((3,)))
  assert np.all(np.isfinite(np.asarray(out)))


# ---------------------------------------------------------------- layers and variants
def test_h_bitlinear_is_norm_then_hadamard_then_quantiser():
  layer = BitLinear(64, 32, act_quant="absmean4", input_transform="hadamard", norm="rms", exact=True,
                    rngs=nnx.Rngs(0))
  x = _normal((2, 3, 64), seed=14, scale=2.0)
  xn = oracles.rms_norm(x)
  want = oracles.absmean_activations(np.asarray(hadamard.hadamard_transform(jnp.asarray(xn))), 4)
  np.testing.assert_allclose(np.asarray(layer.prepare_input(jnp.asarray(x))), want, rtol=1e-6, atol=1e-6)
  w = np.asarray(layer.quantized_kernel())
  np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))), want @ w, rtol=1e-5, atol=1e-5)


def test_bitlinear_refuses_unknown_quantisers_and_transforms():
  with pytest.raises(ValueError, match="act_quant must be None or one of"):
    BitLinear(8, 8, act_quant="absmean3", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="input_transform must be None or one of"):
    BitLinear(8, 8, input_transform="fourier", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("variant", SUCCESSORS)
def test_integer_path_computes_each_layers_fake_quantised_forward(variant):
  """Per layer, on the same input: int8 codes x int8 codes with int32 sums, one rescale. (Across a whole model the
  two paths drift apart at rounding ties of the 4-bit quantisers, which amplify float32 rounding differences.)"""
  cfg = ModelConfig(variant=variant, vocab_size=64, d_model=64, n_layers=1, n_heads=4, max_seq_len=16)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  layers = [m for _, m in nnx.iter_graph(model) if isinstance(m, BitLinear)]
  assert use_integer_matmul(model) == len(layers) == 7                # q k v o gate up down
  for i, layer in enumerate(layers):
    x = jnp.asarray(_normal((2, 5, layer.kernel.shape[0]), seed=i, scale=2.0))
    got = np.asarray(layer(x))
    layer.integer = False
    fake = np.asarray(layer(x))
    np.testing.assert_allclose(got, fake, rtol=0, atol=2e-5 * np.abs(fake).max())


def test_variant_rows_set_each_projection_role():
  def roles(variant):
    block = Transformer(ModelConfig(variant=variant, d_model=64, n_layers=1, n_heads=4), rngs=nnx.Rngs(0)).blocks[0]
    return {name: (l.act_quant, l.act_bits, l.input_transform, l.weight_quant) for name, l in
            (("q", block.attn.q_proj), ("o", block.attn.o_proj), ("up", block.ffn.up_proj),
             ("down", block.ffn.down_proj))}
  assert roles("a48") == {"q": ("absmean4", 4, None, "ternary"), "o": ("topk50_absmax8", 8, None, "ternary"),
                          "up": ("absmean4", 4, None, "ternary"), "down": ("absmax8", 8, None, "ternary")}
  assert roles("v2_a4")["o"] == ("absmean4", 4, "hadamard", "ternary")
  assert roles("v2_a4")["q"] == ("absmean4", 4, None, "ternary")
  assert roles("v2_a8")["down"] == ("absmax8", 8, "hadamard", "ternary")
  assert roles("b158_seq")["q"] == (None, 8, None, "ternary_seq")
  assert roles("b158")["o"] == (None, 8, None, "ternary")
  assert ModelConfig(variant="a48").ffn == "relu2_glu" and ModelConfig(variant="v2_a4").ffn == "swiglu"


@pytest.mark.parametrize("overrides, match", [
    (dict(variant="b158", act_quant="absmean4"), "a named activation quantiser replaces act_bits"),
    (dict(variant="a48", act_quant_attn_out="topk"), "act_quant_attn_out must be None or one of"),
    (dict(variant="v2_a8", hadamard="yes"), "hadamard must be True or False"),
])
def test_model_config_refuses_conflicting_or_unknown_quantisers(overrides, match):
  with pytest.raises(ValueError, match=match):
    ModelConfig(**overrides)


def test_a_named_quantiser_on_b158_with_act_bits_off_is_allowed():
  cfg = ModelConfig(variant="b158", act_bits=None, act_quant="absmean4")
  assert cfg.act_quant_attn_out == cfg.act_quant_ffn_out == "absmean4" and cfg.quantized


def test_fine_tuning_an_fp_model_into_b158_seq_starts_alpha_at_max_abs_w():
  dims = dict(vocab_size=64, d_model=64, n_layers=1, n_heads=4)
  fp = Transformer(ModelConfig(variant="fp", **dims), rngs=nnx.Rngs(1))
  seq = Transformer(ModelConfig(variant="b158_seq", **dims), rngs=nnx.Rngs(2))
  report = weights.init_from(seq, fp)
  assert any(p.endswith("q_proj/weight_scale") for p in report["kept_init"])
  q = seq.blocks[0].attn.q_proj
  np.testing.assert_array_equal(np.asarray(q.kernel[...]), np.asarray(fp.blocks[0].attn.q_proj.kernel[...]))
  np.testing.assert_array_equal(np.asarray(q.weight_scale[...]), np.abs(np.asarray(q.kernel[...])).max(0))


@pytest.mark.parametrize("variant", SUCCESSORS)
def test_hf_and_gguf_exports_refuse_the_successors_by_field(variant, tmp_path):
  cfg = ModelConfig(variant=variant, vocab_size=64, d_model=64, n_layers=1, n_heads=4, linear_norm=None,
                    block_norm="rms", sub_norms=True, tie_embeddings=True)
  field = "weight_quant" if variant == "b158_seq" else "act_quant"
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=f"ModelConfig.{field}="):
    hf.save(model, tmp_path / "hf")
  with pytest.raises(ValueError, match=f"ModelConfig.{field}="):
    gguf.export(model, tmp_path / "m.gguf")


def test_packing_ships_seq_codes_with_their_learned_scales():
  model = Transformer(ModelConfig(variant="b158_seq", vocab_size=64, d_model=64, n_layers=1, n_heads=4),
                      rngs=nnx.Rngs(0))
  tree = packing.quantize_for_inference(model)
  assert not any(name.endswith("weight_scale") for name in tree["dense"])
  q = model.blocks[0].attn.q_proj
  np.testing.assert_array_equal(np.asarray(packing.dequantize(tree)["blocks/0/attn/q_proj"]),
                                np.asarray(q.quantized_kernel()))


# ---------------------------------------------------------------- the two-stage recipe (a4.8 / v2 section 3)
def test_activation_stage_switches_every_named_quantiser_and_back():
  model = Transformer(ModelConfig(variant="a48", d_model=64, n_layers=2, n_heads=4), rngs=nnx.Rngs(0))
  layers = [m for _, m in nnx.iter_graph(model) if isinstance(m, BitLinear)]
  before = [(l.act_quant, l.act_bits) for l in layers]
  assert set_activation_stage(model, "absmax8") == len(layers) == 14
  assert {(l.act_quant, l.act_bits) for l in layers} == {("absmax8", 8)}
  set_activation_stage(model, None)
  assert [(l.act_quant, l.act_bits) for l in layers] == before
  b158 = Transformer(ModelConfig(variant="b158", d_model=64, n_layers=1, n_heads=4), rngs=nnx.Rngs(0))
  assert set_activation_stage(b158, "absmax8") == 0   # absmax through act_bits: nothing named to switch


def test_two_stage_run_switches_at_its_step_and_resumes_across_the_switch_exactly(tmp_path):
  """8 steps, stage 2 from step 5 (fraction 0.5): stopping at step 3 and resuming gives the straight run's losses
  bitwise; the switch matters (a run without stage 1 differs from step 1, and the stage-1 run equals a
  v2_a8-style all-absmax8 run up to the switch)."""
  def config(fraction):
    c = lm.get_config("v2-a4-tiny")
    c.train.update(dict(steps=8, eval_every=4, checkpoint_every=3, log_every=1, act_stage1_fraction=fraction))
    c.data.eval_batches = 1
    return c

  def losses(workdir):
    return [(r["step"], r["loss"]) for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())]

  train.train_and_evaluate(config(0.5), tmp_path / "straight", progress=False)
  train.train_and_evaluate(config(0.5), tmp_path / "resumed", progress=False, stop_at_step=3)
  train.train_and_evaluate(config(0.5), tmp_path / "resumed", progress=False)
  assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
  train.train_and_evaluate(config(0.0), tmp_path / "one_stage", progress=False)
  a8 = config(0.0)
  a8.model.act_quant = a8.model.act_quant_attn_out = a8.model.act_quant_ffn_out = "absmax8"
  train.train_and_evaluate(a8, tmp_path / "a8", progress=False)
  straight, one, eight = losses(tmp_path / "straight"), losses(tmp_path / "one_stage"), losses(tmp_path / "a8")
  assert straight[0] != one[0]                       # stage 1 is not the 4-bit model
  assert straight[:4] == eight[:4]                   # stage 1 is the 8-bit model (steps 1-4) ...
  assert straight[4:] != eight[4:]                   # ... and stage 2 is not


def test_two_stage_options_are_checked():
  for variant, update, match in [
      ("b158-tiny", dict(act_stage1_fraction=0.5), "has none"),
      ("a48-tiny", dict(act_stage1_fraction=1.0), r"a number in \[0, 1\)"),
      ("a48-tiny", dict(stage1_act_quant="absmax4"), "stage1_act_quant must be one of")]:
    c = lm.get_config(variant)
    c.train.update(update)
    cfg = ModelConfig(**c.model.to_dict())
    with pytest.raises(ValueError, match=match):
      _check_config(c, cfg, data.ByteTokenizer(), 1)


@pytest.mark.parametrize("name, dims, lrs", [
    ("a48-7b", (4096, 11008, 32, 32), (1e-3, 6e-4)),          # a4.8 Tables 6-7
    ("a48-3b", (3200, 8640, 32, 26), (1.2e-3, 6.4e-4)),
    ("v2-a4-400m", (1024, 4096, 16, 24), (1.8e-3, 1.2e-3)),   # v2 Tables 8-9
    ("v2-a8-1.3b", (2048, 8192, 32, 18), (1.2e-3, 8e-4)),
])
def test_the_papers_presets_and_their_two_stage_learning_rates(name, dims, lrs):
  config = lm.get_config(name)
  m = config.model
  assert (m.d_model, m.d_ff, m.n_heads, m.n_layers) == dims
  assert (config.optim.recipe, config.optim.lr, config.optim.lr2) == ("b158", *lrs)
  assert config.train.act_stage1_fraction == (0.0 if m.variant == "v2_a8" else 0.95)
