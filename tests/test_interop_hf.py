"""Tests for bitnet_jax/interop/hf.py, against transformers itself (float32, CPU): logits of ours and theirs at every
position for tiny random BitNet (packed, both linear classes; latent) and LLaMA checkpoints, in both directions."""

from __future__ import annotations

import json
import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")   # before torch: transformers' BitNet ops are torch.compile'd

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")   # transformers' BitNet quantizer refuses to load without it
safetensors_torch = pytest.importorskip("safetensors.torch")
from transformers.integrations import bitnet as hf_bitnet   # noqa: E402

from bitnet_jax import data, optim, quant, train   # noqa: E402
from bitnet_jax.interop import hf   # noqa: E402
from bitnet_jax.layers import Norm   # noqa: E402
from bitnet_jax.model import ModelConfig, Transformer   # noqa: E402
from configs import lm   # noqa: E402
from configs.common import model_config_dict   # noqa: E402

VOCAB = 320             # covers the 259 ids of the byte tokenizer (fine-tuning test)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, rms_norm_eps=1e-5)
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ZERO_LAYER = "model.layers.1.self_attn.v_proj.weight"   # all-zero codes in the packed checkpoints
TOKENS = np.random.default_rng(0).integers(0, VOCAB, size=(2, 48))
torch.set_num_threads(2)


# ---------------------------------------------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------------------------------------------
def _parity(ours: np.ndarray, theirs: np.ndarray) -> dict:
  """Per position: max |ours - theirs| over the vocabulary, relative to max |theirs|."""
  rel = np.abs(ours - theirs).max(-1) / np.abs(theirs).max(-1)
  stats = dict(max_rel=float(rel.max()), within_1e4=float(np.mean(rel <= 1e-4)),
               argmax_agree=float(np.mean(ours.argmax(-1) == theirs.argmax(-1))), positions=int(rel.size))
  print("parity", stats)
  return stats


def _assert_parity(ours, theirs, *, min_within: float = 0.9) -> dict:
  stats = _parity(np.asarray(ours), np.asarray(theirs))
  assert stats["argmax_agree"] == 1.0, stats
  assert stats["within_1e4"] >= min_within, stats
  return stats


def _ours(model: Transformer) -> np.ndarray:
  return np.asarray(model(jnp.asarray(TOKENS, jnp.int32)))


def _theirs(directory) -> tuple[np.ndarray, object]:
  model, info = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                                  output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  model.eval()
  with torch.no_grad():
    return model(torch.tensor(TOKENS)).logits.float().numpy(), model


def _faq_weight_quant(w: torch.Tensor) -> tuple[torch.Tensor, float]:
  """Oracle, the b1.58 FAQ reference `weight_quant`: codes and s = 1 / max(mean|w|, 1e-5)."""
  s = 1.0 / w.abs().mean().clamp(min=1e-5)
  return (w * s).round().clamp(-1, 1), float(s)


def _hf_bitnet_checkpoint(directory, *, linear_class: str = "bitlinear", tie: bool = True, seed: int = 0) -> dict:
  """A random tiny BitNet checkpoint stored as the 2B4T release stores it: codes packed by transformers' own
  `pack_weights`, one weight_scale per layer (1/mean|W| for bitlinear, which divides; mean|W| for autobitlinear,
  which multiplies). Returns {layer name: (codes [out, in], mean|W|)}."""
  torch.manual_seed(seed)
  config = transformers.BitNetConfig(vocab_size=VOCAB, tie_word_embeddings=tie, hidden_act="relu2", bos_token_id=None,
                                     eos_token_id=None,
                                     rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, **TINY)
  model = transformers.BitNetForCausalLM(config).float()
  state, codes_of = {}, {}
  for name, t in model.state_dict().items():
    if tie and name == "lm_head.weight":
      continue
    t = t.detach().clone()
    if name.endswith("norm.weight"):
      t = 1 + 0.2 * torch.randn_like(t)   # gains other than 1, so a misplaced norm shows in the logits
    elif name in ("model.embed_tokens.weight", "lm_head.weight"):
      t = torch.randn_like(t)             # logits of order 10, not 0.02
    elif name.split(".")[-2] in PROJ:
      latent = torch.zeros_like(t) if name == ZERO_LAYER else torch.randn_like(t)
      codes, s = _faq_weight_quant(latent)
      codes_of[name] = (codes.numpy().astype(np.int8), 1.0 / s)
      t = hf_bitnet.pack_weights(codes.clone())
      scale = s if linear_class == "bitlinear" else 1.0 / s
      state[name[:-len("weight")] + "weight_scale"] = torch.tensor([scale], dtype=torch.float32)
    state[name] = t.contiguous()
  config.save_pretrained(directory)
  hf_config = json.loads((directory / "config.json").read_text())
  hf_config["quantization_config"] = {"quant_method": "bitnet", "linear_class": linear_class,
                                      "quantization_mode": "offline"}
  (directory / "config.json").write_text(json.dumps(hf_config))
  safetensors_torch.save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
  return codes_of


