"""The benchmark scripts in benchmarks/ run end to end on a CPU, so a GPU session spends its time measuring, not
debugging them: benchmarks/matvec.py with every kernel row in the Pallas interpreter (`--interpret`), the train
step against the PyTorch peer, and CPU decoding against llama.cpp."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MATVEC_PATHS = ("XLA bf16", "XLA unpack+dot", "Pallas 2-bit", "Pallas 2-bit int8", "Pallas 2-bit shift",
                "scan: kernel reads the stack", "scan: XLA slices the stack")


def test_matvec_runs_every_kernel_row_in_the_interpreter_and_checks_them():
  out = subprocess.run([sys.executable, "benchmarks/matvec.py", "--interpret", "--shapes", "128x256",
                        "--batches", "1", "3", "--repeats", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900, check=True).stdout
  rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in out.splitlines()
          if line.startswith("| 128x256 |")]
  assert sorted((batch, path) for _, batch, path, *_ in rows) == sorted(
      (batch, path) for batch in ("1", "3") for path in MATVEC_PATHS), out
  assert all(float(us) > 0 for _, _, _, us, _, _ in rows)
  # The kernel against the XLA path (int32 sums: exact), and the stacked scans against one call per layer
  # (the same sums, added in another fusion: float32 rounding at most).
  kernel = [float(v) for v in re.findall(r"# kernel check \(interpret mode\) 128x256 batch \d: max \|kernel - XLA\| "
                                         r"= (\S+) ", out)]
  stack = [float(v) for v in re.findall(r"# stack check 128x256 batch \d: max \|.*\| = (\S+)", out)]
  assert len(kernel) == 2 and max(kernel) < 1e-5, out
  assert len(stack) == 2 and max(stack) < 1e-5, out


def test_train_step_benchmark_runs_ours_and_the_peer_in_one_table():
  """benchmarks/train_step.py --peer on tiny dims: our FAQ and 2B4T rows and transformers' BitNet rows (torch, in a
  subprocess), each with a positive time and the ratios the README quotes; --profile's op-kind table."""
  out = subprocess.run([sys.executable, "benchmarks/train_step.py", "--d-model", "64", "--layers", "1", "--seq", "16",
                        "--batch", "2", "--d-ff", "128", "--repeats", "1", "--peer-repeats", "1", "--variants", "fp",
                        "--exact", "--peer", "--profile"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900, check=True).stdout
  table, profile = out.split("Profile of 3 steps")
  rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.split("|")[1:-1]]
                                            for line in table.splitlines() if line.startswith("| "))}
  for name in ("fp", "b158 exact", "fp 2B4T", "b158 2B4T", "peer: HF BitNet fp nn.Linear, eager",
               "peer: HF BitNet b1.58 AutoBitLinear, eager"):
    assert float(rows[name][0]) > 0, (name, out)
  assert rows["fp 2B4T"][2] == "1.000" and float(rows["b158 2B4T"][3]) > 0, out   # ratios to our fp, to the peer
  assert "torch 2." in out and " cores; " in out, out   # versions and the CPU the figures came from
  assert "| dots | transposes and copies |" in profile and "| b158 2B4T |" in profile, out


def test_cpu_decode_times_ours_and_llama_cpp_on_one_exported_model():
  """benchmarks/cpu_decode.py on tiny dims: both of our forms and llama.cpp decode the same exported b1.58 model,
  each with a positive speed, and agree on the greedy tokens (every matmul input 256 wide: the same activation
  quantisation in both engines)."""
  out = subprocess.run([sys.executable, "benchmarks/cpu_decode.py", "--d-model", "256", "--layers", "1",
                        "--prompt", "4", "--new-tokens", "8", "--repeats", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900, check=True).stdout
  rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.split("|")[1:-1]]
                                            for line in out.splitlines() if line.startswith("| "))}
  for name in ("ours, b158 dense", "ours, b158 packed", "llama.cpp, TQ2_0"):
    assert float(rows[name][0]) > 0, (name, out)
    assert float(rows[name][4].rstrip("%")) >= 75, (name, out)   # greedy tokens equal to llama.cpp's
  assert rows["llama.cpp, TQ2_0"][2] == "1.00x" and "jax " in out and " cores)" in out, out


def test_faults_script_runs_its_cases_and_counts_them(tmp_path):
  """`benchmarks/faults.py` (the README's count of bad inputs and faults) on two of its cases: a bad config name and
  a refused resume, each run through the real CLI against a trained template run."""
  out = subprocess.run([sys.executable, "benchmarks/faults.py", "--only", "config variant unknown", "--only",
                        "resume d_model", "--json", str(tmp_path / "faults.json")], cwd=ROOT, capture_output=True,
                       text=True, timeout=900, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-3000:]
  assert "2 bad inputs and faults tried: 2 handled, 0 with a traceback, 0 wrong, 0 lost work" in out.stdout
  results = json.loads((tmp_path / "faults.json").read_text())["results"]
  assert {r["name"]: r["outcome"] for r in results} == {"config variant unknown": "handled",
                                                        "resume d_model": "handled"}
  assert all(r["last_line"].startswith("train: error:") for r in results)
