"""step: the model, its optimiser and the jitted train and eval steps on a mesh (sharding -> step -> train).

`setup_mesh(config)` gives the mesh, the logical-axis rules and the model config with its quantisation groups
aligned to the shards; `_model_and_optimizer` builds both sharded at creation; `train_step` / `eval_step` are
`jax.jit`s of the split nnx state with the backend's compiler options (`compiler_options`); `lower_step` lowers
the train step without running it (the dry run, the benchmarks). `train` re-exports every public name here.
"""

from __future__ import annotations

import functools
import math
import os
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from bitnet_jax import data, optim, sharding
from bitnet_jax.layers import ACT_QUANTIZERS, BitLinear, set_act_quant, set_quant_mix
from bitnet_jax.model import ModelConfig, Transformer


def model_config_from(config: ml_collections.ConfigDict) -> ModelConfig:
  """The config's ModelConfig; a quantisation warm-up in `config.train` gives the BitLinears their lambda."""
  fields = config.model.to_dict()
  if _warmup_steps(config):
    fields["quant_warmup"] = True
  return ModelConfig(**fields)


def _warmup_steps(config: ml_collections.ConfigDict) -> int:
  return config.train.get("quant_warmup_steps", 0)


def act_stage2_step(config: ml_collections.ConfigDict) -> int:
  """The last step of stage 1 of the two-stage recipe (`config.train.act_stage1_fraction` of the steps); 0 = off."""
  fraction = config.train.get("act_stage1_fraction", 0.0)
  return round(fraction * config.train.steps) if fraction else 0


def set_activation_stage(model: Transformer, stage1: str | None) -> int:
  """The papers' two-stage recipe (a4.8 and v2 section 3: 8-bit activations first, then the 4-bit hybrid, with
  the optimiser state kept): with `stage1` (a name of `layers.ACT_QUANTIZERS`, "absmax8" in the papers) every
  projection with a named activation quantiser uses it; with None each uses its role's quantiser from
  `model.cfg` again (act_quant for q/k/v and gate/up, act_quant_attn_out for o_proj, act_quant_ffn_out for
  down_proj). Returns how many layers were set. Weights and the Hadamard transforms are not touched."""
  cfg, n = model.cfg, 0
  for block in model.blocks:
    roles = [(cfg.act_quant, l) for l in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj,
                                          block.ffn.gate_proj, block.ffn.up_proj)]
    roles += [(cfg.act_quant_attn_out, block.attn.o_proj), (cfg.act_quant_ffn_out, block.ffn.down_proj)]
    for name, layer in roles:
      if isinstance(layer, BitLinear) and name is not None:
        set_act_quant(layer, stage1 or name)
        n += 1
  return n


def setup_mesh(config: ml_collections.ConfigDict):
  """(mesh, rules, model config) for `config`: the mesh over all devices of all processes, the logical-axis rules,
  and the model config with its quantisation groups aligned to the shards (`sharding.per_shard_groups`)."""
  sh = config.get("sharding", ml_collections.ConfigDict())
  mesh = sharding.make_mesh(config.get("mesh", {"data": -1}))
  rules = sharding.rules_from(sh.get("rules"))
  model_cfg = model_config_from(config)
  if sh.get("per_shard_groups", True):
    model_cfg = sharding.with_quant_groups(model_cfg, mesh, rules)
  sharding.check_model(model_cfg, mesh, rules)
  return mesh, rules, model_cfg


def _check_config(config: ml_collections.ConfigDict, model_cfg: ModelConfig, tokenizer: data.Tokenizer,
                  n_batch_shards: int) -> None:
  t = config.train
  for key in ("steps", "batch_size", "seq_len", "eval_every", "checkpoint_every", "log_every", "keep_checkpoints"):
    if not isinstance(t[key], int) or t[key] < 1:
      raise ValueError(f"config.train.{key} must be a positive int, got {t[key]!r}")
  if t.seq_len > model_cfg.max_seq_len:
    raise ValueError(f"config.train.seq_len={t.seq_len} is longer than the model's maximum "
                     f"config.model.max_seq_len={model_cfg.max_seq_len}")
  if t.batch_size % n_batch_shards:
    raise ValueError(f"config.train.batch_size={t.batch_size} is not divisible by the {n_batch_shards} "
                     f"data-parallel shards of the mesh (mesh.data x mesh.fsdp)")
  warmup = t.get("quant_warmup_steps", 0)
  if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
    raise ValueError(f"config.train.quant_warmup_steps must be a non-negative int, got {warmup!r}")
  if warmup and model_cfg.weight_quant == "none":
    raise ValueError(f"config.train.quant_warmup_steps={warmup} needs a quantised variant; "
                     f"config.model.variant={model_cfg.variant!r} quantises nothing")
  fraction = t.get("act_stage1_fraction", 0.0)
  if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0.0 <= fraction < 1.0:
    raise ValueError(f"config.train.act_stage1_fraction must be a number in [0, 1) (0 = off), got {fraction!r}")
  if fraction and not model_cfg.named_act_quant:
    raise ValueError(f"config.train.act_stage1_fraction={fraction} switches named activation quantisers, but "
                     f"config.model.variant={model_cfg.variant!r} has none (a48, v2_a4 and v2_a8 do)")
  if fraction and t.get("stage1_act_quant") not in ACT_QUANTIZERS:
    raise ValueError(f"config.train.stage1_act_quant must be one of {tuple(ACT_QUANTIZERS)}, "
                     f"got {t.get('stage1_act_quant')!r}")
  if model_cfg.vocab_size < tokenizer.vocab_size:
    raise ValueError(f"config.model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
                     f"{tokenizer.vocab_size} ids ({tokenizer.name}); set "
                     f"--config.model.vocab_size={tokenizer.vocab_size}")
  with warnings.catch_warnings():   # the recipe's checks (a bad learning rate, betas, ...); its warnings come later
    warnings.simplefilter("ignore")
    optim.make_optimizer(config.optim, t.steps)


