"""interop/hf: Hugging Face BitNet checkpoints in and out (model -> interop).

    model = hf.load("bitnet-b1.58-2B-4T/")              # config.json + *.safetensors -> Transformer
    model, tok = hf.load_pretrained("bitnet-b1.58-2B-4T/")   # ... and its tokenizer.json, when present
    hf.save(model, "out/", form="packed")              # transformers.AutoModelForCausalLM.from_pretrained("out/")

Two transformers model types, read and written without torch (safetensors is parsed here):
  * `bitnet` (`BitNetForCausalLM`, the b1.58 2B4T release, ../shared/PAPERS.md section 3) <-> our variant "b158"
    with the 2B4T options: `block_norm="rms"` (input_layernorm, post_attention_layernorm), `linear_norm=None`,
    `sub_norms=True` (attn_sub_norm before o_proj, ffn_sub_norm before down_proj, both RMSNorm), GQA,
    `ffn="relu2_glu"` (hidden_act "relu2") or "swiglu" ("silu"), rotate-half RoPE with `rope_theta`, tied or
    untied embeddings, `norm_eps = rms_norm_eps`.
  * `llama` (`LlamaForCausalLM`) <-> our variant "fp" (block RMSNorm, SwiGLU, no quantisation).

Layouts (transformers' `nn.Linear.weight` is [out, in], our kernels [in, out]; our `head` is [D, V], theirs
`lm_head.weight` [V, D]). Query heads are the consecutive `head_dim` slices of q_proj's output and query head h
reads kv head h // (H / K) in both; both use the rotate-half RoPE with inverse frequencies theta^(-2i / Dh), so
no permutation of q/k rows is needed (it is only for Meta's original interleaved-RoPE files).

How transformers (5.23, read for the format) stores and runs the ternary linear layers, by `quantization_config`:
  * absent: the BitNet architecture runs *unquantised* in transformers; the float weights are the latent weights
    of a b1.58 model (the release's -bf16 "master weights"), which is how `load` reads them.
  * `linear_class="bitlinear"` (the default, "offline"): `weight` uint8 [out/4, in], 4 codes per byte along the
    output axis: with R = out/4, bits 2i..2i+1 of `weight[r, c]` hold `codes[i*R + r, c] + 1` (the "2bit" format
    of `bitnet_jax.packing`, axis 0). `weight_scale` shape (1,) is s = 1/mean|W|, and the layer *divides*:
    `y = (x_codes @ codes.T) / (x_scale * weight_scale)`, x_scale = 127 / max(max|x|, 1e-5) per token,
    round half to even, clip [-128, 127] (our `quant.quantize_activations`, the b1.58 FAQ reference).
  * `linear_class="autobitlinear"`, "offline": `weight` packed as above (or already ternary floats [out, in]),
    and the layer *multiplies*: `y = ActQuant(x) @ weight.T * weight_scale`, so here weight_scale = mean|W|.
  * `linear_class="autobitlinear"`, "online": float latent `weight` [out, in], quantised at every forward with
    absmean per tensor, exactly our `BitLinear` with groups=1. `save(form="latent")` writes this.
`load` follows the checkpoint's own `linear_class`, so weight_scale is read as transformers would run it.
`use_rms_norm=True` (an RMSNorm inside every linear layer) has no equivalent in this layout and is refused.

Our BitLinear re-quantises its float latent kernel at every forward, so a packed layer (codes C, scale m =
mean|W|) becomes the latent kernel `C * m / mean|C|`: its absmean is m, and round(latent / m) clipped to [-1, 1]
gives back C (|C / mean|C|| >= 1 where C != 0). All-zero codes become a zero kernel (both sides then output 0).
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bitnet_jax import quant
from bitnet_jax.model import GATED, ModelConfig, Transformer
from bitnet_jax.packing import pack_2bit, unpack_2bit
from bitnet_jax.tokenizer import HFTokenizer

__all__ = ["load", "load_pretrained", "load_tokenizer", "save", "model_config_from_hf", "hf_config_from",
           "latent_from_codes", "read_safetensors", "write_safetensors", "SAVE_FORMS"]

SAVE_FORMS = ("packed", "latent")   # b158 models; an fp model is written in the LLaMA layout
_ACTS = {"silu": "swiglu", "relu2": "relu2_glu"}   # transformers hidden_act <-> our gated FFN kind
_DEFAULT_THETA = {"bitnet": 500000.0, "llama": 10000.0}   # the config classes' defaults when the file has none
_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------------------------------------------
# safetensors: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, the bytes.
# --------------------------------------------------------------------------------------------------------------
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_ST_CODES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


def read_safetensors(file: str | Path) -> dict[str, np.ndarray]:
  """The tensors of one .safetensors file as read-only numpy arrays backed by a memory map (bf16 as ml_dtypes)."""
  file = Path(file)
  with file.open("rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
  data = np.memmap(file, dtype=np.uint8, mode="r")
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _ST_DTYPES:
      raise ValueError(f"{file}: tensor {name!r} has dtype {info['dtype']}, which hf.load does not read")
    begin, end = info["data_offsets"]
    out[name] = data[8 + n + begin:8 + n + end].view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])
  return out


def write_safetensors(file: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
  """Writes `tensors` as one .safetensors file (header padded to 8 bytes, tensors in name order)."""
  header, arrays, offset = {}, [], 0
  for name in sorted(tensors):
    a = np.ascontiguousarray(tensors[name])
    if a.dtype not in _ST_CODES:
      raise ValueError(f"write_safetensors: tensor {name!r} has dtype {a.dtype}, not one of {list(_ST_DTYPES)}")
    header[name] = {"dtype": _ST_CODES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
    arrays.append(a)
    offset += a.nbytes
  if metadata:
    header["__metadata__"] = metadata
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with Path(file).open("wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for a in arrays:
      f.write(a.tobytes())   # native order: little-endian on every platform jax runs on


def _read_weights(directory: Path) -> dict[str, np.ndarray]:
  index = directory / "model.safetensors.index.json"
  if index.exists():
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
  else:
    files = sorted(p.name for p in directory.glob("*.safetensors"))
  if not files:
    raise FileNotFoundError(f"{directory} has no *.safetensors weights (a pytorch_model.bin is not read: re-save "
                            f"it with transformers' save_pretrained, which writes safetensors)")
  tensors = {}
  for name in files:
    tensors.update(read_safetensors(directory / name))
  return tensors


# --------------------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# --------------------------------------------------------------------------------------------------------------
def _field(hf: dict, key: str, default: Any = None, required: bool = False) -> Any:
  if hf.get(key) is None:
    if required:
      raise ValueError(f"config.json: required field {key!r} is missing")
    return default
  return hf[key]


def _linear_mode(hf: dict) -> str:
  """How the checkpoint's linear weights are stored and run (module docstring): fp | latent | div | mul."""
  q = hf.get("quantization_config")
  if hf["model_type"] == "llama":
    if q:
      raise ValueError(f"config.json: a quantized llama checkpoint (quantization_config={q}) is not supported; "
                       f"hf.load reads the unquantised LLaMA layout of the fp variant")
    return "fp"
  if not q:
    return "latent"
  if q.get("quant_method") != "bitnet":
    raise ValueError(f"config.json: quantization_config.quant_method={q.get('quant_method')!r}, expected 'bitnet'")
  if q.get("use_rms_norm"):
    raise ValueError("config.json: quantization_config.use_rms_norm=true (an RMSNorm inside every linear layer) "
                     "has no equivalent in the 2B4T layout our b158 options map to")
  skip = q.get("modules_to_not_convert")
  if skip is not None:
    if any(s.split(".")[-1] in _LINEARS for s in skip):
      raise ValueError(f"config.json: quantization_config.modules_to_not_convert={skip} leaves attention/FFN "
                       f"projections unquantised; our b158 model quantises all of them")
    if not any(s.split(".")[-1] == "lm_head" for s in skip):
      raise ValueError(f"config.json: quantization_config.modules_to_not_convert={skip} does not name lm_head, so "
                       f"transformers would quantise the output head; ours is full precision")
  linear_class = q.get("linear_class", "bitlinear")
  if linear_class == "bitlinear":
    return "div"   # transformers' BitLinear is offline-packed whatever quantization_mode says
  if linear_class != "autobitlinear":
    raise ValueError(f"config.json: quantization_config.linear_class={linear_class!r}, expected 'bitlinear' or "
                     f"'autobitlinear'")
  mode = q.get("quantization_mode", "offline")
  if mode not in ("online", "offline"):
    raise ValueError(f"config.json: quantization_config.quantization_mode={mode!r}, expected 'online' or 'offline'")
  return "latent" if mode == "online" else "mul"