def _tiny_2b4t(**overrides) -> ModelConfig:
  """Our b158 model with the 2B4T options (the `b158-2b4t` preset's architecture) at tiny size."""
  return ModelConfig(**{**dict(variant="b158", vocab_size=VOCAB, d_model=64, d_ff=128, n_layers=2, n_heads=4,
                               n_kv_heads=2, max_seq_len=64, rope_theta=20000.0, ffn="relu2_glu", linear_norm=None,
                               block_norm="rms", sub_norms=True, tie_embeddings=True, init_std=0.5), **overrides})


def _random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
  """Our model with norm gains other than 1."""
  model = Transformer(cfg, rngs=nnx.Rngs(seed))
  key = jax.random.key(seed + 1)
  for _, norm in nnx.iter_graph(model):
    if isinstance(norm, Norm) and norm.scale is not None:
      key, sub = jax.random.split(key)
      norm.scale[...] = 1 + 0.2 * jax.random.normal(sub, norm.scale.shape)
  return model


@pytest.fixture(scope="module", params=["bitlinear", "autobitlinear"])
def packed_checkpoint(request, tmp_path_factory):
  directory = tmp_path_factory.mktemp(f"hf_{request.param}")
  codes = _hf_bitnet_checkpoint(directory, linear_class=request.param)
  theirs, model = _theirs(directory)
  layer = model.model.layers[0].self_attn.q_proj
  expected = hf_bitnet.BitLinear if request.param == "bitlinear" else hf_bitnet.AutoBitLinear
  assert isinstance(layer, expected), type(layer)   # transformers really runs the ternary layer
  return directory, codes, theirs


@pytest.fixture(scope="module")
def bitlinear_dir(tmp_path_factory):
  """A packed checkpoint for the tests that need one but not transformers' logits."""
  directory = tmp_path_factory.mktemp("hf_plain")
  _hf_bitnet_checkpoint(directory, seed=5)
  return directory


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face -> ours.
# ---------------------------------------------------------------------------------------------------------------
def test_load_packed_matches_transformers(packed_checkpoint):
  directory, _, theirs = packed_checkpoint
  model = hf.load(directory)
  cfg = model.cfg
  assert (cfg.variant, cfg.ffn, cfg.sub_norms, cfg.block_norm, cfg.linear_norm) == (
      "b158", "relu2_glu", True, "rms", None)
  assert (cfg.n_kv_heads, cfg.rope_theta, cfg.tie_embeddings, cfg.norm_eps, cfg.vocab_size) == (
      2, 500000.0, True, 1e-5, VOCAB)
  _assert_parity(_ours(model), theirs)


def test_loaded_kernels_quantise_to_the_checkpoint_codes(packed_checkpoint):
  directory, codes_of, _ = packed_checkpoint
  model = hf.load(directory)
  for name, (codes, mean_abs) in codes_of.items():
    i, kind, proj = int(name.split(".")[2]), name.split(".")[3], name.split(".")[4]
    layer = getattr(getattr(model.blocks[i], "attn" if kind == "self_attn" else "ffn"), proj)
    ours_codes, ours_scale = quant.ternary_codes(layer.kernel[...])
    np.testing.assert_array_equal(np.asarray(ours_codes).T, codes, err_msg=name)
    if name == ZERO_LAYER:
      assert not np.any(np.asarray(layer.kernel[...]))
    else:
      np.testing.assert_allclose(float(ours_scale.reshape(())), mean_abs, rtol=2.4e-7, err_msg=name)


def test_latent_from_codes_reproduces_codes_and_scale():
  rng = np.random.default_rng(1)
  for shape, p_zero in (((256, 96), 0.3), ((8, 4), 0.0), ((64, 64), 0.97)):
    codes = rng.choice([-1, 1], size=shape) * (rng.random(shape) >= p_zero)
    scale = float(rng.uniform(1e-3, 3.0))
    latent = hf.latent_from_codes(codes, scale)
    got_codes, got_scale = quant.ternary_codes(jnp.asarray(latent))
    np.testing.assert_array_equal(np.asarray(got_codes), codes)
    np.testing.assert_allclose(float(got_scale.reshape(())), scale, rtol=1.2e-7)   # one float32 rounding
  assert not np.any(hf.latent_from_codes(np.zeros((4, 4)), 0.5))   # all-zero codes: a zero kernel
  with pytest.raises(ValueError, match="below quant.EPS"):
    hf.latent_from_codes(np.ones((4, 4)), 1e-6)
  with pytest.raises(ValueError, match="codes must be in"):
    hf.latent_from_codes(np.full((4, 4), 2), 0.5)


