"""faults: bad inputs and faults tried against the command-line tools, and how each one ended.

    python benchmarks/faults.py                      # every case, about 10 minutes on 2 CPU cores
    python benchmarks/faults.py --only resume        # the cases whose name or category holds "resume"
    python benchmarks/faults.py --list               # the cases and their commands
    python benchmarks/faults.py --json faults.json --md faults.md

Every case runs the real CLIs (train, generate, export, compare, experiments.*, interop.lm_eval) in subprocesses
(`JAX_PLATFORMS=cpu`, a fresh temporary directory each, as the working directory) after a setup that damages a
copy of a trained run, and is classified as

  handled    the expected outcome: an error (exit status != 0, last stderr line `PROG: error: ...` naming the
             problem, no traceback) or, for a fault the tool should recover from, exit 0 with the recovery
             verified; and every post-check passed;
  traceback  the right outcome, but a raw traceback printed;
  wrong      a wrong exit status or a wrong result (the bad value accepted, a fallback that did not happen);
  lost work  a post-check found data lost or corrupted: a refused command that changed the run's files, a
             checkpoint deleted or holding NaN, metrics torn or interleaved.

Two template runs are trained once and copied per case (`shutil.copytree`): b158-tiny, 40 steps, checkpoints
every 5 (steps 30, 35, 40 kept), and fp-tiny, 6 steps, with a Hugging Face tokenizer file and a text_dir corpus
of its own (relative paths, so each copy has its own). A resumed run is also compared with the uninterrupted
template: the same loss at every logged step and the same checksums of the final checkpoint (training is bitwise
deterministic on CPU). The script always exits 0: it is a report, and prints a markdown table with the totals.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
CFG = str(ROOT / "configs" / "lm.py")
OUTCOMES = ("handled", "traceback", "wrong", "lost work")   # in increasing severity
TIMEOUT = 300

# The template run every resume / checkpoint / metrics case copies, and its command.
RUN = ("--config.train.steps=40", "--config.train.checkpoint_every=5")
FRESH = ("--config.train.steps=5", "--config.train.checkpoint_every=5")   # a bad value accepted ends quickly
LAST, STEPS_KEPT = 40, (30, 35, 40)
# The second template: an fp run with its own tokenizer file and corpus (paths relative to the case directory).
HF_RUN = ("--config.train.steps=6", "--config.train.checkpoint_every=3", "--config.data.tokenizer=hf:tok.json",
          "--config.data.source=text_dir:texts")


# --------------------------------------------------------------------------------------------------------------
# Commands.
# --------------------------------------------------------------------------------------------------------------
def _merge(base, extra) -> list[str]:
  """`base` flags with those that `extra` sets again dropped, then `extra`."""
  keys = {a.split("=", 1)[0] for a in extra}
  return [a for a in base if a.split("=", 1)[0] not in keys] + list(extra)


def train(*extra, variant="b158-tiny", base=RUN, workdir="{w}") -> list[str]:
  return ["-m", "bitnet_jax.train", f"--config={CFG}:{variant}", f"--workdir={workdir}", *_merge(base, extra)]


def fresh(*extra, variant="b158-tiny") -> list[str]:
  return train(*extra, variant=variant, base=FRESH)


def hf_train(*extra) -> list[str]:
  return train(*extra, variant="fp-tiny", base=HF_RUN)


def generate(*extra, workdir="{w}") -> list[str]:
  return ["-m", "bitnet_jax.generate", f"--workdir={workdir}", "--max_new_tokens=16", *extra]


def export(*extra, workdir="{w}") -> list[str]:
  return ["-m", "bitnet_jax.export", f"--workdir={workdir}", *extra]


def experiment(name, *extra) -> list[str]:
  return ["-m", f"experiments.{name}", *extra]


def lm_eval(model_args, *extra) -> list[str]:
  return ["-m", "bitnet_jax.interop.lm_eval", "--model_args", model_args, "--tasks", "piqa", *extra]


def fsize_limited(limit: int, argv: list[str]) -> list[str]:
  """`argv` (`-m MODULE ...`) run under RLIMIT_FSIZE=`limit` bytes with SIGXFSZ ignored: a write past the limit
  fails with EFBIG, as a full disk fails with ENOSPC."""
  module = argv[1]
  code = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
          f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); sys.argv[0] = {module!r}; "
          f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")
  return ["-c", code, *argv[2:]]


def prog_of(argv: list[str]) -> str:
  if argv[0] == "-c":
    module = re.search(r"run_module\('([\w.]+)'", argv[1]).group(1)
  else:
    module = argv[1]
  return module.rsplit(".", 1)[-1]


# A script that restores one step with its checks (checksums, finiteness): exit 0 only if the step is intact.
VERIFY = ("import sys; from bitnet_jax import train; train.load_checkpoint(sys.argv[1], step=int(sys.argv[2])); "
          "print('intact')")


# --------------------------------------------------------------------------------------------------------------
# Files: snapshots, damage, run records.
# --------------------------------------------------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, str]:
  """{relative path: sha256} of every file under `root` (empty if it does not exist)."""
  if not root.exists():
    return {}
  out = {}
  for p in sorted(root.rglob("*")):
    if p.is_file():
      out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
  return out


def steps_of(w: Path) -> list[int]:
  d = w / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def largest_data_file(w: Path, step: int) -> Path:
  files = (w / "checkpoints" / str(step) / "state" / "ocdbt.process_0" / "d").iterdir()
  return max(files, key=lambda p: p.stat().st_size)


def zero_bytes(path: Path, n: int = 8, every: int | None = None) -> None:
  """Overwrites `n` bytes with zeros: in the middle of the file (the first window from there that is not all zero
  already, so the file surely changes) or, with `every`, at every multiple of `every` bytes."""
  data = bytearray(path.read_bytes())
  if every:
    starts = range(0, len(data) - n, every)
  else:
    mid = len(data) // 2
    starts = [next((i for i in range(mid, len(data) - n) if any(data[i:i + n])), mid)]
  for i in starts:
    data[i:i + n] = bytes(n)
  path.write_bytes(bytes(data))


def rewind(w: Path, step: int) -> None:
  """The run as a kill right after the checkpoint of `step` leaves it: later steps and the summary gone (metrics
  rows logged after `step` stay, as they would)."""
  for s in steps_of(w):
    if s > step:
      shutil.rmtree(w / "checkpoints" / str(s))
  (w / "summary.json").unlink(missing_ok=True)


def metrics_lines(w: Path) -> list[str]:
  p = w / "metrics.jsonl"
  return p.read_text(errors="replace").splitlines() if p.exists() else []


def checksums(w: Path, step: int) -> dict | None:
  p = w / "checkpoints" / str(step) / "checksums" / "metadata"
  try:
    return json.loads(p.read_text())
  except (OSError, ValueError):
    return None


def history(w: Path) -> list[dict]:
  p = w / "run_history.jsonl"
  return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


def hf_tokenizer(path: Path, vocab: int) -> None:
  """A small BPE tokenizer.json (with a `</s>` EOS) of `vocab` ids, trained on this repository's sources."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "</s>"], show_progress=False)
  tok.train([str(p) for p in sorted((ROOT / "bitnet_jax").glob("*.py"))], trainer)
  tok.save(str(path))


