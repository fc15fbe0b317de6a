"""generate: sampling from a trained model with a KV cache (model -> sharding -> train -> generate).

    python -m bitnet_jax.generate --workdir=runs/quickstart/b158-small --prompt="def " [--max_new_tokens=80]
        [--temperature=0.8 --top_k=40 --top_p=0.95 --seed=0 --kv_cache=bfloat16|float32|int8|int4|int3]

`generate(model, prompt, n, ...)` is one jitted program: a prefill (`Transformer.decode` on the whole prompt)
writes the prompt's K/V into a `kv_cache.KVCache` and gives the first new token, then a `lax.fori_loop` runs
one single-token decode step per further token. Sampling: temperature 0 is greedy (argmax); otherwise the logits
are divided by the temperature, cut to the top k, then to the top p (nucleus: the most likely tokens until their
probability reaches p), and drawn from with `fold_in(key(seed), step)`: a seed reproduces its tokens.

The model decodes in its inference form (`inference_form`): every BitLinear's weights quantised once, up front,
as the b1.58 FAQ's inference BitLinear does offline (the training form re-quantises the latent weights in every
call), and BitNet's per-tensor activation scales (its training mode) made per token, as BitNet does at inference
(PAPERS.md section 1). Per-token scales make each token's computation independent of the others, the condition
for a KV cache to compute the full forward's function; for b158 and fp models the inference form is that
function unchanged. With a float32 cache on a float32 model every greedy token is the argmax of a full forward
over its prefix (tested for fp, b158 and bitnet); a quantised cache of kind X equals the full forward with
`ModelConfig.kv_quant=X`.

Depth: with `ModelConfig.scan_layers` (or `inference_form(..., layers="stacked")`) the inference copy stores its
blocks stacked and every prefill and decode step runs them as one `lax.scan` over a stacked KV cache, so the
program compiles one block body whatever the depth (3B on CPU: 1.5-3 s against 9-24 s unrolled). The packed
form's kernel then reads each layer's 2-bit codes in place from the stack (`kernels.matmul(..., layer=i)`), so
on GPU/TPU no step copies weights out of it; on CPU (the XLA path) each step slices every layer out of the stack
(13-68% slower steps than unrolled at d_model 512).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bitnet_jax import kernels, kv_cache, packing
from bitnet_jax.layers import LEARNED_SCALE, WEIGHT_CODES, BitLinear, input_codes, transform_input
from bitnet_jax.model import STACK_INDEXED, Transformer

if TYPE_CHECKING:
  from bitnet_jax.tokenizer import Tokenizer


# --------------------------------------------------------------------------------------------------------------
# The inference form of a model.
# --------------------------------------------------------------------------------------------------------------
@nnx.jit
def _quantized_kernels(model: Transformer) -> list[jax.Array]:
  return [m.quantized_kernel().astype(m.dtype) for _, m in nnx.iter_graph(model) if isinstance(m, BitLinear)]


def _is_inference_form(model: Transformer) -> bool:
  return all(m.weight_quant == "none" and m.act_per_token and m.kernel[...].dtype == m.dtype
             for _, m in nnx.iter_graph(model) if isinstance(m, BitLinear))


class PackedCodes(nnx.Variable):
  """Deployed weights of a PackedLinear (2-bit packed codes and their scales): state, not trainable."""


def _packable(layer: BitLinear) -> bool:
  return ((layer.weight_quant in WEIGHT_CODES or layer.weight_quant in LEARNED_SCALE) and layer.act_bits is not None
          and not layer.act_asymmetric)


class PackedLinear(nnx.Module):
  """A BitLinear in its deployed form: ternary (or binary) weight codes packed 2 bits each, int8 activation
  codes per token, and `kernels.matmul` (the Pallas kernel on GPU/TPU, the XLA unpack-then-dot elsewhere).

  The b1.58 FAQ's inference BitLinear, `y = lowbit_gemm(x_q, w_q) / w_scale / x_scale` with exact int32 sums:
  equal bit for bit to the BitLinear's integer path (`layers.use_integer_matmul`), and to its fake-quantised
  forward up to float32 rounding. Binary codes (BitNet) are {-1, +1}, a subset of the ternary digits, so they
  use the same 2-bit kernel. Holds only the packed codes and the scale grid (0.25 bytes per weight) and the
  BitLinear's own norm. In a stacked model (`inference_form(layers="stacked")`) the codes and scales stay whole
  in the layer scan (`model.STACK_INDEXED`) and `layer` holds the block's index: the kernel reads that layer's
  tiles from the stack, so no decode step copies the weights out of it."""

  def __init__(self, layer: BitLinear):
    if not _packable(layer):
      raise ValueError(f"PackedLinear needs quantised weights and symmetric quantised activations "
                       f"(weight_quant={layer.weight_quant!r}, act_bits={layer.act_bits!r}, "
                       f"act_asymmetric={layer.act_asymmetric})")
    codes, scale = layer.weight_codes()
    self.n_out = layer.kernel.shape[1]
    self.packed = PackedCodes(packing.pack_2bit(codes, axis=-1))                     # uint8 [K, ceil(N / 4)]
    self.scale = PackedCodes(scale)                                                 # float32 (G_in, G_out)
    self.norm, self.act_bits, self.dtype, self.exact = layer.norm, layer.act_bits, layer.dtype, layer.exact
    self.act_quant, self.input_transform = layer.act_quant, layer.input_transform
    self.act_groups = layer.groups if layer.group_axis == "in" else 1
    self.layer: PackedCodes | None = nnx.data(None)   # this block's index once the blocks are stacked (`_stack_blocks`)

  def __call__(self, x: jax.Array, *, normalized: jax.Array | None = None) -> jax.Array:
    x = x.astype(self.dtype)
    if self.norm is not None:
      x = self.norm.apply_gain(self.norm.normalize(x) if normalized is None else normalized, self.dtype)
    x = transform_input(x, self.input_transform, self.act_groups)
    x_codes, x_scale = input_codes(x, act_quant=self.act_quant, act_bits=self.act_bits, per_token=True,
                                   groups=self.act_groups, exact=self.exact)
    layer = None if self.layer is None else self.layer[...]   # stacked: codes and scales are the whole stack
    y = kernels.matmul(x_codes, self.packed[...], self.scale[...], n_out=self.n_out, x_scale=x_scale, layer=layer)
    return y.astype(self.dtype)


WEIGHT_FORMS = ("auto", "dense", "packed")
LAYER_FORMS = ("auto", "unrolled", "stacked")


def inference_form(model: Transformer, weights: str = "auto", layers: str = "auto") -> Transformer:
  """A copy of `model` for decoding, its weights quantised once (the training form re-quantises them per call).

  weights="dense": each BitLinear's kernel replaced by the de-quantised kernel its forward uses, in the compute
  dtype (`weight_quant="none"` from then on), activation scales per token: the training graph's function.
  weights="packed": each quantised BitLinear replaced by a `PackedLinear` (2-bit codes, int8 activations, the
  low-bit kernel), the deployed form. "auto" (default): packed on GPU/TPU, where the Pallas kernel runs, dense
  elsewhere (on CPU the XLA unpack-then-dot is slower than the dense dot).

  layers="stacked": the blocks stored stacked (`Transformer.stack_layers`), so prefill and every decode step
  run them as one `lax.scan` over a stacked KV cache: compile time independent of depth, the weights stacked
  once here rather than in every call. Packed codes stay whole in the scan and the kernel reads its layer from
  the stack (`PackedLinear`); dense weights, and the XLA path on CPU, slice each layer out per step.
  "unrolled": one block after another in the program. "auto" (default): stacked iff `cfg.scan_layers`.

  Other parameters are shared with `model`, which is left unchanged. A model already in an inference form is
  returned as is (or stacked, if asked), so converting once before many `generate` calls saves the conversion
  in each."""
  if weights not in WEIGHT_FORMS:
    raise ValueError(f"inference_form: weights must be one of {WEIGHT_FORMS}, got {weights!r}")
  if layers not in LAYER_FORMS:
    raise ValueError(f"inference_form: layers must be one of {LAYER_FORMS}, got {layers!r}")
  stack = layers == "stacked" or (layers == "auto" and model.cfg.scan_layers)
  if layers == "unrolled" and model.layer_stack is not None:
    raise ValueError("inference_form: layers='unrolled' for a model whose blocks are already stacked "
                     "(stack the copy you decode, keep the per-layer original)")
  if _is_inference_form(model):
    return _stack_blocks(nnx.clone(model)) if stack and model.layer_stack is None else model
  if weights == "auto":
    weights = "packed" if jax.default_backend() in kernels.ACCELERATORS else "dense"
  model = nnx.clone(model)
  if weights == "packed":
    for _, module in list(nnx.iter_graph(model)):
      if isinstance(module, nnx.Module) and not isinstance(module, BitLinear):
        for name, child in list(vars(module).items()):
          if isinstance(child, BitLinear) and _packable(child):
            setattr(module, name, PackedLinear(child))
  layers = [m for _, m in nnx.iter_graph(model) if isinstance(m, BitLinear)]
  if layers:
    for layer, kernel in zip(layers, _quantized_kernels(model), strict=True):
      layer.kernel.set_value(kernel)
      layer.weight_quant = "none"
      layer.act_per_token = True
  return _stack_blocks(model) if stack else model


def _stack_blocks(model: Transformer) -> Transformer:
  """`model.stack_layers()`, in place, after giving each PackedLinear its block's index and marking its codes and
  scales `STACK_INDEXED` (passed whole to the kernel, which reads its layer out of the stack)."""
  for i, block in enumerate(model.blocks):
    for _, module in nnx.iter_graph(block):
      if isinstance(module, PackedLinear):
        module.layer = PackedCodes(jnp.asarray(i, jnp.int32))
        for var in (module.packed, module.scale):
          var.set_metadata(**{STACK_INDEXED: True})
  return model.stack_layers()


# --------------------------------------------------------------------------------------------------------------
# Sampling and the decode loop.
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Sampler:
  """Next-token choice from logits [B, V]: greedy at temperature 0, else temperature, top-k, top-p, draw."""
  temperature: float = 0.0
  top_k: int | None = None
  top_p: float | None = None

  def __call__(self, logits_bv: jax.Array, key: jax.Array) -> jax.Array:
    if self.temperature == 0.0:
      return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits = logits_bv.astype(jnp.float32) / self.temperature
    if self.top_k is not None:   # keep logits >= the k-th largest (ties at the k-th are kept too)
      kth = jax.lax.top_k(logits, self.top_k)[0][:, -1:]                            # (B, 1)
      logits = jnp.where(logits < kth, -jnp.inf, logits)
    if self.top_p is not None:   # keep the most likely tokens until their probability reaches top_p
      desc = -jnp.sort(-logits, axis=-1)                                            # (B, V) descending
      probs = jax.nn.softmax(desc, axis=-1)
      before = jnp.cumsum(probs, axis=-1) - probs                                   # mass of the tokens ahead
      cutoff = jnp.min(jnp.where(before < self.top_p, desc, jnp.inf), axis=-1, keepdims=True)   # (B, 1)
      logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate_program(model: Transformer, prompt_bp: jax.Array, seed: jax.Array, max_new_tokens: int, kv_kind: str,
                     sampler: Sampler) -> jax.Array:
  """The whole of `generate` for a model in its inference form, unjitted (`_generate` jits it; a benchmark can
  lower it ahead of time from abstract shapes): prefill, then a `fori_loop` of single-token decode steps."""
  B, P = prompt_bp.shape
  N = max_new_tokens
  key = jax.random.key(seed)
  cache = model.init_cache(B, P + N, kv_kind)
  logits, cache = model.decode(prompt_bp, cache)                                  # prefill: (B, P, V)
  first = sampler(logits[:, -1], jax.random.fold_in(key, 0))                      # (B,)
  out = jnp.zeros((B, P + N), jnp.int32).at[:, :P].set(prompt_bp).at[:, P].set(first)

  def step(i, carry):   # writes the token at position P + i from the one at P + i - 1
    out, cache = carry
    prev = jax.lax.dynamic_slice_in_dim(out, P + i - 1, 1, axis=1)                 # (B, 1)
    logits, cache = model.decode(prev, cache)                                     # (B, 1, V)
    nxt = sampler(logits[:, 0], jax.random.fold_in(key, i))
    return jax.lax.dynamic_update_index_in_dim(out, nxt, P + i, axis=1), cache

  out, _ = jax.lax.fori_loop(1, N, step, (out, cache))
  return out


_generate = nnx.jit(generate_program, static_argnums=(3, 4, 5))


def _check(model: Transformer, prompt: np.ndarray, max_new_tokens, temperature, top_k, top_p, seed,
           kv_dtype) -> None:
  cfg = model.cfg
  if prompt.ndim != 2 or not np.issubdtype(prompt.dtype, np.integer):
    raise ValueError(f"prompt_tokens must be integer token ids of shape [batch, length], got {prompt.dtype} "
                     f"{prompt.shape}")
  if prompt.shape[0] < 1 or prompt.shape[1] < 1:
    raise ValueError(f"prompt_tokens is empty (shape {prompt.shape}): generation needs at least one token")
  if prompt.min() < 0 or prompt.max() >= cfg.vocab_size:
    raise ValueError(f"prompt_tokens holds ids outside [0, vocab_size={cfg.vocab_size}): "
                     f"min {prompt.min()}, max {prompt.max()}")
  if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
  total = prompt.shape[1] + max_new_tokens
  if total > cfg.max_seq_len:
    raise ValueError(f"prompt length {prompt.shape[1]} + max_new_tokens {max_new_tokens} = {total} exceeds the "
                     f"model's max_seq_len={cfg.max_seq_len}")
  if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
    raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
  if top_k is not None and (not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool)
                            or not 1 <= top_k <= cfg.vocab_size):
    raise ValueError(f"top_k must be None or an int in [1, vocab_size={cfg.vocab_size}], got {top_k!r}")
  if top_p is not None and (not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0):
    raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
  if temperature == 0 and (top_k is not None or top_p is not None):
    raise ValueError(f"top_k={top_k!r} / top_p={top_p!r} have no effect at temperature=0 (greedy): "
                     "set a temperature > 0 to sample")
  if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= seed < 2 ** 31:
    raise ValueError(f"seed must be an int in [0, 2^31), got {seed!r}")
  if kv_dtype not in kv_cache.KV_KINDS:
    raise ValueError(f"kv_dtype must be one of {kv_cache.KV_KINDS}, got {kv_dtype!r}")


def generate(model: Transformer, prompt_tokens, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             kv_dtype: str = "bfloat16") -> jax.Array:
  """Prompt followed by `max_new_tokens` generated tokens: int32 [batch, length + max_new_tokens].

  Args:
    model: a Transformer of any variant (decoded in its `inference_form`).
    prompt_tokens: integer ids [batch, length >= 1]; every row continues from the same position.
    max_new_tokens: >= 1; length + max_new_tokens <= the model's max_seq_len.
    temperature: 0 for greedy decoding, else the softmax temperature.
    top_k: sample among the k most likely tokens only (None: all).
    top_p: sample among the most likely tokens whose probability reaches top_p, in (0, 1] (None: all).
    seed: the sampling key's seed; the same seed gives the same tokens.
    kv_dtype: the KV cache's storage: "bfloat16" (default), "float32", "int8", "int4" or "int3" (`kv_cache`).

  Raises:
    ValueError: an empty or out-of-vocabulary prompt, a sequence longer than max_seq_len, a bad temperature,
      top_k, top_p, seed or kv_dtype, or top_k / top_p with temperature 0.
  """
  prompt = np.asarray(prompt_tokens)
  _check(model, prompt, max_new_tokens, temperature, top_k, top_p, seed, kv_dtype)
  sampler = Sampler(float(temperature), None if top_k is None else int(top_k),
                    None if top_p is None or top_p == 1.0 else float(top_p))
  return _generate(inference_form(model), jnp.asarray(prompt, jnp.int32), jnp.int32(seed), int(max_new_tokens),
                   kv_dtype, sampler)


def greedy(model: Transformer, prompt_tokens, max_new_tokens: int, *, kv_dtype: str = "bfloat16") -> jax.Array:
  """Greedy decoding: `generate` at temperature 0."""
  return generate(model, prompt_tokens, max_new_tokens, temperature=0.0, kv_dtype=kv_dtype)


# --------------------------------------------------------------------------------------------------------------
# Loading a run, and the CLI.
# --------------------------------------------------------------------------------------------------------------
def load_run(workdir, *, step: int | None = None) -> tuple[Transformer, Tokenizer]:
  """(model, tokenizer) of a training run: its checkpoint at `step` (default the latest) and the tokenizer its
  config names. FileNotFoundError names a directory that is not a run or has no such checkpoint; a ValueError
  a tokenizer file that is not the one the run trained with (`runs.check_tokenizer`)."""
  from bitnet_jax import runs, tokenizer, train   # loading alone needs train (orbax, grain), the tokenizer files
  model, config = train.load_checkpoint(workdir, step=step)
  tok = tokenizer.make_tokenizer(config.data.get("tokenizer", "byte"))
  runs.check_tokenizer(workdir, tok)
  return model, tok


def main(argv: list[str] | None = None) -> str:
  """Loads a run's latest checkpoint, prints the continuation of --prompt and the decoding speed; returns the
  text. Run as a script (`cli.run`), a missing run or checkpoint, or bad arguments, end the process with a one-line
  message."""
  parser = argparse.ArgumentParser(description="Sample from a trained bitnet_jax run (KV-cache decoding).",
                                   epilog="--debug shows the traceback of an error")
  parser.add_argument("--workdir", required=True, help="a training run directory (config.json, checkpoints/)")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest intact one)")
  parser.add_argument("--prompt", default="def ", help="text to continue")
  parser.add_argument("--max_new_tokens", type=int, default=80)
  parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  parser.add_argument("--top_k", type=int, default=None)
  parser.add_argument("--top_p", type=float, default=None)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--kv_cache", default="bfloat16", choices=kv_cache.KV_KINDS, help="KV cache storage")
  args = parser.parse_args(argv)
  from absl import logging
  logging.set_verbosity(logging.WARNING)   # orbax logs every restore at INFO

  model, tok = load_run(args.workdir, step=args.step)
  prompt = np.asarray(tok.encode(args.prompt), np.int32)[None]
  run = lambda: jax.block_until_ready(generate(
      model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
      seed=args.seed, kv_dtype=args.kv_cache))
  t0 = time.perf_counter()
  run()                                   # compiles
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  out = run()
  seconds = time.perf_counter() - t0
  text = tok.decode(np.asarray(out[0]))
  print(text)
  print(f"-- {args.max_new_tokens} new tokens in {seconds:.3f} s: {args.max_new_tokens / seconds:.1f} tokens/s "
        f"(batch 1, prompt {prompt.shape[1]} tokens, prefill included, {args.kv_cache} KV cache, "
        f"{jax.devices()[0].platform}; first call with compilation {first:.1f} s)")
  return text


if __name__ == "__main__":
  from bitnet_jax import cli
  cli.run("generate", main)
