"""bitnet_jax/kernels/words.py: the word-interleaved 2-bit layout (issue 20's offline layout for dp4a kernels):
the bit layout against a hand-built word, round trips on odd shapes and stacked layers, and the dp4a-style
integer matvec against an int32 matmul, exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax.kernels import words as W


def _codes(rng, *shape):
  return rng.integers(-1, 2, size=shape).astype(np.int8)


def test_one_word_holds_sixteen_k_of_one_column_in_the_documented_bits():
  rng = np.random.default_rng(0)
  codes = _codes(rng, 16, 3)
  got = np.asarray(W.pack_words(codes))
  assert got.shape == (3, 1) and got.dtype == np.uint32
  for n in range(3):   # a plain Python oracle of "bit pair i of byte b <-> k = 4 i + b"
    want = sum(int(codes[4 * i + b, n] + 1) << (2 * i + 8 * b) for i in range(4) for b in range(4))
    assert int(got[n, 0]) == want


def test_shift_and_mask_gives_four_consecutive_k_one_per_byte():
  rng = np.random.default_rng(1)
  codes = _codes(rng, 32, 2)
  words = np.asarray(W.pack_words(codes))
  for j in range(2):
    for i in range(4):
      m = (words[:, j] >> np.uint32(2 * i)) & np.uint32(W.MASK)
      got = np.stack([(m >> np.uint32(8 * b)) & np.uint32(0xFF) for b in range(4)], axis=0)   # [b, N]
      np.testing.assert_array_equal(got.astype(np.int32) - 1, codes[16 * j + 4 * i: 16 * j + 4 * i + 4])


@pytest.mark.parametrize("shape", [(16, 4), (1, 1), (17, 3), (37, 5), (100, 7), (2, 48, 6)])
def test_round_trip_on_odd_shapes_and_stacked_layers(shape):
  codes = _codes(np.random.default_rng(2), *shape)
  words = W.pack_words(codes)
  assert words.shape == (*shape[:-2], shape[-1], -(-shape[-2] // 16))
  np.testing.assert_array_equal(np.asarray(W.unpack_words(words, shape[-2])), codes)


def test_padding_is_code_zero():
  words = np.asarray(W.pack_words(np.ones((3, 1), np.int8)))   # k = 3: 13 padded k
  digits = [(int(words[0, 0]) >> (2 * i + 8 * b)) & 3 for i in range(4) for b in range(4)]
  ks = [4 * i + b for i in range(4) for b in range(4)]
  assert all(d == (2 if k < 3 else 1) for d, k in zip(digits, ks))


@pytest.mark.parametrize("m, k, n", [(1, 16, 8), (1, 100, 33), (4, 37, 5), (16, 256, 64)])
def test_word_matvec_equals_the_int32_matmul_exactly(m, k, n):
  rng = np.random.default_rng(k)
  codes = _codes(rng, k, n)
  x = rng.integers(-127, 128, size=(m, k)).astype(np.int8)
  want = x.astype(np.int32) @ codes.astype(np.int32)
  got = W.word_matvec(jnp.asarray(x), W.pack_words(codes), k)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got), want)
  np.testing.assert_array_equal(np.asarray(jax.jit(W.word_matvec, static_argnums=2)(x, W.pack_words(codes), k)), want)


def test_pack_words_works_under_jit():
  codes = _codes(np.random.default_rng(3), 40, 6)
  np.testing.assert_array_equal(np.asarray(jax.jit(W.pack_words)(codes)), np.asarray(W.pack_words(codes)))


@pytest.mark.parametrize("call, match", [
    (lambda: W.pack_words(np.full((4, 2), 2, np.int8)), "in \\{-1, 0, 1\\}"),
    (lambda: W.pack_words(np.zeros((4, 2), np.float32)), "integer array"),
    (lambda: W.pack_words(np.zeros((4,), np.int8)), "integer array"),
    (lambda: W.unpack_words(np.zeros((2, 1), np.int32), 16), "uint32"),
    (lambda: W.unpack_words(np.zeros((2, 1), np.uint32), 17), "needs 2 words"),
    (lambda: W.word_matvec(np.zeros((1, 16), np.int32), np.zeros((2, 1), np.uint32), 16), "int8"),
    (lambda: W.word_matvec(np.zeros((1, 16), np.int8), np.zeros((2, 2), np.uint32), 16), "uint32 \\[N, 1\\]"),
])
def test_bad_input_is_refused_with_a_clear_error(call, match):
  with pytest.raises(ValueError, match=match):
    call()