def model_config_from_hf(hf: dict, *, dtype: str | None = None) -> ModelConfig:
  """Our ModelConfig for a transformers `bitnet` or `llama` config.json dict. Raises ValueError naming the field
  of anything the model cannot represent (biases, non-default RoPE scaling, a head_dim other than d / heads,
  activations other than silu / relu2)."""
  model_type = hf.get("model_type")
  if model_type not in _DEFAULT_THETA:
    raise ValueError(f"config.json: model_type={model_type!r} is not supported; hf.load reads "
                     f"{tuple(_DEFAULT_THETA)} (BitNet b1.58 2B4T layout, LLaMA layout)")
  d, heads = _field(hf, "hidden_size", required=True), _field(hf, "num_attention_heads", required=True)
  head_dim = _field(hf, "head_dim", d // heads)
  if head_dim * heads != d:
    raise ValueError(f"config.json: head_dim={head_dim} x num_attention_heads={heads} != hidden_size={d}; our "
                     f"attention has head_dim = d_model / n_heads")
  act = _field(hf, "hidden_act", "silu")
  if act not in _ACTS:
    raise ValueError(f"config.json: hidden_act={act!r} is not supported; valid: {tuple(_ACTS)}")
  for key in ("attention_bias", "mlp_bias"):
    if hf.get(key):
      raise ValueError(f"config.json: {key}=true; our linear layers have no biases (LLaMA, b1.58)")
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type != "default":
    raise ValueError(f"config.json: rope_type={rope_type!r} (RoPE scaling) is not supported; only 'default'")
  theta = rope.get("rope_theta", _field(hf, "rope_theta", _DEFAULT_THETA[model_type]))
  _linear_mode(hf)   # validates quantization_config
  return ModelConfig(
      variant="b158" if model_type == "bitnet" else "fp", vocab_size=_field(hf, "vocab_size", required=True),
      d_model=d, n_layers=_field(hf, "num_hidden_layers", required=True), n_heads=heads,
      n_kv_heads=_field(hf, "num_key_value_heads", heads), d_ff=_field(hf, "intermediate_size", required=True),
      max_seq_len=_field(hf, "max_position_embeddings", 2048), rope_theta=float(theta), ffn=_ACTS[act],
      linear_norm=None, block_norm="rms", sub_norms=model_type == "bitnet",
      tie_embeddings=bool(_field(hf, "tie_word_embeddings", False)), norm_eps=float(_field(hf, "rms_norm_eps", 1e-6)),
      init_std=float(_field(hf, "initializer_range", 0.02)), dtype=dtype)


def _require(cfg: ModelConfig, field: str, ok: bool, need: str, layout: str) -> None:
  if not ok:
    raise ValueError(f"hf.save: ModelConfig.{field}={getattr(cfg, field)!r}, but the {layout} layout needs {need}")


def _layout_of(cfg: ModelConfig) -> str:
  """"bitnet" or "llama": the transformers model type `cfg` can be written as (ValueError naming the field if none)."""
  named = [f for f in ("act_quant", "act_quant_attn_out", "act_quant_ffn_out") if getattr(cfg, f, None) is not None]
  if cfg.weight_quant == "none" and cfg.act_bits is None and not named:
    layout, need_sub = "llama", False
  else:
    layout, need_sub = "bitnet", True
    _require(cfg, "weight_quant", cfg.weight_quant == "ternary", "'ternary'", layout)
    for field in named:
      _require(cfg, field, False, "None (per-token absmax INT8 activations, act_bits=8)", layout)
  _require(cfg, "hadamard", not getattr(cfg, "hadamard", False), "False (no Hadamard transform)", layout)
  if layout == "bitnet":
    _require(cfg, "act_bits", cfg.act_bits == 8, "8", layout)
    _require(cfg, "act_per_token", cfg.act_per_token is True, "True (per-token absmax)", layout)
    _require(cfg, "bitnet_asymmetric_ffn", not cfg.bitnet_asymmetric_ffn, "False", layout)
    _require(cfg, "groups", cfg.groups == 1, "1 (one weight_scale per tensor)", layout)
    _require(cfg, "fsdp_groups", cfg.fsdp_groups == 1, "1 (one weight_scale per tensor)", layout)
  _require(cfg, "linear_norm", cfg.linear_norm is None, "None (norms sit in the blocks)", layout)
  _require(cfg, "block_norm", cfg.block_norm == "rms", "'rms'", layout)
  _require(cfg, "sub_norms", cfg.sub_norms == need_sub, str(need_sub), layout)
  _require(cfg, "ffn", cfg.ffn in GATED, f"one of {GATED}", layout)
  if getattr(cfg, "kv_quant", "none") != "none":   # a rounded K/V cache is not part of either layout
    _require(cfg, "kv_quant", False, "'none'", layout)
  return layout


def hf_config_from(cfg: ModelConfig, *, form: str | None = None, dtype: str = "float32",
                   bos_id: int | None = None, eos_id: int | None = None) -> dict:
  """The config.json dict of `cfg` in the transformers layout `save` writes (`form` as in `save`)."""
  layout = _layout_of(cfg)
  hf = {"architectures": ["BitNetForCausalLM" if layout == "bitnet" else "LlamaForCausalLM"],
        "model_type": layout, "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "hidden_act": {v: k for k, v in _ACTS.items()}[cfg.ffn],
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "attention_dropout": 0.0,
        "initializer_range": cfg.init_std, "bos_token_id": bos_id, "eos_token_id": eos_id, "dtype": dtype,
        "use_cache": True}
  if layout == "llama":
    hf["mlp_bias"] = False
    if form is not None:
      raise ValueError(f"hf.save: form={form!r} is for b158 models; an fp model is written in the LLaMA layout")
  else:
    form = form or "packed"
    if form not in SAVE_FORMS:
      raise ValueError(f"hf.save: form={form!r} must be one of {SAVE_FORMS}")
    hf["quantization_config"] = (
        {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline"} if form == "packed"
        else {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"})
  return hf


# --------------------------------------------------------------------------------------------------------------
# Tensors: the name table, codes <-> latent kernels.
# --------------------------------------------------------------------------------------------------------------
def _tensor_table(cfg: ModelConfig) -> list[tuple[str, tuple, str]]:
  """(transformers name, path in our state, kind) for every tensor; kind: embed | head | norm | linear. Linear
  names carry no suffix (`.weight`, `.weight_scale` follow)."""
  rows = [("model.embed_tokens.weight", ("embed",), "embed")]
  for i in range(cfg.n_layers):
    p, b = f"model.layers.{i}.", ("blocks", i)
    rows += [(p + "input_layernorm.weight", b + ("attn_norm", "scale"), "norm"),
             (p + "post_attention_layernorm.weight", b + ("ffn_norm", "scale"), "norm")]
    rows += [(p + f"self_attn.{n}", b + ("attn", n, "kernel"), "linear") for n in _LINEARS[:4]]
    rows += [(p + f"mlp.{n}", b + ("ffn", n, "kernel"), "linear") for n in _LINEARS[4:]]
    if cfg.sub_norms:
      rows += [(p + "self_attn.attn_sub_norm.weight", b + ("attn", "sub_norm", "scale"), "norm"),
               (p + "mlp.ffn_sub_norm.weight", b + ("ffn", "sub_norm", "scale"), "norm")]
  rows.append(("model.norm.weight", ("final_norm", "scale"), "norm"))
  if not cfg.tie_embeddings:
    rows.append(("lm_head.weight", ("head",), "head"))
  return rows


def _node(tree: dict, path: tuple) -> tuple[dict, Any]:
  """(parent dict, key) of `path` in a pure state dict (nnx.List indices may be ints or strings)."""
  for k in path[:-1]:
    tree = tree[k] if k in tree else tree[str(k)]
  key = path[-1] if path[-1] in tree else str(path[-1])
  return tree, key


def latent_from_codes(codes: np.ndarray, scale: float) -> np.ndarray:
  """A float32 latent kernel whose b1.58 absmean quantisation gives back `codes` with scale `scale` = mean|W|.

  `W = C * scale / mean|C|`: mean|W| = scale and round(W / scale) clipped to [-1, 1] is C (|C / mean|C|| >= 1
  where C != 0). Our quantiser sums |W| in float32, in an order XLA picks; equal values would not sum exactly
  (measured: 2e-6 relative over 1,400 terms), so the magnitudes are multiples of one power of two q with the total in
  [2^23 q, 2^24 q): every partial sum is then exact in any order, and the mean is within one float32 rounding
  of `scale`. All-zero codes give a zero kernel. A scale below `quant.EPS` (the reference's clamp on mean|W|)
  cannot be represented and raises ValueError.
  """
  codes = np.asarray(codes)
  if not np.isin(codes, (-1, 0, 1)).all():
    raise ValueError(f"latent_from_codes: codes must be in {{-1, 0, 1}}, got values {np.unique(codes)[:5]}")
  nonzero = codes != 0
  k = int(nonzero.sum())
  if k == 0:
    return np.zeros(codes.shape, np.float32)
  if not np.isfinite(scale) or scale < quant.EPS:
    raise ValueError(f"latent_from_codes: scale={scale} (mean|W|) is below quant.EPS={quant.EPS}, where the b1.58 "
                     f"quantiser clamps it; the layer cannot be reproduced")
  total = float(scale) * codes.size                           # sum |W|
  q = 2.0 ** (math.floor(math.log2(total)) - 23)
  base, extra = divmod(round(total / q), k)                   # k magnitudes of base or base + 1 units of q
  units = np.full(k, base, np.int64)
  units[:extra] += 1
  latent = np.zeros(codes.shape, np.float32)
  latent[nonzero] = codes[nonzero] * (units * q).astype(np.float32)
  return latent


def _float_tensor(name: str, a: np.ndarray, shape: tuple) -> np.ndarray:
  if tuple(a.shape) != tuple(shape):
    raise ValueError(f"tensor {name!r} has shape {tuple(a.shape)}, expected {tuple(shape)} from config.json")
  if not np.issubdtype(a.dtype, np.floating) and a.dtype != jnp.bfloat16:
    raise ValueError(f"tensor {name!r} has dtype {a.dtype}, expected a float dtype")
  return np.asarray(a, np.float32)


def _ternary_kernel(name: str, tensors: dict, mode: str, out_in: tuple[int, int]) -> np.ndarray:
  """Our float32 kernel [in, out] of one linear layer (module docstring for the modes)."""
  w, (n_out, n_in) = tensors[name + ".weight"], out_in
  if mode in ("fp", "latent"):
    return _float_tensor(name + ".weight", w, out_in).T
  if name + ".weight_scale" not in tensors:
    raise ValueError(f"tensor {name + '.weight_scale'!r} is missing (offline BitNet layers need one)")
  ws = np.asarray(tensors[name + ".weight_scale"], np.float64).reshape(-1)
  if ws.size != 1:
    raise ValueError(f"tensor {name + '.weight_scale'!r} has shape {tuple(ws.shape)}; only one scale per tensor "
                     f"(shape (1,)) is supported")
  if w.dtype == np.uint8 and n_out % 4 == 0 and tuple(w.shape) == (n_out // 4, n_in):
    codes = np.asarray(unpack_2bit(np.asarray(w), n_out, axis=0))
  elif mode == "mul" and tuple(w.shape) == out_in and w.dtype != np.uint8:
    codes = np.asarray(w, np.float32)
  else:
    raise ValueError(f"tensor {name + '.weight'!r} has shape {tuple(w.shape)} and dtype {w.dtype}, expected uint8 "
                     f"{(n_out // 4, n_in)} (4 ternary codes per byte along the output axis)")
  scale = 1.0 / ws[0] if mode == "div" else ws[0]   # bitlinear divides by weight_scale, autobitlinear multiplies
  return latent_from_codes(codes.T, scale)   # in our layout: the float32 mean is summed in the model's order


def load(path: str | Path, *, dtype: str | None = None) -> Transformer:
  """A transformers `bitnet` or `llama` checkpoint directory (config.json + safetensors) as our Transformer.

  `dtype` is the compute dtype (ModelConfig.dtype; None: float32 on CPU); latent weights are float32. Raises
  FileNotFoundError for a missing directory or file, ValueError naming the field or tensor for anything else.
  """
  directory = Path(path)
  if not (directory / "config.json").is_file():
    raise FileNotFoundError(f"{directory} is not a Hugging Face checkpoint directory (no config.json)")
  hf = json.loads((directory / "config.json").read_text())
  cfg = model_config_from_hf(hf, dtype=dtype)
  mode = _linear_mode(hf)
  tensors = _read_weights(directory)
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  pure = nnx.to_pure_dict(state)
  used = set()
  for name, ours, kind in _tensor_table(cfg):
    parent, key = _node(pure, ours)
    shape = tuple(parent[key].shape)
    hf_shape = shape[::-1] if kind in ("linear", "head") else shape
    weight = name + ".weight" if kind == "linear" else name
    if weight not in tensors:
      raise ValueError(f"tensor {weight!r} is missing from the safetensors of {directory}")
    if kind == "linear":
      value = _ternary_kernel(name, tensors, mode, hf_shape)
      used.update({weight, name + ".weight_scale"})
    else:
      value = _float_tensor(name, tensors[name], hf_shape)
      value = value.T if kind == "head" else value
      used.add(name)
    parent[key] = jnp.asarray(value, jnp.dtype(cfg.param_dtype))
  ignorable = lambda n: n.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings and n == "lm_head.weight")
  extra = sorted(n for n in tensors if n not in used and not ignorable(n))
  if extra:
    raise ValueError(f"{directory} holds tensors a model_type={hf['model_type']!r} model of this config does not "
                     f"have: {extra[:6]}{' ...' if len(extra) > 6 else ''}")
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def load_tokenizer(path: str | Path) -> HFTokenizer | None:
  """The directory's tokenizer.json as an HFTokenizer (None if absent); its EOS is config.json's eos_token_id
  (the first one, when it is a list) when that id is in the file."""
  directory = Path(path)
  file = directory / "tokenizer.json"
  if not file.is_file():
    return None
  tok = HFTokenizer(str(file))
  config = directory / "config.json"
  eos = json.loads(config.read_text()).get("eos_token_id") if config.is_file() else None
  eos = eos[0] if isinstance(eos, list) and eos else eos
  if isinstance(eos, int) and eos != tok.eos_id:
    import tokenizers   # present: HFTokenizer just used it
    token = tokenizers.Tokenizer.from_file(str(file)).id_to_token(eos)
    if token is not None:
      tok = HFTokenizer(str(file), eos_token=token)
  return tok


def load_pretrained(path: str | Path, *, dtype: str | None = None) -> tuple[Transformer, HFTokenizer | None]:
  """`load(path)` and `load_tokenizer(path)` together."""
  return load(path, dtype=dtype), load_tokenizer(path)


def save(model: Transformer, path: str | Path, *, form: str | None = None, dtype: str = "float32",
         tokenizer: HFTokenizer | None = None) -> None:
  """Writes `model` as a checkpoint directory that `transformers.AutoModelForCausalLM.from_pretrained` loads.

  A b158 model with the 2B4T options is written as `bitnet`: `form="packed"` (default) as the release stores it,
  uint8 codes packed 4 per byte along the output axis with weight_scale = 1/mean|W| (linear_class "bitlinear");
  `form="latent"` with the float latent weights and an online-quantising `autobitlinear` config (for fine-tuning
  in transformers). An fp model with block RMSNorms and a gated FFN is written as `llama`. `dtype`
  ("float32", "bfloat16", "float16") is that of every float tensor (bf16 rounds the weight scales too). A
  `tokenizer` (an HFTokenizer) is copied in as tokenizer.json and sets bos/eos_token_id.
  """
  cfg = model.cfg
  model.require_per_layer("hf.save")
  if dtype not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"hf.save: dtype={dtype!r} must be 'float32', 'bfloat16' or 'float16'")
  if tokenizer is not None and not isinstance(tokenizer, HFTokenizer):
    raise ValueError(f"hf.save: tokenizer must be an HFTokenizer (a tokenizer.json), got {type(tokenizer).__name__}")
  hf = hf_config_from(cfg, form=form, dtype=dtype, bos_id=tokenizer and tokenizer.bos_id,
                      eos_id=tokenizer and tokenizer.eos_id)
  packed = hf.get("quantization_config", {}).get("linear_class") == "bitlinear"
  directory = Path(path)
  directory.mkdir(parents=True, exist_ok=True)
  stale = [p.name for p in directory.glob("*.safetensors*") if p.name != "model.safetensors"]
  if stale:
    raise FileExistsError(f"{directory} already holds other weight files {stale}; save into an empty directory")
  np_dtype = np.dtype(jnp.dtype(dtype))
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  tensors = {}
  for name, ours, kind in _tensor_table(cfg):
    parent, key = _node(pure, ours)
    value = np.asarray(jax.device_get(parent[key]), np.float32)
    if kind == "linear" and packed:
      n_out = value.shape[1]
      if n_out % 4:
        raise ValueError(f"hf.save: {name} has {n_out} output features; the packed form needs a multiple of 4")
      codes, scale = quant.ternary_codes(jnp.asarray(value))                           # [in, out], mean|W|
      tensors[name + ".weight"] = np.asarray(pack_2bit(codes.T, axis=0))              # uint8 [out/4, in]
      tensors[name + ".weight_scale"] = np.asarray([1.0 / float(scale.reshape(()))], np_dtype)
    else:
      value = value.T if kind in ("linear", "head") else value
      tensors[name + ".weight" if kind == "linear" else name] = value.astype(np_dtype)
  write_safetensors(directory / "model.safetensors", tensors, {"format": "pt"})
  (directory / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
  if tokenizer is not None and Path(tokenizer.path).resolve() != (directory / "tokenizer.json").resolve():
    shutil.copyfile(tokenizer.path, directory / "tokenizer.json")
