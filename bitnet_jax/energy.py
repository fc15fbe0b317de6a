"""energy: the papers' arithmetic energy and memory models (model -> energy; used by experiments).

Energy (BitNet, 2310.11453, section 3.1 "Inference-Optimal Scaling" / Tables 1-2; b1.58, 2402.17764, "Energy").
Each matmul (m x n) @ (n x p) costs `m n p` multiplications and `m (n-1) p` additions, at Table 2's
per-operation energies (pJ; Horowitz 2014 at 45nm, the paper's 7nm estimates). We count, for one prefill of
`n_tokens` tokens (m = n_tokens):
  * the linear layers' weight matmuls (q, k, v, o; gate, up, down): FP32 / FP16 in the baselines; in BitNet the
    weights are +-1 (or {-1, 0, 1}), so the additions are INT8 and the only multiplications are the scalings,
    `m p + m n` per matmul (de-quantising the output, quantising the input), counted at FP16;
  * attention's score matmuls QK^T and AV over the full T x T score matrix (`attention="full"`), per query head.
    They are not quantised in any variant (BitNet section 2), so BitNet pays them at FP16, the precision of its
    mixed-precision training and of the FP16 baseline.
The output head is not counted (`include_head=False`). This is the convention BitNet Table 1's numbers imply: the
FP32/FP16 cells are 12 d^2 L T + 2 L T^2 d operations times one Table 2 energy (linear layers alone come out ~2%
low at 6.7B; adding the head comes out ~1% high), and BitNet's MUL cells are exactly attention's FP16 products
(the scalings are < 2% of them). With it 35 of Table 1's 36 cells reproduce (within 10% or to the printed two
decimals); the exception is 6.7B BitNet 7nm ADD: we get 0.034 J, the paper prints 0.04 (-15%). No convention in
`CONVENTIONS` fixes that cell without breaking others (`convention_search`), see experiments/energy.py's output.

b1.58's "71.4x less arithmetic energy for matmul at 7nm" is the per-operation ratio of an FP16 multiply-add to an
INT8 add, (0.34 + 0.16) / 0.007 = 71.43 (`b158_energy_ratio`); at model level the same ratio holds for the linear
layers' matmuls alone up to the (n-1)/n and scaling terms.

Memory (b1.58 Table 1): linear weights at `weight_bits` (2 for the 2-bit kernel the paper measured with, 1.6 for
base-3 packing, 16 for FP16) plus one 16-bit scale per quantised linear layer (per group); embeddings, head and
norm gains at 16 bits. The paper's numbers are measured GPU memory, which also holds the KV cache, activations and
runtime buffers, so the weights-only model is a lower bound (`memory_comparison`).
"""

from __future__ import annotations

import functools
import math

from bitnet_jax.model import GATED, ModelConfig, count_params, preset

PJ = 1e-12
GB = 1e9   # memory in decimal gigabytes (the b1.58 paper does not say GB or GiB)

# BitNet Table 2: energy per operation in pJ, {process: {dtype: {"add", "mul"}}}.
ENERGY_PJ: dict[str, dict[str, dict[str, float]]] = {
    "45nm": {"fp32": {"add": 0.9, "mul": 3.7}, "fp16": {"add": 0.4, "mul": 1.1},
             "int8": {"add": 0.03, "mul": 0.2}},
    "7nm": {"fp32": {"add": 0.38, "mul": 1.31}, "fp16": {"add": 0.16, "mul": 0.34},
            "int8": {"add": 0.007, "mul": 0.07}},
}
PROCESSES = tuple(ENERGY_PJ)
VARIANTS = ("fp32", "fp16", "bitnet")
ATTENTION_MODES = ("full", "causal", "none")

