"""sharding: device meshes, logical-axis rules, per-shard quantisation groups, collectives (model -> sharding -> train).

Parameters and activations carry logical axis names only (`embed`, `heads`, `kv_heads`, `mlp`, `vocab` for
parameters; `batch`, `length`, `act_*` for activations). One rules table, `DEFAULT_RULES` (or the config's
`sharding.rules`), maps them to the axes of a 3-D mesh (`data`, `fsdp`, `tensor`):

  * data parallel:   the batch is split over `data`; parameters are replicated.
  * FSDP:            the batch is split over `fsdp` too, and every parameter's d_model (`embed`) axis is sharded
                     over it; a BitLinear gathers int8 codes, not float32 latent weights (`layers.BitLinear`).
  * tensor parallel: Megatron layout: q/k/v/gate/up are column-parallel (output features over `tensor`), o/down
                     row-parallel (input features over `tensor`); the vocabulary is split over `tensor` too.

Per-shard group quantisation (BitNet section 2.3): with tensor size T and FSDP size F, `with_quant_groups`
sets the model's `groups = T` (weight statistics per output shard of column-parallel layers, and weight, absmax
and sub-norm statistics per input shard of row-parallel ones) and `fsdp_groups = F` (weight statistics per FSDP
shard), so no device needs another's statistics. `collective_stats` counts the collectives of a compiled step;
the tests show b1.58 adds none to the FP step on the same mesh, and that a single global statistic does.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or axes, or None: replicated). MaxText-style: the one place sharding is decided.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


# ------------------------------------------------------------------------------------------------------------
# Meshes and rules.
# ------------------------------------------------------------------------------------------------------------
def mesh_shape(sizes: Mapping[str, int], n_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) from the config's `mesh` sizes; one of them may be -1 for "the rest of the devices"."""
  shape = [int(sizes.get(axis, 1)) for axis in MESH_AXES]
  rest = [i for i, n in enumerate(shape) if n == -1]
  if len(rest) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, shape))}")
  for axis, n in zip(MESH_AXES, shape):
    if n == 0 or n < -1:
      raise ValueError(f"mesh.{axis}={n}: axis sizes must be positive (or -1 for the remaining devices)")
  known = math.prod(n for n in shape if n != -1)
  if rest:
    if n_devices % known:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))}: the fixed axes ({known} devices) do not divide the "
                       f"{n_devices} available devices")
    shape[rest[0]] = n_devices // known
  if math.prod(shape) != n_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices but {n_devices} are "
                     f"available (jax.device_count()); set one axis to -1 to use the rest")
  return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes), axes of type Auto."""
  devices = list(devices) if devices is not None else jax.devices()
  shape = mesh_shape(sizes, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def rules_from(config_rules) -> tuple[tuple[str, Any], ...]:
  """The config's rules (lists, as ml_collections stores them) as the tuple form flax expects."""
  if config_rules is None:
    return DEFAULT_RULES
  rules = []
  for rule in config_rules:
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise ValueError(f"sharding.rules: each rule is (logical_name, mesh_axes), got {rule!r}")
    name, target = rule
    target = tuple(target) if isinstance(target, (list, tuple)) else target
    for axis in (target if isinstance(target, tuple) else (target,)):
      if axis is not None and axis not in MESH_AXES:
        raise ValueError(f"sharding.rules: {name!r} maps to unknown mesh axis {axis!r}; mesh axes are {MESH_AXES}")
    rules.append((name, target))
  return tuple(rules)


def _mesh_axes(rules, name: str | None) -> tuple[str, ...]:
  if name is None:
    return ()
  table = dict(rules)
  if name not in table:
    raise ValueError(f"sharding.rules has no rule for the logical axis {name!r}; add ({name!r}, None) to "
                     f"replicate it")
  target = table[name]
  return () if target is None else (target if isinstance(target, tuple) else (target,))


