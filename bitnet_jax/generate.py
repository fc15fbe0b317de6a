"""generate: text generation from a trained model (model -> generate; used by train for samples).

`greedy` re-runs the full causal forward over a fixed-length buffer at every step: one compilation, no cache.
It is exact (each new token is the argmax of a full forward over the prefix) and fast enough for the short
samples the trainer prints; the KV-cache decoder with sampling options is tracked by the inference issue.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bitnet_jax.model import Transformer


@nnx.jit(static_argnums=(2,))
def _greedy(model: Transformer, prompt_bt: jax.Array, max_new_tokens: int) -> jax.Array:
  B, P = prompt_bt.shape
  buf = jnp.zeros((B, P + max_new_tokens), jnp.int32).at[:, :P].set(prompt_bt)

  def body(i, buf):
    logits = model(buf)                                                  # (B, L, V); causal: pads are unseen
    nxt = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, i - 1, axis=1, keepdims=False), axis=-1)
    return jax.lax.dynamic_update_index_in_dim(buf, nxt.astype(jnp.int32), i, axis=1)

  return jax.lax.fori_loop(P, P + max_new_tokens, body, buf)


def greedy(model: Transformer, prompt_tokens: jax.Array, max_new_tokens: int) -> jax.Array:
  """Greedy decoding: int32 prompt [B, P] -> prompt followed by `max_new_tokens` tokens, int32 [B, P + n]."""
  prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
  if prompt_tokens.ndim != 2 or prompt_tokens.shape[1] < 1:
    raise ValueError(f"prompt_tokens must be int32 [batch, length >= 1], got shape {prompt_tokens.shape}")
  total = prompt_tokens.shape[1] + max_new_tokens
  if total > model.cfg.max_seq_len:
    raise ValueError(f"prompt length {prompt_tokens.shape[1]} + max_new_tokens {max_new_tokens} = {total} exceeds "
                     f"the model's max_seq_len={model.cfg.max_seq_len}")
  return _greedy(model, prompt_tokens, int(max_new_tokens))
