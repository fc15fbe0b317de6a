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

from bitnet_jax import data, optim
from bitnet_jax.generate import greedy
from bitnet_jax.layers import BitLinear
from bitnet_jax.model import ModelConfig, Transformer, count_params


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf; the run stopped before checkpointing that state."""


def model_config_from(config: ml_collections.ConfigDict) -> ModelConfig:
  return ModelConfig(**config.model.to_dict())


def _check_config(config: ml_collections.ConfigDict, model_cfg: ModelConfig) -> None:
  t = config.train
  for key in ("steps", "batch_size", "seq_len", "eval_every", "checkpoint_every", "log_every", "keep_checkpoints"):
    if not isinstance(t[key], int) or t[key] < 1:
      raise ValueError(f"config.train.{key} must be a positive int, got {t[key]!r}")
  if t.seq_len > model_cfg.max_seq_len:
    raise ValueError(f"config.train.seq_len={t.seq_len} is longer than the model's maximum "
                     f"config.model.max_seq_len={model_cfg.max_seq_len}")
  n_data = jax.device_count()   # every device is data-parallel until a mesh config says otherwise
  if t.batch_size % n_data:
    raise ValueError(f"config.train.batch_size={t.batch_size} is not divisible by the {n_data} data-parallel "
                     f"devices")
  if model_cfg.vocab_size < data.ByteTokenizer.vocab_size:
    raise ValueError(f"config.model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
                     f"{data.ByteTokenizer.vocab_size} ids")


def loss_fn(model: Transformer, batch: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy in nats per token. batch: int32 [B, T + 1]."""
  logits = model(batch[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


@nnx.jit
def train_step(model: Transformer, optimizer: nnx.Optimizer, batch: jax.Array):
  loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
  optimizer.update(model, grads)
  # inject_hyperparams records the rate of the update it just applied, so it is read after `update`.
  return loss, optax.tree.norm(grads), optim.current_lr(optimizer.opt_state)


@nnx.jit
def eval_step(model: Transformer, batch: jax.Array) -> jax.Array:
  return loss_fn(model, batch)


def weight_memory(model: Transformer) -> dict[str, float]:
  """Weight bytes as trained (float32 latent) and deployed: BitLinear kernels of a quantised model at 2 bits
  (2-bit packing) and 1.6 bits (base-3 packing) plus one float32 scale per group; everything else at 16 bits.
  An FP model is deployed at 16 bits throughout. Computed from shapes (a model, not a measurement)."""
  total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  linears = [m for _, m in nnx.iter_graph(model) if isinstance(m, BitLinear)]
  quantised = [m for m in linears if m.weight_quant != "none"]
  q_weights = sum(m.kernel[...].size for m in quantised)
  scales = sum(m.groups for m in quantised) * 4
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


def _evaluate(model: Transformer, batches: list[np.ndarray]) -> dict[str, float]:
  loss = float(np.mean([float(eval_step(model, jnp.asarray(b))) for b in batches]))
  return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_bits_per_token": loss / math.log(2)}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                       progress: bool = True, stop_at_step: int | None = None) -> dict:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint) and returns the run summary.

  `stop_at_step` ends this invocation early, with a checkpoint, at that step of the same `train.steps` run (the
  schedule is unchanged): for preemptible jobs, and for testing resume.
  """
  # ---------------------------------------------------------------- 1. run record
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  model_cfg = model_config_from(config)
  _check_config(config, model_cfg)
  t = config.train
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

  # ---------------------------------------------------------------- 2. data
  tokenizer = data.ByteTokenizer()
  corpus = data.load_corpus(config.data.source, valid_fraction=config.data.valid_fraction,
                            text_key=config.data.text_key)
  (workdir / "data.json").write_text(json.dumps(corpus.summary(), indent=2))
  train_it = data.train_iterator(corpus.train, batch_size=t.batch_size, seq_len=t.seq_len, seed=t.seed)
  eval_set = data.eval_batches(corpus.valid, batch_size=t.batch_size, seq_len=t.seq_len,
                               max_batches=config.data.eval_batches)

  # ---------------------------------------------------------------- 3. model and optimiser
  model = Transformer(model_cfg, rngs=nnx.Rngs(t.seed))
  optimizer = nnx.Optimizer(model, optim.make_optimizer(config.optim, t.steps), wrt=nnx.Param)

  # ---------------------------------------------------------------- 4. restore
  manager = ocp.CheckpointManager(
      (workdir / "checkpoints").absolute(),
      options=ocp.CheckpointManagerOptions(max_to_keep=t.keep_checkpoints,
                                           enable_async_checkpointing=t.async_checkpoint))
  modules = {"model": model, "optimizer": optimizer}
  state = lambda: {name: nnx.to_pure_dict(nnx.state(m)) for name, m in modules.items()}
  start = manager.latest_step() or 0
  if start:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state())
    restored = manager.restore(start, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                              data=grain.checkpoint.CheckpointRestore(train_it)))
    for name, m in modules.items():
      nnx.replace_by_pure_dict(sub := nnx.state(m), restored.state[name])
      nnx.update(m, sub)
  metrics_path = workdir / "metrics.jsonl"
  history = read_metrics(metrics_path, start)
  metrics_path.write_text("".join(json.dumps(r) + "\n" for r in history))

  def save(step: int) -> None:
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state()),
                                               data=grain.checkpoint.CheckpointSave(train_it)))

  # ---------------------------------------------------------------- 5. loop
  tokens_per_step = t.batch_size * t.seq_len
  bar = tqdm(total=t.steps, initial=start, disable=not progress, desc=config.get("name", "train"),
             unit="step", dynamic_ncols=True, file=sys.stdout)
  last_time, last_step, wall0 = time.perf_counter(), start, time.perf_counter()
  # TensorBoard events in WORKDIR/tensorboard; on resume, events past the restored step are hidden (purge_step).
  writer = SummaryWriter(str(workdir / "tensorboard"), purge_step=start + 1 if start else None)
  last = t.steps if stop_at_step is None else min(stop_at_step, t.steps)
  with metrics_path.open("a") as log, writer:
    for step in range(start + 1, last + 1):
      loss, grad_norm, lr = train_step(model, optimizer, jnp.asarray(next(train_it)))
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
        log.write(json.dumps(row) + "\n")
        log.flush()
        for key, value in row.items():
          if key != "step":
            writer.add_scalar(f"{'eval' if key.startswith('eval') else 'train'}/{key}", value, step)
        history.append(row)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)
        last_time, last_step = time.perf_counter(), step
      if step % t.checkpoint_every == 0 or step == last:
        save(step)
  bar.close()
  manager.wait_until_finished()
  manager.close()

  # ---------------------------------------------------------------- 6. summary
  # The loop evaluates its last step; a finished run being re-opened restores that same state, so its logged eval
  # is reused rather than recomputed. Only a run stopped early (stop_at_step) evaluates here.
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
  }
  if t.sample_tokens:
    prompt = tokenizer.encode("def ")
    out = greedy(model, jnp.asarray(prompt)[None], t.sample_tokens)
    summary["sample"] = tokenizer.decode(np.asarray(out[0]))
  (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
  return summary


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
  summary = train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
  print(format_summary(summary))


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "a configs/*.py file, e.g. configs/lm.py:b158-tiny",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "run directory (resumed if it holds a checkpoint)")
  flags.mark_flags_as_required(["config", "workdir"])
  sys.path.insert(0, os.getcwd())   # so config files can import `configs.common`
  app.run(main)
