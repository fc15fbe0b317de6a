"""Tests for bitnet_jax/cli.py and the CLIs that go through it: one `PROG: error:` line, `--debug` tracebacks."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bitnet_jax import cli, data, data_tfds
from configs import lm

ROOT = Path(__file__).resolve().parents[1]
DEBUG_HELP = "--debug shows the traceback of an error"


def _raise_from(filename: Path, statement: str) -> None:
  """Runs `statement` as code of `filename` (nothing is written there): the traceback's last frame is that file."""
  exec(compile(statement, str(filename), "exec"), {})


def _caught(fn, *args, **kwargs) -> BaseException:
  try:
    fn(*args, **kwargs)
  except BaseException as e:  # noqa: BLE001
    return e
  raise AssertionError(f"{fn} raised nothing")


@pytest.fixture(autouse=True)
def no_debug_env(monkeypatch):
  """Every test starts without BITNET_JAX_DEBUG, and `cli.run`'s setting of it is undone afterwards."""
  monkeypatch.setenv(cli.DEBUG_ENV, "0")


# --------------------------------------------------------------------------------------------------------------
# one_line
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("exc, line", [
    (ValueError("bad --steps"), "bad --steps"),
    (ValueError("  padded  \n\n"), "padded"),
    (ValueError("Failed to restore checkpoint:\n  at step 7\n[Errno 2] No such file or directory: 'ckpt'"),
     "Failed to restore checkpoint: ([Errno 2] No such file or directory: 'ckpt')"),
    (ValueError("Something broke.\nTraceback of the server:\nValueError: shape (3,) is not (4,)"),
     "Something broke. (ValueError: shape (3,) is not (4,))"),
    (ValueError("first part\nsecond part"), "first part second part"),
    (KeyError("no such key"), "no such key"),   # str(KeyError) would quote it
    (RuntimeError(""), "RuntimeError"),
])
def test_one_line_reduces_any_message_to_one_line(exc, line):
  assert cli.one_line(exc) == line


# --------------------------------------------------------------------------------------------------------------
# is_user_error
# --------------------------------------------------------------------------------------------------------------
def test_our_value_errors_are_the_users_and_third_party_ones_are_bugs():
  ours = _caught(data.load_corpus, "nope")   # raised in bitnet_jax/data.py
  assert isinstance(ours, ValueError) and cli.is_user_error(ours)
  theirs = _caught(json.loads, "{")          # a ValueError (JSONDecodeError) raised inside the json package
  assert isinstance(theirs, ValueError) and not cli.is_user_error(theirs)
  missing = _caught(lambda: os.environ["BITNET_JAX_NO_SUCH_VARIABLE"])   # KeyError raised in os.py
  assert isinstance(missing, KeyError) and not cli.is_user_error(missing)


def test_a_builtins_error_belongs_to_the_file_that_called_it():
  """A builtin has no frame of its own: `int("x")` ends its traceback in the caller's file. Called from our code
  (which parses a user's text) it is the user's; called from anywhere else (here: tests/) it is a bug."""
  here = _caught(int, "x")
  assert isinstance(here, ValueError) and not cli.is_user_error(here)
  ours = _caught(_raise_from, ROOT / "bitnet_jax" / "not_a_module.py", "int('x')")
  assert isinstance(ours, ValueError) and cli.is_user_error(ours)
  bug = _caught(_raise_from, ROOT / "bitnet_jax" / "not_a_module.py", "raise RuntimeError('ours, but a bug')")
  assert not cli.is_user_error(bug)                      # only ValueError, KeyError, FloatingPointError count
  outside = _caught(_raise_from, ROOT / "tests" / "not_a_test.py", "raise ValueError('x')")
  assert not cli.is_user_error(outside)                  # tests/ is not one of the package's folders


def test_file_errors_and_user_errors_count_wherever_they_are_raised(tmp_path):
  missing = _caught(open, tmp_path / "absent.txt")
  assert isinstance(missing, FileNotFoundError) and cli.is_user_error(missing)
  assert cli.is_user_error(_caught(_raise_from, tmp_path / "elsewhere.py", "raise PermissionError('read-only')"))
  assert cli.is_user_error(cli.UserError("any message"))


# --------------------------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------------------------
def test_run_returns_mains_result_and_passes_argv_without_debug():
  seen = []
  assert cli.run("prog", lambda argv: seen.append(argv) or "done", ["--a=1", "--debug", "b"]) == "done"
  assert seen == [["--a=1", "b"]]


