"""Tests for bitnet_jax/quant.py against the numpy oracles of the papers' formulas (tests/oracles.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import oracles
from bitnet_jax import quant

# The oracle comparisons run the quantisers in exact mode (the reference operation order, `quant` docstring), on
# inputs whose float32 reductions are exact in any order (`_dyadic`) or need none (absmax), so they hold bit for
# bit on any CPU; `test_default_mode_*` bounds how far the default (fused) mode may differ.
WEIGHT_FNS = {"ternary": (functools.partial(quant.ternary_weights, exact=True), oracles.ternary),
              "binary": (functools.partial(quant.binary_weights, exact=True), oracles.binary)}
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


def _normal(shape, seed=0, scale=1.0):
  return np.asarray(jax.random.normal(jax.random.key(seed), shape), np.float32) * np.float32(scale)


def _dyadic(shape, seed=0):
  """k / 64 with |k| <= 64: every float32 sum over a few thousand of these is exact, so means agree bitwise."""
  return np.random.default_rng(seed).integers(-64, 65, size=shape).astype(np.float32) / np.float32(64)


# ---------------------------------------------------------------- values against the reference formulas
@pytest.mark.parametrize("groups,axis", [(1, -1), (4, -1), (2, 0), (8, 0)])
@pytest.mark.parametrize("kind", ["ternary", "binary"])
def test_weights_equal_reference_bitwise(kind, groups, axis):
  fn, oracle = WEIGHT_FNS[kind]
  w = _dyadic((48, 32), seed=groups)
  np.testing.assert_array_equal(np.asarray(fn(jnp.asarray(w), groups=groups, axis=axis)), oracle(w, groups, axis))


@pytest.mark.parametrize("kind", ["ternary", "binary"])
def test_weights_match_reference_on_gaussian(kind):
  """Random weights: only the float32 summation order of the mean may differ (one ulp of the scale)."""
  fn, oracle = WEIGHT_FNS[kind]
  w = _normal((256, 96), seed=3)
  got, want = np.asarray(fn(jnp.asarray(w))), oracle(w)
  np.testing.assert_array_equal(np.sign(got), np.sign(want))   # same codes
  np.testing.assert_allclose(got, want, rtol=2e-7, atol=0)


def test_ternary_codes_are_ternary_and_scale_is_absmean():
  w = _normal((64, 64), seed=1)
  codes, scale = quant.ternary_codes(jnp.asarray(w))
  assert codes.dtype == jnp.int8 and scale.dtype == jnp.float32 and scale.shape == (1, 1)
  assert set(np.unique(np.asarray(codes))) <= {-1, 0, 1}
  np.testing.assert_allclose(float(scale[0, 0]), np.abs(w).mean(), rtol=1e-6)
  # b1.58 eq. 1-3: round(w / gamma) clipped, i.e. roughly the |w| > gamma / 2 entries are non-zero.
  np.testing.assert_array_equal(np.asarray(codes), np.clip(np.round(w / np.abs(w).mean()), -1, 1))


def test_binary_sign_of_zero_is_minus_one():
  w = jnp.asarray([[1.0, -1.0, 0.0, 0.0]])   # alpha = 0, so W - alpha = 0 at the zeros
  codes, beta = quant.binary_codes(w)
  np.testing.assert_array_equal(np.asarray(codes), [[1, -1, -1, -1]])
  np.testing.assert_allclose(np.asarray(beta), [[0.5]])


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("asymmetric", [False, True])
def test_activations_equal_reference_bitwise(bits, per_token, asymmetric):
  """Absmax statistics are exact (max/min, no sums), so the result must match the oracle bit for bit."""
  x = _normal((3, 7, 64), seed=bits, scale=3.0)
  if asymmetric:
    x = np.maximum(x, 0)   # the zero-point form is for non-negative inputs (after a ReLU)
  got = quant.quantize_activations(jnp.asarray(x), bits, per_token=per_token, asymmetric=asymmetric, exact=True)
  np.testing.assert_array_equal(np.asarray(got), oracles.activations(x, bits, per_token, 1, asymmetric))


@pytest.mark.parametrize("groups", [2, 4, 16])
@pytest.mark.parametrize("per_token", [True, False])
def test_grouped_activations_equal_reference(groups, per_token):
  x = _normal((5, 64), seed=groups, scale=2.0)
  got = quant.quantize_activations(jnp.asarray(x), 8, per_token=per_token, groups=groups, exact=True)
  np.testing.assert_array_equal(np.asarray(got), oracles.activations(x, 8, per_token, groups))


def test_per_token_codes_use_the_full_int8_range():
  x = _normal((4, 128), seed=5)
  codes, scale = quant.activation_codes(jnp.asarray(x))
  codes = np.asarray(codes)
  assert codes.dtype == np.int8 and scale.shape == (4, 1)
  np.testing.assert_array_equal(np.abs(codes).max(axis=-1), [127] * 4)   # the absmax row element maps to +-127
  np.testing.assert_allclose(np.asarray(scale)[:, 0], np.abs(x).max(-1) / 127, rtol=1e-6)


def test_asymmetric_codes_are_non_negative_and_min_maps_to_zero():
  x = np.abs(_normal((6, 32), seed=2)) + 0.5
  y = np.asarray(quant.quantize_activations(jnp.asarray(x), 8, per_token=True, asymmetric=True))
  np.testing.assert_array_equal(y.min(axis=-1), x.min(axis=-1))   # eta is represented exactly
  assert np.all(np.abs(y - x) <= x.max(-1, keepdims=True) / 127 / 2 * 1.0001)


# ---------------------------------------------------------------- groups are independent quantisers
@pytest.mark.parametrize("kind", ["ternary", "binary"])
@pytest.mark.parametrize("axis", [0, -1])
def test_each_weight_group_is_quantised_alone(kind, axis):
  fn, _ = WEIGHT_FNS[kind]
  w = jnp.asarray(_dyadic((32, 48), seed=7))   # exact sums: the two layouts' summation orders cannot differ
  whole = np.asarray(fn(w, groups=4, axis=axis))
  for idx, slab in oracles.groups_view(np.asarray(w), 4, axis):
    np.testing.assert_array_equal(whole[idx], np.asarray(fn(jnp.asarray(slab))))


@pytest.mark.parametrize("kind", ["ternary", "binary"])
@pytest.mark.parametrize("grid", [(2, 4), (4, 1), (1, 1), (8, 3)])
def test_each_weight_block_of_a_2d_group_grid_is_quantised_alone(kind, grid):
  """groups=(G_in, G_out): one statistic per block, the layout a device of an FSDP x tensor mesh holds."""
  fn, _ = WEIGHT_FNS[kind]
  codes_fn = functools.partial(quant.ternary_codes if kind == "ternary" else quant.binary_codes, exact=True)
  w = jnp.asarray(_dyadic((32, 48), seed=11))
  whole = np.asarray(fn(w, groups=grid))
  codes, scale = codes_fn(w, groups=grid)
  assert scale.shape == grid
  np.testing.assert_array_equal(np.asarray(codes * quant.expand_group_scale(scale, w.shape)), whole)
  bi, bo = 32 // grid[0], 48 // grid[1]
  for i in range(grid[0]):
    for o in range(grid[1]):
      block = w[i * bi:(i + 1) * bi, o * bo:(o + 1) * bo]
      np.testing.assert_array_equal(whole[i * bi:(i + 1) * bi, o * bo:(o + 1) * bo], np.asarray(fn(block)))
  if grid[0] == 1:   # a one-row grid is the single-axis form
    np.testing.assert_array_equal(whole, np.asarray(fn(w, groups=grid[1], axis=-1)))


def test_bad_group_grid_is_refused():
  with pytest.raises(ValueError, match=r"one count per dimension"):
    quant.ternary_weights(jnp.ones((8, 8)), groups=(2, 2, 2))
  with pytest.raises(ValueError, match=r"groups=3 does not divide dimension 1"):
    quant.ternary_codes(jnp.ones((8, 8)), groups=(2, 3))


def test_each_activation_group_is_quantised_alone():
  x = jnp.asarray(_normal((3, 4, 32), seed=9))   # max/min are exact whatever the layout
  whole = np.asarray(quant.quantize_activations(x, 8, per_token=False, groups=4))
  for idx, slab in oracles.groups_view(np.asarray(x), 4, -1):
    np.testing.assert_array_equal(whole[idx], np.asarray(quant.quantize_activations(jnp.asarray(slab), 8,
                                                                                    per_token=False)))


# ---------------------------------------------------------------- code forms equal the fake-quant values
@pytest.mark.parametrize("groups,axis", [(1, -1), (4, -1), (4, 0)])
def test_weight_codes_times_scale_equal_fake_quant_exactly(groups, axis):
  w = jnp.asarray(_normal((32, 64), seed=11))
  for codes_fn, fq_fn in ((quant.ternary_codes, quant.ternary_weights), (quant.binary_codes, quant.binary_weights)):
    codes, scale = codes_fn(w, groups=groups, axis=axis)
    assert codes.dtype == jnp.int8 and scale.dtype == jnp.float32
    assert scale.shape[axis] == groups and scale.size == groups
    deq = codes.astype(jnp.float32) * quant.expand_group_scale(scale, w.shape, axis)
    np.testing.assert_array_equal(np.asarray(deq), np.asarray(fq_fn(w, groups=groups, axis=axis)))


@pytest.mark.parametrize("per_token,groups", [(True, 1), (True, 4), (False, 1), (False, 2)])
def test_activation_codes_times_scale_equal_fake_quant(per_token, groups):
  x = jnp.asarray(_normal((2, 3, 32), seed=13, scale=4.0))
  codes, scale = quant.activation_codes(x, 8, per_token=per_token, groups=groups)
  assert scale.shape[-1] == groups and scale.ndim == x.ndim
  deq = np.asarray(codes, np.float32) * np.asarray(quant.expand_group_scale(scale, x.shape, -1))
  want = np.asarray(quant.quantize_activations(x, 8, per_token=per_token, groups=groups))
  np.testing.assert_allclose(deq, want, rtol=1.2e-7, atol=0)   # c * (1/s) vs c / s: one float32 rounding


# ---------------------------------------------------------------- straight-through gradients
_ALL = [
    ("ternary", lambda x: quant.ternary_weights(x)),
    ("ternary_g4_axis0", lambda x: quant.ternary_weights(x, groups=4, axis=0)),
    ("binary", lambda x: quant.binary_weights(x)),
    ("binary_g2", lambda x: quant.binary_weights(x, groups=2)),
    ("act8_token", lambda x: quant.quantize_activations(x, 8)),
    ("act4_tensor", lambda x: quant.quantize_activations(x, 4, per_token=False)),
    ("act8_asym_g4", lambda x: quant.quantize_activations(x, 8, asymmetric=True, groups=4)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name,fn", _ALL, ids=[n for n, _ in _ALL])
def test_gradient_is_identity(name, fn, dtype):
  x = jnp.asarray(_normal((16, 32), seed=17), dtype)
  cot = jnp.asarray(_normal((16, 32), seed=19), dtype)
  out, vjp = jax.vjp(fn, x)
  (grad,) = vjp(cot)
  assert out.dtype == dtype and grad.dtype == dtype
  np.testing.assert_array_equal(np.asarray(grad, np.float32), np.asarray(cot, np.float32))
  # jax.grad through a jit gives the same identity.
  g2 = jax.jit(jax.grad(lambda x: jnp.sum(fn(x).astype(jnp.float32) * cot.astype(jnp.float32))))(x)
  np.testing.assert_array_equal(np.asarray(g2, np.float32), np.asarray(cot, np.float32))


# ---------------------------------------------------------------- dtypes and edge values
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name,fn", _ALL, ids=[n for n, _ in _ALL])
def test_edge_values_are_finite_and_sane(name, fn, dtype):
  base = np.abs(_normal((8, 32), seed=23)) if "asym" in name else _normal((8, 32), seed=23)
  zeros = fn(jnp.zeros((8, 32), dtype))
  assert zeros.dtype == dtype
  np.testing.assert_array_equal(np.abs(np.asarray(zeros, np.float32)), 0)
  big = 1e30 if dtype != jnp.float16 else 1e3      # float16 tops out at 65504
  for magnitude in (big, 1e-30 if dtype != jnp.float16 else 1e-4):
    x = jnp.asarray(base * magnitude, dtype)
    y = np.asarray(fn(x), np.float32)
    assert np.all(np.isfinite(y)), f"{name} {dtype} at {magnitude}: non-finite output"
    if magnitude >= 1:
      # The low-precision result is the float32 computation on the same input, rounded once to the dtype.
      ref = np.asarray(fn(x.astype(jnp.float32)).astype(dtype), np.float32)
      np.testing.assert_array_equal(y, ref)
      if dtype == jnp.float32:   # and scale equivariance: quantising 1e30 * w is 1e30 * quantising w
        want = np.asarray(fn(jnp.asarray(base, jnp.float32)), np.float32) * np.float32(magnitude)
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    else:
      # Below the 1e-5 clamp the statistic is floored, everything rounds to the zero code.
      assert np.abs(y).max() <= np.abs(np.asarray(x, np.float32)).max() * 1.01 + 1e-30


def test_statistics_are_float32_for_low_precision_inputs():
  """A bf16 input gives the float32 result rounded once to bf16, not a result of bf16 arithmetic."""
  w = jnp.asarray(_normal((64, 64), seed=29), jnp.bfloat16)
  got = quant.ternary_weights(w)
  want = quant.ternary_weights(w.astype(jnp.float32)).astype(jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


# ---------------------------------------------------------------- jit / vmap
_ULP = float(np.finfo(np.float32).eps)


def _sum_rtol(n: int) -> float:
  """Relative tolerance between two float32 sums of the same n non-negative terms in different orders (XLA picks
  the order per compilation and per CPU): sqrt(n) ulps, the typical size of the difference, with no tighter bound
  available without pinning the order."""
  return max(2.0, np.sqrt(n)) * _ULP


def _codes_agree_but_at_ties(got, want, near_tie, rtol):
  """De-quantised weights `got` and `want`: the codes (signs) are equal everywhere but on the `near_tie` mask, and
  the values agree to rtol where the codes are equal. Returns the fraction of flipped codes."""
  differ = np.sign(got) != np.sign(want)
  assert not np.any(differ & ~near_tie), "a code differs away from a rounding tie"
  np.testing.assert_allclose(got[~differ], want[~differ], rtol=rtol, atol=0)
  return differ.mean()


@pytest.mark.parametrize("name", ["ternary", "binary", "activations"])
def test_jit_and_vmap_agree_with_eager(name):
  """Exact mode on inputs whose sums are exact in any order: bit for bit. The default mode on Gaussian inputs:
  XLA picks the float32 summation order per compilation (it differs between jit and eager on AVX-512 machines),
  so the scales agree to `_sum_rtol`, and a weight code may flip only where the weight sits on a tie."""
  fn = {"ternary": quant.ternary_weights, "binary": quant.binary_weights,
        "activations": quant.quantize_activations}[name]
  exact = functools.partial(fn, exact=True)
  w = jnp.asarray(_dyadic((4, 16, 32), seed=31))
  eager = np.stack([np.asarray(exact(w[i])) for i in range(4)])
  np.testing.assert_array_equal(np.asarray(jax.vmap(exact)(w)), eager)
  np.testing.assert_array_equal(np.asarray(jax.jit(jax.vmap(exact))(w)), eager)
  g = jnp.asarray(_normal((4, 16, 32), seed=31))
  eager = np.stack([np.asarray(fn(g[i])) for i in range(4)])
  for got in (np.asarray(jax.vmap(fn)(g)), np.asarray(jax.jit(jax.vmap(fn))(g))):
    if name == "activations":   # max, no sum: the same codes and scales, one rounding of codes / s at most
      np.testing.assert_allclose(got, eager, rtol=3 * _ULP, atol=0)
    elif name == "ternary":
      rtol = _sum_rtol(16 * 32)
      ratio = np.abs(np.asarray(g)) / np.abs(np.asarray(g)).mean(axis=(1, 2), keepdims=True)
      _codes_agree_but_at_ties(got, eager, np.abs(ratio - 0.5) <= 2 * rtol, rtol)
    else:   # binary: Sign(w - mean w) flips only for w within the mean's tolerance of the mean
      centred = np.asarray(g, np.float64) - np.asarray(g, np.float64).mean(axis=(1, 2), keepdims=True)
      differ = np.sign(got) != np.sign(eager)
      assert not np.any(differ & (np.abs(centred) > 1e-5)), "a binary code differs away from the mean"
      np.testing.assert_allclose(np.abs(got), np.abs(eager), rtol=_sum_rtol(16 * 32), atol=0)


@pytest.mark.parametrize("kind", ["ternary", "binary"])
@pytest.mark.parametrize("groups", [1, 4, (2, 4)])
def test_default_mode_weights_equal_exact_mode_but_at_ties(kind, groups):
  """The default (fused) quantiser against exact mode on random weights: the per-group scales agree to
  `_sum_rtol` of the group size (a mean in another summation order), and the codes differ only where |w| / scale
  (ternary) or w - mean(w) (binary) lies within that tolerance of the rounding boundary: a tie-sized fraction."""
  codes_fn = quant.ternary_codes if kind == "ternary" else quant.binary_codes
  gs = groups if isinstance(groups, tuple) else (1, groups)
  rtol = _sum_rtol(384 * 96 // (gs[0] * gs[1]))
  for seed in range(4):
    w = jnp.asarray(_normal((384, 96), seed=seed, scale=0.02))
    fast_codes, fast_scale = jax.jit(functools.partial(codes_fn, groups=groups))(w)
    exact_codes, exact_scale = codes_fn(w, groups=groups, exact=True)
    np.testing.assert_allclose(np.asarray(fast_scale), np.asarray(exact_scale), rtol=rtol, atol=0)
    differ = np.asarray(fast_codes) != np.asarray(exact_codes)
    w64 = np.asarray(w, np.float64)
    blocks = w64.reshape(gs[0], 384 // gs[0], gs[1], 96 // gs[1])
    if kind == "ternary":
      gamma = np.abs(blocks).mean(axis=(1, 3), keepdims=True)
      near_tie = np.abs((np.abs(blocks) / gamma).reshape(w.shape) - 0.5) <= 2 * rtol
    else:
      centred = blocks - blocks.mean(axis=(1, 3), keepdims=True)
      near_tie = (np.abs(centred) <= 2 * rtol * np.abs(blocks).max()).reshape(w.shape)
    assert not np.any(differ & ~near_tie), f"{kind} groups={groups}: a code differs away from a tie"
    assert differ.mean() <= 1e-3
    fq = functools.partial(quant.ternary_weights if kind == "ternary" else quant.binary_weights, groups=groups)
    # The fake-quantised values: the same bound on the fused path's own codes, and the values where they agree.
    assert _codes_agree_but_at_ties(np.asarray(jax.jit(fq)(w)), np.asarray(fq(w, exact=True)), near_tie, rtol) <= 1e-3


@pytest.mark.parametrize("bits,per_token,asymmetric", [(8, True, False), (8, False, False), (4, True, False),
                                                       (8, True, True)])
def test_default_mode_activations_equal_exact_mode_but_at_ties(bits, per_token, asymmetric):
  """Absmax statistics are exact in any order, so only the scale's form separates the two modes: `q * (1 / m)`
  against `q / m` and `codes * (1 / s)` against `codes / s`, at most three float32 roundings of the de-quantised
  value, with identical codes, on every input."""
  for seed in range(4):
    x = _normal((8, 64, 96), seed=seed, scale=3.0)
    x = np.maximum(x, 0) if asymmetric else x
    kw = dict(per_token=per_token, asymmetric=asymmetric)
    fast = np.asarray(jax.jit(lambda x: quant.quantize_activations(x, bits, **kw))(jnp.asarray(x)))
    exact = np.asarray(quant.quantize_activations(jnp.asarray(x), bits, exact=True, **kw))
    np.testing.assert_allclose(fast, exact, rtol=3 * _ULP, atol=0)
    if not asymmetric:
      c_fast, _ = jax.jit(lambda x: quant.activation_codes(x, bits, per_token=per_token))(jnp.asarray(x))
      c_exact, _ = quant.activation_codes(jnp.asarray(x), bits, per_token=per_token, exact=True)
      np.testing.assert_array_equal(np.asarray(c_fast), np.asarray(c_exact))


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("call,match", [
    (lambda: quant.ternary_weights(jnp.ones((6, 10)), groups=4), r"groups=4 does not divide dimension 1 of shape \(6, 10\)"),
    (lambda: quant.binary_weights(jnp.ones((6, 10)), groups=4, axis=0), r"groups=4 does not divide dimension 0"),
    (lambda: quant.ternary_codes(jnp.ones((6, 10)), groups=0), r"groups must be a positive int"),
    (lambda: quant.ternary_weights(jnp.ones((6, 10)), axis=2), r"axis=2 is out of range"),
    (lambda: quant.quantize_activations(jnp.ones((2, 10)), 9), r"bits must be an int from 2 to 8"),
    (lambda: quant.quantize_activations(jnp.ones((2, 10)), 1), r"bits must be an int from 2 to 8"),
    (lambda: quant.quantize_activations(jnp.ones((2, 10)), groups=3), r"groups=3 does not divide"),
    (lambda: quant.activation_codes(jnp.ones((2, 10)), 8, groups=4), r"groups=4 does not divide"),
    (lambda: quant.ternary_weights(jnp.ones(())), r"scalar"),
])
def test_bad_input_raises_a_clear_error(call, match):
  with pytest.raises(ValueError, match=match):
    call()


# ---------------------------------------------------------------- property tests
_arrays = hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=12),
                     elements=st.floats(-1e4, 1e4, width=32, allow_nan=False))


@settings(max_examples=60, deadline=None)
@given(x=_arrays, bits=st.integers(2, 8), per_token=st.booleans())
def test_property_activation_error_is_half_a_step(x, bits, per_token):
  """Symmetric absmax never clips (|x| <= gamma), so every element is within half a quantisation step."""
  y = np.asarray(quant.quantize_activations(jnp.asarray(x), bits, per_token=per_token))
  gamma = np.abs(x).max(axis=-1, keepdims=True) if per_token else np.abs(x).max()
  step = np.maximum(gamma, 1e-5) / (2 ** (bits - 1) - 1)
  assert np.all(np.abs(y - x) <= step / 2 * (1 + 1e-5) + 1e-30)
  exact = np.asarray(quant.quantize_activations(jnp.asarray(x), bits, per_token=per_token, exact=True))
  np.testing.assert_array_equal(exact, oracles.activations(x, bits, per_token))


@settings(max_examples=60, deadline=None)
@given(w=_arrays)
def test_property_ternary_codes_and_values(w):
  codes, scale = quant.ternary_codes(jnp.asarray(w))
  codes = np.asarray(codes)
  assert set(np.unique(codes)) <= {-1, 0, 1}
  y = np.asarray(quant.ternary_weights(jnp.asarray(w)))
  np.testing.assert_array_equal(y, codes * np.asarray(scale))
  # Against the oracle, away from the rounding boundaries |w * s| = 0.5, where a one-ulp difference of the
  # float32 mean (XLA's summation order against numpy's) may legitimately flip a code.
  ws = np.abs(w) / max(np.abs(w).mean(dtype=np.float64), 1e-5)
  clear = np.abs(ws - 0.5) > 1e-5
  np.testing.assert_array_equal(np.sign(y)[clear], np.sign(oracles.ternary(w))[clear])


@settings(max_examples=60, deadline=None)
@given(w=_arrays)
def test_property_binary_codes_and_values(w):
  codes, beta = quant.binary_codes(jnp.asarray(w))
  codes = np.asarray(codes)
  assert set(np.unique(codes)) <= {-1, 1}
  # Sign(W - alpha): compared away from alpha itself, where the float32 mean's summation order decides.
  centred = w.astype(np.float64) - w.mean(dtype=np.float64)
  clear = np.abs(centred) > 1e-5 * (np.abs(w).max() + 1e-30)
  np.testing.assert_array_equal((codes == 1)[clear], (centred > 0)[clear])
