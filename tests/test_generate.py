"""Tests for bitnet_jax/generate.py and bitnet_jax/kv_cache.py: cached decoding against the full forward, sampling,
quantised caches, errors, the CLI, and experiments/kv_cache.py in smoke mode."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bitnet_jax import generate, kv_cache
from bitnet_jax.model import ModelConfig, Transformer
from jaxprs import equations

ROOT = Path(__file__).resolve().parents[1]
# init_std 0.1 (not 0.02) spreads the logits of an untrained model, so greedy choices are not near-ties.
TINY = dict(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, dtype="float32",
            init_std=0.1)
B, P, N = 2, 5, 12   # batch, prompt length, new tokens
# Cached decoding and the full forward compute ulp-different values (other shapes, other reduction orders; the
# inference form's integer dots), so a value at a rounding tie of an activation or KV quantiser can land on the
# neighbouring code. Measured on these tiny models (Intel Xeon, AVX-512): such a flip moves the logits by up to 0.04,
# at a few positions; everything else agrees to float32 ulps. TIE bounds a flip's effect with margin.
TIE = 0.1


def _assert_greedy_up_to_ties(full: np.ndarray, new_tokens: np.ndarray) -> None:
  """Each new token is the argmax of the full forward's logits `full` at the position before it, or (at a
  near-tie the cached path resolved the other way) within TIE of it; at least 90% are the argmax itself."""
  chosen = np.take_along_axis(full, new_tokens[..., None], -1)[..., 0]
  short = full.max(-1) - chosen
  assert short.max() <= TIE and (short == 0).mean() >= 0.9, (short.max(), (short == 0).mean())


def _model(variant: str, **overrides) -> Transformer:
  return Transformer(ModelConfig(**{**TINY, **overrides}, variant=variant), rngs=nnx.Rngs(0))


def _prompt(batch: int = B, length: int = P, seed: int = 1) -> jax.Array:
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, TINY["vocab_size"], jnp.int32)


def _reference(variant: str, **overrides) -> Transformer:
  """The full-forward model whose function cached decoding must compute: BitNet at inference uses per-token
  activation scales (its training form is per tensor), with the same weights (same seed)."""
  return _model(variant, **({"act_per_token": True} if variant == "bitnet" else {}), **overrides)


@nnx.jit
def _forward(model, tokens):   # jitted: an eager forward compiles op by op, ~5x slower here
  return model(tokens)


@nnx.jit
def _decode(model, tokens, cache):
  return model.decode(tokens, cache)


# ---------------------------------------------------------------- cached decoding == the full forward
@pytest.mark.parametrize("variant, scan", [("fp", False), ("b158", False), ("bitnet", False), ("b158", True),
                                           ("a48", False), ("v2_a4", False), ("v2_a8", True), ("b158_seq", False)])
def test_cached_greedy_tokens_are_the_full_forward_argmax(variant, scan):
  model = _model(variant, scan_layers=scan)   # scan: decoded in the stacked form (one lax.scan over the layers)
  out = np.asarray(generate.generate(model, _prompt(), N, kv_dtype="float32"))
  assert out.shape == (B, P + N) and out.dtype == np.int32
  np.testing.assert_array_equal(out[:, :P], np.asarray(_prompt()))
  full = np.asarray(_forward(_reference(variant), jnp.asarray(out[:, :-1])))   # (B, P + N - 1, V)
  _assert_greedy_up_to_ties(full[:, P - 1:], out[:, P:])   # token t+1 = argmax at position t


@pytest.mark.parametrize("variant", ["fp", "b158"])
def test_prefill_and_step_logits_match_the_full_forward(variant):
  tokens = _prompt(length=P + N - 1, seed=2)
  full = np.asarray(_forward(_model(variant), tokens))
  model = generate.inference_form(_model(variant))
  cache = model.init_cache(B, P + N - 1, "float32")
  prefill, cache = _decode(model, tokens[:, :P], cache)
  steps = []
  for t in range(P, P + N - 1):
    logits, cache = _decode(model, tokens[:, t:t + 1], cache)
    steps.append(np.asarray(logits[:, 0]))
  assert int(cache.pos) == P + N - 1
  dev = np.abs(np.concatenate([np.asarray(prefill), np.stack(steps, 1)], 1) - full).max(-1)   # per position
  assert dev.max() <= (2e-5 if variant == "fp" else TIE), dev   # b158: ulps, but where a code flipped at a tie


def test_inference_form_keeps_the_function_and_the_original_model():
  model = _model("b158")
  latent = np.asarray(model.blocks[0].attn.q_proj.kernel[...])
  frozen = generate.inference_form(model)
  assert frozen.blocks[0].attn.q_proj.weight_quant == "none" and model.blocks[0].attn.q_proj.weight_quant == "ternary"
  np.testing.assert_array_equal(np.asarray(model.blocks[0].attn.q_proj.kernel[...]), latent)
  assert len(np.unique(np.asarray(frozen.blocks[0].attn.q_proj.kernel[...]))) == 3   # {-s, 0, +s}
  tokens = _prompt(length=P + N - 1)
  np.testing.assert_array_equal(np.asarray(_forward(frozen, tokens)), np.asarray(_forward(model, tokens)))
  assert generate.inference_form(frozen) is frozen


@pytest.mark.parametrize("variant", ["b158", "bitnet"])
def test_packed_form_is_the_integer_path_bit_for_bit_and_decodes_the_same_tokens(variant):
  from bitnet_jax.layers import use_integer_matmul
  model = _reference(variant)
  packed = generate.inference_form(model, "packed")
  from bitnet_jax.layers import BitLinear
  layers = [m for _, m in nnx.iter_graph(packed) if isinstance(m, generate.PackedLinear)]
  quantised = [m for _, m in nnx.iter_graph(model) if isinstance(m, BitLinear) and m.weight_quant != "none"]
  assert len(layers) == len(quantised) >= 6 * TINY["n_layers"]   # q, k, v, o, (gate,) up, down in every block
  assert not any(isinstance(m, BitLinear) for _, m in nnx.iter_graph(packed))
  q = packed.blocks[0].attn.q_proj
  assert q.packed[...].dtype == jnp.uint8 and q.packed[...].shape == (64, 16)   # 2 bits per weight
  # The deployed form equals the BitLinear integer path (int8 x int8 -> int32, one rescale) exactly ...
  integer = nnx.clone(_reference(variant))
  assert use_integer_matmul(integer) == len(layers)
  tokens = _prompt(length=P + N - 1)
  got = np.asarray(_forward(packed, tokens))
  np.testing.assert_array_equal(got, np.asarray(_forward(integer, tokens)))
  # ... and the fake-quantised (dense) form up to float32 rounding, with the same greedy tokens.
  dense = np.asarray(_forward(generate.inference_form(model, "dense"), tokens))
  np.testing.assert_allclose(got, dense, rtol=0, atol=1e-4 * np.abs(dense).max())
  np.testing.assert_array_equal(np.asarray(generate.generate(packed, _prompt(), N, kv_dtype="float32")),
                                np.asarray(generate.generate(model, _prompt(), N, kv_dtype="float32")))


def test_inference_form_choices_and_errors():
  assert jax.default_backend() == "cpu"   # "auto" is dense here (packed on GPU/TPU, where the kernel runs)
  auto = generate.inference_form(_model("b158"))
  assert not any(isinstance(m, generate.PackedLinear) for _, m in nnx.iter_graph(auto))
  fp = generate.inference_form(_model("fp"), "packed")   # nothing quantised: nothing to pack
  assert not any(isinstance(m, generate.PackedLinear) for _, m in nnx.iter_graph(fp))
  with pytest.raises(ValueError, match="weights must be one of"):
    generate.inference_form(_model("b158"), "int2")
  with pytest.raises(ValueError, match="symmetric quantised activations"):
    generate.PackedLinear(_model("fp").blocks[0].attn.q_proj)


# ---------------------------------------------------------------- stacked blocks: one lax.scan over the layers
def test_stacked_form_stores_every_block_once_with_a_layer_axis():
  model = _model("b158", n_layers=3)
  stacked = generate.inference_form(model, "dense", "stacked")
  assert len(stacked.blocks) == 0 and len(model.blocks) == 3 and model.layer_stack is None
  q = stacked.layer_stack.attn.q_proj.kernel
  assert q.shape == (3, 64, 64) and q.get_metadata()["out_sharding"] == (None, "embed", "heads")
  for i, block in enumerate(generate.inference_form(model, "dense").blocks):   # layer i is the unrolled block i
    np.testing.assert_array_equal(np.asarray(q[...][i]), np.asarray(block.attn.q_proj.kernel[...]))
  cache = stacked.init_cache(B, 16, "int4")
  assert cache.stacked and cache.n_layers == 3 and cache.max_len == 16 and cache.layers[0].k.shape == (3, B, 16, 2, 8)
  assert cache.nbytes == model.init_cache(B, 16, "int4").nbytes
  assert generate.inference_form(stacked) is stacked
  auto = generate.inference_form(_model("fp", scan_layers=True))   # "auto": stacked iff cfg.scan_layers
  assert auto.layer_stack is not None and len(auto.blocks) == 0


def test_a_stacked_cache_write_touches_only_its_layer_and_positions():
  cache = kv_cache.init_cache(n_layers=3, batch=2, max_len=6, n_kv_heads=2, head_dim=4, kind="int8", stacked=True)
  k = jax.random.normal(jax.random.key(0), (2, 2, 2, 4))
  layer = jax.jit(lambda c, k: c.layers[0].replace(index=jnp.int32(1)).write(k, -k, jnp.int32(3)))(cache, k)
  written = np.array(layer.k)
  assert np.abs(written[1, :, 3:5]).sum() > 0
  written[1, :, 3:5] = 0
  assert not written.any()                                          # nothing else changed
  got_k, got_v = layer.read(jnp.float32)                            # the view reads layer 1, [B, L, K, Dh]
  ref_k, ref_v = kv_cache.init_cache(n_layers=1, batch=2, max_len=6, n_kv_heads=2, head_dim=4,
                                     kind="int8").layers[0].write(k, -k, 3).read(jnp.float32)
  # The jitted write and the eager one may form the int8 scale 1 / s in another order (the quantisers' default
  # mode, `quant`): the same codes, the values within 2 float32 roundings.
  np.testing.assert_allclose(np.asarray(got_k), np.asarray(ref_k), rtol=2.5e-7, atol=0)
  np.testing.assert_allclose(np.asarray(got_v), np.asarray(ref_v), rtol=2.5e-7, atol=0)


@pytest.mark.parametrize("variant, weights, kind", [("b158", "packed", "int4"), ("fp", "dense", "bfloat16")])
def test_stacked_decoding_equals_the_unrolled_one(variant, weights, kind):
  model = _model(variant, n_layers=3)
  unrolled = generate.inference_form(model, weights, "unrolled")
  stacked = generate.inference_form(model, weights, "stacked")
  tokens = _prompt(length=P + N - 1, seed=7)
  np.testing.assert_allclose(np.asarray(_forward(stacked, tokens)), np.asarray(_forward(unrolled, tokens)),
                             rtol=0, atol=1e-5)
  caches = [m.init_cache(B, P + N - 1, kind) for m in (unrolled, stacked)]
  logits = [[], []]
  for t0, t1 in [(0, P)] + [(t, t + 1) for t in range(P, P + 3)]:   # prefill, then single-token steps
    for j, m in enumerate((unrolled, stacked)):
      out, caches[j] = _decode(m, tokens[:, t0:t1], caches[j])
      logits[j].append(np.asarray(out))
  np.testing.assert_allclose(np.concatenate(logits[1], 1), np.concatenate(logits[0], 1), rtol=0, atol=1e-5)
  for i in range(3):   # layer i of the stacked cache holds what the unrolled layer i holds
    np.testing.assert_array_equal(np.asarray(caches[1].layers[0].k[i]), np.asarray(caches[0].layers[i].k))
  if weights == "packed":   # the layer scan passes the 7 linears' codes whole (the kernel indexes them), slices none
    scan = _find_scan(jax.make_jaxpr(lambda t, c: stacked.decode(t, c))(tokens[:, :1], caches[1]).jaxpr)
    consts = scan.invars[:scan.params["num_consts"]]
    scanned = scan.invars[scan.params["num_consts"] + scan.params["num_carry"]:]
    assert sum(v.aval.dtype == jnp.uint8 and v.aval.ndim == 3 and v.aval.shape[0] == 3 for v in consts) == 7
    assert not any(v.aval.dtype == jnp.uint8 for v in scanned)


def _find_scan(jaxpr):
  """The first lax.scan equation in a jaxpr or the jaxprs nested in it."""
  return next(eqn for eqn in equations(jaxpr) if eqn.primitive.name == "scan")


def test_the_stacked_packed_decoder_lowers_for_gpus_with_one_block_of_kernels_whatever_the_depth(monkeypatch):
  """What a GPU compiles: the generate program lowered for CUDA (no GPU needed) holds a Triton kernel call per
  packed linear per block in the program, so n_layers times more unrolled than stacked (a 26-layer 3B decoder:
  2 x 26 x 7 = 364 kernels against 14). Each stacked call takes the layer index and the whole stack of its
  linear's codes (4 layers x K rows), so no decode step copies a layer's weights out of the stack."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")   # kernels.matmul: the compiled Pallas kernel
  counts, signatures = {}, {}
  for layers in ("unrolled", "stacked"):
    cfg = ModelConfig(**{**TINY, "n_layers": 4, "d_model": 128}, variant="b158")
    model = nnx.eval_shape(lambda: generate.inference_form(Transformer(cfg, rngs=nnx.Rngs(0)), "packed", layers))
    graphdef, state = nnx.split(model)
    program = jax.jit(lambda state, prompt: generate.generate_program(
        nnx.merge(graphdef, state), prompt, jnp.int32(0), 4, "bfloat16", generate.Sampler()))
    text = program.trace(state, jax.ShapeDtypeStruct((1, P), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
    counts[layers] = text.count("xla.gpu.triton")
    signatures[layers] = [line.rsplit(" : ", 1)[-1] for line in text.splitlines() if "xla.gpu.triton" in line]
  assert counts == {"unrolled": 2 * 4 * 7, "stacked": 2 * 7}, counts   # prefill + step; q, k, v, o, gate, up, down
  for layers, stack in (("unrolled", 1), ("stacked", 4)):
    for signature in signatures[layers]:   # (layer index,) x codes (M, K), weights (stack * K, P) -> partial sums
      k = int(re.search(r"tensor<\d+x(\d+)xi8>", signature).group(1))
      rows = int(re.search(r"tensor<(\d+)x\d+xui8>", signature).group(1))
      assert rows == stack * k and signature.startswith("(tensor<1xi32>") == (layers == "stacked"), signature


def test_stacked_and_per_layer_caches_and_forms_are_not_mixed():
  unrolled = generate.inference_form(_model("b158"), "dense", "unrolled")
  stacked = generate.inference_form(_model("b158"), "dense", "stacked")
  with pytest.raises(ValueError, match="a stacked KV cache for a model whose blocks are per layer"):
    _decode(unrolled, _prompt(), stacked.init_cache(B, 16))
  with pytest.raises(ValueError, match="a per-layer KV cache for a model whose blocks are stacked"):
    _decode(stacked, _prompt(), unrolled.init_cache(B, 16))
  with pytest.raises(ValueError, match="the KV cache has 3 layers, the model 2"):
    _decode(unrolled, _prompt(), _model("b158", n_layers=3).init_cache(B, 16))
  with pytest.raises(ValueError, match="layers='unrolled' for a model whose blocks are already stacked"):
    generate.inference_form(stacked, "dense", "unrolled")
  with pytest.raises(ValueError, match="layers must be one of"):
    generate.inference_form(_model("b158"), "dense", "scan")
  from bitnet_jax import packing
  with pytest.raises(ValueError, match="quantize_for_inference: this model's blocks are stacked"):
    packing.quantize_for_inference(stacked)


# ---------------------------------------------------------------- quantised caches
def test_int4_packing_round_trips_every_code():
  codes = jnp.asarray(np.arange(-8, 8, dtype=np.int8).reshape(2, 8))
  packed = kv_cache.pack_int4(codes)
  assert packed.shape == (2, 4) and packed.dtype == jnp.uint8
  np.testing.assert_array_equal(np.asarray(kv_cache.unpack_int4(packed)), np.asarray(codes))


def test_int3_packing_round_trips_every_code_in_the_documented_byte_layout():
  codes = np.stack([np.arange(-4, 4, dtype=np.int8), np.arange(3, -5, -1, dtype=np.int8)])   # every code, twice
  packed = kv_cache.pack_int3(jnp.asarray(codes))
  assert packed.shape == (2, 3) and packed.dtype == jnp.uint8
  for row, got in zip(codes, np.asarray(packed)):   # code i + 4 in bits 3i .. 3i + 2 of a little-endian 24-bit word
    word = sum((int(c) + 4) << (3 * i) for i, c in enumerate(row))
    assert list(got) == [word & 0xFF, (word >> 8) & 0xFF, word >> 16]
  np.testing.assert_array_equal(np.asarray(kv_cache.unpack_int3(packed)), codes)
  many = jax.random.randint(jax.random.key(0), (3, 5, 32), -4, 4).astype(jnp.int8)
  np.testing.assert_array_equal(np.asarray(kv_cache.unpack_int3(kv_cache.pack_int3(many))), np.asarray(many))
  odd = many[..., :13]                                   # padded with zero codes to 16: 2 words, 6 bytes
  packed = kv_cache.pack_int3(odd)
  assert packed.shape == (3, 5, 6)
  unpacked = np.asarray(kv_cache.unpack_int3(packed))
  np.testing.assert_array_equal(unpacked[..., :13], np.asarray(odd))
  assert not unpacked[..., 13:].any()


@pytest.mark.parametrize("kind, bits", [("int8", 8), ("int4", 4), ("int3", 3)])
def test_kv_quantiser_error_is_at_most_half_a_step_per_token_and_head(kind, bits):
  x = jax.random.normal(jax.random.key(3), (2, 7, 3, 16)) * jnp.exp(jax.random.normal(jax.random.key(4), (2, 7, 3, 1)))
  stored, scale = jax.jit(kv_cache.encode, static_argnums=1)(x, kind)
  assert scale.shape == (2, 7, 3, 1) and stored.shape[-1] == 16 * bits // 8
  y = jax.jit(kv_cache.decode, static_argnums=(2, 3))(stored, scale, kind, jnp.float32)
  step = np.abs(np.asarray(x)).max(-1, keepdims=True) / (2 ** (bits - 1) - 1)    # absmax / q per (token, head)
  err = np.abs(np.asarray(y - x))
  assert (err <= step / 2 * (1 + 1e-3)).all() and err.max() > step.max() / 10
  g = jax.jit(jax.grad(lambda x: (kv_cache.fake_quant(x, kind) * 3.0).sum()))(x)   # straight-through gradient
  np.testing.assert_array_equal(np.asarray(g), 3.0)


@pytest.mark.parametrize("kind, scan, d_model", [("int8", False, 64), ("int4", False, 64), ("int3", False, 64),
                                                  ("int3", True, 64), ("int3", False, 40)])
def test_quantised_cache_computes_the_full_forward_with_kv_quant(kind, scan, d_model):
  # d_model 40: head_dim 10, not a multiple of 8 (int3 pads the last word, as for a48-3b's head_dim 100)
  out = np.asarray(generate.generate(_model("b158", scan_layers=scan, d_model=d_model), _prompt(), N, kv_dtype=kind))
  full = np.asarray(_forward(_model("b158", kv_quant=kind, d_model=d_model), jnp.asarray(out[:, :-1])))
  _assert_greedy_up_to_ties(full[:, P - 1:], out[:, P:])


def test_int3_keeps_position_0_at_4_bits_in_the_cache_and_in_the_full_forward():
  x = jax.random.normal(jax.random.key(8), (2, 6, 2, 16)) * 3.0
  y = np.asarray(kv_cache.fake_quant(x, "int3"))
  np.testing.assert_array_equal(y[:, :1], np.asarray(kv_cache.fake_quant(x[:, :1], "int4")))   # a4.8's [bos] heads
  codes, scale = kv_cache.encode(x[:, 1:], "int3")
  levels = np.asarray(kv_cache.unpack_int3(codes))
  assert set(np.unique(levels)) == {-3, -2, -1, 0, 1, 2, 3}             # absmax, q = 3: -4 is never reached
  np.testing.assert_array_equal(y[:, 1:], levels.astype(np.float32) * np.asarray(scale))
  assert np.abs(y[:, :1] - np.asarray(x[:, :1])).mean() < np.abs(y[:, 1:] - np.asarray(x[:, 1:])).mean()
  g = jax.grad(lambda x: (kv_cache.fake_quant(x, "int3") * 2.0).sum())(x)
  np.testing.assert_array_equal(np.asarray(g), 2.0)
  # The cache: position 0 comes back from the 4-bit copy, written only by the write that holds position 0.
  cache = kv_cache.init_cache(n_layers=1, batch=2, max_len=8, n_kv_heads=2, head_dim=16, kind="int3").layers[0]
  later = cache.write(x[:, 3:], -x[:, 3:], jnp.int32(3))
  assert not np.asarray(later.first.k).any() and not np.asarray(later.read(jnp.float32)[0][:, :3]).any()
  full = jax.jit(lambda c: c.write(x[:, :3], -x[:, :3], jnp.int32(0)))(later)
  k, v = full.read(jnp.float32)
  np.testing.assert_allclose(np.asarray(k[:, :6]), y, rtol=2.5e-7, atol=0)   # jit vs eager: 1 / s may differ in
  np.testing.assert_allclose(np.asarray(v[:, :6]), -y, rtol=2.5e-7, atol=0)  # its last bit (`quant`, default mode)


def test_quantised_kv_logits_are_close_to_full_precision_and_int8_closer_than_int4():
  tokens = _prompt(length=P + N - 1, seed=5)
  base = np.asarray(_forward(_model("b158"), tokens))
  rel = {k: np.sqrt(np.mean((np.asarray(_forward(_model("b158", kv_quant=k), tokens)) - base) ** 2)) / base.std()
         for k in ("bfloat16", "int8", "int4", "int3")}   # RMS logit error relative to the logits' spread
  # Measured on this untrained model: bfloat16 ~0.03, int8 ~0.03, int4 ~0.2, int3 ~0.3 (a trained one:
  # experiments/kv_cache.py).
  assert 0 < rel["int8"] < 0.1 and 0 < rel["bfloat16"] < 0.1 and rel["int8"] < rel["int4"] < rel["int3"] < 0.8, rel
  cache = _model("b158").init_cache(1, 32, "int4")
  assert cache.layers[0].k.dtype == jnp.uint8 and cache.layers[0].k.shape == (1, 32, 2, 8)
  assert cache.nbytes < _model("b158").init_cache(1, 32, "bfloat16").nbytes / 2
  cache = _model("b158").init_cache(1, 32, "int3")   # 3 bytes per 8 codes + a scale, + position 0 again at 4 bits
  assert cache.layers[0].k.shape == (1, 32, 2, 6) and cache.layers[0].first.k.shape == (1, 1, 2, 8)
  per_layer = 2 * (32 * 2 * (6 + 4)) + 2 * (2 * (8 + 4))
  assert cache.nbytes == 2 * per_layer


# ---------------------------------------------------------------- sampling
def _ranks(model, out) -> np.ndarray:
  """Rank of each new token among the full forward's logits at its position (0 = the argmax)."""
  out = np.asarray(out)
  logits = np.asarray(_forward(model, jnp.asarray(out[:, :-1])))[:, P - 1:]
  chosen = np.take_along_axis(logits, out[:, P:, None], -1)
  return (logits > chosen).sum(-1)


def test_sampling_is_reproducible_per_seed_and_top_k_never_leaves_the_k_most_likely():
  model, prompt = _model("fp"), _prompt(batch=16, seed=6)
  sample = lambda **kw: np.asarray(generate.generate(model, prompt, N, temperature=3.0, kv_dtype="float32", **kw))
  k3 = sample(top_k=3, seed=0)
  np.testing.assert_array_equal(sample(top_k=3, seed=0), k3)
  assert (sample(top_k=3, seed=1) != k3).any()
  assert _ranks(model, k3).max() < 3 and (_ranks(model, k3) > 0).any()
  assert _ranks(model, sample(seed=0)).max() >= 3   # without top_k the same draws do leave the top 3


def test_a_tiny_top_p_keeps_only_the_argmax():
  model, prompt = _model("fp"), _prompt(batch=16, seed=6)
  nucleus = generate.generate(model, prompt, N, temperature=3.0, top_p=1e-6, seed=0, kv_dtype="float32")
  assert (_ranks(model, nucleus) == 0).all()


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("prompt, kwargs, match", [
    (np.zeros((1, 0), np.int32), {}, "prompt_tokens is empty"),
    (np.zeros((3,), np.int32), {}, r"shape \[batch, length\]"),
    (np.full((1, 2), 64, np.int32), {}, r"outside \[0, vocab_size=64\)"),
    (np.zeros((1, 30), np.int32), {}, r"prompt length 30 \+ max_new_tokens 12 = 42 exceeds .*max_seq_len=32"),
    (np.zeros((1, 3), np.int32), dict(max_new_tokens=0), "max_new_tokens must be a positive int"),
    (np.zeros((1, 3), np.int32), dict(temperature=-1.0), "temperature must be a finite number >= 0"),
    (np.zeros((1, 3), np.int32), dict(temperature=float("nan")), "temperature must be"),
    (np.zeros((1, 3), np.int32), dict(temperature=1.0, top_k=0), r"top_k must be None or an int in \[1, "),
    (np.zeros((1, 3), np.int32), dict(temperature=1.0, top_k=65), "vocab_size=64"),
    (np.zeros((1, 3), np.int32), dict(temperature=1.0, top_p=0.0), r"top_p must be None or a number in \(0, 1\]"),
    (np.zeros((1, 3), np.int32), dict(temperature=1.0, top_p=1.5), "top_p must be"),
    (np.zeros((1, 3), np.int32), dict(top_k=5), "no effect at temperature=0"),
    (np.zeros((1, 3), np.int32), dict(kv_dtype="int2"), "kv_dtype must be one of"),
])
def test_bad_arguments_are_refused(prompt, kwargs, match):
  kwargs = {"max_new_tokens": N, **kwargs}
  with pytest.raises(ValueError, match=match):
    generate.generate(_model("fp"), prompt, **kwargs)


def test_bad_kv_quant_and_cache_length_are_refused():
  with pytest.raises(ValueError, match="ModelConfig.kv_quant must be one of"):
    ModelConfig(**TINY, kv_quant="int2")
  with pytest.raises(ValueError, match="head_dim=5 must be a multiple of 2 to pack int4 codes"):
    kv_cache.init_cache(n_layers=1, batch=1, max_len=4, n_kv_heads=1, head_dim=5, kind="int4")
  with pytest.raises(ValueError, match=r"fake_quant\('int3'\) rounds position 0 at more bits: x must be \[B, T"):
    kv_cache.fake_quant(jnp.ones((4, 16)), "int3")
  with pytest.raises(ValueError, match=r"max_len must be an int in \[1, max_seq_len=32\]"):
    _model("fp").init_cache(1, 33)
  with pytest.raises(ValueError, match="kv cache kind must be one of"):
    _model("fp").init_cache(1, 8, "fp8")


# ---------------------------------------------------------------- the CLI and the experiment, on a tiny trained run
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  """experiments/kv_cache.py --smoke: trains b158-tiny,smoke (20 steps), then the KV-cache eval table."""
  spec = importlib.util.spec_from_file_location("kv_cache_experiment", ROOT / "experiments" / "kv_cache.py")
  experiment = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(experiment)
  out = tmp_path_factory.mktemp("kv")
  result = experiment.main(["--smoke", f"--smoke-dir={out / 'run'}", f"--out={out / 'kv_cache.json'}"])
  return out, result


def test_kv_cache_experiment_smoke(smoke):
  out, result = smoke
  saved = json.loads((out / "kv_cache.json").read_text())
  assert [r["kv_cache"] for r in saved["rows"]] == ["none", "bfloat16", "int8", "int4", "int3"]
  rows = {r["kv_cache"]: r for r in saved["rows"]}
  summary = json.loads((out / "run" / "summary.json").read_text())
  assert rows["none"]["eval_loss"] == pytest.approx(summary["eval_loss"], rel=1e-6)   # training's own eval
  assert rows["none"]["delta"] == 0 and rows["int4"]["delta"] != 0 and rows["int3"]["delta"] != 0
  assert rows["int3"]["cache_bytes_per_token"] < rows["int4"]["cache_bytes_per_token"]
  assert all(abs(r["delta"]) < 0.1 for r in saved["rows"])
  assert result["rows"] == saved["rows"]


def test_cli_prints_the_continuation_and_speed(smoke, capsys):
  run = smoke[0] / "run"
  text = generate.main([f"--workdir={run}", "--prompt=def ", "--max_new_tokens=16", "--temperature=1.0",
                        "--top_k=5", "--seed=3", "--kv_cache=int8"])
  printed = capsys.readouterr().out
  assert text.startswith("def ") and len(text) > len("def ") and text in printed
  assert "16 new tokens in" in printed and "tokens/s" in printed and "int8 KV cache" in printed


def test_cli_missing_run_exits_with_one_line(tmp_path):
  out = subprocess.run([sys.executable, "-m", "bitnet_jax.generate", f"--workdir={tmp_path / 'absent'}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 1
  assert out.stderr.strip().splitlines() == [f"generate: error: {tmp_path / 'absent'} has no config.json: not a "
                                            "training run directory"]
