"""runs: a run directory's record (beside train: optim -> runs -> train): the workdir lock, the resume check, the
run history and `metrics.jsonl` reading and repair.

- `WorkdirLock`: `WORKDIR/LOCK` holds the holder's host, pid and start time under an exclusive `flock`. The
  kernel drops a flock when its process dies, so a lock left by a killed trainer on this host is stale and taken
  over with a warning; a lock held by a live process, or written by another host (whose processes this one cannot
  see), stops the second trainer with a message naming the holder.
- `check_resume`: before a resumed run writes anything, its config, corpus fingerprint and tokenizer fingerprint
  are compared with the ones the run recorded (`config.json`, `data.json`). A change that alters the run is
  refused, listing each changed field and the flag that restores it; a safe change (the cadence of evaluation,
  logging and checkpoints, the mesh, or more steps where the schedule of the steps already trained is unchanged)
  is allowed and recorded in `run_history.jsonl`, one row per invocation.
- `read_metrics`: a torn last line (a kill during a write) is dropped with a warning; a bad line elsewhere is an
  error naming the file and line.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import warnings
from pathlib import Path

import ml_collections
import numpy as np

from bitnet_jax import optim
from bitnet_jax.cli import UserError

LOCK_NAME = "LOCK"
HISTORY_NAME = "run_history.jsonl"

# Config fields a resumed run may change: when and how often it evaluates, logs and saves, where it runs (the
# mesh; the quantisation groups it implies are checked apart), a fine-tuning source (read only by a fresh run),
# the number of eval batches, and rematerialisation (memory, not the function).
SAFE_FIELDS = ("name", "train.eval_every", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
               "train.async_checkpoint", "train.init_from", "data.eval_batches", "model.remat")
SAFE_PREFIXES = ("mesh.", "sharding.", "distributed.")
STEPS_FIELD = "train.steps"


class WorkdirLocked(UserError):
  """Another trainer holds the workdir."""


class ResumeRefused(UserError):
  """The config would change the run that the workdir holds."""


# --------------------------------------------------------------------------------------------------------------
# The lock.
# --------------------------------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirLock:
  """An exclusive lock on a workdir for one trainer; `with WorkdirLock(w): ...` or `acquire()` / `release()`."""

  def __init__(self, workdir: str | os.PathLike):
    self.path = Path(workdir) / LOCK_NAME
    self._fd: int | None = None
    self._created = False

  def holder(self) -> dict | None:
    try:
      return json.loads(self.path.read_text() or "null")
    except (OSError, ValueError):
      return None

  def acquire(self) -> WorkdirLock:
    self._created = not self.path.parent.exists()   # removed again at release if nothing was written into it
    self.path.parent.mkdir(parents=True, exist_ok=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "argv": sys.argv}
    for _ in range(3):   # the file may be unlinked by its releasing holder between our open and our flock
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EAGAIN, errno.EACCES):
          raise
        held = self.holder() or {}
        raise WorkdirLocked(f"{self.path.parent} is in use by another trainer (host {held.get('host', '?')}, pid "
                            f"{held.get('pid', '?')}, since {held.get('started', '?')}); wait for it to finish or "
                            "stop it, or use another --workdir") from None
      if os.fstat(fd).st_ino != getattr(_stat(self.path), "st_ino", None):
        os.close(fd)
        continue
      old = self.holder()
      if old and old.get("host") != me["host"]:
        os.close(fd)
        raise WorkdirLocked(f"{self.path} was written by host {old.get('host')} (pid {old.get('pid')}, since "
                            f"{old.get('started')}), whose processes this host cannot see; if no trainer runs "
                            f"there on this workdir, delete {self.path} and rerun")
      if old and old.get("pid") != me["pid"]:
        print(f"warning: {self.path}: the trainer that held it (pid {old.get('pid')}, since {old.get('started')}) "
              f"{'is not running' if not _pid_alive(int(old.get('pid', 0))) else 'no longer holds it'}; "
              "taking the stale lock over", file=sys.stderr)
      os.ftruncate(fd, 0)
      os.write(fd, json.dumps(me).encode())
      os.fsync(fd)
      self._fd = fd
      return self
    raise WorkdirLocked(f"{self.path}: could not take the lock (it kept changing); is another trainer starting?")

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      self.path.unlink(missing_ok=True)
      if self._created and not any(self.path.parent.iterdir()):
        self.path.parent.rmdir()   # a run refused before it wrote anything leaves no empty workdir behind
    finally:
      os.close(self._fd)   # closing drops the flock
      self._fd = None

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def _stat(path: Path):
  try:
    return path.stat()
  except FileNotFoundError:
    return None


# --------------------------------------------------------------------------------------------------------------
# metrics.jsonl.
# --------------------------------------------------------------------------------------------------------------
def read_metrics(path: str | os.PathLike, up_to_step: int | None = None) -> list[dict]:
  """The rows of a `metrics.jsonl`, optionally only up to `up_to_step` (a resumed run drops the rows a killed run
  logged after its last checkpoint). A torn last line (the process killed while writing it) is dropped with a
  warning; an unreadable line before the last is a ValueError naming the file and line."""
  path = Path(path)
  if not path.exists():
    return []
  lines = path.read_text(errors="replace").splitlines()
  rows = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      if not isinstance(row, dict) or not isinstance(row.get("step"), int):
        raise ValueError("not a metrics row (an object with an int step)")
    except ValueError as e:
      if i == len(lines) - 1:
        print(f"warning: {path}: dropping its torn last line {i + 1} ({line[:40]!r}...)", file=sys.stderr)
        break
      raise ValueError(f"{path} line {i + 1} is not a metrics row ({e}); repair or remove that line") from None
    rows.append(row)
  return rows if up_to_step is None else [r for r in rows if r["step"] <= up_to_step]


# --------------------------------------------------------------------------------------------------------------
# The resume check.
# --------------------------------------------------------------------------------------------------------------
def check_resume_groups(workdir: str | os.PathLike, model_cfg) -> None:
  """A checkpoint trained with other quantisation groups is a different function: refuse to resume it silently
  (per-shard groups follow the mesh, so a new mesh shape would change them)."""
  workdir = Path(workdir)
  saved = workdir / "config.json"
  if not saved.exists() or not (workdir / "checkpoints").exists():
    return
  try:
    old = json.loads(saved.read_text()).get("model", {})
  except ValueError as e:
    raise ResumeRefused(f"{saved} is unreadable ({e}); restore it or use another --workdir") from None
  for key in ("groups", "fsdp_groups"):
    if key in old and old[key] != getattr(model_cfg, key):
      raise ResumeRefused(f"{workdir} was trained with model.{key}={old[key]} but this mesh gives "
                       f"{getattr(model_cfg, key)}; to resume on this mesh set "
                       f"--config.sharding.per_shard_groups=False --config.model.groups={old.get('groups', 1)} "
                       f"--config.model.fsdp_groups={old.get('fsdp_groups', 1)}")


def flatten(tree: dict, prefix: str = "") -> dict:
  """{"a.b": value} for a nested dict (lists kept whole, tuples as lists: the json view of a config)."""
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict) and value:
      out.update(flatten(value, name + "."))
    else:
      out[name] = json.loads(json.dumps(value))
  return out


def _flag(key: str, value) -> str:
  shown = repr(tuple(value)) if isinstance(value, list) else str(value)
  return f"--config.{key}={shown}"


def _schedule_agrees(old: dict, new: dict, old_steps: int, new_steps: int, trained: int) -> bool:
  """Whether the learning-rate and weight-decay schedules of `new_steps` equal those of `old_steps` at every
  step already trained (0 .. trained): then the run so far is the run the new plan would have made."""
  old_cfg, new_cfg = ml_collections.ConfigDict(old), ml_collections.ConfigDict(new)
  steps = np.arange(trained + 1)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")   # the warmup clamp warning: the same for both
    for fn in (optim.learning_rate_schedule, optim.weight_decay_schedule):
      a = np.asarray(fn(old_cfg, old_steps)(steps))
      b = np.asarray(fn(new_cfg, new_steps)(steps))
      if not np.array_equal(a, b):
        return False
  return True


def check_resume(workdir: str | os.PathLike, new_config: dict, new_data: dict, trained_step: int) -> dict:
  """Compares the run recorded in `workdir` with `new_config` (the json view of the config as it would be saved)
  and `new_data` (`Corpus.summary()`); raises `ResumeRefused` listing every change that alters the run, else
  returns {"allowed": {field: [old, new]}, "added": [fields the record lacks]} for the run history."""
  workdir = Path(workdir)
  try:
    old_config = json.loads((workdir / "config.json").read_text())
  except FileNotFoundError:
    raise ResumeRefused(f"{workdir} holds checkpoints but no config.json: it cannot be checked against this "
                        "config; restore config.json or use another --workdir") from None
  except ValueError as e:
    raise ResumeRefused(f"{workdir}/config.json is unreadable ({e}); restore it or use another --workdir") from None
  old, new = flatten(old_config), flatten(new_config)
  refused, allowed = [], {}
  for key in sorted(set(old) | set(new)):
    if key not in old:
      continue   # a field added to the code's configs since the run was recorded: reported, not refused
    a, b = old[key], new.get(key, "<absent>")
    if a == b:
      continue
    if key in SAFE_FIELDS or key.startswith(SAFE_PREFIXES):
      allowed[key] = [a, b]
    elif (key == STEPS_FIELD and isinstance(b, int) and b >= trained_step
          and _schedule_agrees(old_config.get("optim", {}), new_config.get("optim", {}), a, b, trained_step)):
      allowed[key] = [a, b]
    else:
      why = " (the learning-rate schedule of the steps already trained would change)" if key == STEPS_FIELD else ""
      refused.append((key, a, b, why))
  try:
    old_data = json.loads((workdir / "data.json").read_text())
  except (FileNotFoundError, ValueError):
    old_data = None
  if old_data is not None:
    old_tok, new_tok = old_data.get("tokenizer", {}), new_data.get("tokenizer", {})
    if old_tok.get("fingerprint") != new_tok.get("fingerprint"):
      refused.append(("tokenizer", old_tok.get("fingerprint"), new_tok.get("fingerprint"),
                      f" (the tokenizer {new_tok.get('name')} is not the file the run was trained with)"))
    elif old_data.get("fingerprint") != new_data.get("fingerprint"):
      refused.append(("data", old_data.get("fingerprint", "")[:12], new_data.get("fingerprint", "")[:12],
                      f" (the corpus {new_data.get('name')} changed since the run started)"))
  if refused:
    changes = "; ".join(f"{k}: {a!r} -> {b!r}{why}" for k, a, b, why in refused)
    flags = " ".join(_flag(k, a) for k, a, _, _ in refused if k not in ("tokenizer", "data") and a != "<absent>")
    fix = f"to resume it pass {flags}" if flags else "restore the files it was trained with"
    raise ResumeRefused(f"{workdir} holds a run (step {trained_step}) that this config would change: {changes}; "
                        f"{fix}, or use another --workdir")
  return {"allowed": allowed, "added": sorted(set(new) - set(old))}


def append_history(workdir: str | os.PathLike, row: dict) -> None:
  """Appends one invocation's row (time, host, pid, argv, and `row`) to WORKDIR/run_history.jsonl."""
  row = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "host": socket.gethostname(), "pid": os.getpid(), "argv": sys.argv, **row}
  with (Path(workdir) / HISTORY_NAME).open("a") as f:
    f.write(json.dumps(row) + "\n")


