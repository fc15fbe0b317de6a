"""Tests for bitnet_jax/interop/gguf.py and the export CLI: what the `gguf` package reads back from our files, the
layouts refused with the field named, and llama.cpp itself (llama-cpp-python) running our exported models with
the same logits as ours at every position."""

from __future__ import annotations

import dataclasses
import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

gguf_pkg = pytest.importorskip("gguf")

from bitnet_jax import cli, quant, train   # noqa: E402
from bitnet_jax.export import main as export_main   # noqa: E402
from bitnet_jax.interop import gguf   # noqa: E402
from bitnet_jax.model import ModelConfig, Transformer   # noqa: E402
from bitnet_jax.tokenizer import ByteTokenizer   # noqa: E402
from configs import lm   # noqa: E402

# llama.cpp's TQ matmul quantises activations per 256-wide block: with d_model = d_ff = 256 that is per token.
WIDE = dict(vocab_size=259, d_model=256, d_ff=256, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
            tie_embeddings=True, rope_theta=500000.0, norm_eps=1e-5)
LAYOUTS = {"2b4t": dict(block_norm="rms", linear_norm=None, sub_norms=True),
           "faq": dict(linear_norm_scale=False)}
TOKENS = np.random.default_rng(0).integers(0, 256, size=40)


def _model(layout: str = "2b4t", seed: int = 0, **overrides) -> Transformer:
  """A random b158 model whose norm gains are random too (so a gain written to the wrong tensor shows)."""
  model = Transformer(ModelConfig(**{**WIDE, **LAYOUTS[layout], **overrides}), rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed + 1)
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param) and path[-1] == "scale":   # every norm gain there is
      var[...] = jnp.asarray(rng.uniform(0.5, 1.5, var[...].shape), jnp.float32)
  return model


def _linears(model: Transformer):
  """(gguf name, our kernel [in, out]) of every BitLinear."""
  for i, block in enumerate(model.blocks):
    for ours, theirs in gguf._ATTN:
      yield f"blk.{i}.{theirs}", getattr(block.attn, ours).kernel[...]
    for ours, theirs in gguf._FFN:
      yield f"blk.{i}.{theirs}", getattr(block.ffn, ours).kernel[...]


# ---------------------------------------------------------------- the file, read back by the gguf package
@pytest.mark.parametrize("ftype", gguf.FTYPES)
def test_gguf_reader_gives_back_our_codes_scales_and_norms(tmp_path, ftype):
  model = _model("2b4t")
  summary = gguf.export(model, tmp_path / "m.gguf", ftype=ftype, tokenizer=ByteTokenizer(), embedding_type="F32")
  tensors = gguf.read(tmp_path / "m.gguf")
  assert sorted(tensors) == sorted(gguf.tensor_names(model.cfg))
  for name, kernel in _linears(model):
    codes, scale = quant.ternary_codes(kernel)
    np.testing.assert_array_equal(tensors[name + ".weight"], np.asarray(codes, np.float32).T, err_msg=name)
    assert tensors[name + ".scale"].tolist() == [float(np.asarray(scale).reshape(()))], name
  np.testing.assert_array_equal(tensors["token_embd.weight"], np.asarray(model.embed[...]))
  np.testing.assert_array_equal(tensors["blk.1.attn_sub_norm.weight"], np.asarray(model.blocks[1].attn.sub_norm.scale[...]))
  np.testing.assert_array_equal(tensors["blk.0.ffn_norm.weight"], np.asarray(model.blocks[0].ffn_norm.scale[...]))
  np.testing.assert_array_equal(tensors["output_norm.weight"], np.asarray(model.final_norm.scale[...]))
  assert summary["bits_per_weight"] == {"TQ2_0": 66 * 8 / 256, "TQ1_0": 54 * 8 / 256, "F16": 16.0}[ftype]
  assert not list(tmp_path.glob("*.partial"))


