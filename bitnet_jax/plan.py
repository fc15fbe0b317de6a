"""plan: a pod run planned without allocating it: the train step compiled for the configured mesh from abstract
state, with XLA's per-device memory and the collectives per step (step -> plan -> train's `--dry_run`).
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from bitnet_jax import sharding
from bitnet_jax.model import count_params
from bitnet_jax.step import _model_and_optimizer, lower_step, setup_mesh


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
