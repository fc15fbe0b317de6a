"""weights: a run's trained weights read back (`load_checkpoint`: generate, export, lm_eval, experiments) and copied
into another model for fine-tuning (`init_from`) (step -> weights -> train).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from bitnet_jax import checkpoint
from bitnet_jax.layers import BitLinear
from bitnet_jax.quant_successors import seq_init_scale
from bitnet_jax.model import Transformer
from bitnet_jax.step import setup_mesh


def check_init_source(spec: str) -> None:
  """Raises (ValueError, FileNotFoundError) if `config.train.init_from` cannot name a model: checked before a run
  writes anything, `load_init_source` reads it later."""
  kind, _, path = str(spec).partition(":")
  if kind not in ("hf", "run") or not path:
    raise ValueError(f"config.train.init_from={spec!r} must be 'hf:DIR' or 'run:WORKDIR'")
  if kind == "run" and not (Path(path) / "config.json").exists():
    raise FileNotFoundError(f"config.train.init_from={spec!r}: {path} has no config.json: not a training run")
  if kind == "hf" and not Path(path).is_dir():
    raise FileNotFoundError(f"config.train.init_from={spec!r}: {path} is not a directory")


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
  is an error unless it is a norm gain (left at its init, 1) or a learned weight scale (ParetoQ's `weight_scale`,
  set to max|W| of each output channel of the copied kernel, the paper code's init from an FP model); so is a
  source parameter that nothing reads. Returns {"copied": n, "kept_init": [paths], "mapped": {target: source}}.
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
      initialised = (path[-1] == "scale" and "norm" in path) or path[-1] == "weight_scale"
      (kept if initialised else missing).append("/".join(map(str, path)))
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
  for path, layer in nnx.iter_graph(model):   # learned scales the source lacks start from the copied kernels
    if isinstance(layer, BitLinear) and layer.weight_scale is not None and "/".join(
        map(str, path + ("weight_scale",))) in kept:
      layer.weight_scale[...] = jnp.asarray(seq_init_scale(layer.kernel[...]), layer.weight_scale[...].dtype)
  return {"copied": len(origins), "kept_init": kept, "mapped": mapped}


def load_checkpoint(workdir: str | os.PathLike, config: ml_collections.ConfigDict | None = None, *,
                    step: int | None = None) -> tuple[Transformer, ml_collections.ConfigDict]:
  """(model, config) restored from a run's checkpoint onto the mesh of `config` (default: the run's own
  `config.json`, whose `mesh` may be edited first). Any mesh shape can read any checkpoint; the quantisation
  groups are the ones the run trained with (they are part of the model's function). Only the model's arrays are
  read (an orbax partial restore): the optimiser state, twice the parameters' bytes under Adam, stays on disk.
  The arrays are verified against the step's checksums and checked finite (`checkpoint.restore_intact`): by
  default an unusable latest step is reported and the previous one read; an explicit `step` must be intact.
  """
  workdir = Path(workdir)
  directory = (workdir / "checkpoints").absolute()
  if config is None:
    if not (workdir / "config.json").exists():
      raise FileNotFoundError(f"{workdir} has no config.json: not a training run directory")
    try:
      config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    except ValueError as e:
      raise ValueError(f"{workdir / 'config.json'} is unreadable ({e}): restore it from a copy") from None
  config = config.copy_and_resolve_references()
  config.sharding.per_shard_groups = False   # the trained groups, recorded in config.model, whatever the mesh
  with ocp.CheckpointManager(directory) as manager:
    if not manager.all_steps() or (step is not None and step not in manager.all_steps()):
      raise FileNotFoundError(f"no checkpoint {'' if step is None else f'at step {step} '}in {directory} "
                              f"(steps there: {list(manager.all_steps())})")
    mesh, rules, model_cfg = setup_mesh(config)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
      model = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
      concrete = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                sharding=jax.sharding.NamedSharding(mesh, x.sharding.spec))
      abstract = {"model": jax.tree.map(concrete, nnx.to_pure_dict(nnx.state(model)))}
      args = ocp.args.Composite(state=ocp.args.PyTreeRestore(
          abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True))
      with checkpoint.quiet_orbax_errors():
        _, restored = checkpoint.restore_intact(manager, lambda s: manager.restore(s, args=args),
                                                lambda r: r.state, step=step)
      graphdef, state = nnx.split(model)
      nnx.replace_by_pure_dict(state, restored.state["model"])
      return nnx.merge(graphdef, state), config
