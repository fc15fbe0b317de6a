"""experiments/variants: the smoke comparison end to end (train, extend the grid, measure, report), the report-only
mode, bad arguments."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from bitnet_jax import train

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("experiments_variants", ROOT / "experiments" / "variants.py")
variants = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(variants)


def test_smoke_comparison_measures_each_variants_best_run_and_reruns_nothing(tmp_path, monkeypatch):
  work, out = tmp_path / "runs", tmp_path / "out"
  argv = ["--smoke", "--sizes", "s1", "--variants", "b158", "v2_a4", "--extend", "1", "--workdir", str(work),
          "--out", str(out)]
  result = variants.main(argv)
  saved = json.loads((out / "variants.json").read_text(), parse_constant=lambda c: pytest.fail(f"JSON holds {c}"))
  assert (out / "variants.png").stat().st_size > 0
  rows = result["runs"]
  assert {r["variant"] for r in rows} == {"b158", "v2_a4"}
  for v in ("b158", "v2_a4"):
    lrs = sorted(r["lr"] for r in rows if r["variant"] == v)
    assert lrs[:2] == sorted(variants.SMOKE_GRID) or len(lrs) == 3          # the grid, perhaps one extension
    best = saved["best"]["s1"][v]
    assert best["lr"] in lrs and best["eval_loss"] > 0 and 0 < best["eval_loss_se"] < best["eval_loss"]
    act = best["activations"]
    for role in ("o_proj", "down_proj"):
      assert set(act[role]) == {"as_is", "hadamard"}
      assert act[role]["as_is"]["max_over_mean"] >= 1.0                       # max |x| >= mean |x|
    assert saved["step_seconds"]["s1"][v] > 0
  # v2_a4 trained its two stages: 95% with 8-bit activations, the rest with 4-bit (`configs/lm.py`)
  v2_dir = Path(next(r["workdir"] for r in rows if r["variant"] == "v2_a4"))
  assert json.loads((v2_dir / "config.json").read_text())["train"]["act_stage1_fraction"] == 0.95
  # The report mode reads the finished runs, trains nothing, and finds the same best runs (a plain rerun skips
  # finished runs through the same `lr_sweep.run_sweep`, tested in tests/test_lr_sweep.py).
  monkeypatch.setattr(train, "train_and_evaluate", lambda *a, **k: pytest.fail("a finished run was trained again"))
  report = variants.main([*argv, "--report"])
  assert report["report_only"] and len(report["runs"]) == len(rows)
  assert {v: b["lr"] for v, b in report["best"]["s1"].items()} == {v: b["lr"] for v, b in result["best"]["s1"].items()}


def _result(sizes, tokens=1000, smoke=False, report_only=False):
  return {"runs": [{"size": s, "variant": "b158", "lr": 0.01} for s in sizes],
          "best": {s: {"b158": {"lr": 0.01}} for s in sizes}, "step_seconds": {s: {"b158": 0.1} for s in sizes},
          "tokens_per_run": tokens, "smoke": smoke, "jax": "x", "report_only": report_only, "wall_s": 1.0}


def test_a_run_of_one_size_keeps_the_other_sizes_of_the_results_file(tmp_path):
  path = tmp_path / "variants.json"
  first = variants.keep_other_sizes(path, _result(["s1"], report_only=True))   # no file yet: nothing to keep
  assert set(first["best"]) == {"s1"} and first["measured"]["s1"]["report_only"]
  path.write_text(json.dumps(first))
  both = variants.keep_other_sizes(path, _result(["s2"]))
  assert list(both["best"]) == list(both["step_seconds"]) == ["s1", "s2"]
  assert sorted(r["size"] for r in both["runs"]) == ["s1", "s2"]
  assert both["measured"]["s1"]["report_only"] and not both["measured"]["s2"]["report_only"]   # each its own
  path.write_text(json.dumps(both))
  again = variants.keep_other_sizes(path, _result(["s1"]))   # rerunning s1 replaces s1, keeps s2
  assert [r["size"] for r in again["runs"]].count("s1") == 1 and not again["measured"]["s1"]["report_only"]
  assert set(again["best"]) == {"s1", "s2"}
  # another token budget (or the smoke mode) is not comparable: nothing is kept
  assert set(variants.keep_other_sizes(path, _result(["s3"], tokens=5))["best"]) == {"s3"}
  assert set(variants.keep_other_sizes(path, _result(["s3"], smoke=True))["best"]) == {"s3"}


@pytest.mark.parametrize("argv, match", [
    (["--variants", "b158", "v3"], "--variants must be distinct names of"),
    (["--variants", "b158", "b158"], "--variants must be distinct names of"),
    (["--sizes", "s9"], "--sizes must be of"),
    (["--tokens", "0"], "must be positive"),
])
def test_bad_arguments_stop_before_any_training(argv, match, tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(train, "train_and_evaluate", lambda *a, **k: pytest.fail("trained despite bad arguments"))
  with pytest.raises(SystemExit):
    variants.main(["--smoke", "--workdir", str(tmp_path), *argv])
  assert match in capsys.readouterr().err
