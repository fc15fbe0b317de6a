"""cli: one `error:` line for the command-line tools (beside every CLI: train, generate, export, compare, lm_eval,
experiments; it imports nothing of ours).

A user's mistake (a bad flag value, a missing file, a run that cannot be resumed as asked) ends the process with
one line, `PROG: error: MESSAGE`, and exit status 1; a bug keeps its traceback. The line between them:
`OSError`s (missing files, permissions, a full disk) and the errors this package raises on purpose (a
`ValueError`, `KeyError` or `FloatingPointError` raised from a file of this repository, or any exception that
derives from `UserError`) are the user's; anything else raised elsewhere is a bug. `--debug` on the command line,
or `BITNET_JAX_DEBUG=1` in the environment, shows the traceback of every error.

    def main(argv=None): ...
    if __name__ == "__main__":
      cli.run("generate", main)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Sequence, TypeVar

DEBUG_ENV = "BITNET_JAX_DEBUG"
EXIT_ERROR = 1
# The repository's own code: errors raised from files under these folders are deliberate messages.
_OWN_ROOT = Path(__file__).resolve().parent.parent
_OWN_DIRS = ("bitnet_jax", "experiments", "configs", "benchmarks")
_OWN_TYPES = (ValueError, KeyError, FloatingPointError)

T = TypeVar("T")


class UserError(Exception):
  """An error whose message is the whole story for the user (wherever it was raised)."""


def debug_requested(argv: Sequence[str] | None = None) -> bool:
  argv = sys.argv[1:] if argv is None else argv
  return "--debug" in argv or os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")


def strip_debug(argv: Sequence[str]) -> list[str]:
  """`argv` without `--debug` (which the tools' own parsers do not know)."""
  return [a for a in argv if a != "--debug"]


def raised_in(exc: BaseException, directory: str | Path) -> bool:
  """Whether the innermost frame of `exc`'s traceback (where it was raised) is a file under `directory`."""
  tb, last = exc.__traceback__, None
  while tb is not None:
    last, tb = tb.tb_frame.f_code.co_filename, tb.tb_next
  return last is not None and Path(last).resolve().is_relative_to(Path(directory).resolve())


def _raised_in_own_code(exc: BaseException) -> bool:
  return any(raised_in(exc, _OWN_ROOT / d) for d in _OWN_DIRS)


def is_user_error(exc: BaseException) -> bool:
  """True for the errors `run` prints as one line (see the module docstring)."""
  if isinstance(exc, (UserError, OSError)):
    return True
  return isinstance(exc, _OWN_TYPES) and _raised_in_own_code(exc)


def one_line(exc: BaseException) -> str:
  """The message of `exc` on one line. Multi-line messages (orbax's, absl's) are reduced to their last line that
  says what went wrong (an `[Errno ...]` line or an `XxxError: ...` line), else joined."""
  text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
  text = text.split(". See full TensorStore details")[0]   # tensorstore appends its whole spec (kilobytes)
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if not lines:
    return type(exc).__name__
  if len(lines) == 1:
    return lines[0]
  for line in reversed(lines):
    if line.startswith("[Errno") or (": " in line and line.split(":", 1)[0].endswith(("Error", "Exception"))):
      return f"{lines[0]} ({line})" if line != lines[0] else line
  return " ".join(lines)


def report(prog: str, exc: BaseException) -> None:
  print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)


def run(prog: str, main: Callable[[list[str]], T], argv: Sequence[str] | None = None) -> T:
  """Calls `main(argv without --debug)`; a user error (`is_user_error`) becomes one `PROG: error:` line on stderr
  and `SystemExit(1)`, unless `--debug` / `BITNET_JAX_DEBUG` asks for the traceback."""
  argv = list(sys.argv[1:] if argv is None else argv)
  debug = debug_requested(argv)
  if debug:
    os.environ[DEBUG_ENV] = "1"
  try:
    return main(strip_debug(argv))
  except BrokenPipeError:   # `... | head` closed our stdout: not an error of the tool
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    raise SystemExit(EXIT_ERROR) from None
  except KeyboardInterrupt:
    print(f"{prog}: interrupted", file=sys.stderr)
    raise SystemExit(130) from None
  except Exception as e:  # noqa: BLE001
    if debug or not is_user_error(e):
      raise
    report(prog, e)
    raise SystemExit(EXIT_ERROR) from None