# BitNet Table 1: energy in J for 512 input tokens, {size: {variant: {process: (MUL, ADD)}}}.
PAPER_TABLE1_J: dict[str, dict[str, dict[str, tuple[float, float]]]] = {
    "6.7b": {"fp32": {"7nm": (4.41, 1.28), "45nm": (12.46, 3.03)},
             "fp16": {"7nm": (1.14, 0.54), "45nm": (3.70, 1.35)},
             "bitnet": {"7nm": (0.02, 0.04), "45nm": (0.08, 0.13)}},
    "13b": {"fp32": {"7nm": (8.58, 2.49), "45nm": (24.23, 5.89)},
            "fp16": {"7nm": (2.23, 1.05), "45nm": (7.20, 2.62)},
            "bitnet": {"7nm": (0.04, 0.06), "45nm": (0.12, 0.24)}},
    "30b": {"fp32": {"7nm": (20.09, 5.83), "45nm": (56.73, 13.80)},
            "fp16": {"7nm": (5.21, 2.45), "45nm": (16.87, 6.13)},
            "bitnet": {"7nm": (0.06, 0.14), "45nm": (0.20, 0.53)}},
}
TABLE1_TOKENS = 512
TABLE1_PRINTED_HALF_UNIT = 0.005   # Table 1 prints two decimals
B158_PAPER_RATIO = 71.4            # b1.58 "Energy": FP16 vs INT8 matmul arithmetic at 7nm

# b1.58 Table 1: measured GPU memory in GB, (model, size) -> GB; the presets use the FAQ Table 1 configs.
PAPER_B158_MEMORY_GB: dict[tuple[str, str], float] = {
    ("llama", "700m"): 2.08, ("b158", "700m"): 0.80,
    ("llama", "1.3b"): 3.34, ("b158", "1.3b"): 1.14,
    ("llama", "3b"): 7.89, ("b158", "3b"): 2.22,
    ("b158", "3.9b"): 2.38,
}
PAPER_2B4T_NON_EMBEDDING_GB = 0.4   # b1.58 2B4T technical report

# Counting conventions tried against Table 1 (keyword arguments of `matmul_energy`); "main" is the default.
CONVENTIONS: dict[str, dict] = {
    "main": dict(attention="full", include_head=False, bitnet_attention="fp16"),
    "linear_only": dict(attention="none", include_head=False, bitnet_attention="fp16"),
    "causal_attention": dict(attention="causal", include_head=False, bitnet_attention="fp16"),
    "with_head": dict(attention="full", include_head=True, bitnet_attention="fp16"),
    "bitnet_attention_fp32": dict(attention="full", include_head=False, bitnet_attention="fp32"),
    "bitnet_attention_int8": dict(attention="full", include_head=False, bitnet_attention="int8"),
}


# ------------------------------------------------------------------------------------------------------------
# Operation counts.
# ------------------------------------------------------------------------------------------------------------
def _config(cfg: ModelConfig | str) -> ModelConfig:
  if isinstance(cfg, str):
    return preset(cfg, dtype="float32")
  if not isinstance(cfg, ModelConfig):
    raise ValueError(f"model_config must be a ModelConfig or a preset name, got {type(cfg).__name__}")
  return cfg


def _positive_int(name: str, value) -> int:
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")
  return value


def linear_shapes(cfg: ModelConfig | str) -> list[tuple[int, int]]:
  """(d_in, d_out) of every linear layer's weight in the model (all blocks), as in `bitnet_jax.model`."""
  cfg = _config(cfg)
  D, F, H, K, Dh = cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  block = [(D, H * Dh), (D, K * Dh), (D, K * Dh), (H * Dh, D)]     # q, k, v, o
  block += [(D, F)] * (2 if cfg.ffn in GATED else 1) + [(F, D)]   # (gate,) up, down
  return block * cfg.n_layers


