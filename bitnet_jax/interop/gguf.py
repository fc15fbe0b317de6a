"""interop/gguf: b1.58 models out to GGUF files that llama.cpp runs (model -> interop).

    gguf.export(model, "model.gguf", ftype="TQ2_0", tokenizer=tok)    # -> llama.cpp's `bitnet` architecture
    tensors = gguf.read("model.gguf")                                 # name -> float32 array, dequantised

Written through the `gguf` package (llama.cpp's own Python writer). What upstream llama.cpp's `bitnet` graph
computes (src/models/bitnet.cpp in the llama.cpp that llama-cpp-python 0.3.36 vendors, read for this), per block:
    h = x + o_scale * W_o(attn_sub_norm(Attn(RoPE_neox(q_scale W_q n), RoPE_neox(k_scale W_k n), v_scale W_v n)))
        with n = attn_norm(x)
    y = h + down_scale * W_down(ffn_sub_norm(silu(gate_scale W_gate m) * up_scale W_up m)),  m = ffn_norm(h)
and logits = token_embd(output_norm(y)): a SiLU-gated FFN and a tied output head, every norm an RMSNorm.
Two of our b158 layouts compute exactly that, and `export` accepts only them:
  * the 2B4T options (`block_norm="rms"`, `linear_norm=None`, `sub_norms=True`) with `ffn="swiglu"`;
  * the b1.58 FAQ form (an RMSNorm inside every BitLinear, no block norms): o_proj's and down_proj's own norms
    are attn_sub_norm and ffn_sub_norm, and q/k/v (gate/up) read one input, so their norm gains must be equal
    (always true with `linear_norm_scale=False`) to become one attn_norm (ffn_norm).
Both need `tie_embeddings=True` and one weight scale per tensor (`groups=1`, `fsdp_groups=1`). The 2B4T
release's squared-ReLU FFN (`ffn="relu2_glu"`) is refused: upstream llama.cpp would compute SiLU in its place
(microsoft/BitNet's bitnet.cpp fork has its own architecture for that model).

Weights (`ftype`): each BitLinear is written as its ternary codes, with the per-tensor scale mean|W| as the F32
tensor `blk.N.<proj>.scale` that llama.cpp multiplies the matmul output by. "TQ2_0" stores the codes at
2.0625 bits per weight, "TQ1_0" at 1.6875, both in blocks of 256 along each output row (so every input size
must be a multiple of 256) with one f16 block scale, here exactly 1 (0 for an all-zero block); "F16" stores the
codes as float16 (exact, any size). Embedding and norms: `embedding_type` "F16" (default, as the papers count
memory) or "F32"; norms F32.

What llama.cpp then computes differs from our forward in one place: activation quantisation. For TQ weights its
CPU matmul quantises the input to int8 per 256-element block (Q8_K: 127 / absmax, round half to even), where
b1.58 quantises per token over the whole vector; the two agree when every matmul input is 256 wide (d_model =
d_ff = 256; tested against llama.cpp to float rounding), and differ by the per-block scales otherwise. For F16
weights it does not quantise activations at all (they are rounded to f16), so an F16 export runs the b1.58 model
without its activation quantiser. llama.cpp's default KV cache is f16; `type_k=0, type_v=0` makes it f32.

Tokenizer metadata: the byte tokenizer is written as a "gpt2" (byte-level BPE) vocabulary of the 256 byte tokens
with no merges, plus its specials, so llama.cpp tokenises text to the same ids; a Hugging Face `tokenizer.json`
BPE model is written with its vocabulary and merges (llama.cpp's "default" pre-tokenizer regex, which may differ
from the file's own: a warning says so); with none, the vocabulary type "none" (token ids only).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from bitnet_jax import quant
from bitnet_jax.model import ModelConfig, Transformer
from bitnet_jax.tokenizer import ByteTokenizer, HFTokenizer

__all__ = ["export", "read", "FTYPES", "ARCH", "tensor_names"]

ARCH = "bitnet"
FTYPES = ("TQ2_0", "TQ1_0", "F16")
QK_K = 256   # TQ1_0 / TQ2_0 block size along a row
_ATTN = (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"), ("o_proj", "attn_output"))
_FFN = (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down"))


def _gguf():
  try:
    import gguf
  except ImportError as e:   # an optional dependency (requirements-interop.txt)
    raise ImportError("bitnet_jax.interop.gguf needs the `gguf` package: pip install -r requirements-interop.txt") from e
  return gguf


# --------------------------------------------------------------------------------------------------------------
# Which of our layouts llama.cpp's bitnet graph computes.
# --------------------------------------------------------------------------------------------------------------
def _layout(cfg: ModelConfig) -> str:
  """"2b4t" or "faq", or ValueError naming the ModelConfig field llama.cpp's `bitnet` graph cannot compute."""
  def need(field: str, ok: bool, what: str) -> None:
    if not ok:
      raise ValueError(f"gguf.export: ModelConfig.{field}={getattr(cfg, field)!r}, but llama.cpp's {ARCH!r} "
                       f"architecture needs {what}")
  need("weight_quant", cfg.weight_quant == "ternary", "'ternary' (a b158 model)")
  for field in ("act_quant", "act_quant_attn_out", "act_quant_ffn_out"):
    need(field, getattr(cfg, field, None) is None, "None (per-token absmax INT8 activations, act_bits=8)")
  need("hadamard", not getattr(cfg, "hadamard", False), "False (no Hadamard before its activation quantiser)")
  need("act_bits", cfg.act_bits == 8, "8")
  need("act_per_token", cfg.act_per_token is True, "True")
  need("bitnet_asymmetric_ffn", not cfg.bitnet_asymmetric_ffn, "False")
  need("groups", cfg.groups == 1, "1 (one scale per tensor)")
  need("fsdp_groups", cfg.fsdp_groups == 1, "1 (one scale per tensor)")
  need("ffn", cfg.ffn == "swiglu", "'swiglu' (its FFN is SiLU-gated; a squared-ReLU FFN would silently compute "
       "SiLU there)")
  need("tie_embeddings", cfg.tie_embeddings, "True (its output head is token_embd)")
  need("kv_quant", cfg.kv_quant == "none", "'none'")
  if cfg.block_norm == "rms" and cfg.linear_norm is None and cfg.sub_norms:
    return "2b4t"
  if cfg.block_norm is None and cfg.linear_norm == "rms" and not cfg.sub_norms:
    return "faq"
  raise ValueError(f"gguf.export: norms block_norm={cfg.block_norm!r}, linear_norm={cfg.linear_norm!r}, "
                   f"sub_norms={cfg.sub_norms!r} are neither the 2B4T layout (rms, None, True) nor the b1.58 FAQ "
                   f"form (None, rms, False) that llama.cpp's {ARCH!r} graph computes")