def test_metadata_has_the_keys_llama_cpp_needs(tmp_path):
  model = _model("2b4t")
  gguf.export(model, tmp_path / "m.gguf", tokenizer=ByteTokenizer())
  fields = gguf_pkg.GGUFReader(str(tmp_path / "m.gguf")).fields
  value = lambda key: fields[key].contents()
  assert value("general.architecture") == "bitnet"
  assert value("general.name") == "bitnet_jax"
  cfg = model.cfg
  expected = {"context_length": cfg.max_seq_len, "embedding_length": 256, "block_count": 2, "feed_forward_length": 256,
              "attention.head_count": 4, "attention.head_count_kv": 2}
  for key, v in expected.items():
    assert value(f"bitnet.{key}") == v, key
  assert value("bitnet.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
  assert value("bitnet.rope.freq_base") == 500000.0
  assert value("tokenizer.ggml.model") == "gpt2"
  assert len(value("tokenizer.ggml.tokens")) == 259 and value("tokenizer.ggml.eos_token_id") == ByteTokenizer.EOS


def test_faq_form_merges_equal_gains_and_refuses_unequal_ones(tmp_path):
  model = _model("faq")
  tensors_of = lambda: gguf.read(tmp_path / "m.gguf")
  gguf.export(model, tmp_path / "m.gguf", ftype="F16")
  t = tensors_of()
  for i in range(2):   # linear_norm_scale=False: gains of one, output norm trained
    for name in ("attn_norm", "attn_sub_norm", "ffn_norm"):
      np.testing.assert_array_equal(t[f"blk.{i}.{name}.weight"], np.ones(256, np.float32))
  np.testing.assert_array_equal(t["output_norm.weight"], np.asarray(model.final_norm.scale[...]))
  trained = Transformer(ModelConfig(**{**WIDE, "linear_norm_scale": True}), rngs=nnx.Rngs(0))
  trained.blocks[1].attn.k_proj.norm.scale[...] += 0.01
  trained.blocks[0].attn.o_proj.norm.scale[...] = jnp.linspace(0.5, 1.5, 256)
  with pytest.raises(ValueError, match=r"block 1: the RMSNorm gains of q_proj/k_proj/v_proj differ.*attn_norm"):
    gguf.export(trained, tmp_path / "bad.gguf")
  gguf.export(trained, tmp_path / "ok.gguf", ftype="F16", norm_atol=0.02)   # within the tolerance: q's gain is used
  assert not (tmp_path / "bad.gguf").exists()
  t = gguf.read(tmp_path / "ok.gguf")
  np.testing.assert_array_equal(t["blk.1.attn_norm.weight"], np.asarray(trained.blocks[1].attn.q_proj.norm.scale[...]))
  np.testing.assert_array_equal(t["blk.0.attn_sub_norm.weight"], np.asarray(trained.blocks[0].attn.o_proj.norm.scale[...]))


@pytest.mark.parametrize("overrides, match", [
    (dict(ffn="relu2_glu"), r"ffn='relu2_glu'.*SiLU"),
    (dict(tie_embeddings=False), r"tie_embeddings=False.*token_embd"),
    (dict(groups=2), r"groups=2"),
    (dict(variant="bitnet", linear_norm="rms", ffn="swiglu"), r"weight_quant='binary'"),
    (dict(variant="fp", block_norm="rms"), r"weight_quant='none'"),
    (dict(block_norm="rms", linear_norm="rms"), r"neither the 2B4T layout"),
])
def test_layouts_llama_cpp_cannot_compute_are_refused(tmp_path, overrides, match):
  cfg = {**WIDE, **LAYOUTS["2b4t"], **overrides}
  model = Transformer(ModelConfig(**cfg), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=match):
    gguf.export(model, tmp_path / "m.gguf")
  assert not list(tmp_path.iterdir())


def test_tq_rows_must_be_multiples_of_256_and_bad_arguments(tmp_path):
  narrow = Transformer(ModelConfig(**{**WIDE, **LAYOUTS["2b4t"], "d_model": 128, "n_heads": 2, "n_kv_heads": 2}),
                       rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"blk\.0\.attn_q has 128 input features.*multiple of 256.*F16"):
    gguf.export(narrow, tmp_path / "m.gguf", ftype="TQ1_0")
  gguf.export(narrow, tmp_path / "m.gguf", ftype="F16")   # F16 takes any size
  model = _model()
  with pytest.raises(ValueError, match=r"ftype='Q4_0' must be one of"):
    gguf.export(model, tmp_path / "x.gguf", ftype="Q4_0")
  with pytest.raises(ValueError, match=r"embedding_type='BF16'"):
    gguf.export(model, tmp_path / "x.gguf", embedding_type="BF16")
  with pytest.raises(FileNotFoundError, match=r"no file"):
    gguf.read(tmp_path / "missing.gguf")


def test_an_interrupted_export_leaves_no_file(tmp_path, monkeypatch):
  model = _model()
  gguf.export(model, tmp_path / "m.gguf", ftype="F16")
  before = (tmp_path / "m.gguf").read_bytes()

  def killed(self, *args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(gguf_pkg.GGUFWriter, "write_tensors_to_file", killed)
  with pytest.raises(KeyboardInterrupt):
    gguf.export(model, tmp_path / "m.gguf", ftype="TQ2_0")
  assert (tmp_path / "m.gguf").read_bytes() == before   # the old file is untouched
  assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


# ---------------------------------------------------------------- the CLI on a trained run
def test_export_cli_writes_gguf_and_hf_from_a_run(tmp_path, capsys):
  config = lm.get_config("b158-tiny")
  config.train.update(steps=2, eval_every=2, checkpoint_every=2, log_every=1)
  config.data.eval_batches = 1
  config.model.update(tie_embeddings=True, linear_norm_scale=False)   # the FAQ form llama.cpp computes
  train.train_and_evaluate(config, tmp_path / "run", progress=False)
  summary = export_main([f"--workdir={tmp_path / 'run'}", "--format=gguf", "--ftype=F16",
                         f"--out={tmp_path / 'm.gguf'}"])
  assert "ternary weights at 16.0000 bits" in capsys.readouterr().out
  model, _ = train.load_checkpoint(tmp_path / "run")
  tensors = gguf.read(summary["path"])
  for name, kernel in _linears(model):
    np.testing.assert_array_equal(tensors[name + ".weight"], np.asarray(quant.ternary_codes(kernel)[0], np.float32).T)
  capsys.readouterr()
  bad = {"d_model=64|multiple of 256": ["--format=gguf", "--ftype=TQ2_0", f"--out={tmp_path / 'x.gguf'}"],
         "not a training run": [f"--workdir={tmp_path / 'nothing'}", "--format=gguf", f"--out={tmp_path / 'x.gguf'}"],
         "linear_norm='rms'": ["--format=hf", f"--out={tmp_path / 'hf'}"],   # the FAQ form is not transformers'
         "would overwrite the run": ["--format=hf", f"--out={tmp_path / 'run'}"]}
  for pattern, args in bad.items():
    if not any(a.startswith("--workdir") for a in args):
      args = [f"--workdir={tmp_path / 'run'}", *args]
    with pytest.raises(SystemExit) as info:
      cli.run("export", export_main, args)
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(rf"export: error: .*({pattern})", err[0]), (pattern, err)
  assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["d_model"] == 64   # untouched


# ---------------------------------------------------------------- llama.cpp runs our file
def _llama(path, n_ctx: int = 64):
  llama_cpp = pytest.importorskip("llama_cpp")
  # f32 KV cache (type 0): llama.cpp's default f16 cache would round K and V.
  return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                         n_threads=2, type_k=0, type_v=0, flash_attn=False, verbose=False)


def _theirs(path, tokens) -> np.ndarray:
  llm = _llama(path)
  llm.eval([int(t) for t in tokens])
  return np.asarray(llm.scores[:len(tokens)], np.float32)


def _parity(ours: np.ndarray, theirs: np.ndarray) -> dict:
  rel = np.abs(ours - theirs).max(-1) / np.abs(ours).max(-1)
  stats = dict(max_rel=float(rel.max()), median_rel=float(np.median(rel)), within_1e4=float(np.mean(rel <= 1e-4)),
               argmax_agree=float(np.mean(ours.argmax(-1) == theirs.argmax(-1))))
  print("llama.cpp parity", stats)
  return stats


@pytest.mark.parametrize("layout, ftype", [("2b4t", "TQ2_0"), ("2b4t", "TQ1_0"), ("faq", "TQ2_0")])
def test_llama_cpp_logits_match_ours(tmp_path, layout, ftype):
  model = _model(layout, seed=3)
  gguf.export(model, tmp_path / "m.gguf", ftype=ftype, tokenizer=ByteTokenizer(), embedding_type="F32")
  theirs = _theirs(tmp_path / "m.gguf", TOKENS)
  ours = np.asarray(model(jnp.asarray(TOKENS[None], jnp.int32)))[0]
  stats = _parity(ours, theirs)
  assert stats["argmax_agree"] == 1.0, stats
  assert stats["within_1e4"] >= 0.9, stats


def test_llama_cpp_general_widths_differ_only_by_per_block_activation_scales(tmp_path, monkeypatch):
  """d_model 512, d_ff 1536: llama.cpp's Q8_K activations have one scale per 256 features, b1.58's one per token.
  Our model with its activation quantiser switched to 256-wide groups reproduces llama.cpp; as trained it does not.
  One layer: a code that flips on a near-tie (float32 norms differ in the last bit) stays at its position."""
  model = _model("2b4t", seed=3, d_model=512, d_ff=1536, n_layers=1)
  gguf.export(model, tmp_path / "m.gguf", embedding_type="F32")
  theirs = _theirs(tmp_path / "m.gguf", TOKENS)
  per_token = _parity(np.asarray(model(jnp.asarray(TOKENS[None], jnp.int32)))[0], theirs)
  real = quant.quantize_activations
  monkeypatch.setattr(quant, "quantize_activations",
                      lambda x, bits=8, **kw: real(x, bits, **{**kw, "groups": x.shape[-1] // gguf.QK_K}))
  per_block = _parity(np.asarray(model(jnp.asarray(TOKENS[None], jnp.int32)))[0], theirs)
  assert per_block["argmax_agree"] >= 0.95 and per_block["within_1e4"] >= 0.9, per_block
  assert per_token["median_rel"] > 100 * per_block["median_rel"], (per_token, per_block)


def test_llama_cpp_f16_export_runs_without_activation_quantisation(tmp_path):
  """F16 weights: llama.cpp does not quantise activations, so it matches our model with act_bits=None."""
  model = _model("2b4t", seed=4)
  gguf.export(model, tmp_path / "m.gguf", ftype="F16", embedding_type="F32")
  theirs = _theirs(tmp_path / "m.gguf", TOKENS)
  unquantised = Transformer(dataclasses.replace(model.cfg, act_bits=None), rngs=nnx.Rngs(0))
  nnx.update(unquantised, nnx.state(model, nnx.Param))
  no_act = _parity(np.asarray(unquantised(jnp.asarray(TOKENS[None], jnp.int32)))[0], theirs)
  with_act = _parity(np.asarray(model(jnp.asarray(TOKENS[None], jnp.int32)))[0], theirs)
  assert no_act["argmax_agree"] == 1.0 and no_act["max_rel"] < 5e-3, no_act   # f16 rounding of activations
  assert with_act["max_rel"] > no_act["max_rel"]


def test_llama_cpp_tokenises_text_to_our_byte_ids(tmp_path):
  gguf.export(_model(), tmp_path / "m.gguf", tokenizer=ByteTokenizer())
  llm = _llama(tmp_path / "m.gguf")
  text = "Hello, wörld!\n  def f(x): return x ** 2"
  ids = llm.tokenize(text.encode(), add_bos=False, special=False)
  assert ids == ByteTokenizer().encode(text).tolist()
  assert llm.detokenize(ids).decode() == text
