"""train: the training loop, checkpoints, metrics and the CLI (model -> sharding -> train -> experiments).

    python -m bitnet_jax.train --config=configs/lm.py:b158-tiny --workdir=runs/b158-tiny [--config.train.steps=50]

`train_and_evaluate(config, workdir)` reads top to bottom in phases: run record, data, model and optimiser,
step functions, restore, loop, summary. Re-running the same command on the same workdir resumes from the latest
complete checkpoint (model, optimiser state, data-iterator position and step are all in it), and a resumed run
produces the same loss at every step as an uninterrupted one (bitwise on CPU; tested with a real SIGKILL).

Outputs in the workdir: `config.json`, `data.json` (corpus fingerprint), `metrics.jsonl` (one object per logged
step: step, loss, lr, grad_norm, tokens_per_s, and eval_loss / eval_ppl / eval_bits_per_token when evaluated),
`tensorboard/` (the same scalars as TensorBoard events), `checkpoints/`, `summary.json`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
import time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tensorboardX import SummaryWriter
from tqdm.auto import tqdm

from bitnet_jax import data, optim, sharding
from bitnet_jax.layers import BitLinear, set_quant_mix
from bitnet_jax.model import ModelConfig, Transformer, count_params


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf; the run stopped before checkpointing that state."""


def model_config_from(config: ml_collections.ConfigDict) -> ModelConfig:
  """The config's ModelConfig; a quantisation warm-up in `config.train` gives the BitLinears their lambda."""
  fields = config.model.to_dict()
  if _warmup_steps(config):
    fields["quant_warmup"] = True
  return ModelConfig(**fields)


def _warmup_steps(config: ml_collections.ConfigDict) -> int:
  return config.train.get("quant_warmup_steps", 0)


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
  if model_cfg.vocab_size < tokenizer.vocab_size:
    raise ValueError(f"config.model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
                     f"{tokenizer.vocab_size} ids ({tokenizer.name}); set "
                     f"--config.model.vocab_size={tokenizer.vocab_size}")


def _check_resume_groups(workdir: Path, model_cfg: ModelConfig) -> None:
  """A checkpoint trained with other quantisation groups is a different function: refuse to resume it silently
  (per-shard groups follow the mesh, so a new mesh shape would change them)."""
  saved = workdir / "config.json"
  if not saved.exists() or not (workdir / "checkpoints").exists():
    return
  old = json.loads(saved.read_text()).get("model", {})
  for key in ("groups", "fsdp_groups"):
    if key in old and old[key] != getattr(model_cfg, key):
      raise ValueError(f"{workdir} was trained with model.{key}={old[key]} but this mesh gives "
                       f"{getattr(model_cfg, key)}; to resume on this mesh set "
                       f"--config.sharding.per_shard_groups=False --config.model.groups={old.get('groups', 1)} "
                       f"--config.model.fsdp_groups={old.get('fsdp_groups', 1)}")


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


def read_metrics(path: str | os.PathLike, up_to_step: int | None = None) -> list[dict]:
  """The rows of a `metrics.jsonl`, optionally only up to `up_to_step` (a resumed run drops the rows a killed run
  logged after its last checkpoint)."""
  path = Path(path)
  if not path.exists():
    return []
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return rows if up_to_step is None else [r for r in rows if r["step"] <= up_to_step]


