"""Test helper: walking a jaxpr, for tests that check what a traced program does (what it slices, what it scans)."""

from __future__ import annotations

from collections.abc import Iterator


def equations(jaxpr) -> Iterator:
  """Every equation of `jaxpr` and of the jaxprs nested in its equations' parameters (jit, scan, pallas bodies),
  depth first, in program order."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      inner = getattr(param, "jaxpr", param)   # a ClosedJaxpr holds its Jaxpr in .jaxpr
      if hasattr(inner, "eqns"):
        yield from equations(inner)
