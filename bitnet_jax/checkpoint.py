"""checkpoint: saved steps that prove their integrity, and restores that skip the ones that do not (beside train:
train and load_checkpoint call it; it imports nothing of ours but cli).

orbax's files carry no checksums of their own (OCDBT data files, tensorstore 0.1.86): eight zero bytes written
into a data file restore silently as NaN weights. So every step saved through `save_args` carries, next to the
state, a `checksums` item: for each array, two 32-bit sums of its raw bits (`array_checksum`). `restore_intact`
recomputes them after a restore, checks that every float array is finite, and on any failure (a file that is
missing, garbled or fails its checksums) warns naming the step and tries the previous one.

`array_checksum` is a Fletcher-style pair over the array's bits read as unsigned integers u_i (flattened in
row-major order): (sum_i u_i, sum_i (2i + 1) u_i), both mod 2^32. Integer addition mod 2^32 is associative, so
the pair is the same bit for bit whatever the reduction order, the CPU or the sharding (a sharded array's sums are
global sums): a checkpoint saved on one mesh verifies when restored onto another. A change of any one element
changes the second sum (2i + 1 is odd, so invertible mod 2^32); a swap of two different elements changes it too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, TypeVar

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from bitnet_jax.cli import UserError, one_line

CHECKSUMS = "checksums"     # the item of a checkpoint that holds them
CORRUPT_DIR = "checkpoints_corrupt"   # where a resumed run moves the steps it could not restore (never deleted)

T = TypeVar("T")


class CheckpointError(UserError):
  """No intact checkpoint to restore, or a save that failed."""


def _bits(x: jax.Array) -> jax.Array:
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  width = jnp.dtype(x.dtype).itemsize * 8
  if width > 32:
    raise ValueError(f"array_checksum: {x.dtype} is wider than 32 bits")
  unsigned = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}[width]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def array_checksum(x: jax.Array) -> jax.Array:
  """uint32 [2]: (sum u_i, sum (2i+1) u_i) mod 2^32 over the bits u of `x` (see the module docstring)."""
  u = _bits(jnp.asarray(x)).reshape(-1)
  weights = jax.lax.iota(jnp.uint32, u.size) * jnp.uint32(2) + jnp.uint32(1)
  return jnp.stack([jnp.sum(u, dtype=jnp.uint32), jnp.sum(u * weights, dtype=jnp.uint32)])


@jax.jit
def _checksums(leaves: list[jax.Array]) -> list[jax.Array]:
  return [array_checksum(x) for x in leaves]


@jax.jit
def _finite(leaves: list[jax.Array]) -> list[jax.Array]:
  return [jnp.all(jnp.isfinite(x)) for x in leaves]


def _flat(tree) -> dict[str, jax.Array]:
  return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def tree_checksums(tree) -> dict[str, list[int]]:
  """{keystr path: [sum, weighted sum]} of every array of `tree` (one jitted program)."""
  flat = _flat(tree)
  sums = jax.device_get(_checksums(list(flat.values())))
  return {key: [int(a), int(b)] for key, (a, b) in zip(flat, sums)}


def non_finite(tree) -> list[str]:
  """The paths of the floating-point arrays of `tree` that hold a NaN or an Inf."""
  flat = {k: v for k, v in _flat(tree).items() if jnp.issubdtype(v.dtype, jnp.inexact)}
  ok = jax.device_get(_finite(list(flat.values())))
  return [key for key, good in zip(flat, ok) if not bool(good)]


def verify(tree, expected: dict[str, list[int]] | None, what: str) -> None:
  """Raises `CheckpointError` if an array of `tree` is not finite or its checksums differ from `expected`
  (arrays of `tree` that `expected` does not list, e.g. a partial restore's, are compared where listed)."""
  bad = non_finite(tree)
  if bad:
    raise CheckpointError(f"{what} holds non-finite values in {len(bad)} arrays ({', '.join(bad[:3])}"
                          f"{' ...' if len(bad) > 3 else ''})")
  if expected is None:
    return
  actual = tree_checksums(tree)
  differ = [key for key, sums in actual.items() if key in expected and expected[key] != sums]
  if differ:
    raise CheckpointError(f"{what} fails its checksums in {len(differ)} arrays ({', '.join(differ[:3])}"
                          f"{' ...' if len(differ) > 3 else ''}): the files were changed after the save")


def save_args(state, **items) -> ocp.args.Composite:
  """The Composite that saves `state` with its checksums (and any further named items, e.g. the data iterator)."""
  return ocp.args.Composite(state=ocp.args.StandardSave(state),
                            **{CHECKSUMS: ocp.args.JsonSave(tree_checksums(state))}, **items)


def has_checksums(directory: str | Path, step: int) -> bool:
  return (Path(directory) / str(step) / CHECKSUMS).exists()


def read_checksums(manager: ocp.CheckpointManager, step: int) -> dict | None:
  """The checksums saved with `step` (None for a checkpoint written before they existed)."""
  if not has_checksums(manager.directory, step):
    return None
  restored = manager.restore(step, args=ocp.args.Composite(**{CHECKSUMS: ocp.args.JsonRestore()}))
  return restored[CHECKSUMS]


def restore_intact(manager: ocp.CheckpointManager, restore: Callable[[int], T], state_of: Callable[[T], Any], *,
                   prefix: str = "", step: int | None = None, warn=None) -> tuple[int | None, T | None]:
  """(step, restore(step)) for the newest step that restores and verifies (`verify`); (None, None) when the
  manager holds no step. A step that fails is reported through `warn(step, message)` (default: a line on
  stderr) and the previous one is tried; if none is intact, `CheckpointError` lists each step's failure.
  `state_of(result)` is the restored tree whose checksums are saved under `prefix` + its own paths. With `step`
  only that step is tried."""
  warn = warn or (lambda s, msg: print(f"warning: checkpoint step {s} in {manager.directory} is unusable: {msg}; "
                                      "trying the previous step", file=sys.stderr))
  steps = sorted(manager.all_steps(), reverse=True) if step is None else [step]
  # steps saved since checksums exist all have them; an older run's earlier steps may not (restored unverified)
  checksummed = [s for s in manager.all_steps() if has_checksums(manager.directory, s)]
  failures = []
  for s in steps:
    try:
      result = restore(s)
      saved = read_checksums(manager, s)
      if saved is None and checksummed and s > min(checksummed):
        raise CheckpointError(f"step {s} has no checksums while earlier steps of the run do (removed?)")
      expected = None if saved is None else {k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)}
      verify(state_of(result), expected, f"checkpoint step {s}")
      return s, result
    except Exception as e:  # noqa: BLE001 (any failure to read a step makes it unusable)
      failed_save_happened()   # its other reads report from orbax's threads as a failed save's writes do
      failures.append(f"step {s}: {one_line(e)}")
      if step is None:
        warn(s, one_line(e))
  if not failures:
    return None, None
  raise CheckpointError(f"no intact checkpoint in {manager.directory}: " + "; ".join(failures))


