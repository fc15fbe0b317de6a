"""train: the training loop, its run record and the CLI (model -> sharding -> step -> train -> experiments).

    python -m bitnet_jax.train --config=configs/lm.py:b158-tiny --workdir=runs/b158-tiny [--config.train.steps=50]

`train_and_evaluate(config, workdir)` reads top to bottom in phases: mesh and checks, data and the resume check,
model and optimiser, restore, loop, summary. Re-running the same command on the same workdir resumes from the
newest intact checkpoint (model, optimiser state, data-iterator position and step are all in it), and a resumed
run produces the same loss at every step as an uninterrupted one (bitwise on CPU; tested with a real SIGKILL).

What guards a run (tests/test_faults.py):
- one trainer per workdir (`runs.WorkdirLock`, WORKDIR/LOCK);
- a resume that would change the run (model, quantisation, data, tokenizer, batch, sequence length, schedule) is
  refused before anything is written (`runs.check_resume`); safe changes are recorded in `run_history.jsonl`;
- a NaN or Inf loss or gradient norm stops the run, and every save first checks the state finite, so every
  checkpoint is finite (`NonFiniteLossError` names the last one);
- every checkpoint carries checksums of its arrays; a step that fails them or fails to restore is skipped with a
  warning and moved to `checkpoints_corrupt/` (`checkpoint.restore_intact`, `checkpoint.quarantine`);
- a failed background save (disk full, permissions) stops the run with one line once it has resolved;
- `config.json`, `data.json`, `metrics.jsonl` and `summary.json` are replaced atomically, and a torn last line of
  `metrics.jsonl` is dropped on resume.

Outputs in the workdir: `config.json`, `data.json` (corpus and tokenizer fingerprints), `metrics.jsonl` (one
object per logged step: step, loss, lr, grad_norm, tokens_per_s, and eval_loss / eval_ppl / eval_bits_per_token
when evaluated), `tensorboard/` (the same scalars as TensorBoard events), `checkpoints/`, `run_history.jsonl`
(one row per invocation), `summary.json`; `LOCK` while a trainer runs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import threading
import time
from pathlib import Path

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from tensorboardX import SummaryWriter
from tqdm.auto import tqdm

from bitnet_jax import checkpoint, cli, data, runs, sharding
from bitnet_jax.model import ModelConfig, Transformer, count_params
# The step, the weights and the plan live in their own modules; `train.X` keeps naming them all.
from bitnet_jax.plan import dry_run, format_dry_run, lower_train_step  # noqa: F401
from bitnet_jax.runs import read_metrics  # noqa: F401
from bitnet_jax.step import (  # noqa: F401
    _check_config, _model_and_optimizer, _warmup_steps, act_stage2_step, compiler_options, eval_step, loss_fn,
    lower_step, model_config_from, set_activation_stage, setup_mesh, train_step, weight_memory)
from bitnet_jax.weights import check_init_source, init_from, load_checkpoint, load_init_source  # noqa: F401


class NonFiniteLossError(FloatingPointError):
  """The loss, the gradient norm or the updated state became NaN or Inf; the run stopped before checkpointing
  that state (every save checks the state first)."""


def _evaluate(model: Transformer, batches: list[jax.Array]) -> dict[str, float]:
  loss = float(np.mean([float(eval_step(model, b)) for b in batches]))
  return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_bits_per_token": loss / math.log(2)}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                       progress: bool = True, stop_at_step: int | None = None) -> dict:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint) and returns the run summary.

  `stop_at_step` ends this invocation early, with a checkpoint, at that step of the same `train.steps` run (the
  schedule is unchanged): for preemptible jobs, and for testing resume. On several processes every process
  calls this; only process 0 writes logs (and holds the workdir lock), and every process writes its shards of
  the checkpoints. Nothing is written before the config and, on resume, the recorded run are checked.
  """
  # ---------------------------------------------------------------- 1. mesh and checks (nothing written yet)
  sharding.initialize_distributed(config.get("distributed"))
  workdir = Path(workdir)
  mesh, rules, model_cfg = setup_mesh(config)
  tokenizer = data.make_tokenizer(config.data.get("tokenizer", "byte"))   # the checks need its vocabulary
  _check_config(config, model_cfg, tokenizer, sharding.data_parallel_size(mesh, rules))
  runs.check_resume_groups(workdir, model_cfg)
  config = config.copy_and_resolve_references()
  config.model.groups, config.model.fsdp_groups = model_cfg.groups, model_cfg.fsdp_groups   # as trained
  main_process = jax.process_index() == 0
  with (runs.WorkdirLock(workdir) if main_process else contextlib.nullcontext()), checkpoint.quiet_orbax_errors():
    return _train(config, workdir, mesh, rules, model_cfg, tokenizer, progress, stop_at_step)