def axis_size(mesh: Mesh, rules, name: str) -> int:
  """How many shards the logical axis `name` is split into on `mesh`."""
  return math.prod(mesh.shape[a] for a in _mesh_axes(rules, name))


def logical_spec(rules, names: Sequence[str | None]) -> P:
  axes = [_mesh_axes(rules, n) for n in names]
  return P(*[None if not a else (a[0] if len(a) == 1 else a) for a in axes])


def data_parallel_size(mesh: Mesh, rules=DEFAULT_RULES) -> int:
  """The number of batch shards (the batch size must divide by it)."""
  return axis_size(mesh, rules, "batch")


# ------------------------------------------------------------------------------------------------------------
# Quantisation groups aligned with the shards, and validation of a model against a mesh.
# ------------------------------------------------------------------------------------------------------------
def with_quant_groups(model_cfg, mesh: Mesh, rules=DEFAULT_RULES):
  """The model config with `groups` = the tensor-parallel shard count and `fsdp_groups` = the FSDP one.

  The group counts are those of the logical axes the BitLinears group: `mlp`/`heads` for `groups`, `embed`
  for `fsdp_groups` (BitNet section 2.3: G equal to the number of model-parallel partitions).
  """
  groups = axis_size(mesh, rules, "mlp")
  for other in ("heads", "kv_heads"):
    if axis_size(mesh, rules, other) not in (1, groups):
      raise ValueError(f"per-shard groups need {other!r} split like 'mlp' ({groups} ways) or not at all; the "
                       f"rules split it {axis_size(mesh, rules, other)} ways")
  return model_cfg.replace(groups=groups, fsdp_groups=axis_size(mesh, rules, "embed"))


def check_model(model_cfg, mesh: Mesh, rules=DEFAULT_RULES) -> None:
  """Raises a ValueError naming the parameter, dimension and mesh axis for every dimension not divisible by the
  number of shards its logical axis maps to; also checks that tensor shards hold whole attention heads."""
  from bitnet_jax.model import Transformer   # one-way flow: model is below sharding

  abstract = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
  problems = []
  for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
    for dim, (size, name) in enumerate(zip(var.shape, names)):
      shards = axis_size(mesh, rules, name) if name else 1
      if size % shards:
        problems.append(f"parameter {'/'.join(map(str, path))} dimension {dim} ({name!r}, size {size}) is not "
                        f"divisible by its {shards} shards over mesh axes {_mesh_axes(rules, name)}")
  for what, n, name in (("n_heads", model_cfg.n_heads, "heads"), ("n_kv_heads", model_cfg.n_kv_heads, "kv_heads")):
    shards = axis_size(mesh, rules, name)
    if n % shards:
      problems.append(f"ModelConfig.{what}={n} is not divisible by the {shards} tensor shards of {name!r}: a "
                      f"shard must hold whole heads (pad the heads or map {name!r} to None in sharding.rules)")
  if problems:
    hint = " (pad vocab_size to a multiple of the shard count)" if any("vocab" in p for p in problems) else ""
    raise ValueError(f"the model does not fit mesh {dict(mesh.shape)}:\n  " + "\n  ".join(problems) + hint)


# ------------------------------------------------------------------------------------------------------------
# Feeding data: each process passes only its own rows of the global batch.
# ------------------------------------------------------------------------------------------------------------
def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES, ndim: int = 2) -> NamedSharding:
  return NamedSharding(mesh, logical_spec(rules, ("batch",) + (None,) * (ndim - 1)))


def process_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> np.ndarray:
  """Indices of the global batch's rows that this process's devices hold, in increasing order."""
  rows = set()
  for index in sharding.addressable_devices_indices_map(global_shape).values():
    rows.update(range(*index[0].indices(global_shape[0])))
  return np.asarray(sorted(rows))