def tensor_names(cfg: ModelConfig) -> list[str]:
  """The GGUF tensor names `export` writes for `cfg`, in order (`.weight` / `.scale` suffixes included)."""
  _layout(cfg)
  names = ["token_embd.weight", "output_norm.weight"]
  for i in range(cfg.n_layers):
    b = f"blk.{i}."
    names += [b + "attn_norm.weight", b + "attn_sub_norm.weight", b + "ffn_norm.weight", b + "ffn_sub_norm.weight"]
    for _, g in _ATTN + _FFN:
      names += [b + g + ".weight", b + g + ".scale"]
  return names


def _block(pure: dict, i: int) -> dict:
  """Block i of a pure state dict (nnx.List indices may be ints or strings)."""
  return pure["blocks"][i] if i in pure["blocks"] else pure["blocks"][str(i)]


def _gain(block: dict, path: tuple[str, ...], width: int | None = None) -> np.ndarray:
  """The array at `path`; a BitLinear norm without a gain (`linear_norm_scale=False`) gives ones of `width`."""
  for k in path:
    if width is not None and k == "norm" and k not in block:
      return np.ones(width, np.float32)
    block = block[k]
  return np.asarray(jax.device_get(block), np.float32)


def _one_gain(block: dict, group: str, projs: tuple[str, ...], what: str, i: int, atol: float) -> np.ndarray:
  """The RMSNorm gain shared by `projs` (FAQ form): equal within `atol`, else ValueError naming them."""
  width = block[group][projs[0]]["kernel"].shape[0]
  gains = [_gain(block, (group, p, "norm", "scale"), width) for p in projs]
  worst = max(float(np.max(np.abs(g - gains[0]))) for g in gains)
  if worst > atol:
    raise ValueError(f"gguf.export: block {i}: the RMSNorm gains of {'/'.join(projs)} differ (max |difference| "
                     f"{worst:.3g}), but llama.cpp's {ARCH!r} graph has one {what} for them; train with "
                     f"ModelConfig.linear_norm_scale=False, or use the 2B4T layout (block_norm='rms', "
                     f"linear_norm=None, sub_norms=True)")
  return gains[0]


