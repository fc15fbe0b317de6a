"""model: the decoder-only Transformer of BitNet, BitNet b1.58 and their FP baselines (layers -> model_config -> model).

One code path for the four variants ("b158", "bitnet", "fp", "fp_bitnet") and the 2B4T options, chosen by the
`ModelConfig` fields; `bitnet_jax.model_config` describes them and holds the papers' presets (re-exported here).

Not quantised, as both papers say: the embedding, the output head and the attention score computation.
Choices the papers leave open, named: rotary position embeddings for every variant (BitNet does not say which
positions it uses); `bitnet_asymmetric_ffn` reads BitNet's "activations before the non-linear functions" as the
input of the FFN's second projection (the output of the GELU/ReLU), and is off by default because with SubLN that
input is normalised and no longer non-negative.

Generation: `Transformer.decode(tokens, cache)` continues sequences held in a `kv_cache.KVCache` (per layer K and V
[B, L, K, Dh] plus the next position) and returns (logits, updated cache); `bitnet_jax.generate` drives it.
`ModelConfig.kv_quant` rounds K/V in the full forward as a quantised cache would (teacher-forced KV-cache loss).

Shapes: B batch, T sequence, D d_model, H query heads, K kv heads, G = H / K, Dh head dim, F d_ff, V vocab,
L cache length, S key positions.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import sys

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd

from bitnet_jax import cli, kv_cache
from bitnet_jax.kv_cache import KVCache, LayerKV
from bitnet_jax.layers import BitLinear, Norm, dense, logical_constraint, make_param
# The config, its constants and the presets live in model_config; re-exported so `from bitnet_jax.model import
# ModelConfig, preset, ...` keeps working.
from bitnet_jax.model_config import (AUTO, DTYPES, FFN_KINDS, GATED, PRESETS, REMAT_POLICIES, VARIANTS,  # noqa: F401
                                     ModelConfig, preset)

# Metadata flag of a variable in a stored layer stack (`Transformer.stack_layers`) whose module reads its own layer
# out of the whole stack, given its layer index (a scanned variable): the layer scan passes such a variable whole
# instead of slicing it, so no step copies that layer's weights out of the stack (generate.PackedLinear's codes,
# which the low-bit kernel reads in place).
STACK_INDEXED = "stack_indexed"
# Logical names of activation axes (parameters use embed / heads / kv_heads / mlp / vocab); the sharding rules
# in the config map both kinds to mesh axes.
BATCH, LENGTH = "batch", "length"


# ------------------------------------------------------------------------------------------------------------
# The network, in data-flow order.
# ------------------------------------------------------------------------------------------------------------
def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, rotate-half layout (LLaMA / HF): x (B, T, N, Dh), positions (B, T) or (T,)."""
  half = x.shape[-1] // 2
  freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)                # (Dh/2,)
  angles = positions.astype(jnp.float32)[..., None] * freqs                      # (B?, T, Dh/2)
  cos = jnp.cos(angles)[..., None, :]                                            # (B?, T, 1, Dh/2)
  sin = jnp.sin(angles)[..., None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _linear(cfg: ModelConfig, d_in: int, d_out: int, axes, *, parallel: str, rngs: nnx.Rngs,
            norm: bool = True, asymmetric: bool = False, role: str = "act_quant") -> BitLinear:
  """A BitLinear with the config's quantisation. parallel="column" groups outputs, "row" groups inputs. `role`
  names the config field of its activation quantiser; the two output roles are H-BitLinear if `cfg.hadamard`."""
  act_quant = getattr(cfg, role)
  return BitLinear(d_in, d_out, weight_quant=cfg.weight_quant, act_bits=cfg.act_bits if act_quant is None else None,
                   act_per_token=cfg.act_per_token, act_asymmetric=asymmetric, act_quant=act_quant,
                   input_transform="hadamard" if cfg.hadamard and role != "act_quant" else None, groups=cfg.groups,
                   group_axis="out" if parallel == "column" else "in", fsdp_groups=cfg.fsdp_groups,
                   norm=cfg.linear_norm if norm else None, norm_eps=cfg.norm_eps, norm_scale=cfg.linear_norm_scale,
                   dtype=cfg.compute_dtype, param_dtype=jnp.dtype(cfg.param_dtype), init_std=cfg.init_std,
                   axes=axes, quant_mix=cfg.quant_warmup and cfg.weight_quant != "none", exact=cfg.exact_quant,
                   rngs=rngs)


def _norm(cfg: ModelConfig, kind: str | None, dim: int, axis_name: str, groups: int = 1) -> Norm | None:
  return Norm(dim, kind=kind, eps=cfg.norm_eps, groups=groups, axis_name=axis_name,
              param_dtype=jnp.dtype(cfg.param_dtype)) if kind else None


def _shared_norm(layer: BitLinear, x: jax.Array) -> jax.Array | None:
  """The gain-free norm of x for the column-parallel BitLinears that read it (they share kind, eps and groups)."""
  return layer.norm.normalize(x.astype(layer.dtype)) if layer.norm is not None else None


def _tensor_parallel() -> bool:
  """Whether the active mesh and rules split the heads or the FFN width over more than one device."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return False
  rules = dict(spmd.get_logical_axis_rules() or ())
  for name in ("heads", "kv_heads", "mlp"):
    axes = rules.get(name)
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    if math.prod(mesh.shape[a] for a in axes) > 1:
      return True
  return False


def _fusable(layers) -> bool:
  """Projections of one input that can run as one matmul computing exactly their separate function: training-form
  BitLinears with no norm of their own (a per-projection gain would give each its own quantised input) and no
  warm-up weight, with one activation quantiser, outside tensor parallelism (a concatenated kernel would not keep
  each shard's columns on its device)."""
  first = layers[0]
  same = ("weight_quant", "act_bits", "act_per_token", "act_asymmetric", "act_quant", "input_transform",
          "act_groups", "dtype", "exact")
  alike = all(type(l) is BitLinear and not l.integer and l.norm is None and l.quant_mix is None
              and all(getattr(l, a) == getattr(first, a) for a in same) for l in layers)
  return alike and not _tensor_parallel()


def project(layers, x_btd: jax.Array, *, fuse: bool = True) -> list[jax.Array]:
  """[layer(x) for layer in layers] for column-parallel projections of one input (q/k/v, gate/up).

  Fused (`ModelConfig.fuse_projections`, where `_fusable`): the input is prepared (activation-quantised) once
  and multiplied by the concatenation of the layers' effective kernels, each quantised with its own statistic
  (its own block grid), then split: the same function as separate projections, as one larger matmul (on a
  GPU, fewer and larger GEMMs; on the CPU measured slower, so off by default). Otherwise each layer runs on its
  own, sharing the gain-free norm of x where they have one."""
  if fuse and len(layers) > 1 and all(isinstance(l, BitLinear) for l in layers) and _fusable(layers):
    x = layers[0].prepare_input(x_btd)
    w = jnp.concatenate([l.effective_kernel() for l in layers], axis=1)
    y = dense(x, w)
    ends = list(itertools.accumulate(l.kernel.shape[1] for l in layers))
    return [y[..., a:b] for a, b in zip([0] + ends[:-1], ends)]
  xn = _shared_norm(layers[0], x_btd)
  return [l(x_btd, normalized=xn) for l in layers]


class Attention(nnx.Module):
  """Causal multi-head attention with GQA and RoPE; q/k/v column-parallel, o row-parallel; optional KV cache."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    D, H, K, Dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    self.q_proj = _linear(cfg, D, H * Dh, ("embed", "heads"), parallel="column", rngs=rngs)
    self.k_proj = _linear(cfg, D, K * Dh, ("embed", "kv_heads"), parallel="column", rngs=rngs)
    self.v_proj = _linear(cfg, D, K * Dh, ("embed", "kv_heads"), parallel="column", rngs=rngs)
    self.sub_norm = _norm(cfg, "rms" if cfg.sub_norms else None, H * Dh, "heads", cfg.groups)
    self.o_proj = _linear(cfg, H * Dh, D, ("heads", "embed"), parallel="row", rngs=rngs, norm=not cfg.sub_norms,
                          role="act_quant_attn_out")

  def __call__(self, x_btd: jax.Array, positions: jax.Array,
               cache: LayerKV | None = None) -> tuple[jax.Array, LayerKV | None]:
    """(output (B, T, D), cache). positions (T,): the tokens' absolute positions, for RoPE.

    Without a cache (training, scoring): causal attention among the T tokens, K and V rounded as `cfg.kv_quant`
    says. With one (decoding): the new tokens' K/V are written into the cache at `positions`, and the queries
    attend over all L cache positions, a key being visible iff its position is <= the query's (positions not
    yet written lie after every query, so they are masked too).
    """
    cfg = self.cfg
    B, T, _ = x_btd.shape
    H, K, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q, k, v = project([self.q_proj, self.k_proj, self.v_proj], x_btd, fuse=cfg.fuse_projections)
    q = rope(q.reshape(B, T, H, Dh), positions, cfg.rope_theta)                                  # (B, T, H, Dh)
    k = rope(k.reshape(B, T, K, Dh), positions, cfg.rope_theta)                                  # (B, T, K, Dh)
    v = v.reshape(B, T, K, Dh)                                                                   # (B, T, K, Dh)
    q = logical_constraint(q, (BATCH, LENGTH, "act_heads", None))   # heads stay on their tensor shard
    k = logical_constraint(k, (BATCH, LENGTH, "act_kv_heads", None))
    v = logical_constraint(v, (BATCH, LENGTH, "act_kv_heads", None))
    if cache is None:
      k, v = kv_cache.fake_quant(k, cfg.kv_quant), kv_cache.fake_quant(v, cfg.kv_quant)   # "none": k, v as is
      visible = jnp.tril(jnp.ones((T, T), dtype=bool))                               # (T, S = T)
    else:
      cache = cache.write(k, v, positions[0])
      k, v = cache.read(k.dtype)                                                     # (B, S = L, K, Dh)
      visible = jnp.arange(k.shape[1])[None, :] <= positions[:, None]               # (T, S = L)
    # Heads-major layout through QK^T, softmax and AV: one transpose of q, k and v in, one of the output out,
    # so every dot has its batch axes leading (a third off the attention's CPU time against transposing inside
    # each einsum, `benchmarks/results/cpu.md`).
    q = q.reshape(B, T, K, H // K, Dh).transpose(0, 2, 3, 1, 4)                     # (B, K, G, T, Dh)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)                         # (B, K, S, Dh)
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) / math.sqrt(Dh)
    scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)                        # (B, K, G, T, S)
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, v)                                # (B, K, G, T, Dh)
    out = out.transpose(0, 3, 1, 2, 4).reshape(B, T, H * Dh)                        # (B, T, H*Dh)
    if self.sub_norm is not None:
      out = self.sub_norm(out)
    return self.o_proj(out), cache


class FeedForward(nnx.Module):
  """SwiGLU / squared-ReLU GLU (gate, up, down) or a two-layer GELU/ReLU MLP (up, down)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.kind, self.fuse = cfg.ffn, cfg.fuse_projections
    D, F = cfg.d_model, cfg.d_ff
    self.gate_proj = (_linear(cfg, D, F, ("embed", "mlp"), parallel="column", rngs=rngs)
                      if cfg.ffn in GATED else None)
    self.up_proj = _linear(cfg, D, F, ("embed", "mlp"), parallel="column", rngs=rngs)
    self.sub_norm = _norm(cfg, "rms" if cfg.sub_norms else None, F, "mlp", cfg.groups)
    self.down_proj = _linear(cfg, F, D, ("mlp", "embed"), parallel="row", rngs=rngs, norm=not cfg.sub_norms,
                             asymmetric=cfg.bitnet_asymmetric_ffn, role="act_quant_ffn_out")

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    if self.gate_proj is not None:   # gate and up read the same input: one matmul, or a shared norm
      gate, up = project([self.gate_proj, self.up_proj], x_btd, fuse=self.fuse)    # (B, T, F) each
    else:
      up = self.up_proj(x_btd)                                                      # (B, T, F)
    if self.kind == "swiglu":
      h = jax.nn.silu(gate) * up
    elif self.kind == "relu2_glu":
      h = jnp.square(jax.nn.relu(gate)) * up
    elif self.kind == "gelu":
      h = jax.nn.gelu(up)
    else:
      h = jax.nn.relu(up)
    h = logical_constraint(h, (BATCH, LENGTH, "act_mlp"))
    if self.sub_norm is not None:
      h = self.sub_norm(h)
    return self.down_proj(h)


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then + ffn(norm(.)); the norms are absent when BitLinear has them."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.attn_norm = _norm(cfg, cfg.block_norm, cfg.d_model, "embed")
    self.attn = Attention(cfg, rngs=rngs)
    self.ffn_norm = _norm(cfg, cfg.block_norm, cfg.d_model, "embed")
    self.ffn = FeedForward(cfg, rngs=rngs)

  def __call__(self, x_btd: jax.Array, positions: jax.Array,
               cache: LayerKV | None = None) -> tuple[jax.Array, LayerKV | None]:
    h = self.attn_norm(x_btd) if self.attn_norm is not None else x_btd
    a, cache = self.attn(h, positions, cache)
    x_btd = x_btd + a
    h = self.ffn_norm(x_btd) if self.ffn_norm is not None else x_btd
    return x_btd + self.ffn(h), cache


def _run_block(block: Block, x: jax.Array, positions: jax.Array, remat: str) -> jax.Array:
  """block(x), with `jax.checkpoint` around it when rematerialising (the backward recomputes the block from its
  input instead of keeping its activations)."""
  if remat == "none":
    return block(x, positions)[0]
  graphdef, state = nnx.split(block)

  @functools.partial(jax.checkpoint, policy=REMAT_POLICIES[remat])
  def run(state, x):
    return nnx.merge(graphdef, state)(x, positions)[0]
  return run(state, x)


class Transformer(nnx.Module):
  """Causal decoder-only LM: int32 tokens (B, T) -> float32 logits (B, T, V).

  `__call__` is the full forward (training, scoring). `decode` is the generation path: it continues a sequence
  held in a KV cache (`init_cache`), a prompt at once (prefill) or a token at a time.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pdt = jnp.dtype(cfg.param_dtype)
    self.embed = make_param(jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.d_model), pdt) * cfg.init_std,
                            ("vocab", "embed"))
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
    self.layer_stack: Block | None = nnx.data(None)   # set by stack_layers (inference copies): all blocks in one
    self.final_norm = _norm(cfg, cfg.block_norm or cfg.linear_norm or "rms", cfg.d_model, "embed")
    self.head = None if cfg.tie_embeddings else make_param(
        jax.random.normal(rngs.params(), (cfg.d_model, cfg.vocab_size), pdt) * cfg.init_std, ("embed", "vocab"))

  def __call__(self, tokens_bt: jax.Array) -> jax.Array:
    cfg = self.cfg
    B, T = tokens_bt.shape
    if T > cfg.max_seq_len:
      raise ValueError(f"sequence length {T} exceeds ModelConfig.max_seq_len={cfg.max_seq_len}")
    x = self._embed(tokens_bt)                                                      # (B, T, D)
    positions = jnp.arange(T)                                                       # (T,)
    residual = (BATCH, LENGTH, "act_embed")
    if cfg.scan_layers or self.layer_stack is not None:
      return self._logits(self._scan_blocks(x, positions))
    for block in self.blocks:
      x = logical_constraint(_run_block(block, logical_constraint(x, residual), positions, cfg.remat), residual)
    return self._logits(x)

  def _stacked_blocks(self) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef of one block, the variables passed whole into the layer scan (`STACK_INDEXED`), the blocks'
    other state with a leading layer axis, which the scan slices): the stored stack (`stack_layers`), or one
    built from the per-layer blocks, a transient copy of their weights."""
    if self.layer_stack is not None:
      return nnx.split(self.layer_stack, lambda _, var: var.get_metadata().get(STACK_INDEXED, False), ...)
    graphdefs = {nnx.graphdef(b) for b in self.blocks}
    if len(graphdefs) != 1:
      raise ValueError("stacking the blocks needs every block to have the same structure "
                       f"(found {len(graphdefs)} distinct ones)")
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[nnx.state(b) for b in self.blocks])
    return graphdefs.pop(), nnx.State({}), stacked

  def _scan_blocks(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    """The blocks as one `lax.scan` over their stacked parameters: the compiled program holds one block body,
    so compile time no longer grows with depth. Training keeps the parameters stored per layer (checkpoints,
    interop and packing see the same tree) and stacks them inside the step, a transient copy of the block
    weights; an inference copy can store them stacked once (`stack_layers`)."""
    residual = (BATCH, LENGTH, "act_embed")
    graphdef, whole, stacked = self._stacked_blocks()

    def body(h, state):
      h = _run_block(nnx.merge(graphdef, whole, state), logical_constraint(h, residual), positions, self.cfg.remat)
      return logical_constraint(h, residual), None
    return jax.lax.scan(body, x, stacked)[0]

  def require_per_layer(self, what: str) -> None:
    """ValueError naming `what` if the blocks are stored stacked (an inference copy): checkpoints, exports and
    packing read the per-layer tree."""
    if self.layer_stack is not None:
      raise ValueError(f"{what}: this model's blocks are stacked (an inference copy, Transformer.stack_layers); "
                       "pass the trained model, whose blocks are stored per layer")

  def stack_layers(self) -> "Transformer":
    """In place, and returns self: the blocks stored as one Block whose parameters carry a leading layer axis
    (`layer_stack`; `blocks` is emptied), which `__call__` and `decode` run as one `lax.scan`.

    For inference copies (`generate.inference_form` with `ModelConfig.scan_layers`): a decode step then
    compiles one block body whatever the depth, reading a stack built once (not in every step, as the training
    scan does) and a stacked KV cache (`init_cache` gives one) updated in place. Checkpoints, training and
    interop use the per-layer storage, so a stacked model is not for them (`require_per_layer`)."""
    if self.layer_stack is not None:
      return self
    graphdef, _, stacked = self._stacked_blocks()
    for _, var in nnx.to_flat_state(stacked):   # the logical axes gain the (unsharded) layer axis
      axes = var.get_metadata().get("out_sharding")
      if axes is not None:
        var.set_metadata(out_sharding=(None, *axes))
    self.layer_stack = nnx.data(nnx.merge(graphdef, stacked))
    self.blocks = nnx.List([])
    return self

  def init_cache(self, batch: int, max_len: int | None = None, kind: str = "bfloat16") -> KVCache:
    """An empty KV cache for `batch` sequences of up to `max_len` (default max_seq_len) positions; `kind` is
    float32 | bfloat16 | int8 | int4 | int3 (`kv_cache.KV_KINDS`)."""
    cfg = self.cfg
    max_len = cfg.max_seq_len if max_len is None else max_len
    if not isinstance(max_len, int) or not 1 <= max_len <= cfg.max_seq_len:
      raise ValueError(f"init_cache: max_len must be an int in [1, max_seq_len={cfg.max_seq_len}], got {max_len!r}")
    return kv_cache.init_cache(n_layers=cfg.n_layers, batch=batch, max_len=max_len, n_kv_heads=cfg.n_kv_heads,
                               head_dim=cfg.head_dim, kind=kind, stacked=self.layer_stack is not None)

  def decode(self, tokens_bt: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Continues the sequences in `cache`: tokens (B, T) at absolute positions cache.pos .. cache.pos + T - 1.

    A prompt into an empty cache is the prefill; then one token per call. Returns float32 logits (B, T, V) and
    the cache with the tokens' K/V written and `pos` advanced by T. The caller keeps `pos + T <= cache.max_len`
    (not checkable under jit). Same weights and function as `__call__`: only the attention reads K/V from the
    cache, stored in its kind, which `ModelConfig.kv_quant` reproduces in the full forward.
    """
    T = tokens_bt.shape[1]
    if T > cache.max_len:
      raise ValueError(f"decode: {T} tokens do not fit a KV cache of max_len={cache.max_len}")
    if cache.n_layers != self.cfg.n_layers:
      raise ValueError(f"decode: the KV cache has {cache.n_layers} layers, the model {self.cfg.n_layers}")
    if cache.stacked != (self.layer_stack is not None):
      raise ValueError(f"decode: a {'stacked' if cache.stacked else 'per-layer'} KV cache for a model whose "
                       f"blocks are {'stacked' if self.layer_stack is not None else 'per layer'}: make the cache "
                       "with this model's init_cache")
    x = self._embed(tokens_bt)                                                      # (B, T, D)
    positions = cache.pos + jnp.arange(T, dtype=jnp.int32)                          # (T,) absolute
    residual = (BATCH, LENGTH, "act_embed")
    if cache.stacked:   # one scan over the layers; the stacked K/V ride in the carry, updated in place
      graphdef, whole, stacked = self._stacked_blocks()

      def body(carry, xs):
        h, kv = carry
        state, i = xs
        h, kv = nnx.merge(graphdef, whole, state)(logical_constraint(h, residual), positions, kv.replace(index=i))
        return (h, kv.replace(index=None)), None

      (x, kv), _ = jax.lax.scan(body, (x, cache.layers[0]), (stacked, jnp.arange(cache.n_layers)))
      return self._logits(x), cache.replace(layers=(kv,), pos=cache.pos + T)
    layers = []
    for block, layer in zip(self.blocks, cache.layers):
      x, layer = block(logical_constraint(x, residual), positions, layer)
      layers.append(layer)
    return self._logits(x), cache.replace(layers=tuple(layers), pos=cache.pos + T)

  def _embed(self, tokens_bt: jax.Array) -> jax.Array:
    # Under FSDP the table is gathered along d_model before the lookup (its gradient is then reduce-scattered),
    # so the looked-up rows come out whole per token rather than split over the FSDP devices.
    table = logical_constraint(self.embed[...], ("vocab", None))
    return jnp.take(table, tokens_bt, axis=0).astype(self.cfg.compute_dtype)   # (B, T, D)

  def _logits(self, x_btd: jax.Array) -> jax.Array:
    x = self.final_norm(x_btd)
    head = self.embed[...].T if self.head is None else self.head[...]               # (D, V)
    logits = jnp.einsum("btd,dv->btv", x, head.astype(self.cfg.compute_dtype), preferred_element_type=jnp.float32)
    return logical_constraint(logits, (BATCH, LENGTH, "act_vocab"))


# ------------------------------------------------------------------------------------------------------------
# Parameter counts without allocation.
# ------------------------------------------------------------------------------------------------------------
def count_params(cfg: ModelConfig) -> dict[str, int]:
  """{"total", "non_embedding", "embedding"} parameter counts via `nnx.eval_shape` (nothing is allocated).

  "embedding" counts the input embedding and an untied output head, the parameters that stay high precision.
  """
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  params = nnx.state(abstract, nnx.Param)
  total = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  embedding = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
  return {"total": total, "non_embedding": total - embedding, "embedding": embedding}


def _fmt(n: int) -> str:
  return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def main(argv=None) -> None:
  argv = cli.strip_debug(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(description="bitnet_jax model presets (the papers' configs).",
                                   epilog="--debug shows the traceback of an error")
  parser.add_argument("--list", action="store_true", help="print every preset with its parameter counts")
  args = parser.parse_args(argv)
  if not args.list:
    parser.print_help()
    return
  print("| preset | variant | d_model | layers | heads | kv | d_ff | vocab | params | non-embedding |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for name in PRESETS:
    cfg = preset(name, dtype="float32")
    n = count_params(cfg)
    print(f"| {name} | {cfg.variant} | {cfg.d_model} | {cfg.n_layers} | {cfg.n_heads} | {cfg.n_kv_heads} | "
          f"{cfg.d_ff} | {cfg.vocab_size} | {_fmt(n['total'])} | {_fmt(n['non_embedding'])} |")


if __name__ == "__main__":
  cli.run("model", main)