def test_run_turns_a_user_error_into_one_line_and_exit_1(capsys):
  def main(argv):
    print("started")
    data.load_corpus("nope")

  with pytest.raises(SystemExit) as info:
    cli.run("prog", main, [])
  assert info.value.code == cli.EXIT_ERROR == 1
  out, err = capsys.readouterr()
  assert out == "started\n"
  assert err.splitlines() == [f"prog: error: {cli.one_line(_caught(data.load_corpus, 'nope'))}"]
  assert err.startswith("prog: error: unknown source 'nope'")


def test_run_turns_a_multi_line_file_error_into_one_line(capsys):
  def main(argv):
    raise FileNotFoundError("cannot restore run:\n  checkpoints/ is empty\n[Errno 2] No such file: 'x'")

  with pytest.raises(SystemExit):
    cli.run("train", main, [])
  assert capsys.readouterr().err == "train: error: cannot restore run: ([Errno 2] No such file: 'x')\n"


def test_run_keeps_the_traceback_of_a_bug(capsys):
  with pytest.raises(json.JSONDecodeError):
    cli.run("prog", lambda argv: json.loads("{"), [])
  with pytest.raises(ZeroDivisionError):
    cli.run("prog", lambda argv: 1 / 0, [])
  assert capsys.readouterr().err == ""


def test_debug_flag_reraises_and_sets_the_environment_for_children(capsys):
  with pytest.raises(ValueError, match="unknown source 'nope'"):
    cli.run("prog", lambda argv: data.load_corpus("nope"), ["--debug"])
  assert os.environ[cli.DEBUG_ENV] == "1"
  assert capsys.readouterr().err == ""


@pytest.mark.parametrize("value, debug", [("1", True), ("true", True), ("0", False), ("", False), ("no", False)])
def test_debug_environment_variable(value, debug, monkeypatch, capsys):
  monkeypatch.setenv(cli.DEBUG_ENV, value)
  assert cli.debug_requested([]) is debug
  if debug:
    with pytest.raises(ValueError):
      cli.run("prog", lambda argv: data.load_corpus("nope"), [])
  else:
    with pytest.raises(SystemExit):
      cli.run("prog", lambda argv: data.load_corpus("nope"), [])
    assert capsys.readouterr().err.startswith("prog: error: unknown source")


def test_interrupt_exits_130_without_a_traceback(capsys):
  def main(argv):
    raise KeyboardInterrupt

  with pytest.raises(SystemExit) as info:
    cli.run("prog", main, [])
  assert info.value.code == 130 and capsys.readouterr().err == "prog: interrupted\n"