def text_corpus(d: Path) -> None:
  """d/texts: a small text_dir corpus (the stdlib's json and email packages as .txt files)."""
  d.mkdir(parents=True)
  import email
  import json as json_module
  files = sorted(Path(json_module.__file__).parent.glob("*.py")) + sorted(Path(email.__file__).parent.glob("*.py"))
  for i, f in enumerate(files):
    shutil.copy(f, d / f"doc{i:02d}.txt")


# --------------------------------------------------------------------------------------------------------------
# Running a case.
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Proc:
  argv: list[str]
  rc: int | None
  stdout: str
  stderr: str
  seconds: float
  timed_out: bool = False

  @property
  def last_line(self) -> str:
    lines = [line for line in self.stderr.splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""

  @property
  def shown_line(self) -> str:
    """The line the report shows: the last `warning:` line of a command that succeeded, else the last line."""
    warnings = [line for line in self.stderr.splitlines() if line.startswith("warning:")]
    return warnings[-1] if self.rc == 0 and warnings else self.last_line


@dataclasses.dataclass
class Case:
  name: str
  category: str
  cmd: list[str] | None                   # the command under test (placeholders {w} {d} {cfg}); None: `drive`
  expect: str = "error"                   # "error": one `PROG: error:` line; "ok": exit 0
  match: str = ""                         # a regex the error line must match (it names the problem)
  setup: Callable | None = None           # setup(ctx): prepares ctx.d (copies a template, damages it)
  check: Callable | None = None           # check(ctx, proc): post-checks, after the command
  drive: Callable | None = None           # drive(ctx): runs several commands itself (kills, locks, resumes)
  slow: bool = False                      # started first (the pool then fills up with the quick ones)
  about: str = ""                         # what the commands are, where `cmd` is None


class Ctx:
  """One case's directory, environment, commands run and verdicts."""

  def __init__(self, case: Case, d: Path, templates: dict):
    self.case, self.d, self.w, self.t = case, d, d / "run", templates
    self.env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "BITNET_JAX_DEBUG": "0",
                "PYTHONUNBUFFERED": "1", "TFDS_DATA_DIR": str(d / "tfds"), "HF_HUB_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    self.procs: list[Proc] = []
    self.main: Proc | None = None
    self.verdicts: list[tuple[str, str]] = []
    self.snap: dict[str, str] = {}
    self.background: list[subprocess.Popen] = []
    self.damaged: int | None = None   # the checkpoint step a setup damaged
    self.notes: list[str] = []        # what a driver did (for the json)

  def fmt(self, argv) -> list[str]:
    return [a.format(w=self.w, d=self.d, cfg=CFG) for a in argv]

  def call(self, argv, timeout=TIMEOUT) -> Proc:
    argv = self.fmt(argv)
    t0 = time.perf_counter()
    try:
      out = subprocess.run([PY, *argv], cwd=self.d, env=self.env, capture_output=True, text=True, errors="replace",
                           timeout=timeout)
      proc = Proc(argv, out.returncode, out.stdout, out.stderr, time.perf_counter() - t0)
    except subprocess.TimeoutExpired as e:
      text = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
      proc = Proc(argv, None, text(e.stdout), text(e.stderr), time.perf_counter() - t0, timed_out=True)
    self.procs.append(proc)
    return proc

  def popen(self, argv) -> subprocess.Popen:
    """A background command (its own process group, so a kill reaches all of it); stdout and stderr to files."""
    n = len(self.procs) + len(self.background)
    out, err = (open(self.d / f"bg{n}.{k}", "w") for k in ("out", "err"))
    p = subprocess.Popen([PY, *self.fmt(argv)], cwd=self.d, env=self.env, stdout=out, stderr=err,
                         start_new_session=True)
    p.files, p.t0, p.argv = (out, err), time.perf_counter(), self.fmt(argv)
    self.background.append(p)
    return p

  def finish(self, p: subprocess.Popen, timeout=TIMEOUT) -> Proc:
    try:
      rc, timed_out = p.wait(timeout=timeout), False
    except subprocess.TimeoutExpired:
      os.killpg(p.pid, signal.SIGKILL)
      rc, timed_out = p.wait(), True
    for f in p.files:
      f.close()
    stdout, stderr = (Path(f.name).read_text(errors="replace") for f in p.files)
    proc = Proc(p.argv, None if timed_out else rc, stdout, stderr, time.perf_counter() - p.t0, timed_out)
    self.procs.append(proc)
    return proc

  def bad(self, outcome: str, why: str) -> None:
    self.verdicts.append((outcome, why))

  def copy(self, template: str = "b158", to: Path | None = None) -> Path:
    """A copy of a template run at `to` (default the workdir); the hf template's tokenizer and corpus come too."""
    to = to or self.w
    shutil.copytree(self.t[template] / "run", to)
    if template == "hf":
      shutil.copy(self.t[template] / "tok.json", self.d / "tok.json")
      shutil.copytree(self.t[template] / "texts", self.d / "texts")
    return to

  # ---------------------------------------------------------------- expectations on one command
  def expect_error(self, p: Proc, match: str = "", prog: str | None = None, main: bool = True) -> bool:
    """One `PROG: error:` line (argparse's `PROG.py: error:` too), exit != 0, no traceback; True if it failed."""
    prog = prog or prog_of(p.argv)
    if main and self.main is None:
      self.main = p
    if p.timed_out:
      self.bad("wrong", f"timed out after {p.seconds:.0f} s")
      return False
    if p.rc == 0:
      self.bad("wrong", "exit 0: the bad input was accepted")
      return False
    if p.rc < 0:
      self.bad("wrong", f"killed by signal {-p.rc}")
      return True
    pattern = rf"^{re.escape(prog)}(\.py)?: error: "
    one_line = re.match(pattern, p.last_line)
    if "Traceback (most recent call last)" in p.stderr:
      printed = re.search(pattern, p.stderr, re.M)
      self.bad("traceback", f"exit {p.rc} with a traceback" + (" after its error line" if printed else
                                                                 ", no error line"))
    elif not one_line:
      self.bad("wrong", f"exit {p.rc} without a `{prog}: error:` line")
    elif match and not re.search(match, p.last_line):
      self.bad("wrong", f"the error does not name the problem (expected /{match}/)")
    return True

  def expect_ok(self, p: Proc, main: bool = True) -> bool:
    if main and self.main is None:
      self.main = p
    if p.timed_out:
      self.bad("wrong", f"timed out after {p.seconds:.0f} s")
      return False
    if p.rc != 0:
      self.bad("wrong", f"exit {p.rc}, expected 0 (recovery)")
      return False
    if "Traceback (most recent call last)" in p.stderr:
      self.bad("traceback", "exit 0 but a traceback printed")
    return True

  # ---------------------------------------------------------------- post-checks
  def check_unchanged(self, root: Path | None = None, before: dict | None = None, ignore=()) -> None:
    """The files under `root` (default the workdir) as they were after the setup: changed or removed is lost
    work, added is wrong (a refused command writes nothing)."""
    root = root or self.w
    before = self.snap if before is None else before
    after = snapshot(root)
    keep = lambda k: not any(re.search(pat, k) for pat in ignore)
    changed = sorted(k for k in before if k in after and before[k] != after[k] and keep(k))
    removed = sorted(k for k in before if k not in after and keep(k))
    added = sorted(k for k in after if k not in before and keep(k))
    if changed or removed:
      self.bad("lost work", f"{root.name}: changed {changed[:4]} removed {removed[:4]}")
    if added:
      self.bad("wrong", f"{root.name}: wrote {added[:4]} though it refused")

  def check_metrics(self, last: int = LAST, every_step: bool = False) -> list[dict]:
    """metrics.jsonl whole: every line a row, steps strictly increasing up to `last`, losses finite."""
    lines = metrics_lines(self.w)
    rows = []
    for i, line in enumerate(lines):
      try:
        rows.append(json.loads(line))
      except ValueError:
        self.bad("lost work", f"metrics.jsonl line {i + 1} is not json: {line[:60]!r}")
        return []
    steps = [r.get("step") for r in rows]
    if any(b <= a for a, b in zip(steps, steps[1:])):
      self.bad("lost work", f"metrics.jsonl steps not strictly increasing (interleaved or duplicated): {steps}")
    if not steps or steps[-1] != last:
      self.bad("wrong", f"metrics.jsonl ends at step {steps[-1] if steps else None}, expected {last}")
    if every_step and steps != list(range(1, last + 1)):
      missing = sorted(set(range(1, last + 1)) - set(steps))
      self.bad("lost work", f"metrics.jsonl lacks steps {missing[:8]}")
    if any(not math.isfinite(r.get("loss", 0.0)) for r in rows):
      self.bad("lost work", "metrics.jsonl holds a non-finite loss")
    return rows

  def check_as_template(self, rows: list[dict]) -> None:
    """The resumed run against the uninterrupted template: losses at common steps, final checkpoint checksums."""
    ref = {r["step"]: r["loss"] for r in self.t["rows"]}
    differ = [r["step"] for r in rows if r["step"] in ref and r["loss"] != ref[r["step"]]]
    if differ:
      self.bad("wrong", f"losses differ from the uninterrupted run at steps {differ}")
    sums = checksums(self.w, LAST)
    if sums is None:
      self.bad("wrong", f"checkpoint {LAST} has no readable checksums item after the resume")
    elif sums != self.t["checksums"]:
      self.bad("wrong", f"checkpoint {LAST} differs from the uninterrupted run's (checksums)")

  def check_resumed(self) -> None:
    """After a resume that should have finished: checkpoint 40 there, metrics whole, as the template."""
    if LAST not in steps_of(self.w):
      self.bad("wrong", f"no checkpoint {LAST} after the resume (steps {steps_of(self.w)})")
    self.check_as_template(self.check_metrics())


def run_case(case: Case, tmp: Path, templates: dict, keep: bool) -> dict:
  d = tmp / "cases" / case.name
  d.mkdir(parents=True)
  ctx = Ctx(case, d, templates)
  t0 = time.perf_counter()
  try:
    if case.setup:
      case.setup(ctx)
    ctx.snap = snapshot(ctx.w)
    if case.drive:
      case.drive(ctx)
    else:
      p = ctx.call(case.cmd)
      ran = ctx.expect_error(p, case.match) if case.expect == "error" else ctx.expect_ok(p)
      if ran and case.expect == "error":   # a refusal leaves the workdir exactly as set up
        ctx.check_unchanged()
      if ran and case.check:
        case.check(ctx, p)
  except Exception as e:  # noqa: BLE001 (a broken case is reported, never hidden)
    ctx.bad("wrong", f"the case itself failed: {type(e).__name__}: {e}")
  finally:
    for p in ctx.background:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
  outcome = max((o for o, _ in ctx.verdicts), key=OUTCOMES.index, default="handled")
  main = ctx.main or (ctx.procs[0] if ctx.procs else None)
  result = {
      "name": case.name, "category": case.category, "outcome": outcome,
      "why": "; ".join(f"{o}: {w}" for o, w in ctx.verdicts), "notes": ctx.notes,
      "last_line": main.shown_line if main else "", "seconds": time.perf_counter() - t0,
      "commands": [{"argv": ["python", *p.argv], "rc": p.rc, "seconds": round(p.seconds, 1),
                    "stderr_head": p.stderr[:1500], "stderr_tail": p.stderr[-2000:], "stdout_tail": p.stdout[-600:],
                    **({"stderr": p.stderr[:30000]} if ctx.verdicts else {})} for p in ctx.procs],
  }
  if not keep:
    shutil.rmtree(d, ignore_errors=True)
  return result


# --------------------------------------------------------------------------------------------------------------
# Setups and drivers.
# --------------------------------------------------------------------------------------------------------------
def copy_b158(ctx):
  ctx.copy("b158")


def copy_hf(ctx):
  ctx.copy("hf")


def rewound(step=35, then=None):
  def setup(ctx):
    ctx.copy("b158")
    rewind(ctx.w, step)
    if then:
      then(ctx)
  return setup


def damaged(what: str, steps="latest", template="b158"):
  """A copy of a template with the checkpoint of the latest step (or every step) damaged."""
  def setup(ctx):
    ctx.copy(template)
    for s in steps_of(ctx.w) if steps == "all" else steps_of(ctx.w)[-1:]:
      step, ctx.damaged = ctx.w / "checkpoints" / str(s), s
      if what == "zero bytes":   # the largest data file: optimiser state as well as weights
        zero_bytes(largest_data_file(ctx.w, s))
      elif what == "zero bytes everywhere":   # every 4 KiB of every data file: the weights a model-only read needs
        for f in (step / "state" / "ocdbt.process_0" / "d").iterdir():
          zero_bytes(f, every=4096)
      elif what == "delete data file":
        largest_data_file(ctx.w, s).unlink()
      elif what == "garble metadata":
        (step / "_CHECKPOINT_METADATA").write_text("{garbled")
      elif what == "delete checksums":
        shutil.rmtree(step / "checksums")
      elif what == "garble iterator":
        (step / "data" / "process_0-of-1.json").write_text("\0\0garbled")
      elif what == "tmp dir":   # a save killed before orbax renamed its temporary directory
        step.rename(step.with_name(f"{s}.orbax-checkpoint-tmp-1700000000"))
      else:
        raise ValueError(what)
  return setup


def fell_back(ctx, p, quarantine=True) -> bool:
  """A resume (or a read) that skipped the damaged latest step for the one before."""
  s = ctx.damaged
  if not re.search(rf"step {s} .*unusable", p.stderr):
    ctx.bad("wrong", f"no warning that step {s} is unusable (it was restored as if intact, or not tried)")
    return False
  if quarantine and not (ctx.w / "checkpoints_corrupt" / str(s)).exists():
    ctx.bad("wrong", f"the damaged step {s} was not moved to checkpoints_corrupt/")
  return True


def resume_fell_back(ctx, p):
  fell_back(ctx, p)
  ctx.check_resumed()


def resume_fell_back_or_intact(ctx, p):
  """Damage orbax does not read back (metadata only): falling back is right, and so is restoring the step as it
  is, if the run then ends exactly as the uninterrupted one (the step's arrays verified by their checksums)."""
  if "unusable" in p.stderr:
    fell_back(ctx, p)
  ctx.check_resumed()


def read_fell_back(ctx, p):
  """generate / export on a damaged latest step: a warning, a result, and the run left as it was."""
  fell_back(ctx, p, quarantine=False)
  ctx.check_unchanged()
  if ctx.case.cmd[1] == "bitnet_jax.generate" and not p.stdout.strip():
    ctx.bad("wrong", "generate printed no text")


def resumed(ctx, p):
  ctx.check_resumed()


def allowed(key, new):
  def check(ctx, p):
    ctx.check_resumed()
    rows = history(ctx.w)
    change = rows[-1].get("changes", {}).get(key) if rows else None
    if not change or change[1] != new:
      ctx.bad("wrong", f"run_history.jsonl does not record the change of {key} (last row: "
                       f"{rows[-1].get('changes') if rows else None})")
    saved = json.loads((ctx.w / "config.json").read_text())
    for part in key.split("."):
      saved = saved[part]
    if saved != new:
      ctx.bad("wrong", f"config.json records {key}={saved!r}, not the new {new!r}")
  return check


def not_created(*names):
  """A refused command leaves no output file (an empty directory at most)."""
  def check(ctx, p):
    for n in names:
      path = ctx.d / n
      if path.is_file() or snapshot(path):
        ctx.bad("wrong", f"wrote {n} though it refused")
  return check


def drive_nan(ctx):
  """lr 1e6: the loss becomes non-finite; the error names the last checkpoint, which must exist, restore intact
  and finite, and serve generate."""
  p = ctx.call(fresh("--config.train.steps=40", "--config.train.checkpoint_every=1", "--config.optim.lr=1e6",
                     "--config.optim.lr2=1e6"))
  if not ctx.expect_error(p, r"non-finite|loss is \S+ \(gradient norm \S+\) at step \d+"):
    return
  m = re.search(r"the last checkpoint, step (\d+)", p.last_line)
  if not m:
    ctx.bad("wrong", "the error names no last checkpoint")
    return
  step, steps = int(m.group(1)), steps_of(ctx.w)
  if not steps or step != steps[-1]:
    ctx.bad("lost work" if step not in steps else "wrong", f"names step {step}; the checkpoints are {steps}")
    return
  ctx.check_metrics(last=max(r["step"] for r in map(json.loads, metrics_lines(ctx.w))))
  v = ctx.call(["-c", VERIFY, "{w}", str(step)])
  if v.rc != 0:
    ctx.bad("lost work", f"the named checkpoint {step} does not restore intact: {v.last_line}")
  g = ctx.call(generate())
  if g.rc != 0:
    ctx.bad("wrong", f"generate after the NaN run: exit {g.rc}: {g.last_line}")
  elif "unusable" in g.stderr:
    ctx.bad("lost work", "generate found the latest checkpoint unusable (a non-finite state was saved)")
  elif not g.stdout.strip() or "\0" in g.stdout:
    ctx.bad("lost work", f"generate printed garbage: {g.stdout[:60]!r}")


def drive_kill(sig):
  """A run killed (SIGKILL) or interrupted (SIGINT, Ctrl-C) after its first checkpoint, then the same command
  again: it must resume and end as the uninterrupted run, metrics whole."""
  def drive(ctx):
    cmd = train("--config.train.log_every=1")
    p = ctx.popen(cmd)
    deadline = time.time() + TIMEOUT
    while not steps_of(ctx.w) and p.poll() is None and time.time() < deadline:
      time.sleep(0.02)
    if p.poll() is not None:
      ctx.bad("wrong", "setup: the run ended before the signal could be sent (case inconclusive)")
      ctx.main = ctx.finish(p)
      return
    os.killpg(p.pid, sig) if sig == signal.SIGKILL else os.kill(p.pid, sig)
    first = ctx.finish(p)
    at = len(metrics_lines(ctx.w))
    if sig == signal.SIGINT:
      ctx.main = first
      said = "train: interrupted" in first.stderr.splitlines()
      if first.rc != 130 or first.last_line != "train: interrupted":
        ctx.bad("wrong", f"Ctrl-C: exit {first.rc}, {'' if said else 'no line train: interrupted, '}last line "
                         f"{first.last_line!r} (expected exit 130, last line 'train: interrupted')")
      if "Traceback (most recent call last)" in first.stderr:
        ctx.bad("traceback", "Ctrl-C printed a traceback")
    again = ctx.call(cmd)
    if not ctx.expect_ok(again):
      return
    rows = ctx.check_metrics(every_step=True)
    ctx.check_as_template(rows)
    ctx.notes.append(f"signal {sig} sent after {at} metrics rows")
  return drive


def drive_second_trainer(ctx):
  """A trainer running; a second one on the same workdir must stop at once with one line, and the first must
  finish with its metrics whole (every step once, in order: no interleaving)."""
  steps_per_s = ctx.t["steps_per_s"]
  steps = max(200, int(steps_per_s * 45) // 10 * 10)   # about 45 s of training: outlives the second's start-up
  cmd = fresh(f"--config.train.steps={steps}", f"--config.train.checkpoint_every={steps // 4}",
              "--config.train.log_every=1")
  first = ctx.popen(cmd)
  deadline = time.time() + TIMEOUT
  while not (ctx.w / "LOCK").exists() and first.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  second = ctx.call(cmd)
  still_running = first.poll() is None
  ctx.expect_error(second, "in use by another trainer")
  if not still_running:
    ctx.bad("wrong", "setup: the first trainer ended before the second one finished (case inconclusive)")
  a = ctx.finish(first)
  if a.rc != 0:
    ctx.bad("lost work", f"the first trainer did not finish: exit {a.rc}: {a.last_line}")
    return
  ctx.check_metrics(last=steps, every_step=True)
  if len(history(ctx.w)) != 1:
    ctx.bad("lost work", f"run_history.jsonl has {len(history(ctx.w))} rows (the refused trainer wrote one)")
  if (ctx.w / "LOCK").exists():
    ctx.bad("wrong", "LOCK left behind after the first trainer finished")


def drive_flock_holder(ctx):
  """A live process holding the workdir's flock (as a running trainer does): refused, nothing touched."""
  code = ("import fcntl, json, os, socket, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
          "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, json.dumps(dict(host=socket.gethostname(), pid=os.getpid(), "
          "started='faults')).encode()); print('locked', flush=True); time.sleep(600)")
  holder = ctx.popen(["-c", code, "{w}/LOCK"])
  deadline = time.time() + 60
  while "locked" not in Path(holder.files[0].name).read_text() and holder.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  ctx.snap = snapshot(ctx.w)
  p = ctx.call(train())
  if ctx.expect_error(p, r"in use by another trainer \(host .*pid \d+"):
    ctx.check_unchanged()


def stale_lock(host=None, text=None):
  def setup(ctx):
    rewound(35)(ctx)
    dead = subprocess.Popen(["true"])
    dead.wait()
    holder = {"host": host or socket.gethostname(), "pid": dead.pid, "started": "2020-01-01T00:00:00+00:00"}
    (ctx.w / "LOCK").write_text(text if text is not None else json.dumps(holder))
  return setup


def lock_taken_over(warn=True):
  def check(ctx, p):
    if warn and "stale lock" not in p.stderr:
      ctx.bad("wrong", "no warning that a stale lock was taken over")
    if (ctx.w / "LOCK").exists():
      ctx.bad("wrong", "LOCK left behind")
    ctx.check_resumed()
  return check


def drive_disk_full(rewind_to, limit, match, then_resume=True):
  """The trainer under a file-size limit (a full disk): it stops with one line, the checkpoints before the
  failure stay intact, and the same command without the limit resumes and finishes as the uninterrupted run."""
  def drive(ctx):
    if rewind_to is not None:
      ctx.copy("b158")
      rewind(ctx.w, rewind_to)
    ctx.snap = snapshot(ctx.w)
    kept = {k: v for k, v in ctx.snap.items() if k.startswith("checkpoints/")}
    p = ctx.call(fsize_limited(limit, train()))
    if not ctx.expect_error(p, match, prog="train"):
      return
    now = snapshot(ctx.w)
    lost = sorted(k for k, v in kept.items() if now.get(k) != v)
    if lost:
      ctx.bad("lost work", f"checkpoint files changed by the failed save: {lost[:4]}")
    changed = [k for k in ("config.json", "data.json") if k in ctx.snap and now.get(k) != ctx.snap[k]]
    if changed:
      ctx.bad("lost work", f"{changed} changed by the failed run")
    if then_resume:
      again = ctx.call(train())
      if ctx.expect_ok(again, main=False):
        if "unusable" in again.stderr:
          ctx.bad("lost work", "the resume found a checkpoint unusable: " + again.stderr.split("unusable")[0][-80:])
        ctx.check_resumed()
  return drive


def other_tokenizer(ctx):
  ctx.copy("hf")
  hf_tokenizer(ctx.d / "tok.json", vocab=200)


def gone_tokenizer(ctx):
  ctx.copy("hf")
  (ctx.d / "tok.json").unlink()


def corpus_grown(ctx):
  ctx.copy("hf")
  (ctx.d / "texts" / "new.txt").write_text("a document added after the run started\n" * 50)


def write(path: str, text: str, then=None):
  def setup(ctx):
    if then:
      then(ctx)
    p = ctx.d / path
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
  return setup


def edit_metrics(fn, rewind_to=35):
  def setup(ctx):
    rewound(rewind_to)(ctx)
    lines = metrics_lines(ctx.w)
    (ctx.w / "metrics.jsonl").write_text(fn(lines))
  return setup


# --------------------------------------------------------------------------------------------------------------
# The cases.
# --------------------------------------------------------------------------------------------------------------
def cases() -> list[Case]:
  C = Case
  cfg, res, ckpt, met, lock, disk, gen, exp, ex, lme = ("train flags/config", "resume", "checkpoint integrity",
                                                       "metrics", "lock", "disk/save", "generate", "export",
                                                       "experiments", "lm_eval")
  out = [
      # ------------------------------------------------------------ train flags and config (a fresh workdir)
      C("config variant unknown", cfg, fresh(variant="b999-tiny"), match="unknown config variant"),
      C("config option unknown key", cfg, fresh(variant="b158-tiny,seed=3"), match="unknown key 'seed'"),
      C("config file missing", cfg, ["-m", "bitnet_jax.train", "--config={d}/nope.py:b158-tiny", "--workdir={w}"],
        match="nope.py"),
      C("config file syntax error", cfg, ["-m", "bitnet_jax.train", "--config={d}/bad.py", "--workdir={w}"],
        setup=write("bad.py", "def get_config(:\n"), match="bad.py"),
      C("config key unknown", cfg, fresh("--config.train.stepz=5"), match="stepz"),
      C("steps not an int", cfg, fresh("--config.train.steps=abc"), match="steps"),
      C("steps negative", cfg, fresh("--config.train.steps=-3"), match="steps"),
      C("seq_len over max_seq_len", cfg, fresh("--config.train.seq_len=256"), match="max_seq_len"),
      C("batch not divisible by devices", cfg, fresh("--simulate_devices=2", "--config.train.batch_size=3"),
        match="divisible"),
      C("lr negative", cfg, fresh("--config.optim.lr=-0.001"), match=r"\blr\b"),
      C("lr nan", cfg, fresh("--config.optim.lr=nan"), match=r"\blr\b"),
      C("d_model negative", cfg, fresh("--config.model.d_model=-64"), match="d_model"),
      C("n_heads does not divide d_model", cfg, fresh("--config.model.n_heads=5"), match="n_heads"),
      C("weight_quant unknown", cfg, fresh("--config.model.weight_quant=ternary9"), match="weight_quant"),
      C("vocab_size below the tokenizer's", cfg, fresh("--config.model.vocab_size=100"), match="vocab_size"),
      C("init_from missing run", cfg, fresh("--config.train.init_from=run:{d}/absent"), match="absent"),
      C("mesh larger than the devices", cfg, fresh("--config.mesh.data=3"), match="mesh|device"),
      C("workdir is a file", cfg, fresh(), setup=write("run", "a file, not a directory"), match="run"),
      C("workdir flag missing", cfg, ["-m", "bitnet_jax.train", f"--config={CFG}:b158-tiny"], match="workdir"),
      C("data source unknown", cfg, fresh("--config.data.source=nope"), match="unknown source"),
      C("text_dir missing", cfg, fresh("--config.data.source=text_dir:{d}/absent"), match="does not exist"),
      C("tfds dataset nonexistent", cfg, fresh("--config.data.source=tfds:nonexistent_ds"), match="nonexistent_ds"),
      C("valid_fraction above 1", cfg, fresh("--config.data.valid_fraction=1.5"), match="valid_fraction"),
      C("tokenizer spec unknown", cfg, fresh("--config.data.tokenizer=nope"), match="tokenizer"),
      C("tokenizer file missing", cfg, fresh("--config.data.tokenizer=sentencepiece:{d}/absent.model"),
        match="not found"),
      C("tokenizer file garbage (hf)", cfg, fresh("--config.data.tokenizer=hf:{d}/garbage.json"),
        setup=write("garbage.json", "this is not a tokenizer"), match="garbage.json"),
      C("tokenizer file garbage (sentencepiece)", cfg, fresh("--config.data.tokenizer=sentencepiece:{d}/bad.model"),
        setup=write("bad.model", "this is not a model"), match="bad.model"),
      # ------------------------------------------------------------ resume: refused changes (the run untouched)
      C("resume d_model", res, train("--config.model.d_model=128"), setup=copy_b158, match="model.d_model"),
      C("resume weight_quant", res, train("--config.model.weight_quant=binary"), setup=copy_b158,
        match="model.weight_quant"),
      C("resume batch_size", res, train("--config.train.batch_size=4"), setup=copy_b158, match="train.batch_size"),
      C("resume seq_len", res, train("--config.train.seq_len=32"), setup=copy_b158, match="train.seq_len"),
      C("resume more steps (decaying schedule)", res, train("--config.train.steps=80"), setup=copy_b158,
        match="train.steps"),
      C("resume seed", res, train("--config.train.seed=1"), setup=copy_b158, match="train.seed"),
      C("resume lr", res, train("--config.optim.lr=0.003"), setup=copy_b158, match="optim.lr"),
      C("resume tokenizer file replaced", res, hf_train(), setup=other_tokenizer, match="tokenizer"),
      C("resume tokenizer file deleted", res, hf_train(), setup=gone_tokenizer, match="not found"),
      C("resume corpus changed", res, hf_train(), setup=corpus_grown, match="corpus"),
      C("resume config.json deleted", res, train(),
        setup=lambda ctx: (ctx.copy("b158"), (ctx.w / "config.json").unlink()), match="config.json"),
      C("resume config.json garbled", res, train(), setup=lambda ctx: (ctx.copy("b158"),
        (ctx.w / "config.json").write_text('{"model": {')), match="config.json"),
      # ------------------------------------------------------------ resume: allowed changes, interruptions
      C("resume eval_every changed", res, train("--config.train.eval_every=2"), expect="ok", setup=rewound(35),
        check=allowed("train.eval_every", 2)),
      C("resume log_every changed", res, train("--config.train.log_every=1"), expect="ok", setup=rewound(35),
        check=allowed("train.log_every", 1)),
      C("resume checkpoint_every changed", res, train("--config.train.checkpoint_every=2"), expect="ok",
        setup=rewound(35), check=allowed("train.checkpoint_every", 2)),
      C("rerun a finished run", res, train(), expect="ok", setup=copy_b158,
        check=lambda ctx, p: ctx.check_unchanged(ignore=(r"^summary\.json$", r"^run_history\.jsonl$",
                                                         r"^tensorboard/"))),
      C("SIGKILL mid-run, then resume", res, None, drive=drive_kill(signal.SIGKILL), slow=True,
        about="train (40 steps, log_every=1); SIGKILL after its first checkpoint; the same command again"),
      C("Ctrl-C mid-run, then resume", res, None, drive=drive_kill(signal.SIGINT), slow=True,
        about="train (40 steps, log_every=1); SIGINT after its first checkpoint; the same command again"),
      # ------------------------------------------------------------ checkpoint integrity
      C("zero bytes in latest: resume", ckpt, train(), expect="ok", setup=damaged("zero bytes"),
        check=resume_fell_back),
      C("zero bytes (every 4 KiB) in latest: generate", ckpt, generate(), expect="ok",
        setup=damaged("zero bytes everywhere"), check=read_fell_back),
      C("zero bytes (every 4 KiB) in latest: export", ckpt, export("--format=hf", "--out={d}/hf"), expect="ok",
        setup=damaged("zero bytes everywhere", template="hf"), check=read_fell_back),
      C("data file deleted in latest: resume", ckpt, train(), expect="ok", setup=damaged("delete data file"),
        check=resume_fell_back),
      C("_CHECKPOINT_METADATA garbled: resume", ckpt, train(), expect="ok", setup=damaged("garble metadata"),
        check=resume_fell_back_or_intact),
      C("checksums deleted in latest: resume", ckpt, train(), expect="ok", setup=damaged("delete checksums"),
        check=resume_fell_back),
      C("checksums deleted in latest: generate", ckpt, generate(), expect="ok", setup=damaged("delete checksums"),
        check=read_fell_back),
      C("data iterator garbled in latest: resume", ckpt, train(), expect="ok", setup=damaged("garble iterator"),
        check=resume_fell_back),
      C("unfinished save left a tmp dir: resume", ckpt, train(), expect="ok", setup=damaged("tmp dir"),
        check=resumed),
      C("every step corrupt: resume", ckpt, train(), setup=damaged("zero bytes", "all"), match="no intact checkpoint"),
      C("every step corrupt (every 4 KiB): generate", ckpt, generate(), setup=damaged("zero bytes everywhere", "all"),
        match="no intact checkpoint"),
      C("NaN run (lr 1e6)", ckpt, None, drive=drive_nan, slow=True,
        about="train lr=lr2=1e6, 40 steps, checkpoint_every=1; restore the step it names; generate"),
      # ------------------------------------------------------------ metrics.jsonl
      C("metrics torn last line: resume", met, train(), expect="ok", check=resumed,
        setup=edit_metrics(lambda ls: "\n".join(ls) + '\n{"step": 41, "loss": 1.2')),
      C("metrics corrupt middle line: resume", met, train(), match=r"metrics\.jsonl line 2",
        setup=edit_metrics(lambda ls: "\n".join([ls[0], "garbage{", *ls[2:]]) + "\n")),
      C("metrics rows past the checkpoint: resume", met, train(), expect="ok", setup=rewound(30), check=resumed),
      C("metrics deleted: resume", met, train(), expect="ok",
        setup=rewound(35, then=lambda ctx: (ctx.w / "metrics.jsonl").unlink()), check=resumed),
      # ------------------------------------------------------------ the workdir lock
      C("second trainer on a locked workdir", lock, None, drive=drive_second_trainer, slow=True,
        about="train (~45 s) in the background; once WORKDIR/LOCK exists, the same command again"),
      C("lock held by a live process", lock, None, drive=drive_flock_holder, setup=rewound(35),
        about="a process holding flock(WORKDIR/LOCK); train on that workdir"),
      C("stale lock of a dead pid", lock, train(), expect="ok", setup=stale_lock(), check=lock_taken_over()),
      C("lock written by another host", lock, train(), setup=stale_lock(host="faults-other-host"),
        match="faults-other-host"),
      C("lock file garbled", lock, train(), expect="ok", setup=stale_lock(text="not json"),
        check=lock_taken_over(warn=False)),
      # ------------------------------------------------------------ a full disk (RLIMIT_FSIZE)
      C("disk full at a checkpoint save", disk, None, slow=True,
        drive=drive_disk_full(30, 100_000, r"step 35.*last complete checkpoint is step 30"),
        about="rewound to step 30; train under RLIMIT_FSIZE=100 kB; then train without the limit"),
      C("disk full at the first save", disk, None, slow=True,
        drive=drive_disk_full(None, 100_000, r"step 5 .*last complete checkpoint is none"),
        about="a fresh train under RLIMIT_FSIZE=100 kB; then train without the limit"),
      C("disk full writing config.json", disk, None, slow=True,
        drive=drive_disk_full(35, 1_000, r"File too large|No space|config\.json"),
        about="rewound to step 35; train under RLIMIT_FSIZE=1000 B; then train without the limit"),
      # ------------------------------------------------------------ generate
      C("generate: workdir missing", gen, generate(workdir="{d}/absent"), match="absent"),
      C("generate: no checkpoints", gen, generate(), match="no checkpoint",
        setup=lambda ctx: (ctx.copy("b158"), shutil.rmtree(ctx.w / "checkpoints"))),
      C("generate: config.json garbled", gen, generate(), match="config.json",
        setup=lambda ctx: (ctx.copy("b158"), (ctx.w / "config.json").write_text("{garbled"))),
      C("generate: max_new_tokens negative", gen, generate("--max_new_tokens=-5"), setup=copy_b158,
        match="max_new_tokens"),
      C("generate: longer than max_seq_len", gen, generate("--max_new_tokens=1000"), setup=copy_b158,
        match="max_seq_len"),
      C("generate: top_p above 1", gen, generate("--temperature=1", "--top_p=1.5"), setup=copy_b158,
        match="top_p"),
      C("generate: kv_cache unknown", gen, generate("--kv_cache=int2"), setup=copy_b158, match="kv_cache"),
      C("generate: tokenizer file replaced", gen, generate(), setup=other_tokenizer, match="tokenizer"),
      C("generate: non-ASCII prompt", gen, generate("--prompt=héllo ✓ 日本"), expect="ok", setup=copy_b158,
        check=lambda ctx, p: ctx.check_unchanged() if p.stdout.strip() else ctx.bad("wrong", "no text printed")),
      # ------------------------------------------------------------ export
      C("export: workdir missing", exp, export("--format=hf", "--out={d}/hf", workdir="{d}/absent"), match="absent",
        check=not_created("hf")),
      C("export: out is the workdir", exp, export("--format=hf", "--out={w}"), setup=copy_b158,
        match="overwrite the run"),
      C("export: out inside checkpoints", exp, export("--format=hf", "--out={w}/checkpoints/hf"), setup=copy_b158,
        match="overwrite the run"),
      C("export: out is another run", exp, export("--format=hf", "--out={d}/other"), match="training run",
        setup=lambda ctx: (ctx.copy("b158"), ctx.copy("b158", ctx.d / "other")),
        check=lambda ctx, p: ctx.check_unchanged(ctx.d / "other", snapshot(ctx.t["b158"] / "run"))),
      C("export: fp run to gguf", exp, export("--format=gguf", "--out={d}/fp.gguf"), setup=copy_hf,
        match="ternary|b158", check=not_created("fp.gguf")),
      C("export: step missing", exp, export("--format=hf", "--out={d}/hf", "--step=999"), setup=copy_hf,
        match="999", check=not_created("hf")),
      C("export: out under a file", exp, export("--format=hf", "--out={d}/afile/hf"),
        setup=write("afile", "x", then=copy_hf), match="afile"),
      # ------------------------------------------------------------ experiments
      C("kv_cache: workdir missing", ex, experiment("kv_cache", "--workdir={d}/absent", "--out={d}/kv.json"),
        match="absent", check=not_created("kv.json")),
      C("ptq: workdir missing", ex, experiment("ptq", "--workdir={d}/absent", "--out={d}/out"), match="absent",
        check=not_created("out")),
      C("ptq: workdir holds no fp run", ex, experiment("ptq", "--workdir={d}/sweep", "--out={d}/out"),
        setup=lambda ctx: (ctx.d / "sweep").mkdir(), match="fp", check=not_created("out")),
      C("scaling: tokens per parameter zero", ex, experiment("scaling", "--tokens_per_param=0", "--workdir={d}/sweep",
                                                             "--out={d}/out"),
        match="tokens", check=not_created("sweep", "out")),
      C("lr_sweep: one learning rate", ex, experiment("lr_sweep", "--lrs", "1e-3", "--workdir={d}/sweep",
                                                      "--out={d}/out"), match="lrs", check=not_created("sweep")),
      C("lr_sweep: negative learning rate", ex, experiment("lr_sweep", "--lrs", "-1", "1e-3", "--workdir={d}/sweep",
                                                           "--out={d}/out"), match="lrs", check=not_created("sweep")),
      C("energy: unknown preset", ex, experiment("energy", "--ratio-preset=nope", "--out={d}/out"),
        match="nope", check=not_created("out")),
      C("energy: negative weight bits", ex, experiment("energy", "--weight-bits=-1", "--out={d}/out"),
        match="weight-bits|weight_bits", check=not_created("out")),
      C("compare: unknown variant", ex, ["-m", "bitnet_jax.compare", "--variants=nope", "--size=tiny",
                                         "--workdir={d}/runs"], match="unknown config variant",
        check=not_created("runs")),
      # ------------------------------------------------------------ lm_eval
      C("lm_eval: workdir missing", lme, lm_eval("workdir={d}/absent"), match="not a directory"),
      C("lm_eval: unknown model arg", lme, lm_eval("workdir={w},colour=blue"), setup=copy_b158, match="colour"),
      C("lm_eval: max_length too long", lme, lm_eval("workdir={w},max_length=4096"), setup=copy_b158,
        match="max_length"),
      C("lm_eval: unknown task", lme, lm_eval("workdir={w}")[:-1] + ["nonexistent_task_xyz"], setup=copy_b158,
        match="nonexistent_task_xyz"),
  ]
  names = [c.name for c in out]
  assert len(names) == len(set(names)), "case names must be unique"
  return out


# --------------------------------------------------------------------------------------------------------------
# Templates, report.
# --------------------------------------------------------------------------------------------------------------
def build_templates(tmp: Path) -> dict:
  """Trains the two template runs (in parallel) and reads what the cases compare against."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "BITNET_JAX_DEBUG": "0"}
  b158, hf = tmp / "templates" / "b158", tmp / "templates" / "hf"
  b158.mkdir(parents=True)
  hf.mkdir(parents=True)
  hf_tokenizer(hf / "tok.json", vocab=250)
  text_corpus(hf / "texts")
  jobs = {name: subprocess.Popen([PY, *[a.format(w=d / "run") for a in argv]], cwd=d, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for name, d, argv in (("b158", b158, train()), ("hf", hf, hf_train()))}
  for name, p in jobs.items():
    out, err = p.communicate(timeout=600)
    if p.returncode != 0:
      raise SystemExit(f"faults: the {name} template run failed (exit {p.returncode}):\n{err[-3000:]}")
  rows = [json.loads(line) for line in metrics_lines(b158 / "run")]
  if steps_of(b158 / "run") != list(STEPS_KEPT):
    raise SystemExit(f"faults: the b158 template kept steps {steps_of(b158 / 'run')}, expected {STEPS_KEPT}")
  tps = json.loads((b158 / "run" / "summary.json").read_text())["tokens_per_s"]
  return {"b158": b158, "hf": hf, "rows": rows, "checksums": checksums(b158 / "run", LAST),
          "steps_per_s": tps / (8 * 64)}


def shorten(text: str, tmp: str, n: int = 110) -> str:
  text = text.replace(tmp, "$TMP").replace("|", "\\|")
  return text if len(text) <= n else text[:n - 1] + "…"


def markdown(results: list[dict], tmp: str) -> str:
  lines = ["| case | category | outcome | last stderr line (a warning, if it exited 0) |", "|---|---|---|---|"]
  for r in results:
    outcome = r["outcome"] if r["outcome"] == "handled" else f"**{r['outcome']}**"
    lines.append(f"| {r['name']} | {r['category']} | {outcome} | `{shorten(r['last_line'], tmp)}` |")
  return "\n".join(lines)


def totals(results: list[dict]) -> str:
  n = {o: sum(r["outcome"] == o for r in results) for o in OUTCOMES}
  return (f"{len(results)} bad inputs and faults tried: {n['handled']} handled, {n['traceback']} with a traceback, "
          f"{n['wrong']} wrong, {n['lost work']} lost work")


def header(argv: list[str]) -> str:
  cpu = next((line.split(":", 1)[1].strip() for line in
              subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
              if line.startswith("Model name")), platform.processor() or "?")
  jax_version = subprocess.run([PY, "-c", "import jax; print(jax.__version__)"], capture_output=True, text=True,
                               env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout.strip()
  date = datetime.datetime.now(datetime.timezone.utc).strftime("%a %b %d %H:%M:%S UTC %Y")
  return (f"Command: `python benchmarks/faults.py {' '.join(argv)}`\n\n"
          f"Date: {date}; CPU: {cpu} ({os.cpu_count()} cores); jax {jax_version}; Python {platform.python_version()}")


def main(argv=None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--only", action="append", default=None,
                      help="run the cases whose name or category contains this substring (repeatable: any of them)")
  parser.add_argument("--list", action="store_true", help="list the cases and their commands, run nothing")
  parser.add_argument("--json", default=None, help="write the results (commands, exit codes, stderr tails) here")
  parser.add_argument("--md", default=None, help="write the report (header, table, totals) here")
  parser.add_argument("--jobs", type=int, default=2, help="cases run at once (default 2)")
  parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
  args = parser.parse_args(argv)
  selected = [c for c in cases() if not args.only or any(o.lower() in f"{c.name} {c.category}".lower()
                                                         for o in args.only)]
  if args.list:
    for c in selected:
      what = " ".join(c.cmd) if c.cmd else c.about
      print(f"{c.category:20s} {c.name:45s} expect {c.expect:5s} python {what}")
    print(f"{len(selected)} cases")
    return
  if not selected:
    raise SystemExit(f"faults: no case matches --only={args.only!r}")

  # A shell's background job ignores SIGINT and its children inherit that; the Ctrl-C case needs the default.
  signal.signal(signal.SIGINT, signal.default_int_handler)
  tmp = Path(tempfile.mkdtemp(prefix="faults-"))
  t0 = time.perf_counter()
  try:
    print(f"training the template runs in {tmp} ...", flush=True)
    templates = build_templates(tmp)
    order = sorted(selected, key=lambda c: not c.slow)
    results = {}
    lock = threading.Lock()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool, tqdm(total=len(order), unit="case") as bar:
      futures = {pool.submit(run_case, c, tmp, templates, args.keep): c for c in order}
      for future in as_completed(futures):
        r = future.result()
        with lock:
          results[r["name"]] = r
          bar.write(f"{r['outcome']:9s} {r['seconds']:5.0f} s  {r['category']:20s} {r['name']}"
                    + (f"  ({shorten(r['why'], str(tmp), 160)})" if r["why"] else ""))
          bar.update(1)
    ordered = [results[c.name] for c in selected]
    report = "\n\n".join([header(argv), markdown(ordered, str(tmp)), totals(ordered)])
    print(f"\n{report}\n\n({time.perf_counter() - t0:.0f} s)")
    if args.json:
      Path(args.json).write_text(json.dumps({"totals": totals(ordered), "tmp": str(tmp), "results": ordered},
                                            indent=2))
    if args.md:
      Path(args.md).write_text(report + "\n")
  finally:
    if not args.keep:
      shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
