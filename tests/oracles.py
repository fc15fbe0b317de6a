"""Slow, obvious numpy oracles of the papers' formulas (../shared/PAPERS.md), written independently of bitnet_jax.

They follow the FAQ reference code's operation order (`s = 1 / max(mean|w|, 1e-5)`, `round(w * s) / s`), in
float32, so that where the float32 reductions agree the library must agree bit for bit.
"""

import numpy as np

F32 = np.float32


def groups_view(a, groups, axis):
  """Yields (index, slab) for each of `groups` equal slabs of `a` along `axis`."""
  n = a.shape[axis] // groups
  for g in range(groups):
    idx = [slice(None)] * a.ndim
    idx[axis] = slice(g * n, (g + 1) * n)
    yield tuple(idx), a[tuple(idx)]


def ternary(w, groups=1, axis=-1):
  """b1.58 FAQ `weight_quant`, per group: s = 1/max(mean|w|, 1e-5); clip(round(w*s), -1, 1) / s."""
  w = np.asarray(w, F32)
  out = np.empty_like(w)
  for idx, wg in groups_view(w, groups, axis):
    s = F32(1) / max(F32(np.abs(wg).mean(dtype=F32)), F32(1e-5))
    out[idx] = np.clip(np.round(wg * s), -1, 1) / s
  return out


def binary(w, groups=1, axis=-1):
  """BitNet eq. 1-4 per group: Sign(W - mean W) * mean|W|, Sign(0) = -1."""
  w = np.asarray(w, F32)
  out = np.empty_like(w)
  for idx, wg in groups_view(w, groups, axis):
    alpha, beta = wg.mean(dtype=F32), np.abs(wg).mean(dtype=F32)
    out[idx] = np.where(wg - alpha > 0, F32(1), F32(-1)) * beta
  return out


def activations(x, bits=8, per_token=True, groups=1, asymmetric=False):
  """Absmax (BitNet eq. 5) or zero-point (eq. 6) fake quantisation with q = 2^(b-1) - 1 (FAQ reference's 127)."""
  x = np.asarray(x, F32)
  q = F32(2 ** (bits - 1) - 1)
  out = np.empty_like(x)
  for idx, xg in groups_view(x, groups, -1):
    if per_token:
      gamma = np.abs(xg).max(axis=-1, keepdims=True)
      eta = xg.min(axis=-1, keepdims=True)
    else:
      gamma, eta = np.abs(xg).max(), xg.min()
    s = q / np.maximum(gamma, F32(1e-5))
    if asymmetric:
      out[idx] = np.clip(np.round((xg - eta) * s), 0, q) / s + eta
    else:
      out[idx] = np.clip(np.round(xg * s), -q - 1, q) / s
  return out


def rms_norm(x, eps=1e-5):
  x = np.asarray(x, F32)
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + F32(eps))


def layer_norm(x, eps=1e-5):
  x = np.asarray(x, F32)
  c = x - x.mean(axis=-1, keepdims=True)
  return c / np.sqrt(np.mean(c * c, axis=-1, keepdims=True) + F32(eps))


# ---------------------------------------------------------------- the successors (bitnet_jax/quant_successors.py)
def absmean_activations(x, bits=4, groups=1):
  """a4.8 eq. 7 / v2 eq. 6 per token: s = sqrt(q) / max(mean|x|, 1e-5), clip(round(x s), -q - 1, q) / s."""
  x = np.asarray(x, F32)
  q = 2 ** (bits - 1) - 1
  out = np.empty_like(x)
  for idx, xg in groups_view(x, groups, -1):
    beta = np.abs(xg).sum(axis=-1, keepdims=True, dtype=F32) / F32(xg.shape[-1])
    s = F32(np.sqrt(q)) / np.maximum(beta, F32(1e-5))
    out[idx] = np.clip(np.round(xg * s), -q - 1, q) / s
  return out


def topk(x, fraction=0.5, groups=1):
  """a4.8 eq. 1's mask per token: entries with |x| at least the K-th largest |x| kept, K = round(fraction d)."""
  x = np.asarray(x)
  out = np.zeros_like(x)
  for idx, xg in groups_view(x, groups, -1):
    k = max(1, round(fraction * xg.shape[-1]))
    kth = -np.sort(-np.abs(xg), axis=-1)[..., k - 1:k]
    out[idx] = np.where(np.abs(xg) >= kth, xg, 0)
  return out


def seq_ternary(w, alpha, g=None):
  """ParetoQ SEQ for ternary, as its code's StretchedElasticQuant: value and, given the cotangent g, (dW, dalpha).

  Kernel [in, out], alpha [out]; u = W / alpha; q = round(clip(u, +-0.99) * 1.5) / 1.5; W_q = q alpha.
  dW = g [|u| <= 0.99]; dalpha = sum_in g (q - u) inside, g sign(u) outside, over sqrt(W.size)."""
  w, alpha = np.asarray(w, np.float64), np.maximum(np.asarray(alpha, np.float64), 1e-5)[None, :]
  u = w / alpha
  q = np.round(np.clip(u, -0.99, 0.99) * 1.5) / 1.5
  value = q * alpha
  if g is None:
    return value
  g = np.asarray(g, np.float64)
  inside = np.abs(u) <= 0.99
  dw = np.where(inside, g, 0.0)
  dalpha = (g * np.where(inside, q - u, np.sign(u))).sum(axis=0) / np.sqrt(w.size)
  return value, dw, dalpha
