"""model_config: ModelConfig, the variants' defaults and the papers' presets (layers -> model_config -> model).

The variants (`ModelConfig.variant`; table `VARIANTS` holds each one's defaults for the fields left at "auto"):
  * "b158"      BitNet b1.58 (2402.17764): ternary absmean weights, per-token 8-bit absmax activations,
                LLaMA-like (RMSNorm, SwiGLU, rotary embeddings, no biases). As in the FAQ reference code every
                linear layer of attention and FFN is a BitLinear with its own RMSNorm, and the block's own
                RMSNorm is removed.
  * "bitnet"    BitNet (2310.11453): binary weights, 8-bit absmax activations per tensor (the paper's training
                mode), LayerNorm inside each BitLinear (SubLN, eq. 12), a GELU FFN of width 4d.
  * "fp"        the LLaMA baseline of the b1.58 paper: same architecture, quantisation off, block pre-norms.
  * "fp_bitnet" the BitNet architecture with quantisation off.
The successors, each the b158 layout (per-BitLinear RMSNorm, ternary absmean weights) with named activation
quantisers (`layers.ACT_QUANTIZERS`) per projection role: block inputs (q/k/v, gate/up), the attention output
projection's input (o_proj) and the FFN down projection's input (down_proj):
  * "a48"       BitNet a4.8 (2411.04965): absmean INT4 on q/k/v and gate/up (eq. 6-7), top-50% then INT8 on
                o_proj (eq. 1), INT8 on down_proj after a squared-ReLU GLU (eq. 5), whose zeros are its sparsity.
  * "v2_a8"     BitNet v2 (2504.18415) with 8-bit activations: per-token absmax INT8 everywhere, and o_proj and
                down_proj as H-BitLinear (eq. 7: norm, then the Hadamard transform, then quantisation), SwiGLU.
  * "v2_a4"     BitNet v2 with native 4-bit activations: absmean INT4 everywhere (eq. 6), H-BitLinear as v2_a8.
  * "b158_seq"  b158 with ParetoQ's (2502.02631) stretched elastic ternary quantiser: a learned scale per output
                channel instead of the absmean statistic.
The papers' two-stage recipes (8-bit activations first, then the 4-bit hybrid, reusing the optimiser state)
are continue-training from an a8 run; see docs/quantisers.md.
Options for the released b1.58 2B4T checkpoint (2504.12285): squared-ReLU gated FFN (`ffn="relu2_glu"`),
extra `attn_sub_norm` / `ffn_sub_norm` before o_proj / down_proj (`sub_norms=True`), grouped-query attention
(`n_kv_heads`), tied embeddings, `rope_theta`.

`PRESETS` / `preset(name)`: the papers' model configs by name (BitNet Table 5, b1.58 FAQ Table 1, 2B4T).
Building a config validates it and starts no XLA backend; `bitnet_jax.model` builds the network from it and
re-exports every name here.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from bitnet_jax import kv_cache
from bitnet_jax.layers import ACT_QUANTIZERS, NORM_KINDS, WEIGHT_QUANTIZERS

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
    # Successors: named activation quantisers replace act_bits (None here), per role.
    "a48": dict(weight_quant="ternary", act_bits=None, act_per_token=True, linear_norm="rms", block_norm=None,
                ffn="relu2_glu", act_quant="absmean4", act_quant_attn_out="topk50_absmax8",
                act_quant_ffn_out="absmax8", hadamard=False),
    "v2_a8": dict(weight_quant="ternary", act_bits=None, act_per_token=True, linear_norm="rms", block_norm=None,
                  ffn="swiglu", act_quant="absmax8", hadamard=True),
    "v2_a4": dict(weight_quant="ternary", act_bits=None, act_per_token=True, linear_norm="rms", block_norm=None,
                  ffn="swiglu", act_quant="absmean4", hadamard=True),
    "b158_seq": dict(weight_quant="ternary_seq", act_bits=8, act_per_token=True, linear_norm="rms",
                     block_norm=None, ffn="swiglu"),
}
# Fields every variant gets when its row leaves them out (before the roles follow `act_quant`).
_BASE_DEFAULTS = dict(act_quant=None, hadamard=False)
ACT_ROLES = ("act_quant", "act_quant_attn_out", "act_quant_ffn_out")
FFN_KINDS = ("swiglu", "relu2_glu", "gelu", "relu")
GATED = ("swiglu", "relu2_glu")
DTYPES = ("float32", "bfloat16", "float16")
# Rematerialisation of each block in the backward pass: what the forward keeps for it.
REMAT_POLICIES = {
    "none": None,                                                     # keep everything (no remat)
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep the matmul outputs, recompute the rest
    "full": jax.checkpoint_policies.nothing_saveable,                 # keep only the block inputs
}


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
  variant: str = "b158"                # b158 | bitnet | fp | fp_bitnet | a48 | v2_a8 | v2_a4 | b158_seq
  # Quantisation (auto: from the variant).
  weight_quant: str = AUTO             # ternary | binary | ternary_seq | none
  act_bits: int | None | str = AUTO    # 2..8, or None for no activation quantisation
  act_per_token: bool | str = AUTO     # per-token (b1.58) or per-tensor (BitNet training) absmax
  # Named activation quantisers (`layers.ACT_QUANTIZERS`: absmax8 | absmean4 | topk50_absmax8), replacing act_bits
  # (which must then be None): act_quant for the block inputs (q/k/v, gate/up), the two others for the inputs of
  # o_proj and down_proj (auto: the variant's, else act_quant). None: the absmax of act_bits.
  act_quant: str | None = AUTO
  act_quant_attn_out: str | None = AUTO
  act_quant_ffn_out: str | None = AUTO
  hadamard: bool | str = AUTO          # o_proj and down_proj as BitNet v2's H-BitLinear (Hadamard before quant)
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
  # Round K and V in the full forward as a KV cache of this kind stores them (none | bfloat16 | int8 | int4 |
  # int3, the last a4.8's, position 0 at 4 bits; `kv_cache.fake_quant`): the teacher-forced loss of decoding with
  # a quantised cache. "none" changes nothing.
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
    for key, value in {**_BASE_DEFAULTS, **VARIANTS[self.variant]}.items():
      if getattr(self, key) == AUTO:
        object.__setattr__(self, key, value)
    for key in ACT_ROLES[1:]:
      if getattr(self, key) == AUTO:
        object.__setattr__(self, key, self.act_quant)
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
    for name in ACT_ROLES:
      if getattr(self, name) not in (None, *ACT_QUANTIZERS):
        raise ValueError(f"ModelConfig.{name} must be None or one of {tuple(ACT_QUANTIZERS)}, "
                         f"got {getattr(self, name)!r}")
    if self.act_bits is not None and any(getattr(self, r) is not None for r in ACT_ROLES):
      named = ", ".join(f"{r}={getattr(self, r)!r}" for r in ACT_ROLES if getattr(self, r) is not None)
      raise ValueError(f"ModelConfig.act_bits={self.act_bits!r} and {named}: a named activation quantiser "
                       f"replaces act_bits; set act_bits=None (or leave the names at None)")
    if not isinstance(self.hadamard, bool):
      raise ValueError(f"ModelConfig.hadamard must be True or False, got {self.hadamard!r}")
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
    return self.weight_quant != "none" or self.act_bits is not None or self.named_act_quant

  @property
  def named_act_quant(self) -> bool:
    """Whether any projection role uses a named activation quantiser (`act_quant`, ...)."""
    return any(getattr(self, r) is not None for r in ACT_ROLES)

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


def _successor_tables() -> dict[str, dict]:
  """a4.8 Table 6 (hidden, GLU, heads, layers; 700M-3B as FAQ Table 1, plus 7B) and v2 Table 8 (400M-7B), each
  for its variants; seq 2048. Neither paper names its vocabulary: LLaMA's 32K, as b1.58's presets, is our choice."""
  a48 = {"700m": (1536, 4096, 24, 24), "1.3b": (2048, 5460, 32, 24), "3b": (3200, 8640, 32, 26),
         "7b": (4096, 11008, 32, 32)}
  v2 = {"400m": (1024, 4096, 16, 24), "1.3b": (2048, 8192, 32, 18), "3b": (4096, 8192, 32, 20),
        "7b": (4096, 16384, 32, 24)}
  out = {}
  for prefix, variant, rows in (("a48", "a48", a48), ("v2-a8", "v2_a8", v2), ("v2-a4", "v2_a4", v2)):
    for size, (d, f, h, n) in rows.items():
      out[f"{prefix}-{size}"] = dict(variant=variant, d_model=d, d_ff=f, n_heads=h, n_layers=n, vocab_size=32000,
                                     max_seq_len=2048)
  return out


PRESETS: dict[str, dict] = {
    **_bitnet_table5(),
    **_faq_table1("b158", "b158", ("700m", "1.3b", "3b", "3.9b")),
    **_faq_table1("llama", "fp", ("700m", "1.3b", "3b")),
    # b1.58 2B4T technical report / the released checkpoint's config.json.
    "b158-2b4t": dict(variant="b158", d_model=2560, d_ff=6912, n_layers=30, n_heads=20, n_kv_heads=5,
                      vocab_size=128256, max_seq_len=4096, rope_theta=500000.0, ffn="relu2_glu",
                      linear_norm=None, block_norm="rms", sub_norms=True, tie_embeddings=True),
    **_successor_tables(),
}


def preset(name: str, **overrides) -> ModelConfig:
  """The ModelConfig of a paper's model by name (`bitnet-125m` ... `bitnet-30b`, `b158-700m` ... `b158-3.9b`,
  `llama-700m` ... `llama-3b`, `b158-2b4t`, `a48-700m` ... `a48-7b`, `v2-a8-400m` ... `v2-a4-7b`), with optional
  field overrides."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; valid names: {', '.join(PRESETS)}")
  return ModelConfig(**{**PRESETS[name], **overrides})