def matmul_ops(cfg: ModelConfig | str, n_tokens: int, *, attention: str = "full",
               include_head: bool = False) -> dict[str, dict[str, int]]:
  """Multiplications and additions of one prefill of `n_tokens` tokens, by matmul group.

  Returns {"linear": {"mul", "add", "scale_mul"}, "attention": {"mul", "add"}, "head": {"mul", "add"}}; an
  (m x n) @ (n x p) product counts m n p muls and m (n-1) p adds (PAPERS.md, BitNet energy model), "scale_mul"
  is BitNet's m p + m n scalings. attention: "full" counts the whole T x T score matrix, "causal" its lower
  triangle, "none" nothing. The head is zero unless `include_head`.
  """
  cfg = _config(cfg)
  T = _positive_int("n_tokens", n_tokens)
  if attention not in ATTENTION_MODES:
    raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
  shapes = linear_shapes(cfg)
  linear = {"mul": sum(T * n * p for n, p in shapes), "add": sum(T * (n - 1) * p for n, p in shapes),
            "scale_mul": sum(T * p + T * n for n, p in shapes)}
  H, Dh, L = cfg.n_heads, cfg.head_dim, cfg.n_layers
  if attention == "full":       # QK^T: (T x Dh) @ (Dh x T); AV: (T x T) @ (T x Dh); per query head
    mul = 2 * T * T * Dh
    add = T * (Dh - 1) * T + T * (T - 1) * Dh
  elif attention == "causal":   # query t sees t + 1 keys
    pairs = T * (T + 1) // 2
    mul = 2 * pairs * Dh
    add = pairs * (Dh - 1) + (T * (T - 1) // 2) * Dh
  else:
    mul = add = 0
  attn = {"mul": mul * H * L, "add": add * H * L}
  D, V = cfg.d_model, cfg.vocab_size
  head = {"mul": T * D * V, "add": T * (D - 1) * V} if include_head else {"mul": 0, "add": 0}
  return {"linear": linear, "attention": attn, "head": head}


# ------------------------------------------------------------------------------------------------------------
# Energy.
# ------------------------------------------------------------------------------------------------------------
def matmul_energy(model_config: ModelConfig | str, n_tokens: int, process: str, *, attention: str = "full",
                  include_head: bool = False, bitnet_attention: str = "fp16") -> dict[str, dict[str, float]]:
  """Arithmetic energy in joules of the matmuls of one `n_tokens` prefill: BitNet Table 1's model.

  Returns {"fp32": {"mul", "add"}, "fp16": {...}, "bitnet": {...}}. FP32 and FP16 run every counted matmul in
  that precision; "bitnet" (1-bit or ternary weights, 8-bit activations) runs the linear layers' additions in INT8
  and multiplies only for the scalings (FP16), attention in `bitnet_attention` and the head (if counted) in FP16.
  Per-operation energies are BitNet Table 2's (`ENERGY_PJ`). Ternary zeros are not skipped (an upper bound for
  b1.58). The counting convention is in the module docstring; energy is linear in n_tokens with attention="none"
  and quadratic otherwise.
  """
  if process not in ENERGY_PJ:
    raise ValueError(f"process must be one of {PROCESSES}, got {process!r}")
  if bitnet_attention not in ("fp32", "fp16", "int8"):
    raise ValueError(f"bitnet_attention must be 'fp32', 'fp16' or 'int8', got {bitnet_attention!r}")
  ops = matmul_ops(model_config, n_tokens, attention=attention, include_head=include_head)
  e = ENERGY_PJ[process]
  lin, att, head = ops["linear"], ops["attention"], ops["head"]
  out = {}
  for dtype in ("fp32", "fp16"):
    out[dtype] = {"mul": (lin["mul"] + att["mul"] + head["mul"]) * e[dtype]["mul"] * PJ,
                  "add": (lin["add"] + att["add"] + head["add"]) * e[dtype]["add"] * PJ}
  ea, e16 = e[bitnet_attention], e["fp16"]
  out["bitnet"] = {
      "mul": (lin["scale_mul"] * e16["mul"] + att["mul"] * ea["mul"] + head["mul"] * e16["mul"]) * PJ,
      "add": (lin["add"] * e["int8"]["add"] + att["add"] * ea["add"] + head["add"] * e16["add"]) * PJ,
  }
  return out


def table1_comparison(**convention) -> list[dict]:
  """Every cell of BitNet Table 1 (bitnet-6.7b/13b/30b presets, 512 tokens): ours, the paper's, relative error.

  `within_10pct`: |ours - paper| <= 10% of paper; `matches_printed`: ours rounds to the printed two decimals.
  Keyword arguments are a counting convention (`CONVENTIONS`), default "main".
  """
  rows = []
  for size, by_variant in PAPER_TABLE1_J.items():
    name = f"bitnet-{size}"
    energies = {p: matmul_energy(name, TABLE1_TOKENS, p, **convention) for p in PROCESSES}
    for variant, by_process in by_variant.items():
      for process, (paper_mul, paper_add) in by_process.items():
        for op, paper in (("mul", paper_mul), ("add", paper_add)):
          ours = energies[process][variant][op]
          rel = (ours - paper) / paper
          rows.append(dict(size=size, preset=name, variant=variant, process=process, op=op, ours_j=ours,
                           paper_j=paper, rel_error=rel, within_10pct=abs(rel) <= 0.10,
                           matches_printed=abs(ours - paper) <= TABLE1_PRINTED_HALF_UNIT + 1e-12))
  return rows


def convention_search() -> dict[str, dict]:
  """Table 1 under each of `CONVENTIONS`: cells reproduced, worst relative error, and the 6.7B BitNet 7nm ADD
  cell (the one the main convention misses). Fixed list, nothing fitted."""
  out = {}
  for name, conv in CONVENTIONS.items():
    rows = table1_comparison(**conv)
    cell = next(r for r in rows if r["size"] == "6.7b" and r["variant"] == "bitnet" and r["process"] == "7nm"
                and r["op"] == "add")
    out[name] = dict(convention=conv, cells=len(rows), within_10pct=sum(r["within_10pct"] for r in rows),
                     matches_printed=sum(r["matches_printed"] for r in rows),
                     reproduced=sum(r["within_10pct"] or r["matches_printed"] for r in rows),
                     max_abs_rel_error=max(abs(r["rel_error"]) for r in rows),
                     bitnet_6_7b_7nm_add_j=cell["ours_j"])
  return out


def b158_energy_ratio(model_config: ModelConfig | str = "b158-3b", n_tokens: int = TABLE1_TOKENS,
                      process: str = "7nm") -> dict[str, float]:
  """b1.58's "71.4x less arithmetic energy for matrix multiplication at 7nm", three ways.

  per_op: (FP16 add + FP16 mul) / INT8 add from Table 2, the paper's arithmetic ((0.16 + 0.34) / 0.007).
  linear_adds_only: FP16 (mul + add) / b1.58 INT8 adds, over the model's linear-layer matmuls.
  linear_with_scalings: the same with b1.58's FP16 scaling multiplications added to its side.
  with_attention: whole matmul energy incl. attention (FP16 in both), the Table 1 convention, for contrast.
  """
  if process not in ENERGY_PJ:
    raise ValueError(f"process must be one of {PROCESSES}, got {process!r}")
  e = ENERGY_PJ[process]
  lin = matmul_energy(model_config, n_tokens, process, attention="none")
  full = matmul_energy(model_config, n_tokens, process, attention="full")
  lin_adds = matmul_ops(model_config, n_tokens, attention="none")["linear"]["add"] * e["int8"]["add"] * PJ
  fp16_lin = lin["fp16"]["mul"] + lin["fp16"]["add"]
  return dict(per_op=(e["fp16"]["add"] + e["fp16"]["mul"]) / e["int8"]["add"],
              linear_adds_only=fp16_lin / lin_adds,
              linear_with_scalings=fp16_lin / (lin["bitnet"]["mul"] + lin["bitnet"]["add"]),
              with_attention=sum(full["fp16"].values()) / sum(full["bitnet"].values()),
              paper=B158_PAPER_RATIO)


# ------------------------------------------------------------------------------------------------------------
# Memory.
# ------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _count_params(cfg: ModelConfig) -> dict[str, int]:
  return count_params(cfg)   # abstract init (~1 s for a large preset); configs are frozen, so cache it


def param_breakdown(cfg: ModelConfig | str) -> dict[str, int]:
  """{"linear", "embedding", "other"} parameter counts: linear-layer weights (quantised in BitNet / b1.58),
  input embedding + untied head (kept high precision), and the rest (norm gains)."""
  cfg = _config(cfg)
  counts = _count_params(cfg)
  linear = sum(n * p for n, p in linear_shapes(cfg))
  return {"linear": linear, "embedding": counts["embedding"], "other": counts["non_embedding"] - linear}


def weight_memory_bytes(cfg: ModelConfig | str, weight_bits: float, *, include_embedding: bool = True) -> float:
  """Bytes to store the model for inference: linear weights at `weight_bits` (2: 2-bit packing, 1.6: base-3,
  16: FP16, 1: binary) plus one 16-bit scale per linear layer and group when weight_bits < 16; embeddings, head
  and norm gains at 16 bits (`include_embedding=False` drops embedding and head: "non-embedding memory")."""
  if isinstance(weight_bits, bool) or not isinstance(weight_bits, (int, float)) or not 0 < weight_bits <= 32:
    raise ValueError(f"weight_bits must be a number in (0, 32], got {weight_bits!r}")
  cfg = _config(cfg)
  parts = param_breakdown(cfg)
  scales = len(linear_shapes(cfg)) * cfg.groups if weight_bits < 16 else 0
  high = parts["other"] + scales + (parts["embedding"] if include_embedding else 0)
  return parts["linear"] * weight_bits / 8 + high * 2


def kv_cache_bytes(cfg: ModelConfig | str, seq_len: int, batch: int, bits: float = 16) -> float:
  """KV cache bytes: 2 (K and V) x layers x batch x seq_len x kv_heads x head_dim values at `bits` each."""
  cfg = _config(cfg)
  _positive_int("seq_len", seq_len)
  _positive_int("batch", batch)
  if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not 0 < bits <= 32:
    raise ValueError(f"bits must be a number in (0, 32], got {bits!r}")
  return 2 * cfg.n_layers * batch * seq_len * cfg.n_kv_heads * cfg.head_dim * bits / 8


def memory_comparison(weight_bits: float = 2.0, kv_seq_len: int = 2048, batch: int = 1) -> list[dict]:
  """Our memory model next to b1.58 Table 1's measured memory, one dict per row of that table.

  LLaMA rows store FP16 weights, b1.58 rows `weight_bits` (default 2: the paper measured with a 2-bit kernel).
  `weights_gb` is the weights-only estimate; `with_kv_gb` adds an FP16 KV cache of `kv_seq_len` tokens x `batch`
  (the paper does not give the sequence length it measured at; 2048 is the models' training length).
  Reductions vs LLaMA compare with the LLaMA row of the same size (3.9B: LLaMA 3B, as the paper does).
  """
  weights, kv = {}, {}
  for (model, size) in PAPER_B158_MEMORY_GB:
    bits = 16 if model == "llama" else weight_bits
    weights[model, size] = weight_memory_bytes(f"{model}-{size}", bits) / GB
    kv[model, size] = kv_cache_bytes(f"{model}-{size}", kv_seq_len, batch) / GB
  rows = []
  for (model, size), paper in PAPER_B158_MEMORY_GB.items():
    ref = ("llama", "3b" if size == "3.9b" else size)
    ours = weights[model, size]
    rows.append(dict(model="LLaMA" if model == "llama" else "BitNet b1.58", size=size.upper(),
                     preset=f"{model}-{size}", weight_bits=16 if model == "llama" else weight_bits,
                     weights_gb=ours, with_kv_gb=ours + kv[model, size], paper_gb=paper,
                     ours_over_paper=ours / paper, paper_minus_ours_gb=paper - ours,
                     reduction_vs_llama=weights[ref] / ours,
                     with_kv_reduction_vs_llama=(weights[ref] + kv[ref]) / (ours + kv[model, size]),
                     paper_reduction_vs_llama=PAPER_B158_MEMORY_GB[ref] / paper))
  return rows


def memory_2b4t(bits: tuple[float, ...] = (math.log2(3), 1.6, 2.0)) -> list[dict]:
  """Non-embedding weight memory of the 2B4T config at several storage widths, next to the report's 0.4 GB."""
  return [dict(weight_bits=b, ours_gb=weight_memory_bytes("b158-2b4t", b, include_embedding=False) / GB,
               paper_gb=PAPER_2B4T_NON_EMBEDDING_GB) for b in bits]