# --------------------------------------------------------------------------------------------------------------
# The CLIs: --debug in their help, never rejected by their parsers.
# --------------------------------------------------------------------------------------------------------------
def _experiment(name: str):
  spec = importlib.util.spec_from_file_location(f"experiments_{name}", ROOT / "experiments" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _bitnet(name: str):
  return importlib.import_module(f"bitnet_jax.{name}")


@pytest.mark.parametrize("load, name", [(_experiment, "energy"), (_experiment, "kv_cache"), (_experiment, "lr_sweep"),
                                        (_experiment, "ptq"), (_experiment, "scaling"), (_bitnet, "compare"),
                                        (_bitnet, "model")])
def test_every_cli_documents_debug_and_strips_it_from_sys_argv(load, name, monkeypatch, capsys):
  main = load(name).main
  with pytest.raises(SystemExit) as info:
    main(["--help"])
  assert info.value.code == 0 and capsys.readouterr().out.count(DEBUG_HELP) == 1
  monkeypatch.setattr(sys, "argv", [name, "--debug", "--help"])   # main() reading sys.argv itself
  with pytest.raises(SystemExit) as info:
    main()
  assert info.value.code == 0 and DEBUG_HELP in capsys.readouterr().out


def test_lm_eval_main_never_hands_debug_to_the_harness(monkeypatch):
  import lm_eval.__main__
  from bitnet_jax.interop import lm_eval as ours
  seen = []
  monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", lambda: seen.append(list(sys.argv[1:])))
  ours.main(["--debug", "--model_args", "workdir=runs/x", "--tasks", "piqa"])
  monkeypatch.setattr(sys, "argv", ["lm_eval", "ls", "tasks", "--debug"])
  ours.main()
  assert seen == [["run", "--model", "bitnet_jax", "--model_args", "workdir=runs/x", "--tasks", "piqa"],
                  ["ls", "tasks"]]


# --------------------------------------------------------------------------------------------------------------
# The CLIs as processes.
# --------------------------------------------------------------------------------------------------------------
def _run(args: list[str], debug_env: bool = False, timeout: int = 120) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", cli.DEBUG_ENV: "1" if debug_env else "0"}
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("args, line", [
    (["-m", "experiments.kv_cache", "--workdir={tmp}/absent"],
     "kv_cache: error: {tmp}/absent is not a training run (no config.json); train one with `make train`, or use "
     "--smoke"),
    (["-m", "bitnet_jax.compare", "--variants=nope", "--size=tiny", "--workdir={tmp}/runs"],
     "compare: error: unknown config variant 'nope-tiny'; valid: b158-tiny,"),
    (["experiments/energy.py", "--ratio-preset=nope", "--out={tmp}/out"],
     "energy: error: unknown model preset 'nope'; valid names: bitnet-125m,"),
    (["-m", "bitnet_jax.interop.lm_eval", "--model_args", "workdir={tmp}/absent", "--tasks", "piqa"],
     "lm_eval: error: bitnet_jax lm_eval model: workdir='{tmp}/absent' is not a directory"),
], ids=["kv_cache", "compare", "energy", "lm_eval"])
def test_cli_error_is_one_line_and_exit_1(args, line, tmp_path):
  out = _run([a.format(tmp=tmp_path) for a in args])
  assert out.returncode == 1, out.stderr[-3000:]
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  assert out.stderr.strip().splitlines()[-1].startswith(line.format(tmp=tmp_path))
  # lm_eval's harness logs its progress on stderr first; ours print nothing else there
  assert len(out.stderr.strip().splitlines()) == 1 or "lm_eval" in args[1]


@pytest.mark.parametrize("args, debug_env, last", [
    (["-m", "experiments.kv_cache", "--workdir={tmp}/absent", "--debug"], False,
     "FileNotFoundError: {tmp}/absent is not a training run (no config.json)"),
    (["experiments/energy.py", "--ratio-preset=nope", "--out={tmp}/out"], True,
     "ValueError: unknown model preset 'nope'"),
], ids=["kv_cache --debug", "energy BITNET_JAX_DEBUG=1"])
def test_cli_debug_shows_the_traceback(args, debug_env, last, tmp_path):
  out = _run([a.format(tmp=tmp_path) for a in args], debug_env=debug_env)
  assert out.returncode == 1
  assert "Traceback (most recent call last)" in out.stderr and "error:" not in out.stderr
  assert out.stderr.strip().splitlines()[-1].startswith(last.format(tmp=tmp_path))


# --------------------------------------------------------------------------------------------------------------
# The messages behind them: TFDS datasets, config args.
# --------------------------------------------------------------------------------------------------------------
def test_unknown_tfds_dataset_is_one_line_naming_it(tmp_path):
  error = _caught(data.load_corpus, "tfds:nonexistent_ds", data_dir=str(tmp_path))
  assert isinstance(error, ValueError) and cli.is_user_error(error)
  message = str(error)
  assert "\n" not in message and len(message) < 300
  assert message.startswith("tfds:nonexistent_ds: TFDS knows no dataset 'nonexistent_ds'")
  assert str(tmp_path) in message and "list_builders(with_community_datasets=False)" in message
  assert list(tmp_path.iterdir()) == []   # nothing downloaded or prepared
  close = str(_caught(data_tfds.open_tfds, "mnits", "train", str(tmp_path)))
  assert "tfds:mnits:" in close and "did you mean mnist" in close and "\n" not in close


def test_unknown_tfds_version_is_one_line(tmp_path):
  error = _caught(data_tfds.open_tfds, "mnist:9.9.9", "train", str(tmp_path))
  assert isinstance(error, ValueError) and cli.is_user_error(error)
  assert str(error).startswith("tfds:mnist:9.9.9: Dataset mnist cannot be loaded at version 9.9.9, only: ")
  assert "\n" not in str(error)


@pytest.mark.parametrize("arg, message", [
    ("b158-tiny,seed=x", "config arg has unknown key 'seed'; valid keys: variant, steps, batch, seq_len, smoke"),
    ("b158-tiny,steps=abc", "config arg steps='abc': expected an int"),
    ("b158-tiny,batch=1.5", "config arg batch='1.5': expected an int"),
    ("b158-tiny,seq_len=-8", "config arg seq_len=-8: expected a positive int (or 0 for the variant's default)"),
    ("b158-tiny,smoke=maybe", "config arg smoke='maybe': expected a boolean"),
    ("b158-tiny,steps", "config arg 'steps': expected key=value (valid keys: variant, steps, batch, seq_len, smoke)"),
    ("nope", "unknown config variant 'nope'; valid: b158-tiny,"),
])
def test_config_arg_errors_name_the_key(arg, message):
  error = _caught(lm.get_config, arg)
  assert isinstance(error, ValueError) and cli.is_user_error(error)
  assert str(error).startswith(message) and "\n" not in str(error)
