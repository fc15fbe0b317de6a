"""model: the decoder-only Transformer for BitNet, BitNet b1.58 and their FP baselines (quant -> layers -> model).

One code path, four variants (`ModelConfig.variant`):
  * "b158"      BitNet b1.58 (2402.17764): ternary absmean weights, per-token 8-bit absmax activations,
                LLaMA-like (RMSNorm, SwiGLU, rotary embeddings, no biases). As in the FAQ reference code every
                linear layer of attention and FFN is a BitLinear with its own RMSNorm, and the block's own
                RMSNorm is removed.
  * "bitnet"    BitNet (2310.11453): binary weights, 8-bit absmax activations per tensor (the paper's training
                mode), LayerNorm inside each BitLinear (SubLN, eq. 12), a GELU FFN of width 4d.
  * "fp"        the LLaMA baseline of the b1.58 paper: same architecture, quantisation off, block pre-norms.
  * "fp_bitnet" the BitNet architecture with quantisation off.
Options for the released b1.58 2B4T checkpoint (2504.12285): squared-ReLU gated FFN (`ffn="relu2_glu"`),
extra `attn_sub_norm` / `ffn_sub_norm` before o_proj / down_proj (`sub_norms=True`), grouped-query attention
(`n_kv_heads`), tied embeddings, `rope_theta`.

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
import dataclasses
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
from bitnet_jax.layers import (NORM_KINDS, WEIGHT_QUANTIZERS, BitLinear, Norm, dense, logical_constraint,
                               make_param)

AUTO = "auto"   # a field left to the variant's default

# Per-variant defaults for every field left at AUTO.
VARIANTS: dict[str, dict] = {
    "b158": dict(weight_quant="ternary", act_bits=8, act_per_token=True, linear_norm="rms", block_norm=None,
                 ffn="swiglu"),
    "bitnet": dict(weight_quant="binary", act_bits=8, act_per_token=False, linear_norm="layer", block_norm=None,
                   ffn="gelu"),
    "fp": dict(weight_quant="none", act_bits=None, act_per_token=True, linear_norm=None, block_norm="rms",
               ffn="swiglu"),
    "fp_bitnet": dict(weight_quant="none", act_bits=None, act_per_token=True, linear_norm="layer",
                      block_norm=None, ffn="gelu"),
}
FFN_KINDS = ("swiglu", "relu2_glu", "gelu", "relu")
GATED = ("swiglu", "relu2_glu")
DTYPES = ("float32", "bfloat16", "float16")
# Rematerialisation of each block in the backward pass: what the forward keeps for it.
REMAT_POLICIES = {
    "none": None,                                                     # keep everything (no remat)
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep the matmul outputs, recompute the rest
    "full": jax.checkpoint_policies.nothing_saveable,                 # keep only the block inputs
}
# Metadata flag of a variable in a stored layer stack (`Transformer.stack_layers`) whose module reads its own layer
# out of the whole stack, given its layer index (a scanned variable): the layer scan passes such a variable whole
# instead of slicing it, so no step copies that layer's weights out of the stack (generate.PackedLinear's codes,
# which the low-bit kernel reads in place).
STACK_INDEXED = "stack_indexed"
# Logical names of activation axes (parameters use embed / heads / kv_heads / mlp / vocab); the sharding rules
# in the config map both kinds to mesh axes.
BATCH, LENGTH = "batch", "length"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """Model hyper-parameters. Fields left at "auto" take the variant's default (table `VARIANTS`)."""
  vocab_size: int = 256
  d_model: int = 128
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int | None = None        # None: = n_heads (no GQA)
  d_ff: int | str = AUTO               # auto: 4 d for gelu/relu, 8d/3 rounded up to a multiple of 64 for GLUs
  max_seq_len: int = 256
  variant: str = "b158"                # b158 | bitnet | fp | fp_bitnet
  # Quantisation (auto: from the variant).
  weight_quant: str = AUTO             # ternary | binary | none
  act_bits: int | None | str = AUTO    # 2..8, or None for no activation quantisation
  act_per_token: bool | str = AUTO     # per-token (b1.58) or per-tensor (BitNet training) absmax
  bitnet_asymmetric_ffn: bool = False  # BitNet eq. 6 zero-point quantisation on the FFN down projection input
  groups: int = 1                      # quantisation groups G (BitNet section 2.3), aligned with tensor shards
  fsdp_groups: int = 1                 # weight-statistic groups along d_model, aligned with FSDP shards
  # Architecture (auto: from the variant).
  linear_norm: str | None = AUTO       # norm inside each BitLinear: rms | layer | None
  linear_norm_scale: bool = True       # a learnable gain on that norm (=1 at init: the reference's RMSNorm(x))
  block_norm: str | None = AUTO        # pre-norm of each attention / FFN block: rms | layer | None
  sub_norms: bool = False              # 2B4T: RMSNorm before o_proj and down_proj
  ffn: str = AUTO                      # swiglu | relu2_glu | gelu | relu
  rope_theta: float = 10000.0
  tie_embeddings: bool = False
  norm_eps: float = 1e-5
  init_std: float = 0.02
  dtype: str | None = None             # compute dtype; None: bfloat16 on accelerators, float32 on CPU (at build)
  param_dtype: str = "float32"         # latent weights (always float32 in the papers' recipes)
  remat: str = "none"                  # none | dots | full: rematerialise each block in the backward pass
  scan_layers: bool = False            # run the blocks as one lax.scan (compile time independent of depth)
  # Round K and V in the full forward as a KV cache of this kind stores them (none | bfloat16 | int8 | int4;
  # `kv_cache.fake_quant`): the teacher-forced loss of decoding with a quantised cache. "none" changes nothing.
  kv_quant: str = "none"
  # Give every quantised BitLinear a warm-up weight lambda (`layers.QuantMix`) that the trainer ramps from 0 to 1
  # (`config.train.quant_warmup_steps`): fine-tuning an FP checkpoint into b1.58 without a cliff at step 0.
  quant_warmup: bool = False
  # Quantise in the reference operation order, bit for bit (`quant`'s exact mode; parity tests). The default lets
  # XLA fuse the quantisers: codes equal except at rounding ties, scales within float32 summation order, faster.
  exact_quant: bool = False
  # Run projections that read the same input (q/k/v, gate/up) as one matmul over their concatenated kernels,
  # each quantised with its own statistic (`project`). Storage and checkpoints are unchanged; only layouts
  # without a per-projection norm gain qualify (fp, 2B4T), and not under tensor parallelism. Off by default: on
  # the CPU the concatenation and the output slices cost more than the larger dots gain (measured 5% slower,
  # benchmarks/results/cpu.md); not yet measured on a GPU.
  fuse_projections: bool = False

  def __post_init__(self):
    if self.variant not in VARIANTS:
      raise ValueError(f"ModelConfig.variant must be one of {tuple(VARIANTS)}, got {self.variant!r}")
    for key, value in VARIANTS[self.variant].items():
      if getattr(self, key) == AUTO:
        object.__setattr__(self, key, value)
    if self.n_kv_heads is None:
      object.__setattr__(self, "n_kv_heads", self.n_heads)
    if self.d_ff == AUTO:
      d_ff = 4 * self.d_model if self.ffn not in GATED else 64 * math.ceil(8 * self.d_model / 3 / 64)
      object.__setattr__(self, "d_ff", d_ff)
    self._validate()

  def _validate(self):
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len", "groups",
                 "fsdp_groups"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
    if self.d_model % self.n_heads:
      raise ValueError(f"ModelConfig.d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"ModelConfig.n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig: head_dim = d_model / n_heads = {self.head_dim} must be even for RoPE")
    if self.weight_quant not in WEIGHT_QUANTIZERS:
      raise ValueError(f"ModelConfig.weight_quant must be one of {tuple(WEIGHT_QUANTIZERS)}, "
                       f"got {self.weight_quant!r}")
    if self.act_bits is not None and (not isinstance(self.act_bits, int) or not 2 <= self.act_bits <= 8):
      raise ValueError(f"ModelConfig.act_bits must be None or an int from 2 to 8, got {self.act_bits!r}")
    for name in ("linear_norm", "block_norm"):
      if getattr(self, name) not in (None, *NORM_KINDS):
        raise ValueError(f"ModelConfig.{name} must be None or one of {NORM_KINDS}, got {getattr(self, name)!r}")
    if self.ffn not in FFN_KINDS:
      raise ValueError(f"ModelConfig.ffn must be one of {FFN_KINDS}, got {self.ffn!r}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES and not (name == "dtype" and getattr(self, name) is None):
        raise ValueError(f"ModelConfig.{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
    # Every grouped feature size (column-parallel outputs, row-parallel inputs) must split into `groups`.
    for what, size in (("d_model", self.d_model), ("d_ff", self.d_ff),
                       ("n_kv_heads * head_dim", self.n_kv_heads * self.head_dim)):
      if size % self.groups:
        raise ValueError(f"ModelConfig.groups={self.groups} does not divide {what}={size}")
    if self.d_model % self.fsdp_groups:
      raise ValueError(f"ModelConfig.fsdp_groups={self.fsdp_groups} does not divide d_model={self.d_model}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"ModelConfig.remat must be one of {tuple(REMAT_POLICIES)}, got {self.remat!r}")
    if self.kv_quant not in kv_cache.KV_QUANT:
      raise ValueError(f"ModelConfig.kv_quant must be one of {kv_cache.KV_QUANT}, got {self.kv_quant!r}")

  @property
  def compute_dtype(self) -> jnp.dtype:
    """`dtype`, with None resolved when the model is built (not when the config is: building a config must not
    start the XLA backend, which `jax.distributed.initialize` has to precede)."""
    if self.dtype is None:
      return jnp.dtype("float32" if jax.default_backend() == "cpu" else "bfloat16")
    return jnp.dtype(self.dtype)

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def quantized(self) -> bool:
    return self.weight_quant != "none" or self.act_bits is not None

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)


# ------------------------------------------------------------------------------------------------------------
# Presets: the papers' model configs by name.
# ------------------------------------------------------------------------------------------------------------
def _bitnet_table5() -> dict[str, dict]:
  """BitNet Table 5 (hidden, layers, heads); 16K SentencePiece vocabulary (Table 6), FFN 4x."""
  rows = {"125m": (768, 12, 12), "350m": (1024, 24, 16), "760m": (1536, 24, 16), "1.3b": (2048, 24, 32),
          "2.7b": (2560, 32, 32), "6.7b": (4096, 32, 32), "13b": (5120, 40, 40), "30b": (7168, 48, 56)}
  return {f"bitnet-{k}": dict(variant="bitnet", d_model=d, n_layers=n, n_heads=h, vocab_size=16384,
                              max_seq_len=2048) for k, (d, n, h) in rows.items()}


def _faq_table1(prefix: str, variant: str, sizes) -> dict[str, dict]:
  """b1.58 FAQ Table 1 (hidden, GLU, heads, layers), shared by b1.58 and LLaMA; LLaMA's 32K vocab, seq 2048."""
  rows = {"700m": (1536, 4096, 24, 24), "1.3b": (2048, 5460, 32, 24), "3b": (3200, 8640, 32, 26),
          "3.9b": (3200, 12800, 32, 26)}
  return {f"{prefix}-{k}": dict(variant=variant, d_model=rows[k][0], d_ff=rows[k][1], n_heads=rows[k][2],
                                n_layers=rows[k][3], vocab_size=32000, max_seq_len=2048) for k in sizes}


PRESETS: dict[str, dict] = {
    **_bitnet_table5(),
    **_faq_table1("b158", "b158", ("700m", "1.3b", "3b", "3.9b")),
    **_faq_table1("llama", "fp", ("700m", "1.3b", "3b")),
    # b1.58 2B4T technical report / the released checkpoint's config.json.
    "b158-2b4t": dict(variant="b158", d_model=2560, d_ff=6912, n_layers=30, n_heads=20, n_kv_heads=5,
                      vocab_size=128256, max_seq_len=4096, rope_theta=500000.0, ffn="relu2_glu",
                      linear_norm=None, block_norm="rms", sub_norms=True, tie_embeddings=True),
}


def preset(name: str, **overrides) -> ModelConfig:
  """The ModelConfig of a paper's model by name (`bitnet-125m` ... `bitnet-30b`, `b158-700m` ... `b158-3.9b`,
  `llama-700m` ... `llama-3b`, `b158-2b4t`), with optional field overrides."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; valid names: {', '.join(PRESETS)}")
  return ModelConfig(**{**PRESETS[name], **overrides})


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
            norm: bool = True, asymmetric: bool = False) -> BitLinear:
  """A BitLinear with the config's quantisation. parallel="column" groups outputs, "row" groups inputs."""
  return BitLinear(d_in, d_out, weight_quant=cfg.weight_quant, act_bits=cfg.act_bits,
                   act_per_token=cfg.act_per_token, act_asymmetric=asymmetric, groups=cfg.groups,
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
  same = ("weight_quant", "act_bits", "act_per_token", "act_asymmetric", "act_groups", "dtype", "exact")
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
    self.o_proj = _linear(cfg, H * Dh, D, ("heads", "embed"), parallel="row", rngs=rngs, norm=not cfg.sub_norms)

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
                             asymmetric=cfg.bitnet_asymmetric_ffn)

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
    float32 | bfloat16 | int8 | int4 (`kv_cache.KV_KINDS`)."""
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
  print(f"| preset | variant | d_model | layers | heads | kv | d_ff | vocab | params | non-embedding |")
  print(f"|---|---|---|---|---|---|---|---|---|---|")
  for name in PRESETS:
    cfg = preset(name, dtype="float32")
    n = count_params(cfg)
    print(f"| {name} | {cfg.variant} | {cfg.d_model} | {cfg.n_layers} | {cfg.n_heads} | {cfg.n_kv_heads} | "
          f"{cfg.d_ff} | {cfg.vocab_size} | {_fmt(n['total'])} | {_fmt(n['non_embedding'])} |")


if __name__ == "__main__":
  cli.run("model", main)
