"""hadamard: the online normalised Hadamard transform of BitNet v2's H-BitLinear (quant -> layers -> model -> ...).

BitNet v2 (arXiv 2504.18415) rotates the inputs of the attention output and FFN down projections with a
Hadamard matrix before quantising them to 4 bits: the rotation spreads the few large outlier channels of those
inputs over all channels, so the rotated activations are close to Gaussian and a 4-bit grid fits them.

`hadamard_transform(x)` applies `H_n x / sqrt(n)` along the last axis with the fast Walsh-Hadamard transform
(log2 n butterfly stages, O(n log n)), where H_n is Sylvester's Hadamard matrix (`H_1 = [1]`,
`H_2n = [[H_n, H_n], [H_n, -H_n]]`, equal to `scipy.linalg.hadamard(n)`). The normalised matrix is symmetric
and orthogonal, so the transform is its own inverse and its gradient (vjp) is the same transform of the cotangent,
written as a `custom_vjp` that stores nothing from the forward.

Widths that are not a power of two (d_ff = 1408 = 11 x 128, for instance), and feature-sharded inputs: the
transform is block-diagonal, `blockdiag(H_b, ..., H_b) / sqrt(b)`, with b the largest power of two dividing the
width of one group (`groups=G` splits the width into G groups, as BitLinear's row-parallel shards are). Our
reading, named: the paper's models have power-of-two widths and it does not say what it does otherwise; a block
of a power of two keeps the transform exact, orthogonal and local to a tensor-parallel shard (no
communication), at the cost of mixing only within blocks of b channels. `block_size(n, groups)` says which b.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

__all__ = ["block_size", "hadamard_transform", "hadamard_matrix"]


def block_size(n: int, groups: int = 1) -> int:
  """The power of two b the transform of a width-n axis in `groups` groups uses: the largest dividing n / groups."""
  if not isinstance(n, int) or n < 1:
    raise ValueError(f"hadamard: width must be a positive int, got {n!r}")
  if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1 or n % groups:
    raise ValueError(f"hadamard: groups={groups!r} must be a positive int dividing the width {n}")
  m = n // groups
  return m & -m   # the lowest set bit: the largest power of two dividing m


def _fwht(x: jax.Array, b: int) -> jax.Array:
  """Blocks of b along the last axis, each replaced by H_b x / sqrt(b); float32 arithmetic."""
  *lead, n = x.shape
  y = x.astype(jnp.float32).reshape(*lead, n // b, b)
  h = 1
  while h < b:   # stage s pairs element i with i + h inside each run of 2h: (a + c, a - c)
    y = y.reshape(*lead, n // b, b // (2 * h), 2, h)
    a, c = y[..., 0, :], y[..., 1, :]
    y = jnp.stack([a + c, a - c], axis=-2)
    h *= 2
  return (y.reshape(*lead, n) * (1.0 / math.sqrt(b))).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _transform(x: jax.Array, b: int) -> jax.Array:
  return _fwht(x, b)


def _transform_fwd(x, b):
  return _fwht(x, b), None


def _transform_bwd(b, _, g):
  return (_fwht(g, b),)   # H symmetric and orthogonal: the vjp of x -> Hx is g -> H^T g = Hg


_transform.defvjp(_transform_fwd, _transform_bwd)


def hadamard_transform(x: jax.Array, *, groups: int = 1) -> jax.Array:
  """`H x / sqrt(b)` per block of b features along the last axis (module docstring); its own inverse.

  `groups=G`: the last axis is G groups (tensor-parallel shards) and no block crosses a group boundary.
  The result has x's dtype, computed in float32.
  """
  if x.ndim < 1:
    raise ValueError("hadamard_transform: expected an array with a feature axis, got a scalar")
  return _transform(x, block_size(x.shape[-1], groups))


def hadamard_matrix(n: int, groups: int = 1) -> jax.Array:
  """The float32 [n, n] matrix M with `hadamard_transform(x, groups=groups) == x @ M` (symmetric: M = M^T)."""
  return hadamard_transform(jnp.eye(n, dtype=jnp.float32), groups=groups)