def _evaluate(model: Transformer, batches: list[jax.Array]) -> dict[str, float]:
  loss = float(np.mean([float(eval_step(model, b)) for b in batches]))
  return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_bits_per_token": loss / math.log(2)}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                       progress: bool = True, stop_at_step: int | None = None) -> dict:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint) and returns the run summary.

  `stop_at_step` ends this invocation early, with a checkpoint, at that step of the same `train.steps` run (the
  schedule is unchanged): for preemptible jobs, and for testing resume. On several processes every process
  calls this; only process 0 writes logs, and every process writes its shards of the checkpoints.
  """
  # ---------------------------------------------------------------- 1. run record, mesh, checks
  sharding.initialize_distributed(config.get("distributed"))
  workdir = Path(workdir)
  main_process = jax.process_index() == 0
  mesh, rules, model_cfg = setup_mesh(config)
  tokenizer = data.make_tokenizer(config.data.get("tokenizer", "byte"))   # the checks need its vocabulary
  _check_config(config, model_cfg, tokenizer, sharding.data_parallel_size(mesh, rules))
  _check_resume_groups(workdir, model_cfg)
  config = config.copy_and_resolve_references()
  config.model.groups, config.model.fsdp_groups = model_cfg.groups, model_cfg.fsdp_groups   # as trained
  t = config.train
  if main_process:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

  # ---------------------------------------------------------------- 2. data
  # Every process computes the same global batches from the seed and transfers only its own rows.
  corpus = data.load_corpus(config.data.source, valid_fraction=config.data.valid_fraction,
                            text_key=config.data.text_key, tokenizer=tokenizer)
  if main_process:
    (workdir / "data.json").write_text(json.dumps(corpus.summary(), indent=2))
  train_it = data.train_iterator(corpus.train, batch_size=t.batch_size, seq_len=t.seq_len, seed=t.seed)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  eval_set = [sharding.shard_batch(b, batch_sharding) for b in
              data.eval_batches(corpus.valid, batch_size=t.batch_size, seq_len=t.seq_len,
                                max_batches=config.data.eval_batches)]

  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    # -------------------------------------------------------------- 3. model and optimiser, sharded at creation
    model, optimizer = nnx.jit(_model_and_optimizer(model_cfg, config.optim, t.steps, t.seed))()

    # -------------------------------------------------------------- 4. restore
    manager = ocp.CheckpointManager(
        (workdir / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=t.keep_checkpoints,
                                             enable_async_checkpointing=t.async_checkpoint))
    modules = {"model": model, "optimizer": optimizer}
    state = lambda: {name: nnx.to_pure_dict(nnx.state(m)) for name, m in modules.items()}
    start = manager.latest_step() or 0
    if start:   # restored onto this mesh's shardings, whatever mesh wrote it
      abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state())
      restored = manager.restore(start, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(train_it)))
      for name, m in modules.items():
        nnx.replace_by_pure_dict(sub := nnx.state(m), restored.state[name])
        nnx.update(m, sub)
    elif t.get("init_from"):   # a fresh run starting from other weights (a resumed run has its own)
      report = init_from(model, load_init_source(t.init_from))
      if main_process:
        print(f"init_from {t.init_from}: {report['copied']} parameters copied, "
              f"{len(report['kept_init'])} norm gains left at their init", file=sys.stderr)
    metrics_path = workdir / "metrics.jsonl"
    history = read_metrics(metrics_path, start)
    if main_process:
      metrics_path.write_text("".join(json.dumps(r) + "\n" for r in history))

    def save(step: int) -> None:
      manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state()),
                                                 data=grain.checkpoint.CheckpointSave(train_it)))

    # -------------------------------------------------------------- 5. loop
    tokens_per_step = t.batch_size * t.seq_len
    bar = tqdm(total=t.steps, initial=start, disable=not (progress and main_process),
               desc=config.get("name", "train"), unit="step", dynamic_ncols=True, file=sys.stdout)
    last_time, last_step, wall0 = time.perf_counter(), start, time.perf_counter()
    # TensorBoard events in WORKDIR/tensorboard; on resume, events past the restored step are hidden (purge_step).
    writer = (SummaryWriter(str(workdir / "tensorboard"), purge_step=start + 1 if start else None)
              if main_process else None)
    last = t.steps if stop_at_step is None else min(stop_at_step, t.steps)
    with (metrics_path.open("a") if main_process else contextlib.nullcontext()) as log, \
        (writer or contextlib.nullcontext()):
      for step in range(start + 1, last + 1):
        batch = sharding.shard_batch(next(train_it), batch_sharding)
        loss, grad_norm, lr = train_step(model, optimizer, batch, quant_warmup_steps=_warmup_steps(config))
        loss = float(loss)
        if not math.isfinite(loss):
          manager.wait_until_finished()
          manager.close()
          raise NonFiniteLossError(f"loss is {loss} at step {step}: stopping; the last checkpoint "
                                   f"(step {manager.latest_step()}) holds the last good state")
        bar.update(1)
        evaluate = step % t.eval_every == 0 or step == t.steps
        if step % t.log_every == 0 or evaluate or step == start + 1:
          now = time.perf_counter()
          row = {"step": step, "loss": loss, "lr": float(lr), "grad_norm": float(grad_norm),
                 "tokens_per_s": (step - last_step) * tokens_per_step / max(now - last_time, 1e-9)}
          if evaluate:
            row.update(_evaluate(model, eval_set))
          history.append(row)
          if main_process:
            log.write(json.dumps(row) + "\n")
            log.flush()
            for key, value in row.items():
              if key != "step":
                writer.add_scalar(f"{'eval' if key.startswith('eval') else 'train'}/{key}", value, step)
          bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)
          last_time, last_step = time.perf_counter(), step
        if step % t.checkpoint_every == 0 or step == last:
          save(step)
    bar.close()
    manager.wait_until_finished()
    manager.close()

    # -------------------------------------------------------------- 6. summary
    # The loop evaluates its last step; a finished run being re-opened restores that same state, so its logged
    # eval is reused rather than recomputed. Only a run stopped early (stop_at_step) evaluates here.
    logged = history[-1] if history and history[-1]["step"] == last and "eval_loss" in history[-1] else None
    final = ({k: logged[k] for k in ("eval_loss", "eval_ppl", "eval_bits_per_token")} if logged
             else _evaluate(model, eval_set))
    trained = [r for r in history if r["step"] > start]
    speed = [r["tokens_per_s"] for r in trained[1:]] or [r["tokens_per_s"] for r in trained]
    summary = {
        "name": config.get("name", ""), "variant": model_cfg.variant, "steps": t.steps, "resumed_from": start,
        "final_train_loss": history[-1]["loss"] if history else None, **final,
        "tokens_per_s": float(np.median(speed)) if speed else None,
        "wall_s": time.perf_counter() - wall0, "tokens": t.steps * tokens_per_step,
        "params": count_params(model_cfg), "weight_memory": weight_memory(model), "data": corpus.summary(),
        "mesh": dict(mesh.shape), "processes": jax.process_count(),
    }
  if main_process:
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
  return summary


def _model_and_optimizer(model_cfg: ModelConfig, optim_cfg, steps: int, seed: int = 0):
  """A function building (model, optimiser): run it under `nnx.jit` to create them sharded (each device
  materialises only its shards, no host holds a whole parameter) or under `nnx.eval_shape` for abstract state."""
  def create():
    model = Transformer(model_cfg, rngs=nnx.Rngs(seed))
    return model, nnx.Optimizer(model, optim.make_optimizer(optim_cfg, steps), wrt=nnx.Param)
  return create


def load_init_source(spec: str) -> Transformer:
  """The model `config.train.init_from` names: "hf:DIR" (a transformers BitNet or LLaMA checkpoint directory,
  `interop.hf.load`) or "run:WORKDIR" (the last checkpoint of one of our runs, `load_checkpoint`)."""
  kind, _, path = str(spec).partition(":")
  if kind == "hf" and path:
    from bitnet_jax.interop import hf   # interop sits beside the trainer; imported only when asked for
    return hf.load(path)
  if kind == "run" and path:
    return load_checkpoint(path)[0]
  raise ValueError(f"config.train.init_from={spec!r} must be 'hf:DIR' or 'run:WORKDIR'")


# An FP (LLaMA-layout) block normalises the attention and FFN inputs once; the quantised variants normalise the
# input of every BitLinear (b1.58's RMSNorm inside BitLinear). Converting FP into b1.58 gives the block norm's gain
# to the layers that read that input; o_proj and down_proj, whose inputs an FP block does not normalise, keep
# gain 1 (their norm is new: the function changes there, which the quantisation warm-up lets training absorb).
_NORM_FROM_FP = {("attn", "q_proj"): "attn_norm", ("attn", "k_proj"): "attn_norm", ("attn", "v_proj"): "attn_norm",
                 ("ffn", "gate_proj"): "ffn_norm", ("ffn", "up_proj"): "ffn_norm"}


def init_from(model: Transformer, source: Transformer) -> dict:
  """Copies `source`'s parameters into `model` in place (onto `model`'s shardings) for fine-tuning.

  Parameters are matched by path and must have equal shapes. From an FP model into a quantised variant the
  block norms' gains go to the per-layer input norms (`_NORM_FROM_FP`). A parameter of `model` with no source
  is an error unless it is a norm gain (left at its init, 1); so is a source parameter that nothing reads.
  Returns {"copied": n, "kept_init": [paths], "mapped": {target: source}}.
  """
  target = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  source_state = dict(nnx.to_flat_state(nnx.state(source, nnx.Param)))
  src = {path: v[...] for path, v in source_state.items()}
  origins, mapped, kept, missing, mismatched = {}, {}, [], [], []
  for path, variable in target.items():
    origin = path
    if origin not in src and len(path) >= 5 and path[-2:] == ("norm", "scale") and path[2:4] in _NORM_FROM_FP:
      origin = path[:2] + (_NORM_FROM_FP[path[2:4]], "scale")
      mapped["/".join(map(str, path))] = "/".join(map(str, origin))
    if origin not in src:
      (kept if path[-1] == "scale" and "norm" in path else missing).append("/".join(map(str, path)))
      continue
    if tuple(src[origin].shape) != tuple(variable.shape):
      mismatched.append(f"{'/'.join(map(str, path))}: {tuple(src[origin].shape)} -> {tuple(variable.shape)}")
      continue
    origins[path] = origin
  used = set(origins.values())
  unused = sorted("/".join(map(str, p)) for p in src if p not in used)
  problems = []
  if missing:
    problems.append(f"parameters with no source: {missing[:6]}{' ...' if len(missing) > 6 else ''}")
  if mismatched:
    problems.append(f"shapes differ: {mismatched[:6]}{' ...' if len(mismatched) > 6 else ''}")
  if unused:
    problems.append(f"source parameters nothing reads: {unused[:6]}{' ...' if len(unused) > 6 else ''}")
  if problems:
    raise ValueError("init_from: the source model does not fit this config (set config.model to the source's "
                     "sizes): " + "; ".join(problems))
  for path, origin in origins.items():
    variable = target[path]
    value = jnp.asarray(src[origin], variable[...].dtype)
    sharding_ = getattr(variable[...], "sharding", None)
    variable[...] = jax.device_put(value, sharding_) if sharding_ is not None else value
  return {"copied": len(origins), "kept_init": kept, "mapped": mapped}


def load_checkpoint(workdir: str | os.PathLike, config: ml_collections.ConfigDict | None = None, *,
                    step: int | None = None) -> tuple[Transformer, ml_collections.ConfigDict]:
  """(model, config) restored from a run's checkpoint onto the mesh of `config` (default: the run's own
  `config.json`, whose `mesh` may be edited first). Any mesh shape can read any checkpoint; the quantisation
  groups are the ones the run trained with (they are part of the model's function). Only the model's arrays are
  read (an orbax partial restore): the optimiser state, twice the parameters' bytes under Adam, stays on disk.
  """
  workdir = Path(workdir)
  directory = (workdir / "checkpoints").absolute()
  if config is None:
    if not (workdir / "config.json").exists():
      raise FileNotFoundError(f"{workdir} has no config.json: not a training run directory")
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  config = config.copy_and_resolve_references()
  config.sharding.per_shard_groups = False   # the trained groups, recorded in config.model, whatever the mesh
  with ocp.CheckpointManager(directory) as manager:
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
      raise FileNotFoundError(f"no checkpoint {'' if step is None else f'at step {step} '}in {directory} "
                              f"(steps there: {list(manager.all_steps())})")
    mesh, rules, model_cfg = setup_mesh(config)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
      model = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
      concrete = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                sharding=jax.sharding.NamedSharding(mesh, x.sharding.spec))
      abstract = {"model": jax.tree.map(concrete, nnx.to_pure_dict(nnx.state(model)))}
      restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True)))
      graphdef, state = nnx.split(model)
      nnx.replace_by_pure_dict(state, restored.state["model"])
      return nnx.merge(graphdef, state), config


# --------------------------------------------------------------------------------------------------------------
# Ahead-of-time: plan a pod run without allocating it.
# --------------------------------------------------------------------------------------------------------------
def lower_train_step(config: ml_collections.ConfigDict):
  """The train step lowered for the configured mesh from abstract (shape-and-sharding only) state.

  Nothing is allocated: the model and optimiser are built with `nnx.eval_shape` under the mesh, so a 3B model
  can be planned for 256 simulated CPU devices on a laptop. Returns `(lowered, model_cfg, abstract_state)`;
  `lowered.compile()` gives XLA's per-device memory analysis and the HLO to count collectives in.
  """
  mesh, rules, model_cfg = setup_mesh(config)
  t = config.train
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    model, optimizer = nnx.eval_shape(_model_and_optimizer(model_cfg, config.optim, t.steps))
    batch = jax.ShapeDtypeStruct((t.batch_size, t.seq_len + 1), jnp.int32,
                                 sharding=sharding.batch_sharding(mesh, rules))
    lowered = lower_step(model, optimizer, batch)
  return lowered, model_cfg, {"model": nnx.state(model), "optimizer": nnx.state(optimizer), "mesh": mesh}


def _per_device_bytes(state) -> int:
  total = 0
  for leaf in jax.tree.leaves(state):
    shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
    total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
  return total


def dry_run(config: ml_collections.ConfigDict) -> dict:
  """Compiles the train step for the configured mesh and reports per-device memory and collectives."""
  t0 = time.perf_counter()
  lowered, model_cfg, abstract = lower_train_step(config)
  compiled = lowered.compile()
  mem = compiled.memory_analysis()
  stats = sharding.collective_stats(compiled.as_text())
  return {
      "name": config.get("name", ""), "mesh": dict(abstract["mesh"].shape), "devices": jax.device_count(),
      "groups": model_cfg.groups, "fsdp_groups": model_cfg.fsdp_groups, "params": count_params(model_cfg),
      "params_bytes_per_device": _per_device_bytes(abstract["model"]),
      "optimizer_bytes_per_device": _per_device_bytes(abstract["optimizer"]),
      "compiled": {key: int(getattr(mem, key + "_in_bytes", 0) or 0)
                   for key in ("argument_size", "output_size", "temp_size", "alias_size",
                               "generated_code_size")} if mem is not None else {},
      "collectives": stats["counts"], "collective_bytes": {k: int(v) for k, v in stats["bytes"].items()},
      "collective_bytes_by_dtype": {op: {dt: int(b) for dt, b in d.items()}
                                    for op, d in stats["bytes_by_dtype"].items() if d},
      "compile_s": time.perf_counter() - t0,
  }


def format_dry_run(report: dict) -> str:
  gb = lambda b: f"{b / 2**30:.3f} GiB" if b >= 2**30 else f"{b / 2**20:.2f} MiB"
  c = report["compiled"]
  lines = [f"dry run: {report['name']} on mesh {report['mesh']} ({report['devices']} devices), quantisation "
           f"groups {report['groups']} x fsdp {report['fsdp_groups']}, {report['params']['total']:,} parameters "
           f"(compiled in {report['compile_s']:.0f} s)",
           f"  per device: parameters {gb(report['params_bytes_per_device'])}, optimiser state "
           f"{gb(report['optimizer_bytes_per_device'])}",
           f"  compiled step per device (XLA memory analysis): arguments {gb(c.get('argument_size', 0))}, "
           f"outputs {gb(c.get('output_size', 0))}, temporaries {gb(c.get('temp_size', 0))}, aliased "
           f"{gb(c.get('alias_size', 0))}",
           "  collectives per step: " + ", ".join(
               f"{op} {n} ({report['collective_bytes'][op] / 2**20:.2f} MiB: " + ", ".join(
                   f"{dt} {b / 2**20:.2f}" for dt, b in report["collective_bytes_by_dtype"].get(op, {}).items())
               + ")" for op, n in report["collectives"].items() if n)]
  return "\n".join(lines)


def format_summary(summary: dict) -> str:
  mem = summary["weight_memory"]
  lines = [f"{summary['name']} ({summary['variant']}): {summary['steps']} steps, {summary['tokens']:,} tokens, "
           f"{summary['wall_s']:.0f} s",
           f"  train loss {summary['final_train_loss']:.4f} | eval loss {summary['eval_loss']:.4f} nats/token "
           f"({summary['eval_bits_per_token']:.3f} bits) | eval ppl {summary['eval_ppl']:.3f}",
           f"  {summary['tokens_per_s'] or 0:.0f} tokens/s | params {summary['params']['total']:,} | weights "
           f"{mem['trained_mb']:.2f} MB trained, {mem['packed_2bit_mb']:.2f} MB packed (2-bit)"]
  if "sample" in summary:
    lines.append(f"  sample: {summary['sample']!r}")
  return "\n".join(lines)


def main(argv) -> None:
  from absl import flags, logging
  del argv
  logging.set_verbosity(logging.WARNING)   # orbax logs every save at INFO, which buries the progress bar
  if flags.FLAGS.dry_run:
    report = dry_run(flags.FLAGS.config)
    print(format_dry_run(report))
    if flags.FLAGS.workdir:
      Path(flags.FLAGS.workdir).mkdir(parents=True, exist_ok=True)
      (Path(flags.FLAGS.workdir) / "dry_run.json").write_text(json.dumps(report, indent=2))
    return
  if not flags.FLAGS.workdir:
    raise app.UsageError("--workdir is required (except with --dry_run)")
  summary = train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
  if jax.process_index() == 0:
    print(format_summary(summary))


def _simulate_devices_from_argv(argv: list[str]) -> None:
  """`--simulate_devices=N`: N CPU devices, for planning a pod run on a laptop. XLA reads the flag when the
  backend starts, which happens while the config file is parsed, so it is set here, before flag parsing."""
  for arg in argv:
    if arg.startswith("--simulate_devices="):
      n = int(arg.split("=", 1)[1])
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                 f" --xla_force_host_platform_device_count={n}").strip()
      os.environ.setdefault("JAX_PLATFORMS", "cpu")


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "a configs/*.py file, e.g. configs/lm.py:b158-tiny",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "run directory (resumed if it holds a checkpoint)")
  flags.DEFINE_bool("dry_run", False, "compile the train step for the configured mesh from abstract state and "
                    "print per-device memory and collectives, without allocating or training")
  flags.DEFINE_integer("simulate_devices", None, "simulate this many CPU devices (with --dry_run: plan a pod run)")
  flags.mark_flags_as_required(["config"])
  _simulate_devices_from_argv(sys.argv)
  sys.path.insert(0, os.getcwd())   # so config files can import `configs.common`
  app.run(main)