def check_tokenizer(workdir: str | os.PathLike, tokenizer) -> None:
  """Raises ValueError if `tokenizer` is not the one the run in `workdir` trained with (its fingerprint in
  `data.json`): another file would map the model's ids to other text. A run without `data.json` is not checked."""
  try:
    recorded = json.loads((Path(workdir) / "data.json").read_text()).get("tokenizer", {})
  except (FileNotFoundError, ValueError):
    return
  if recorded.get("fingerprint") not in (None, tokenizer.fingerprint):
    raise ValueError(f"the tokenizer {tokenizer.name} is not the one {workdir} was trained with (fingerprint "
                     f"{str(tokenizer.fingerprint)[:12]}, recorded {str(recorded['fingerprint'])[:12]} in data.json): "
                     "restore the tokenizer file the run used")


def check_not_a_run(out: str | os.PathLike, workdir: str | os.PathLike) -> None:
  """Raises ValueError if writing to `out` could overwrite a run: `out` is `workdir`, lies inside its
  checkpoints, or is a directory that holds a run (a checkpoints/ folder; a config.json alone may be an HF export's)."""
  out, workdir = Path(out).absolute(), Path(workdir).absolute()
  run_files = {workdir / n for n in ("config.json", "data.json", "metrics.jsonl", "summary.json", HISTORY_NAME)}
  if out == workdir or workdir / "checkpoints" in out.parents or out in run_files:
    raise ValueError(f"--out={out} would overwrite the run in {workdir}: write the export elsewhere")
  if (out / "checkpoints").is_dir():
    raise ValueError(f"--out={out} holds a training run: write the export elsewhere")