def _float_tensors(cfg: ModelConfig, pure: dict, layout: str, atol: float) -> dict[str, np.ndarray]:
  """Norm gains (and the embedding) by GGUF name."""
  out = {"token_embd.weight": _gain(pure, ("embed",)), "output_norm.weight": _gain(pure, ("final_norm", "scale"))}
  for i in range(cfg.n_layers):
    block, b = _block(pure, i), f"blk.{i}."
    if layout == "2b4t":
      out[b + "attn_norm.weight"] = _gain(block, ("attn_norm", "scale"))
      out[b + "attn_sub_norm.weight"] = _gain(block, ("attn", "sub_norm", "scale"))
      out[b + "ffn_norm.weight"] = _gain(block, ("ffn_norm", "scale"))
      out[b + "ffn_sub_norm.weight"] = _gain(block, ("ffn", "sub_norm", "scale"))
    else:
      out[b + "attn_norm.weight"] = _one_gain(block, "attn", ("q_proj", "k_proj", "v_proj"), "attn_norm", i, atol)
      out[b + "attn_sub_norm.weight"] = _gain(block, ("attn", "o_proj", "norm", "scale"), cfg.d_model)
      out[b + "ffn_norm.weight"] = _one_gain(block, "ffn", ("gate_proj", "up_proj"), "ffn_norm", i, atol)
      out[b + "ffn_sub_norm.weight"] = _gain(block, ("ffn", "down_proj", "norm", "scale"), cfg.d_ff)
  return out


# --------------------------------------------------------------------------------------------------------------
# Tokenizer metadata.
# --------------------------------------------------------------------------------------------------------------
def _byte_level_chars() -> list[str]:
  """GPT-2's byte -> printable unicode character table (byte-level BPE vocabularies spell bytes this way)."""
  keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
  chars, extra = {}, 0
  for b in range(256):
    if b in keep:
      chars[b] = chr(b)
    else:
      chars[b], extra = chr(256 + extra), extra + 1
  return [chars[b] for b in range(256)]


def _add_tokenizer(writer, gguf, tokenizer, vocab_size: int) -> str:
  """Writes the tokenizer.ggml.* keys; returns the vocabulary type written."""
  T = gguf.TokenType
  if tokenizer is None:
    writer.add_tokenizer_model("none")
    writer.add_vocab_size(vocab_size)
    return "none"
  if isinstance(tokenizer, ByteTokenizer):
    tokens = _byte_level_chars() + ["<pad>", "<s>", "</s>"]
    types = [T.NORMAL] * 256 + [T.CONTROL] * 3
    # No merges. llama.cpp needs the key and the gguf package writes no empty array, so one merge that never
    # applies: BPE symbols are single characters here, and "<pad>" is five.
    merges = ["<pad> <pad>"]
    pre = "default"
  elif isinstance(tokenizer, HFTokenizer):
    spec = json.loads(Path(tokenizer.path).read_text())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
      raise ValueError(f"gguf.export: tokenizer {tokenizer.path} is a {model.get('type')!r} model; only BPE "
                       f"tokenizer.json files (and the byte tokenizer) are written; pass tokenizer=None for ids only")
    vocab = dict(model["vocab"])
    special = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    vocab.update(special)
    n = max(vocab.values()) + 1
    tokens, types = [f"[PAD{i}]" for i in range(n)], [T.UNUSED] * n
    for text, i in vocab.items():
      tokens[i], types[i] = text, (T.CONTROL if text in special else T.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    pre = "default"
    warnings.warn("gguf.export: the tokenizer.json's pre-tokenizer is written as llama.cpp's 'default' regex; check "
                  "that llama.cpp tokenises your text to the same ids", stacklevel=3)
  else:
    raise ValueError(f"gguf.export: tokenizer must be a ByteTokenizer, an HFTokenizer or None, got "
                     f"{type(tokenizer).__name__}")
  if len(tokens) > vocab_size:
    raise ValueError(f"gguf.export: the tokenizer has {len(tokens)} tokens but the model's vocab_size is {vocab_size}")
  tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]   # embedding rows beyond the tokenizer
  types += [T.UNUSED] * (vocab_size - len(types))
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre(pre)
  writer.add_token_list(tokens)
  writer.add_token_types(types)
  writer.add_token_merges(merges)
  for setter, tid in ((writer.add_bos_token_id, tokenizer.bos_id), (writer.add_eos_token_id, tokenizer.eos_id),
                      (writer.add_pad_token_id, getattr(tokenizer, "pad_id", None))):
    if tid is not None and 0 <= tid < vocab_size:
      setter(int(tid))
  writer.add_add_bos_token(False)   # our models are trained on text without a BOS prefix
  return "gpt2"


