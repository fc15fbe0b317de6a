"""The benchmark scripts in benchmarks/ run end to end on a CPU, so a GPU session spends its time measuring, not
debugging them: benchmarks/matvec.py with every kernel row in the Pallas interpreter (`--interpret`)."""

from __future__ import annotations

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
