"""Tests for bitnet_jax/energy.py and experiments/energy.py: BitNet Table 1 energy cells, b1.58's 71.4x, scaling
properties, bad input, the memory model against hand counts, and the experiment script's output."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import jax
import pytest
from flax import nnx

from bitnet_jax import energy
from bitnet_jax.model import ModelConfig, Transformer

# Oracle: BitNet (arXiv 2310.11453) Table 1, energy in J for 512 input tokens, copied from ../shared/PAPERS.md
# (which was checked against the paper): {size: {variant: (7nm MUL, 7nm ADD, 45nm MUL, 45nm ADD)}}.
PAPER_TABLE1 = {
    "6.7b": {"fp32": (4.41, 1.28, 12.46, 3.03), "fp16": (1.14, 0.54, 3.70, 1.35), "bitnet": (0.02, 0.04, 0.08, 0.13)},
    "13b": {"fp32": (8.58, 2.49, 24.23, 5.89), "fp16": (2.23, 1.05, 7.20, 2.62), "bitnet": (0.04, 0.06, 0.12, 0.24)},
    "30b": {"fp32": (20.09, 5.83, 56.73, 13.80), "fp16": (5.21, 2.45, 16.87, 6.13),
            "bitnet": (0.06, 0.14, 0.20, 0.53)},
}
COLUMNS = (("7nm", "mul"), ("7nm", "add"), ("45nm", "mul"), ("45nm", "add"))
# Cells we do not claim within 10% (documented in bitnet_jax/energy.py and experiments/results/energy.json):
# 6.7B BitNet 7nm MUL is 0.0238 J vs a printed 0.02 (+19%, but equal at the printed two decimals);
# 6.7B BitNet 7nm ADD is 0.0340 J vs 0.04 (-15%, not reproduced).
NOT_WITHIN_10PCT = {("6.7b", "bitnet", "7nm", "mul"), ("6.7b", "bitnet", "7nm", "add")}
CELLS = [(s, v, p, op) for s, by_v in PAPER_TABLE1.items() for v in by_v for p, op in COLUMNS]
# Oracle: b1.58 (arXiv 2402.17764) Table 1, measured memory in GB, and its printed reductions vs LLaMA.
PAPER_MEMORY = {("llama", "700m"): 2.08, ("b158", "700m"): 0.80, ("llama", "1.3b"): 3.34, ("b158", "1.3b"): 1.14,
                ("llama", "3b"): 7.89, ("b158", "3b"): 2.22, ("b158", "3.9b"): 2.38}
PAPER_MEMORY_REDUCTION = {"700m": 2.60, "1.3b": 2.93, "3b": 3.55, "3.9b": 3.32}

TINY = dict(vocab_size=100, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64, dtype="float32")


def _paper(size, variant, process, op):
  return PAPER_TABLE1[size][variant][COLUMNS.index((process, op))]


@pytest.fixture(scope="module")
def table1():
  return {size: {p: energy.matmul_energy(f"bitnet-{size}", 512, p) for p in ("7nm", "45nm")}
          for size in PAPER_TABLE1}


# ---------------------------------------------------------------- BitNet Table 1
@pytest.mark.parametrize("cell", [c for c in CELLS if c not in NOT_WITHIN_10PCT], ids="-".join)
def test_table1_cell_within_10_percent(table1, cell):
  size, variant, process, op = cell
  ours, paper = table1[size][process][variant][op], _paper(*cell)
  assert abs(ours - paper) <= 0.10 * paper, (ours, paper)


def test_table1_fp_cells_match_printed_two_decimals(table1):
  for size, variant, process, op in CELLS:
    if variant != "bitnet":
      assert abs(table1[size][process][variant][op] - _paper(size, variant, process, op)) <= 0.005 + 1e-9


def test_table1_documented_misses(table1):
  """The two 6.7B BitNet 7nm cells: one matches at printed precision, one does not reproduce (-15%)."""
  mul = table1["6.7b"]["7nm"]["bitnet"]["mul"]
  add = table1["6.7b"]["7nm"]["bitnet"]["add"]
  assert abs(mul - 0.02) <= 0.005 and abs(mul - 0.02) > 0.10 * 0.02
  assert 0.033 < add < 0.035 and abs(add - 0.04) > 0.10 * 0.04
  rows = energy.table1_comparison()
  assert len(rows) == 36 and sum(r["within_10pct"] or r["matches_printed"] for r in rows) == 35


def test_module_reference_values_equal_the_oracle():
  for size, variant, process, op in CELLS:
    mul, add = energy.PAPER_TABLE1_J[size][variant][process]
    assert (mul if op == "mul" else add) == _paper(size, variant, process, op)
  assert energy.PAPER_B158_MEMORY_GB == PAPER_MEMORY


# ---------------------------------------------------------------- b1.58's 71.4x
def test_b158_71x():
  r = energy.b158_energy_ratio("b158-3b", 512, "7nm")
  assert round(r["per_op"], 1) == 71.4 and math.isclose(r["per_op"], (0.16 + 0.34) / 0.007)
  assert abs(r["linear_adds_only"] - 71.43) < 0.05    # (n-1)/n corrections only
  assert 69 < r["linear_with_scalings"] < r["linear_adds_only"]
  assert r["with_attention"] < r["linear_with_scalings"]


# ---------------------------------------------------------------- scaling properties
@pytest.mark.parametrize("process", ["7nm", "45nm"])
def test_linear_layers_energy_is_linear_in_tokens(process):
  e1 = energy.matmul_energy("bitnet-1.3b", 100, process, attention="none")
  e3 = energy.matmul_energy("bitnet-1.3b", 300, process, attention="none")
  for v in energy.VARIANTS:
    for op in ("mul", "add"):
      assert math.isclose(e3[v][op], 3 * e1[v][op], rel_tol=1e-12)


def test_full_attention_energy_is_quadratic_in_tokens():
  e = [energy.matmul_energy("bitnet-1.3b", t, "7nm")["fp16"]["add"] for t in (64, 128, 192, 256)]
  second = [e[2] - 2 * e[1] + e[0], e[3] - 2 * e[2] + e[1]]
  assert second[0] > 0 and math.isclose(second[0], second[1], rel_tol=1e-9)


@pytest.mark.parametrize("name", ["bitnet-125m", "b158-700m", "b158-2b4t", "llama-3b"])
@pytest.mark.parametrize("attention", ["full", "causal", "none"])
def test_bitnet_below_fp16_below_fp32_and_7nm_below_45nm(name, attention):
  e7 = energy.matmul_energy(name, 256, "7nm", attention=attention)
  e45 = energy.matmul_energy(name, 256, "45nm", attention=attention)
  for op in ("mul", "add"):
    for e in (e7, e45):
      assert e["bitnet"][op] < e["fp16"][op] < e["fp32"][op]
    for v in energy.VARIANTS:
      assert e7[v][op] < e45[v][op]


def test_causal_attention_counts_the_lower_triangle():
  cfg = ModelConfig(**TINY)
  T, H, Dh, L = 16, cfg.n_heads, cfg.head_dim, cfg.n_layers
  full = energy.matmul_ops(cfg, T, attention="full")["attention"]
  causal = energy.matmul_ops(cfg, T, attention="causal")["attention"]
  assert full["mul"] == 2 * T * T * Dh * H * L
  assert causal["mul"] == 2 * (T * (T + 1) // 2) * Dh * H * L
  # Brute force over (query, key) pairs: QK^T costs Dh-1 adds per pair, AV adds each of t+1 values: t adds x Dh.
  adds = sum((t + 1) * (Dh - 1) + t * Dh for t in range(T))
  assert causal["add"] == adds * H * L


# ---------------------------------------------------------------- bad input
def test_unknown_process_names_it():
  with pytest.raises(ValueError, match="process.*5nm"):
    energy.matmul_energy("bitnet-125m", 512, "5nm")
  with pytest.raises(ValueError, match="process.*3nm"):
    energy.b158_energy_ratio("b158-700m", 512, "3nm")


@pytest.mark.parametrize("n_tokens", [0, -1, 1.5, True])
def test_bad_n_tokens(n_tokens):
  with pytest.raises(ValueError, match="n_tokens"):
    energy.matmul_energy("bitnet-125m", n_tokens, "7nm")


def test_other_bad_arguments():
  with pytest.raises(ValueError, match="attention"):
    energy.matmul_energy("bitnet-125m", 8, "7nm", attention="sparse")
  with pytest.raises(ValueError, match="bitnet_attention"):
    energy.matmul_energy("bitnet-125m", 8, "7nm", bitnet_attention="int4")
  with pytest.raises(ValueError, match="unknown model preset"):
    energy.matmul_energy("bitnet-1t", 8, "7nm")
  with pytest.raises(ValueError, match="model_config"):
    energy.matmul_energy(42, 8, "7nm")
  with pytest.raises(ValueError, match="weight_bits"):
    energy.weight_memory_bytes(ModelConfig(**TINY), 0)
  with pytest.raises(ValueError, match="seq_len"):
    energy.kv_cache_bytes(ModelConfig(**TINY), 0, 1)
  with pytest.raises(ValueError, match="batch"):
    energy.kv_cache_bytes(ModelConfig(**TINY), 8, -2)


# ---------------------------------------------------------------- memory model
@pytest.mark.parametrize("kw", [dict(variant="b158"), dict(variant="bitnet"), dict(variant="fp", n_kv_heads=2)])
def test_linear_shapes_are_the_models_kernels(kw):
  cfg = ModelConfig(**{**TINY, **kw})
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  kernels = [x.shape for path, x in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
             if "kernel" in jax.tree_util.keystr(path)]
  assert sorted(kernels) == sorted(energy.linear_shapes(cfg))


def test_weight_memory_by_hand():
  cfg = ModelConfig(**TINY, variant="b158")
  # Per layer: q, k, v, o 32x32 each; gate, up 32x64; down 64x32 -> 4*1024 + 2*2048 + 2048 = 10240; 2 layers.
  linear = 2 * 10240
  # Norm gains: an RMSNorm in each BitLinear (d_in: 6 x 32 + 64 = 256 per layer) + the final norm (32).
  norms = 2 * 256 + 32
  embedding = 2 * 100 * 32    # input embedding + untied head
  scales = 2 * 7              # one 16-bit scale per linear layer
  assert energy.param_breakdown(cfg) == {"linear": linear, "embedding": embedding, "other": norms}
  assert energy.weight_memory_bytes(cfg, 2) == linear * 2 / 8 + (norms + embedding + scales) * 2 == 19036
  assert energy.weight_memory_bytes(cfg, 1.6) == linear * 1.6 / 8 + (norms + embedding + scales) * 2
  assert energy.weight_memory_bytes(cfg, 16) == (linear + norms + embedding) * 2 == 54848
  assert energy.weight_memory_bytes(cfg, 2, include_embedding=False) == linear / 4 + (norms + scales) * 2


def test_kv_cache_by_hand():
  cfg = ModelConfig(**TINY)
  # 2 (K, V) x 2 layers x batch 3 x 10 tokens x 4 kv heads x 8 dims x 2 bytes.
  assert energy.kv_cache_bytes(cfg, 10, 3) == 2 * 2 * 3 * 10 * 4 * 8 * 2 == 7680
  assert energy.kv_cache_bytes(cfg.replace(n_kv_heads=2), 10, 3) == 3840
  assert energy.kv_cache_bytes(cfg, 10, 3, bits=4) == 1920


def test_memory_comparison_rows():
  rows = energy.memory_comparison(2.0, 2048)
  assert [(r["preset"], r["paper_gb"]) for r in rows] == [(f"{m}-{s}", gb) for (m, s), gb in PAPER_MEMORY.items()]
  for r in rows:
    assert 0 < r["weights_gb"] < r["with_kv_gb"] and r["weights_gb"] < r["paper_gb"]   # weights: a lower bound
    if r["model"] != "LLaMA":
      assert abs(r["paper_reduction_vs_llama"] - PAPER_MEMORY_REDUCTION[r["preset"].split("-")[1]]) < 0.01
      assert r["reduction_vs_llama"] > r["paper_reduction_vs_llama"]


# ---------------------------------------------------------------- the experiment script
def _script():
  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments", "energy.py")
  spec = importlib.util.spec_from_file_location("experiments_energy", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_script_help(capsys):
  with pytest.raises(SystemExit) as exit_info:
    _script().main(["--help"])
  assert exit_info.value.code == 0 and "--out" in capsys.readouterr().out


def test_script_writes_json_and_png(tmp_path, capsys):
  _script().main(["--out", str(tmp_path)])
  with open(tmp_path / "energy.json") as f:
    result = json.load(f)
  assert {"table1", "table1_conventions", "b158_71x", "memory", "memory_2b4t_non_embedding"} <= set(result)
  cells = result["table1"]["cells"]
  assert len(cells) == 36
  assert {"size", "variant", "process", "op", "ours_j", "paper_j", "rel_error", "within_10pct"} <= set(cells[0])
  assert result["table1"]["summary"]["not_reproduced"] == ["6.7b bitnet 7nm add"]
  assert result["b158_71x"]["reproduced"] is True
  assert len(result["memory"]["rows"]) == 7
  assert (tmp_path / "energy.png").stat().st_size > 10_000
  out = capsys.readouterr().out
  assert "| size | variant |" in out and "| model | size |" in out