def _finalized_steps(directory: Path) -> list[int]:
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def _write_atomic(path: Path, text: str) -> None:
  """Writes `path` through a temporary file and a rename: a kill leaves the old file or the new, never half."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def _finish_saves(manager) -> None:
  try:
    manager.wait_until_finished()
    manager.close()
  except Exception:  # noqa: BLE001 (a failed save: the steps before it are intact; an unfinished one is ignored)
    pass


def _non_finite_stop(manager, directory: Path, what: str) -> NonFiniteLossError:
  try:
    manager.wait_until_finished()
  except Exception:  # noqa: BLE001 (a failed save leaves the earlier steps; they are listed below)
    pass
  manager.close()
  steps = _finalized_steps(directory)
  where = (f"the last checkpoint, step {steps[-1]}, holds finite state (each save is checked first); start a new "
           f"run from it with --config.train.init_from=run:{directory.parent}" if steps else
           "no checkpoint was saved before it")
  return NonFiniteLossError(f"{what}: stopping; {where}")


def _train(config, workdir: Path, mesh, rules, model_cfg: ModelConfig, tokenizer, progress: bool,
           stop_at_step: int | None) -> dict:
  t = config.train
  main_process = jax.process_index() == 0
  ckpt_dir = (workdir / "checkpoints").absolute()

  # ---------------------------------------------------------------- 2. data, and the resume check
  # Every process computes the same global batches from the seed and transfers only its own rows.
  corpus = data.load_corpus(config.data.source, valid_fraction=config.data.valid_fraction,
                            test_fraction=config.data.get("test_fraction", 0.0), text_key=config.data.text_key,
                            tokenizer=tokenizer)
  config_json = config.to_json_best_effort(indent=2)
  saved = _finalized_steps(ckpt_dir)
  if not saved and t.get("init_from"):
    check_init_source(t.init_from)
  changes = (runs.check_resume(workdir, json.loads(config_json), corpus.summary(), saved[-1]) if saved
             else {"allowed": {}, "added": []})
  if main_process:   # the run record, written only once the checks have passed
    workdir.mkdir(parents=True, exist_ok=True)
    _write_atomic(workdir / "config.json", config_json)
    _write_atomic(workdir / "data.json", json.dumps(corpus.summary(), indent=2))
  train_it = data.train_iterator(corpus.train, batch_size=t.batch_size, seq_len=t.seq_len, seed=t.seed)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  eval_set = [sharding.shard_batch(b, batch_sharding) for b in
              data.eval_batches(corpus.valid, batch_size=t.batch_size, seq_len=t.seq_len,
                                max_batches=config.data.eval_batches)]

  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    # -------------------------------------------------------------- 3. model and optimiser, sharded at creation
    model, optimizer = nnx.jit(_model_and_optimizer(model_cfg, config.optim, t.steps, t.seed))()

    # -------------------------------------------------------------- 4. restore the newest intact checkpoint
    manager = ocp.CheckpointManager(
        ckpt_dir, options=ocp.CheckpointManagerOptions(max_to_keep=t.keep_checkpoints,
                                                       enable_async_checkpointing=t.async_checkpoint))
    modules = {"model": model, "optimizer": optimizer}
    state = lambda: {name: nnx.to_pure_dict(nnx.state(m)) for name, m in modules.items()}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state())   # onto this mesh, whatever mesh wrote it
    start, restored = checkpoint.restore_intact(
        manager, lambda s: manager.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(train_it))),
        lambda r: r.state)
    start = start or 0
    if restored is not None:
      for name, m in modules.items():
        nnx.replace_by_pure_dict(sub := nnx.state(m), restored.state[name])
        nnx.update(m, sub)
      newer = [s for s in manager.all_steps() if s > start]
      if newer and main_process:   # moved aside (not deleted) so that those steps can be saved again
        moved = checkpoint.quarantine(manager, newer, workdir)
        print(f"warning: resuming from step {start}; unusable later steps moved to "
              f"{', '.join(map(str, moved))}", file=sys.stderr)
    elif t.get("init_from"):   # a fresh run starting from other weights (a resumed run has its own)
      report = init_from(model, load_init_source(t.init_from))
      if main_process:
        print(f"init_from {t.init_from}: {report['copied']} parameters copied, "
              f"{len(report['kept_init'])} norm gains left at their init", file=sys.stderr)
    metrics_path = workdir / "metrics.jsonl"
    history = read_metrics(metrics_path, start)   # a torn last line, and rows after `start`, dropped
    if main_process:
      _write_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in history))
      runs.append_history(workdir, {"start_step": start, "steps": t.steps, "stop_at_step": stop_at_step,
                                    "changes": changes["allowed"], "new_fields": changes["added"]})

    pending = {"step": None}   # the step of a save that may still be in flight

    def save_failed(failed: int, error: BaseException) -> checkpoint.CheckpointError:
      pending["step"] = None
      checkpoint.failed_save_happened()
      try:
        manager.close()
      except Exception:  # noqa: BLE001 (the same error again)
        pass
      done = [s for s in _finalized_steps(ckpt_dir) if s != failed]
      return checkpoint.CheckpointError(
          f"saving the checkpoint of step {failed} to {ckpt_dir} failed: {checkpoint.save_error(error)}; the "
          f"last complete checkpoint is {f'step {done[-1]}' if done else 'none'}; free space (or fix the "
          "permissions) and rerun the same command to resume from it")

    def check_saves() -> None:   # a failed background save stops the run once it has resolved
      if pending["step"] is None:
        return
      error = checkpoint.finished_save_error(manager)
      if error is not None:
        raise save_failed(pending["step"], error)
      if not manager.is_saving_in_progress():
        pending["step"] = None

    def save(step: int) -> None:
      now = state()
      bad = checkpoint.non_finite(now)
      if bad:
        raise _non_finite_stop(manager, ckpt_dir, f"the update of step {step} made {len(bad)} arrays non-finite "
                               f"({', '.join(bad[:3])})")
      check_saves()
      try:   # orbax first waits for the save before: its failure, or this save's own, raises here
        manager.save(step, args=checkpoint.save_args(now, data=grain.checkpoint.CheckpointSave(train_it)))
      except Exception as e:  # noqa: BLE001
        raise save_failed(pending["step"] or step, e) from None
      pending["step"] = step
      check_saves()

    # -------------------------------------------------------------- 5. loop
    tokens_per_step = t.batch_size * t.seq_len
    bar = tqdm(total=t.steps, initial=start, disable=not (progress and main_process),
               desc=config.get("name", "train"), unit="step", dynamic_ncols=True, file=sys.stdout)
    last_time, last_step, wall0 = time.perf_counter(), start, time.perf_counter()
    # TensorBoard events in WORKDIR/tensorboard; on resume, events past the restored step are hidden (purge_step).
    writer = (SummaryWriter(str(workdir / "tensorboard"), purge_step=start + 1 if start else None)
              if main_process else None)
    last = t.steps if stop_at_step is None else min(stop_at_step, t.steps)
    stage2 = act_stage2_step(config)   # the two-stage recipe: stage-1 activations up to this step
    if stage2 and start < stage2:
      set_activation_stage(model, t.stage1_act_quant)
    try:
      with contextlib.closing(bar), (metrics_path.open("a") if main_process else contextlib.nullcontext()) as log, \
          (writer or contextlib.nullcontext()):
        for step in range(start + 1, last + 1):
          if stage2 and step == stage2 + 1:
            set_activation_stage(model, None)
          batch = sharding.shard_batch(next(train_it), batch_sharding)
          loss, grad_norm, lr = train_step(model, optimizer, batch, quant_warmup_steps=_warmup_steps(config))
          loss, grad_norm = float(loss), float(grad_norm)
          if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise _non_finite_stop(manager, ckpt_dir, f"loss is {loss} (gradient norm {grad_norm}) at step {step}")
          check_saves()
          bar.update(1)
          evaluate = step % t.eval_every == 0 or step == t.steps
          if step % t.log_every == 0 or evaluate or step == start + 1:
            now = time.perf_counter()
            row = {"step": step, "loss": loss, "lr": float(lr), "grad_norm": grad_norm,
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
    except KeyboardInterrupt:   # Ctrl-C: give the save in flight up to a minute to complete
      finisher = threading.Thread(target=_finish_saves, args=(manager,), daemon=True)
      finisher.start()
      finisher.join(timeout=60)   # an interrupted orbax call can leave it waiting forever: not this process
      raise
    if pending["step"] is not None:
      while manager.is_saving_in_progress():
        time.sleep(0.05)
      check_saves()
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
    _write_atomic(workdir / "summary.json", json.dumps(summary, indent=2))
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
  if flags.FLAGS.dry_run:
    report = dry_run(flags.FLAGS.config)
    print(format_dry_run(report))
    if flags.FLAGS.workdir:
      Path(flags.FLAGS.workdir).mkdir(parents=True, exist_ok=True)
      (Path(flags.FLAGS.workdir) / "dry_run.json").write_text(json.dumps(report, indent=2))
    return
  if not flags.FLAGS.workdir:
    raise ValueError("--workdir is required (except with --dry_run)")
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


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a config file that fails to load, a misspelt `--config.KEY` or a bad option value
  reported as one `train: error:` line (`cli`) instead of absl's multi-line dump."""
  from absl import flags
  try:
    rest = flags.FLAGS(argv)
    flags.FLAGS.config.keys()   # a config file that failed to load raises only when read
  except (flags.Error, OSError, ValueError, AttributeError, TypeError, SyntaxError) as e:
    if cli.debug_requested(argv[1:]):
      raise
    print(f"train: error: {_flag_error_message(e, argv)}", file=sys.stderr)
    sys.exit(cli.EXIT_ERROR)
  return rest


