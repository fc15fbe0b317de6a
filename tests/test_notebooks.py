"""The Colab notebooks in colab/: each runs top to bottom (shrunken, `BITNET_SMALL=1`) and is committed clean.

The kernel is this interpreter (`sys.executable`, the venv's Python in `make test` and CI), through a kernel spec
named "python3" written into a temporary folder, so a "python3" kernel installed elsewhere on the machine is
never picked up.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
COLAB = ROOT / "colab"
NOTEBOOKS = ("01_quantizers", "02_train_bitnet_vs_fp", "03_scaling_and_energy", "04_sharding")
CELL_TIMEOUT_S = 300   # one cell; the shrunken notebooks take about a minute in all on 2 CPU cores


def _builder():
  spec = importlib.util.spec_from_file_location("colab_build", COLAB / "_build.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _kernel_manager(tmp_path: Path) -> KernelManager:
  """A KernelManager for a "python3" kernel that runs `sys.executable -m ipykernel_launcher`."""
  spec_dir = tmp_path / "kernels" / "python3"
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "Python 3 (bitnet_jax)", "language": "python"}))
  specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)
  return KernelManager(kernel_name="python3", kernel_spec_manager=specs)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, tmp_path):
  nb = nbformat.read(COLAB / f"{name}.ipynb", as_version=4)
  env = {**os.environ, "BITNET_SMALL": "1", "JAX_PLATFORMS": "cpu", "TMPDIR": str(tmp_path),
         "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
  client = NotebookClient(nb, km=_kernel_manager(tmp_path), timeout=CELL_TIMEOUT_S, allow_errors=False,
                          resources={"metadata": {"path": str(COLAB)}})   # run in colab/, as Jupyter would
  t0 = time.perf_counter()
  client.execute(env=env)   # raises CellExecutionError, naming the cell, on the first error
  print(f"{name}: executed in {time.perf_counter() - t0:.1f} s")
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(c.execution_count for c in code)
  figures = sum(1 for c in code for o in c.outputs if "image/png" in o.get("data", {}))
  assert figures >= 1, f"{name} drew no figure"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_has_no_outputs(name):
  nb = nbformat.read(COLAB / f"{name}.ipynb", as_version=4)
  nbformat.validate(nb)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert cell.outputs == [], f"{name} cell {i} has outputs"
      assert cell.execution_count is None, f"{name} cell {i} has execution count {cell.execution_count}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_is_what_the_builder_writes(name):
  expected = _builder().render(name)
  assert (COLAB / f"{name}.ipynb").read_text() == expected, \
      f"colab/{name}.ipynb is out of date: run `.venv/bin/python colab/_build.py` and commit both"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_opens_with_badge_and_install_cell(name):
  nb = nbformat.read(COLAB / f"{name}.ipynb", as_version=4)
  first, second = nb.cells[0], nb.cells[1]
  assert first.cell_type == "markdown"
  assert (f"https://colab.research.google.com/github/bitnet-jax/bitnet_jax/blob/main/colab/{name}.ipynb"
          in first.source)
  assert second.cell_type == "code" and "pip" in second.source and "find_checkout" in second.source
  assert 'SMALL = os.environ.get("BITNET_SMALL") == "1"' in "".join(c.source for c in nb.cells)
