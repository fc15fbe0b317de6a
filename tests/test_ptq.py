"""experiments/ptq.py: the smoke run end to end, PTQ losses against FP, the quantised kernels, the errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from bitnet_jax import train
from bitnet_jax.layers import BitLinear

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
  spec = importlib.util.spec_from_file_location(f"experiments_{name}", ROOT / "experiments" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


ptq = _load("ptq")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  """One --smoke run for the whole module: (workdir, out, the returned result, the written json)."""
  root = tmp_path_factory.mktemp("ptq")
  work, out = root / "runs", root / "out"
  result = ptq.main(["--smoke", "--workdir", str(work), "--out", str(out)])
  return work, out, result, json.loads((out / "ptq.json").read_text())


@pytest.fixture(scope="module")
def fp_model(smoke):
  work = smoke[0]
  return train.load_checkpoint(work / f"fp-{ptq.SMOKE_SIZES[0]}")


def test_smoke_writes_every_method_for_every_size(smoke):
  work, out, result, saved = smoke
  assert (out / "ptq.png").stat().st_size > 10_000
  assert saved["rows"] == json.loads(json.dumps(result["rows"]))
  assert [r["size"] for r in saved["rows"]] == list(ptq.SMOKE_SIZES) and saved["smoke"] is True
  assert {"jax", "flax", "numpy", "python"} <= set(saved["versions"])
  assert set(saved["methods"]) == set(ptq.METHODS) == {"fp", "w8a8", "w4a8", "w1.58a8", "w1a8", "qat_b158",
                                                       "qat_bitnet"}
  for row in saved["rows"]:
    assert set(row["losses"]) == set(ptq.METHODS)
    assert all(np.isfinite(v) and 0 < v < 10 for v in row["losses"].values()), row["losses"]
    summary = json.loads((work / f"fp-{row['size']}" / "summary.json").read_text())
    assert row["n_params"] == summary["params"]["non_embedding"] > 0
    # every linear layer of attention and FFN, nothing else (embedding and head stay full precision)
    names = row["quantized_modules"]
    leaves = {n.rsplit("/", 1)[-1] for n in names}
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any("embed" in n or "head" in n for n in names)
    # the QAT columns are the b158 / bitnet runs' own eval losses
    for method, variant in (("qat_b158", "b158"), ("qat_bitnet", "bitnet")):
      qat = json.loads((work / f"{variant}-{row['size']}" / "summary.json").read_text())
      assert row["losses"][method] == qat["eval_loss"]


def test_w8a8_is_nearly_lossless_and_w1a8_is_clearly_worse(smoke):
  for row in smoke[3]["rows"]:
    loss = row["losses"]
    assert abs(loss["w8a8"] - loss["fp"]) < 5e-3, loss
    assert loss["w1a8"] - loss["fp"] > 0.02, loss
    assert loss["w1a8"] - loss["fp"] > 5 * abs(loss["w8a8"] - loss["fp"]), loss


def test_remeasured_fp_loss_equals_the_runs_summary(smoke):
  work, _, _, saved = smoke
  for row in saved["rows"]:
    summary = json.loads((work / f"fp-{row['size']}" / "summary.json").read_text())
    assert row["losses"]["fp"] == pytest.approx(summary["eval_loss"], abs=1e-4)
    assert row["fp_summary_eval_loss"] == summary["eval_loss"] and row["fp_check"]["ok"] is True


@pytest.mark.parametrize("method,limit", [("w8a8", 256), ("w4a8", 16), ("w1.58a8", 3), ("w1a8", 2)])
def test_quantized_kernels_take_few_values(fp_model, smoke, method, limit):
  model, _ = fp_model
  before = {p: np.asarray(l.kernel[...]) for p, l in nnx.iter_graph(model) if isinstance(l, BitLinear)}
  q, names = ptq.quantize_model(model, method)
  layers = [(p, l) for p, l in nnx.iter_graph(q) if isinstance(l, BitLinear)]
  assert len(layers) == len(names) == len(before) > 0
  for path, layer in layers:
    w = np.asarray(layer.kernel[...])
    distinct = np.unique(w).size
    assert distinct <= limit, (path, distinct)
    assert distinct >= {"w8a8": 64, "w4a8": 8, "w1.58a8": 3, "w1a8": 2}[method], (path, distinct)  # not collapsed
    assert np.abs(w).max() <= np.abs(before[path]).max() * (1 + 1e-6)
    assert layer.act_bits == 8 and layer.act_per_token
  # the FP model is untouched, and the embedding / head of the clone are the FP ones
  for path, layer in nnx.iter_graph(model):
    if isinstance(layer, BitLinear):
      np.testing.assert_array_equal(np.asarray(layer.kernel[...]), before[path])
      assert layer.act_bits is None
  np.testing.assert_array_equal(np.asarray(q.embed[...]), np.asarray(model.embed[...]))
  np.testing.assert_array_equal(np.asarray(q.head[...]), np.asarray(model.head[...]))
  for row in smoke[3]["rows"]:
    assert row["distinct_kernel_values_max"][method] <= smoke[3]["distinct_kernel_values_bound"][method] <= limit


def test_evaluator_reproduces_a_qat_runs_own_eval_loss(smoke):
  """The re-measuring path (--eval-batches) scores a QAT checkpoint exactly as the trainer did."""
  run = smoke[0] / f"b158-{ptq.SMOKE_SIZES[0]}"
  model, config = train.load_checkpoint(run)
  loss = ptq.Evaluator()({"b158": model}, config)["b158"]
  assert loss == pytest.approx(json.loads((run / "summary.json").read_text())["eval_loss"], abs=1e-4)


def test_quantize_model_refuses_a_qat_model_and_unknown_methods(smoke, fp_model):
  qat_model, _ = train.load_checkpoint(smoke[0] / f"b158-{ptq.SMOKE_SIZES[0]}")
  with pytest.raises(ValueError, match="already quantised"):
    ptq.quantize_model(qat_model, "w8a8")
  with pytest.raises(ValueError, match="method must be one of"):
    ptq.quantize_model(fp_model[0], "w2a2")


def test_missing_or_unfinished_workdir_raises_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="--workdir .* does not exist"):
    ptq.main(["--workdir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
  (tmp_path / "sweep" / "fp-s1").mkdir(parents=True)
  (tmp_path / "sweep" / "fp-s1" / "config.json").write_text("{}")   # a run still training: no summary.json
  with pytest.raises(ValueError, match="no finished fp-<size> run"):
    ptq.main(["--workdir", str(tmp_path / "sweep"), "--out", str(tmp_path / "out")])
  assert not (tmp_path / "out" / "ptq.json").exists()
