"""pytest root: makes `tests/oracles.py` importable and keeps XLA to the host CPU."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "tests"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