# --------------------------------------------------------------------------------------------------------------
# Export and read.
# --------------------------------------------------------------------------------------------------------------
def export(model: Transformer, path: str | os.PathLike, *, ftype: str = "TQ2_0", tokenizer=None,
           embedding_type: str = "F16", name: str = "bitnet_jax", norm_atol: float = 0.0) -> dict:
  """Writes `model` (a b158 model in a layout llama.cpp's `bitnet` graph computes: module docstring) to `path`.

  `ftype`: "TQ2_0" (2-bit, default), "TQ1_0" (1.6-bit) or "F16" codes; `embedding_type`: "F16" or "F32";
  `tokenizer`: ByteTokenizer, HFTokenizer or None. `norm_atol`: how far the FAQ form's q/k/v (gate/up) gains
  may differ to be merged into one norm (0: exactly equal). The file is written to a temporary name and renamed,
  so an interrupted export leaves no partial file. Returns a summary: tensors, bytes, bits per ternary weight.
  ValueError names the field, tensor or argument llama.cpp cannot take.
  """
  gguf = _gguf()
  if ftype not in FTYPES:
    raise ValueError(f"gguf.export: ftype={ftype!r} must be one of {FTYPES}")
  if embedding_type not in ("F16", "F32"):
    raise ValueError(f"gguf.export: embedding_type={embedding_type!r} must be 'F16' or 'F32'")
  cfg = model.cfg
  model.require_per_layer("gguf.export")
  layout = _layout(cfg)
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  floats = _float_tensors(cfg, pure, layout, norm_atol)
  qtype = {"TQ2_0": gguf.GGMLQuantizationType.TQ2_0, "TQ1_0": gguf.GGMLQuantizationType.TQ1_0,
           "F16": gguf.GGMLQuantizationType.F16}[ftype]
  linears = []   # (gguf name, codes [out, in] int8, scale)
  for i in range(cfg.n_layers):
    block = _block(pure, i)
    for group, table in (("attn", _ATTN), ("ffn", _FFN)):
      for ours, theirs in table:
        kernel = block[group][ours]["kernel"]                  # [in, out] float latent
        codes, scale = quant.ternary_codes(kernel)
        tensor = f"blk.{i}.{theirs}"   # not `name`: that is the model name written to general.name
        n_in = kernel.shape[0]
        if ftype != "F16" and n_in % QK_K:
          raise ValueError(f"gguf.export: {tensor} has {n_in} input features per row; {ftype} stores rows in "
                           f"blocks of {QK_K}, so it needs a multiple of {QK_K} (use ftype='F16' for this model)")
        linears.append((tensor, np.asarray(codes).T.copy(), float(np.asarray(scale).reshape(()))))

  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".partial")
  writer = gguf.GGUFWriter(str(tmp), ARCH)
  try:
    writer.add_name(name)
    writer.add_file_type({"TQ2_0": gguf.LlamaFileType.MOSTLY_TQ2_0, "TQ1_0": gguf.LlamaFileType.MOSTLY_TQ1_0,
                          "F16": gguf.LlamaFileType.MOSTLY_F16}[ftype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)   # without it llama.cpp uses 10000
    vocab_type = _add_tokenizer(writer, gguf, tokenizer, cfg.vocab_size)

    emb = np.float16 if embedding_type == "F16" else np.float32
    writer.add_tensor("token_embd.weight", floats.pop("token_embd.weight").astype(emb))
    for key, value in floats.items():
      writer.add_tensor(key, value.astype(np.float32))
    n_weights = n_bytes = 0
    for key, codes, scale in linears:
      if ftype == "F16":
        data = codes.astype(np.float16)
        writer.add_tensor(key + ".weight", data)
      else:
        data = gguf.quants.quantize(codes.astype(np.float32), qtype)
        writer.add_tensor(key + ".weight", data, raw_dtype=qtype)
      writer.add_tensor(key + ".scale", np.asarray([scale], np.float32))
      n_weights, n_bytes = n_weights + codes.size, n_bytes + data.nbytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
  except BaseException:
    writer.close()
    tmp.unlink(missing_ok=True)
    raise
  writer.close()
  os.replace(tmp, path)
  return {"path": str(path), "ftype": ftype, "layout": layout, "vocab": vocab_type, "bytes": path.stat().st_size,
          "ternary_weights": n_weights, "bits_per_weight": 8.0 * n_bytes / max(n_weights, 1)}


def read(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Every tensor of a GGUF file as float32 in numpy's [rows, row length] order (ggml's ne reversed),
  dequantised by the `gguf` package's own reader (TQ codes times their block scale)."""
  gguf = _gguf()
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"gguf.read: no file {path}")
  out = {}
  for t in gguf.GGUFReader(str(path)).tensors:
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    out[t.name] = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
  return out