def loss_fn(model: Transformer, batch: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy in nats per token. batch: int32 [B, T + 1]."""
  logits = model(batch[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


# XLA:CPU hands reductions as well as dots to YNNPACK by default (jax 0.10); its reductions are slow at these
# shapes (a 2048 x 1408 row sum took 60 ms in a d512 train step on an AMD EPYC), so the step's jits give it dots
# only: 17% off that step. Not applied where XLA_FLAGS already chooses, nor where the option is unknown.
_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


@functools.cache
def compiler_options(backend: str) -> dict:
  """The XLA compiler options of the train and eval steps on `backend` (`jax.default_backend()`)."""
  if backend != "cpu" or "ynn_fusion_type" in os.environ.get("XLA_FLAGS", ""):
    return {}
  try:
    jax.jit(jnp.sum, compiler_options=_CPU_OPTIONS).lower(jnp.ones(4)).compile()
  except Exception:   # an XLA without the option: its default is fine  # noqa: BLE001
    return {}
  return dict(_CPU_OPTIONS)


def _update(model: Transformer, optimizer: nnx.Optimizer, batch: jax.Array, quant_warmup_steps: int):
  if quant_warmup_steps:
    set_quant_mix(model, optax.linear_schedule(0.0, 1.0, quant_warmup_steps)(optimizer.step[...]))
  loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
  optimizer.update(model, grads)
  # inject_hyperparams records the rate of the update it just applied, so it is read after `update`.
  return loss, optax.tree.norm(grads), optim.current_lr(optimizer.opt_state)


@functools.cache
def _jitted_step(backend: str, quant_warmup_steps: int):
  def step(graphdef, state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    out = _update(model, optimizer, batch, quant_warmup_steps)
    return out, nnx.state((model, optimizer))
  return jax.jit(step, static_argnums=0, compiler_options=compiler_options(backend))


def train_step(model: Transformer, optimizer: nnx.Optimizer, batch: jax.Array, quant_warmup_steps: int = 0):
  """One optimiser update, in place on model and optimizer; returns (loss, gradient norm, learning rate).

  With `quant_warmup_steps`, every BitLinear's warm-up weight lambda is first set to
  `optax.linear_schedule(0, 1, quant_warmup_steps)` at the optimiser's step: 0 (the FP forward) at the first
  update, 1 (fully quantised) from update `quant_warmup_steps` on (`layers.mix_quantized`). A `jax.jit` of the
  split state (not `nnx.jit`, which takes no compiler options: `compiler_options`)."""
  graphdef, state = nnx.split((model, optimizer))
  out, state = _jitted_step(jax.default_backend(), quant_warmup_steps)(graphdef, state, batch)
  nnx.update((model, optimizer), state)
  return out


def lower_step(model: Transformer, optimizer: nnx.Optimizer, batch, quant_warmup_steps: int = 0):
  """`train_step` lowered (not run) for these (possibly abstract) model, optimiser and batch."""
  graphdef, state = nnx.split((model, optimizer))
  return _jitted_step(jax.default_backend(), quant_warmup_steps).lower(graphdef, state, batch)


@functools.cache
def _jitted_eval(backend: str):
  return jax.jit(lambda graphdef, state, batch: loss_fn(nnx.merge(graphdef, state), batch), static_argnums=0,
                 compiler_options=compiler_options(backend))


def eval_step(model: Transformer, batch: jax.Array) -> jax.Array:
  """The loss of `batch` (`loss_fn`), jitted."""
  graphdef, state = nnx.split(model)
  return _jitted_eval(jax.default_backend())(graphdef, state, batch)


def weight_memory(model: Transformer) -> dict[str, float]:
  """Weight bytes as trained (float32 latent) and deployed: BitLinear kernels of a quantised model at 2 bits
  (2-bit packing) and 1.6 bits (base-3 packing) plus one float32 scale per group; everything else at 16 bits.
  An FP model is deployed at 16 bits throughout. Computed from shapes (a model, not a measurement)."""
  total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  linears = [m for _, m in nnx.iter_graph(model) if isinstance(m, BitLinear)]
  quantised = [m for m in linears if m.weight_quant != "none"]
  q_weights = sum(m.kernel[...].size for m in quantised)
  scales = sum(math.prod(m.weight_groups) for m in quantised) * 4
  rest16 = (total - q_weights) * 2
  return {"trained_mb": total * 4 / 1e6,
          "packed_2bit_mb": (q_weights * 2 / 8 + scales + rest16) / 1e6,
          "packed_1.6bit_mb": (q_weights * 1.6 / 8 + scales + rest16) / 1e6}


def _model_and_optimizer(model_cfg: ModelConfig, optim_cfg, steps: int, seed: int = 0):
  """A function building (model, optimiser): run it under `nnx.jit` to create them sharded (each device
  materialises only its shards, no host holds a whole parameter) or under `nnx.eval_shape` for abstract state."""
  def create():
    model = Transformer(model_cfg, rngs=nnx.Rngs(seed))
    return model, nnx.Optimizer(model, optim.make_optimizer(optim_cfg, steps), wrt=nnx.Param)
  return create
