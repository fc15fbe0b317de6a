"""The installed package, not the checkout: build the wheel, install it away from the checkout, import every module
from it and run each CLI's --help (what `pip install .` or `pip install git+...` gives a user, Colab included)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLIS = ("bitnet_jax.train", "bitnet_jax.compare", "bitnet_jax.generate", "bitnet_jax.export", "bitnet_jax.model",
        "bitnet_jax.interop.lm_eval")


def _modules() -> list[str]:
  return sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                for p in (ROOT / "bitnet_jax").rglob("*.py"))


def test_the_wheel_ships_every_module_and_each_cli_runs_from_it(tmp_path):
  dist, site, src = tmp_path / "dist", tmp_path / "site", tmp_path / "src"
  # A clean copy of the source: a build/ left in the checkout by an earlier build would leak into the wheel.
  shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "runs",
                                                           "workdirs", "__pycache__", ".pytest_cache", ".hypothesis"))
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(dist),
                  str(src)], check=True, capture_output=True, text=True, timeout=600)
  (wheel,) = dist.glob("bitnet_jax-*.whl")
  shipped = set(zipfile.ZipFile(wheel).namelist())
  missing = [m for m in _modules() if m.replace(".", "/") + ".py" not in shipped
             and m.replace(".", "/") + "/__init__.py" not in shipped]
  assert not missing, f"the wheel lacks {missing}"
  subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
                 check=True, capture_output=True, text=True, timeout=600)
  # Away from the checkout (cwd elsewhere, the installed copy first on the path): every module must come from it.
  env = {**os.environ, "PYTHONPATH": str(site), "JAX_PLATFORMS": "cpu"}
  check = ("import importlib, sys\n"
           f"for name in {_modules()!r}:\n"
           "  mod = importlib.import_module(name)\n"
           f"  assert mod.__file__.startswith({str(site)!r}), (name, mod.__file__)\n"
           "print('ok')\n")
  out = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
  for cli in CLIS:
    out = subprocess.run([sys.executable, "-m", cli, "--help"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    text = out.stdout + out.stderr
    # argparse exits 0 after --help; absl (train) prints its flags and exits 1. Either way: flags, no traceback.
    assert out.returncode in (0, 1) and "Traceback" not in text and "--" in text, (cli, text[-3000:])