def shard_batch(global_batch: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global jax.Array from the host batch; only this process's rows are transferred (multi-host safe).

  Every process computes the same global batch (the data order is a function of the seed), so a run on P
  processes sees exactly the batches of a run on one.
  """
  rows = process_rows(sharding, global_batch.shape)
  return jax.make_array_from_process_local_data(sharding, np.ascontiguousarray(global_batch[rows]),
                                                global_batch.shape)


# ------------------------------------------------------------------------------------------------------------
# Multi-host.
# ------------------------------------------------------------------------------------------------------------
def initialize_distributed(cfg: Mapping[str, Any] | None = None) -> bool:
  """Calls `jax.distributed.initialize` when the config or the environment asks for several processes.

  `cfg` keys (the config's `distributed` block): `coordinator_address` ("host:port"; empty: unset),
  `num_processes`, `process_id`. Without an address, it initialises from the environment when it shows a
  multi-process job (SLURM with more than one task, a multi-host TPU slice, or `JAX_COORDINATOR_ADDRESS`), where
  jax reads the settings itself. Returns whether this process is part of a multi-process job. Idempotent; call
  it before anything touches the devices.
  """
  global _DISTRIBUTED
  if _DISTRIBUTED:
    return True
  cfg = dict(cfg or {})
  address = cfg.get("coordinator_address") or ""
  if address:
    n, i = cfg.get("num_processes"), cfg.get("process_id")
    if n is None or i is None or int(n) < 1 or not 0 <= int(i) < int(n):
      raise ValueError(f"distributed.coordinator_address={address!r} needs distributed.num_processes >= 1 and "
                       f"0 <= distributed.process_id < num_processes, got {n!r} and {i!r}")
    jax.distributed.initialize(coordinator_address=address, num_processes=int(n), process_id=int(i))
    _DISTRIBUTED = True
    return True
  env = os.environ
  slurm = int(env.get("SLURM_NTASKS", "1")) > 1
  tpu_pod = "," in env.get("TPU_WORKER_HOSTNAMES", "")
  if slurm or tpu_pod or env.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize()
    _DISTRIBUTED = True
  return _DISTRIBUTED


_DISTRIBUTED = False


# ------------------------------------------------------------------------------------------------------------
# Collective accounting in compiled HLO.
# ------------------------------------------------------------------------------------------------------------
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "s4": 0.5, "u4": 0.5, "s2": 0.25, "u2": 0.25}
_OP = re.compile(r"=\s*(?P<type>.*?)\s(?P<op>" + "|".join(COLLECTIVES) + r")(?P<start>-start)?\(")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


def _arrays(type_text: str) -> list[tuple[str, float]]:
  """(dtype, bytes) of each array in an HLO type, e.g. "(s8[64,64]{1,0}, f32[4]{0})"."""
  out = []
  for dtype, dims in _ARRAY.findall(type_text):
    if dtype in _DTYPE_BYTES:
      out.append((dtype, _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)))
  return out


def collective_stats(hlo_text: str) -> dict[str, Any]:
  """Counts each collective in compiled HLO text, and the bytes each kind produces per device.

  Async pairs (`all-gather-start` / `-done`) count once. Bytes sum the op's result arrays; for an all-gather
  that is the gathered (whole) size per device. Returns {"counts": {op: n}, "bytes": {op: b},
  "bytes_by_dtype": {op: {dtype: b}}}.
  """
  counts = {op: 0 for op in COLLECTIVES}
  nbytes = {op: 0.0 for op in COLLECTIVES}
  by_dtype: dict[str, dict[str, float]] = {op: {} for op in COLLECTIVES}
  for line in hlo_text.splitlines():
    m = _OP.search(line)
    if not m:
      continue
    op = m.group("op")
    counts[op] += 1
    arrays = _arrays(m.group("type"))
    if m.group("start") and len(arrays) >= 2:
      arrays = arrays[len(arrays) // 2:]   # a start op's type is (operands..., results...)
    for dtype, b in arrays:
      nbytes[op] += b
      by_dtype[op][dtype] = by_dtype[op].get(dtype, 0.0) + b
  return {"counts": counts, "bytes": nbytes, "bytes_by_dtype": by_dtype}