def _flag_error_message(e: BaseException, argv: list[str]) -> str:
  """One line naming the flag and what is wrong with it, from absl's and ml_collections' messages."""
  text = str(e.args[0]) if isinstance(e, AttributeError) and e.args else str(e)
  lines = [line.strip().strip("'\"") for line in text.replace("\\n", "\n").splitlines() if line.strip()]
  config_arg = next((a for a in argv if a.startswith("--config=")), "--config")
  if isinstance(e, SyntaxError):
    return f"{config_arg}: {e}"
  if "Error whilst parsing config file" in text:   # get_config raised: its last line is the message
    return f"{config_arg}: {lines[-1].split(': ', 1)[-1]}"
  if "Failed loading config file" in text:
    return f"{config_arg}: cannot load the config file ({text.strip().splitlines()[-1].strip()})"
  if isinstance(e, AttributeError) and lines:   # an override of a key the config does not have
    key = lines[0].strip("'\\")
    flag = next((a.split("=")[0] for a in argv if a.startswith("--config.") and a.split("=")[0].endswith(key)),
                f"--config.{key}")
    return f"{flag}: no such config key" + (f" ({' '.join(lines[1:])})" if len(lines) > 1 else "")
  return cli.one_line(e)


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "a configs/*.py file, e.g. configs/lm.py:b158-tiny",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "run directory (resumed if it holds a checkpoint)")
  flags.DEFINE_bool("dry_run", False, "compile the train step for the configured mesh from abstract state and "
                    "print per-device memory and collectives, without allocating or training")
  flags.DEFINE_integer("simulate_devices", None, "simulate this many CPU devices (with --dry_run: plan a pod run)")
  flags.DEFINE_bool("debug", False, f"show the traceback of an error (also {cli.DEBUG_ENV}=1)")
  flags.mark_flags_as_required(["config"])
  _simulate_devices_from_argv(sys.argv)
  sys.path.insert(0, os.getcwd())   # so config files can import `configs.common`
  try:
    app.run(lambda argv: cli.run("train", lambda _: main(argv), sys.argv[1:]), flags_parser=_parse_flags)
  except SystemExit as e:
    if e.code == 130:   # interrupted: orbax's threads may be stuck in the interrupted save; leave without them
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(130)
    raise