def quarantine(manager: ocp.CheckpointManager, steps, workdir: str | Path) -> list[Path]:
  """Moves the step directories `steps` out of the manager's directory into WORKDIR/checkpoints_corrupt/ (kept
  for inspection, never deleted) so that a resumed run can save those steps again; returns the new paths."""
  moved = []
  for s in steps:
    src = Path(manager.directory) / str(s)
    dst = Path(workdir) / CORRUPT_DIR / str(s)
    if dst.exists():
      dst = dst.with_name(f"{s}.{len(list(dst.parent.glob(f'{s}*')))}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(src), str(dst))
    moved.append(dst)
  manager.reload()
  return moved


def save_error(e: BaseException) -> str:
  """The part of a failed save's message that says why (tensorstore's messages name every temporary path)."""
  msg = one_line(e)
  for marker in ("Failed to write", "[Errno", "Permission denied", "No space left"):
    i = msg.find(marker)
    if i > 0:
      return msg[i:]
  return msg


class _DropFailedSaveLogs(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return "orbax-checkpoint-tmp" not in record.getMessage()


class _DropOrbaxErrors(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


@contextlib.contextmanager
def quiet_orbax_errors():
  """orbax logs a failed save from every thread that touched it, and a failed restore with TensorStore's whole
  spec (about 100 lines per array); the trainer and `restore_intact` report each failure in one line themselves,
  so orbax's ERROR records are dropped while this context is open (on the absl logger and the root handlers,
  where they are emitted and where they land)."""
  quiet_failed_saves()   # a failed restore's other reads report like a failed save's writes
  drop = _DropOrbaxErrors()
  targets = [logging.getLogger("absl"), *logging.getLogger().handlers]
  for target in targets:
    target.addFilter(drop)
  try:
    yield
  finally:
    for target in targets:
      target.removeFilter(drop)


_state = {"quiet": False, "failed": False}


def _drop_failed_save_reports(hook):
  def unraisable(info):
    closed_loop = isinstance(info.exc_value, RuntimeError) and "Event loop is closed" in str(info.exc_value)
    if not (closed_loop or _state["failed"]):
      hook(info)
  return unraisable


def quiet_failed_saves() -> None:
  """Once per process, before saving: when an asynchronous save fails, its other writes go on failing in
  tensorstore's threads, each reporting to the save's closed event loop (an unraisable RuntimeError), an
  unawaited coroutine and an unretrieved future, and at exit the coroutines left behind report again:
  hundreds of lines. The trainer reports a failed save once itself (`finished_save_error`), so these reports are
  dropped: the closed-loop errors always, every other unraisable report only once a save has failed
  (`failed_save_happened`)."""
  if _state["quiet"]:
    return
  sys.unraisablehook = _drop_failed_save_reports(sys.unraisablehook)
  warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
  logging.getLogger("asyncio").addFilter(_DropFailedSaveLogs())
  _state["quiet"] = True


def failed_save_happened() -> None:
  """Marks this process as past a failed save or restore (see `quiet_failed_saves`)."""
  _state["failed"] = True


def finished_save_error(manager: ocp.CheckpointManager) -> BaseException | None:
  """The error of the last asynchronous save if it has finished and failed, else None. Never blocks on a save
  still in progress (orbax's `check_for_errors` does not see a failed background write; `wait_until_finished`
  does, and returns at once when nothing is in flight)."""
  if manager.is_saving_in_progress():
    return None
  try:
    manager.wait_until_finished()
  except Exception as e:  # noqa: BLE001
    return e
  return None