def test_load_transformers_llama(tmp_path):
  torch.manual_seed(3)
  config = transformers.LlamaConfig(vocab_size=VOCAB, tie_word_embeddings=False,
                                    rope_parameters={"rope_type": "default", "rope_theta": 40000.0}, **TINY)
  model = transformers.LlamaForCausalLM(config).float()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else torch.randn_like(p) * 0.3)
  model.save_pretrained(tmp_path)
  theirs, _ = _theirs(tmp_path)
  ours = hf.load(tmp_path)
  assert (ours.cfg.variant, ours.cfg.ffn, ours.cfg.tie_embeddings, ours.cfg.sub_norms, ours.cfg.rope_theta) == (
      "fp", "swiglu", False, False, 40000.0)
  stats = _assert_parity(_ours(ours), theirs, min_within=1.0)
  assert stats["max_rel"] < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# Ours -> Hugging Face.
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form,tie,dtype", [("packed", True, "float32"), ("latent", False, "float32"),
                                             ("packed", False, "bfloat16")])
def test_save_loads_in_transformers_with_the_same_logits(tmp_path, form, tie, dtype):
  model = _random_model(_tiny_2b4t(tie_embeddings=tie))
  ours = _ours(model)
  hf.save(model, tmp_path, form=form, dtype=dtype)
  theirs, their_model = _theirs(tmp_path)
  expected = hf_bitnet.BitLinear if form == "packed" else hf_bitnet.AutoBitLinear
  assert isinstance(their_model.model.layers[1].mlp.down_proj, expected)
  assert their_model.config.rope_parameters["rope_theta"] == model.cfg.rope_theta
  back = hf.load(tmp_path)
  assert back.cfg == model.cfg
  if dtype == "float32":
    _assert_parity(ours, theirs)
    np.testing.assert_allclose(_ours(back), ours, rtol=0, atol=1e-6 * np.abs(ours).max())
  else:
    # bf16 weights put many int8 roundings on exact mathematical ties (x * 127 / max|x| = k + 1/2 for values on
    # the bf16 grid), which the two implementations' float32 rounding breaks either way (measured: a flip in the
    # first layer's q input, then everything after it). So the bf16 file is checked tensor by tensor.
    _parity(_ours(back), theirs)
    on_disk = hf.read_safetensors(tmp_path / "model.safetensors")
    assert on_disk["lm_head.weight"].dtype == jnp.bfloat16 and on_disk["model.norm.weight"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(back.embed[...], model.embed[...].astype(jnp.bfloat16).astype(jnp.float32))
    for proj in ("q_proj", "o_proj"):
      want_codes, want_scale = quant.ternary_codes(getattr(model.blocks[0].attn, proj).kernel[...])
      got_codes, got_scale = quant.ternary_codes(getattr(back.blocks[0].attn, proj).kernel[...])
      np.testing.assert_array_equal(got_codes, want_codes)
      np.testing.assert_allclose(got_scale, want_scale, rtol=2 ** -8)   # weight_scale rounded to bf16
  if form == "latent":   # the float weights without quantization_config: the -bf16 master-weights layout
    config = json.loads((tmp_path / "config.json").read_text())
    del config["quantization_config"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    np.testing.assert_array_equal(_ours(hf.load(tmp_path)), _ours(back))


def test_llama_layout_round_trip(tmp_path):
  cfg = ModelConfig(variant="fp", vocab_size=VOCAB, d_model=64, d_ff=128, n_layers=2, n_heads=4, n_kv_heads=2,
                    max_seq_len=64, rope_theta=30000.0, init_std=0.3)
  model = _random_model(cfg, seed=4)
  ours = _ours(model)
  hf.save(model, tmp_path)
  assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama"
  theirs, their_model = _theirs(tmp_path)
  assert type(their_model).__name__ == "LlamaForCausalLM"
  stats = _assert_parity(ours, theirs, min_within=1.0)
  assert stats["max_rel"] < 1e-5
  np.testing.assert_array_equal(_ours(hf.load(tmp_path)), ours)   # float32 in, float32 out: bit for bit


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer, bad input, fine-tuning.
# ---------------------------------------------------------------------------------------------------------------
def test_tokenizer_is_loaded_and_saved_with_the_model(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers
  words = ["hello", "world", "bit", "net", "<unk>"]
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"])   # ids 5, 6, 7
  src = tmp_path / "src"
  model = _random_model(_tiny_2b4t())
  hf.save(model, src)
  assert hf.load_tokenizer(src) is None
  tok.save(str(src / "tokenizer.json"))
  config = json.loads((src / "config.json").read_text())
  config["eos_token_id"] = [7, 6]   # config.json names the EOS; tokenizer.json alone would give <|end_of_text|>
  (src / "config.json").write_text(json.dumps(config))
  loaded, tokenizer = hf.load_pretrained(src)
  assert (tokenizer.eos_id, tokenizer.bos_id) == (7, 5)
  np.testing.assert_array_equal(tokenizer.encode("hello bit net"), [0, 2, 3])
  hf.save(loaded, tmp_path / "out", tokenizer=tokenizer)
  saved = json.loads((tmp_path / "out" / "config.json").read_text())
  assert (saved["eos_token_id"], saved["bos_token_id"]) == (7, 5)
  np.testing.assert_array_equal(hf.load_tokenizer(tmp_path / "out").encode("world"), [1])


def test_bad_input_gives_clear_errors(tmp_path, bitlinear_dir):
  directory = bitlinear_dir
  with pytest.raises(FileNotFoundError, match="no config.json"):
    hf.load(tmp_path / "missing")
  config = json.loads((directory / "config.json").read_text())

  def variant(name, config_changes=None, tensors=None):
    out = tmp_path / name
    out.mkdir()
    (out / "config.json").write_text(json.dumps({**config, **(config_changes or {})}))
    weights = dict(hf.read_safetensors(directory / "model.safetensors"))
    hf.write_safetensors(out / "model.safetensors", tensors(weights) if tensors else weights)
    return out

  with pytest.raises(ValueError, match="model_type='gpt2'"):
    hf.load(variant("gpt2", {"model_type": "gpt2"}))
  with pytest.raises(ValueError, match="use_rms_norm"):
    hf.load(variant("rms", {"quantization_config": {**config["quantization_config"], "use_rms_norm": True}}))
  with pytest.raises(ValueError, match="rope_type='llama3'"):
    hf.load(variant("rope", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}}))
  with pytest.raises(ValueError, match=r"model.layers.0.self_attn.k_proj.weight.*shape \(4, 64\)"):
    hf.load(variant("shape", tensors=lambda w: {**w, "model.layers.0.self_attn.k_proj.weight":
                                                 w["model.layers.0.self_attn.k_proj.weight"][:4]}))
  with pytest.raises(ValueError, match="model.norm.weight.*missing"):
    hf.load(variant("missing", tensors=lambda w: {k: v for k, v in w.items() if k != "model.norm.weight"}))
  with pytest.raises(ValueError, match="does not have.*bias"):
    hf.load(variant("bias", tensors=lambda w: {**w, "model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}))
  with pytest.raises(ValueError, match="intermediate_size.*missing"):
    hf.load(variant("nofield", {"intermediate_size": None}))
  b158 = Transformer(ModelConfig(variant="b158", vocab_size=VOCAB), rngs=nnx.Rngs(0))   # per-linear RMSNorm
  with pytest.raises(ValueError, match="linear_norm='rms'"):
    hf.save(b158, tmp_path / "refused")
  with pytest.raises(ValueError, match="form='bogus'"):
    hf.save(_random_model(_tiny_2b4t()), tmp_path / "refused", form="bogus")


def test_finetuning_a_loaded_checkpoint_lowers_the_loss(bitlinear_dir):
  model = hf.load(bitlinear_dir)
  config = lm.get_config("b158-tiny,smoke")
  config.model = model_config_dict(model.cfg)   # the trainer's config, adapted to the loaded model
  config.train.steps, config.train.batch_size, config.train.seq_len = 12, 8, 32
  config.optim.warmup_steps = 2
  assert train.model_config_from(config) == model.cfg
  tokenizer = data.make_tokenizer(config.data.tokenizer)
  assert model.cfg.vocab_size >= tokenizer.vocab_size
  corpus = data.load_corpus(config.data.source, valid_fraction=config.data.valid_fraction, tokenizer=tokenizer)
  batches = data.train_iterator(corpus.train, batch_size=config.train.batch_size, seq_len=config.train.seq_len,
                                seed=config.train.seed)
  held_out = jnp.asarray(data.eval_batches(corpus.valid, batch_size=8, seq_len=config.train.seq_len, max_batches=1)[0])
  before = float(train.eval_step(model, held_out))
  optimizer = nnx.Optimizer(model, optim.make_optimizer(config.optim, config.train.steps), wrt=nnx.Param)
  losses = [float(train.train_step(model, optimizer, jnp.asarray(next(batches)))[0])
            for _ in range(config.train.steps)]
  after = float(train.eval_step(model, held_out))
  print("fine-tuning losses", [round(x, 2) for x in losses], "held-out", round(before, 2), "->", round(after, 2))
  assert all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 1.0, losses
  assert after < before - 1.0, (before, after)
