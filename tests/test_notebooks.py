"""The Colab notebooks in colab/: each runs top to bottom (shrunken, `BITNET_SMALL=1`), is committed clean, and is in
sync with its jupytext source (colab/NAME.py, percent format: the file a review reads and an edit changes).

The kernel is this interpreter (`sys.executable`, the venv's Python in `make test` and CI), through a kernel spec
named "python3" written into a temporary folder, so a "python3" kernel installed elsewhere on the machine is
never picked up.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import jupytext
import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
COLAB = ROOT / "colab"
NOTEBOOKS = ("01_quantizers", "02_train_bitnet_vs_fp", "03_scaling_and_energy", "04_sharding")
NOTEBOOK_METADATA = ("kernelspec", "colab", "accelerator")   # what the .py header carries for the .ipynb
CELL_TIMEOUT_S = 300   # one cell; the shrunken notebooks take about a minute in all on 2 CPU cores


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


def test_colab_holds_exactly_the_paired_notebooks():
  """Every notebook has its source and every source its notebook; nothing else generates them."""
  assert sorted(p.stem for p in COLAB.glob("*.ipynb")) == sorted(NOTEBOOKS)
  assert sorted(p.stem for p in COLAB.glob("*.py")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_in_sync_with_its_jupytext_source(name):
  """Cell by cell the .ipynb holds what colab/NAME.py holds (`make notebooks` updates it after an edit)."""
  notebook = nbformat.read(COLAB / f"{name}.ipynb", as_version=4)
  source = jupytext.read(COLAB / f"{name}.py")
  hint = f"colab/{name}.ipynb differs from colab/{name}.py: run `make notebooks` and commit both"
  assert notebook.metadata.get("jupytext", {}).get("formats") == "ipynb,py:percent", hint
  assert len(notebook.cells) == len(source.cells), hint
  for i, (a, b) in enumerate(zip(notebook.cells, source.cells)):
    assert (a.cell_type, a.source) == (b.cell_type, b.source), f"{hint} (first difference in cell {i})"
  for key in NOTEBOOK_METADATA:
    assert notebook.metadata.get(key) == source.metadata.get(key), f"{hint} (notebook metadata {key!r})"


def test_sync_check_sees_an_edit(tmp_path):
  """The comparison above is not vacuous: editing one line of a source is a difference in exactly that cell."""
  source = jupytext.read(COLAB / f"{NOTEBOOKS[0]}.py")
  notebook = nbformat.read(COLAB / f"{NOTEBOOKS[0]}.ipynb", as_version=4)
  i = next(i for i, c in enumerate(source.cells) if c.cell_type == "code" and i > 1)
  source.cells[i].source += "\nprint('edited')"
  jupytext.write(source, tmp_path / "edited.py", fmt="py:percent")
  edited = jupytext.read(tmp_path / "edited.py")
  differ = [j for j, (a, b) in enumerate(zip(notebook.cells, edited.cells)) if a.source != b.source]
  assert differ == [i]


def test_install_cell_is_the_same_in_every_notebook():
  """Each notebook must bootstrap itself on Colab, so the install code is repeated: one text, edited in step."""
  cells = {}
  for name in NOTEBOOKS:
    source = nbformat.read(COLAB / f"{name}.ipynb", as_version=4).cells[1].source
    # 04 sets up its 8 devices first (before jax is imported); 02-04 then also find configs/ in the clone.
    end = "importlib.invalidate_caches()\n"
    cells[name] = source[source.index("# Install."):source.index(end) + len(end)]
  assert len(set(cells.values())) == 1, f"install cells differ between {sorted(cells)}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_opens_with_badge_and_install_cell(name):
  nb = nbformat.read(COLAB / f"{name}.ipynb", as_version=4)
  first, second = nb.cells[0], nb.cells[1]
  assert first.cell_type == "markdown"
  assert (f"https://colab.research.google.com/github/bitnet-jax/bitnet_jax/blob/main/colab/{name}.ipynb"
          in first.source)
  assert second.cell_type == "code" and "pip" in second.source and "find_checkout" in second.source
  assert 'SMALL = os.environ.get("BITNET_SMALL") == "1"' in "".join(c.source for c in nb.cells)
