"""docs: README.md and docs/*.md stay true to the tree: links resolve, quoted commands parse their flags.

- Every relative link `[..](path)` and image `![..](path)` resolves to an existing file (http(s)/mailto links and
  pure #anchors are skipped; a #fragment is stripped before the check).
- Every command the docs quote, in a shell code block (``` with no language, bash, sh, shell, console) or in an
  inline code span, is checked by entry point: `python -m bitnet_jax.X` and `python benchmarks/*.py` /
  `python experiments/*.py` run `--help` once each (in parallel, JAX_PLATFORMS=cpu) and every `--flag` the docs
  use must appear in that help; `--config.a.b=...` overrides of `python -m bitnet_jax.train` are checked against
  the config that `--config=configs/lm.py:ARG` names (`get_config(ARG)`); `make X` targets must be in the Makefile.
  Backslash continuations are joined; ```python blocks are Python, not commands, and are skipped.
- Config keys the prose quotes (`config.data.source`, `--config.train.quant_warmup_steps=N`) exist.
- Every docs page is linked from the README and links back to it.
About 35 s on 2 CPU cores, nearly all of it the nine `--help` runs (each imports jax).
"""
from __future__ import annotations

import collections
import importlib
import os
import pathlib
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}
HELP_TIMEOUT_S = 120

# ------------------------------------------------------------------------------------------ parsing the Markdown


def _split_fences(text: str) -> tuple[str, list[tuple[str, list[str]]]]:
  """text -> (the prose with fenced blocks blanked out, [(language, lines) of each fenced block])."""
  prose, blocks, block = [], [], None
  for line in text.split("\n"):
    fence = re.match(r"\s*(```|~~~)\s*([\w+-]*)", line)
    if block is None and fence:
      block = (fence.group(2).lower(), [])
      prose.append("")
    elif block is not None and re.match(r"\s*(```|~~~)\s*$", line):
      blocks.append(block)
      block = None
      prose.append("")
    elif block is not None:
      block[1].append(line)
      prose.append("")
    else:
      prose.append(line)
  assert block is None, "unclosed code fence"
  return "\n".join(prose), blocks


def _code_spans(prose: str) -> list[str]:
  """Inline code spans (they may wrap onto the next line, never across a blank line)."""
  return [" ".join(s.split()) for s in re.findall(r"`([^`]+)`", prose) if "\n\n" not in s]


def _link_targets(prose: str) -> list[str]:
  """Targets of inline links and images, `[..](t)` / `![..](t)` (nested badges included), and `[x]: t` refs."""
  prose = re.sub(r"`[^`]*`", "", prose)
  targets = re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose)
  targets += re.findall(r"^\s*\[[^\]]+\]:\s*(\S+)", prose, flags=re.M)
  return targets


def _join_continuations(lines: list[str]) -> list[str]:
  out, cur = [], ""
  for line in lines:
    if line.rstrip().endswith("\\"):
      cur += line.rstrip()[:-1] + " "
    else:
      out.append(cur + line)
      cur = ""
  if cur:
    out.append(cur)
  return out


# `python -m bitnet_jax.x`, `python benchmarks/x.py`, `.venv/bin/python experiments/x.py`, ... anywhere in a line
# (a `--command="... && .venv/bin/python -m ..."` included); the command runs to `&&`, `||`, `;` or `|`.
_PYTHON = re.compile(r"(?:^|(?<=[\s\"'(;&|]))(?:[\w./-]*/)?python3?\s+(-m\s+[\w.]+|[\w./-]+\.py)")
_MAKE = re.compile(r"(?:^|&&|;|\|\|)\s*make\s+([\w.-]+)")

Command = collections.namedtuple("Command", "doc entry args text")


def _commands_in(line: str, doc: str) -> tuple[list[Command], list[str]]:
  """One shell line -> (python commands, make targets)."""
  line = line.strip()
  if not line or line.startswith("#"):
    return [], []
  cmds = []
  for m in _PYTHON.finditer(line):
    entry = " ".join(m.group(1).split())
    tail = re.split(r"&&|\|\||;|\s\|\s", line[m.end():])[0].strip()
    if tail.count('"') % 2 and tail.endswith('"') or tail.count("'") % 2 and tail.endswith("'"):
      tail = tail[:-1]   # the closing quote of an enclosing --command="..."
    try:
      args = shlex.split(tail, comments=True)
    except ValueError as e:
      raise AssertionError(f"{doc}: cannot split the command {line!r}: {e}") from e
    cmds.append(Command(doc, entry, args, line))
  return cmds, _MAKE.findall(line)


def _collect() -> tuple[list[Command], list[tuple[str, str]]]:
  cmds, targets = [], []
  for path in DOCS:
    doc = str(path.relative_to(ROOT))
    prose, blocks = _split_fences(path.read_text())
    lines = [l for lang, ls in blocks if lang in SHELL_LANGS for l in _join_continuations(ls)]
    spans = [s for s in _code_spans(prose) if _PYTHON.match(s) or _MAKE.match(s)]
    # `benchmarks/matvec.py --interpret`: a script quoted with its flags but without `python`
    spans += [f"python {s}" for s in _code_spans(prose) if re.match(r"(benchmarks|experiments)/[\w/]+\.py\s+--", s)]
    for line in lines + spans:
      c, t = _commands_in(line, doc)
      cmds += c
      targets += [(doc, x) for x in t]
  return cmds, targets


COMMANDS, MAKE_TARGETS = _collect()


def _flags(args: list[str]) -> list[str]:
  return [a[2:].split("=", 1)[0] for a in args if a.startswith("--") and len(a) > 2]


def _is_ours(entry: str) -> bool:
  """Entry points this repository owns: `-m bitnet_jax.*`, benchmarks/ and experiments/ scripts."""
  return entry.startswith("-m bitnet_jax") or re.match(r"(benchmarks|experiments)/", entry) is not None


def _entry_file(entry: str) -> pathlib.Path:
  if entry.startswith("-m "):
    rel = pathlib.Path(*entry[3:].split("."))
    return ROOT / rel.with_suffix(".py") if (ROOT / rel.with_suffix(".py")).exists() else ROOT / rel / "__main__.py"
  return ROOT / entry


# Entry points whose --help the flag checks need: those the docs pass flags to (other than --config.* overrides).
HELP_ENTRIES = sorted({c.entry for c in COMMANDS if _is_ours(c.entry)
                       and any(not f.startswith("config.") for f in _flags(c.args))})

# ------------------------------------------------------------------------------------------------ the tests


def test_the_docs_are_found_and_parsed():
  """The collectors see what the docs hold (so an empty parse cannot pass every other test vacuously)."""
  assert len(DOCS) >= 5, DOCS
  entries = {c.entry for c in COMMANDS}
  assert {"-m bitnet_jax.train", "-m bitnet_jax.export", "benchmarks/train_step.py"} <= entries, entries
  assert any("--dry_run" in c.args for c in COMMANDS), "the backslash-continued dry-run command was not joined"
  assert {t for _, t in MAKE_TARGETS} >= {"train", "test"}


def test_every_docs_page_is_linked_from_the_readme_and_links_back():
  readme = set(_link_targets(_split_fences((ROOT / "README.md").read_text())[0]))
  for page in DOCS[1:]:
    assert f"docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"
    assert any(t.split("#")[0] == "../README.md" for t in _link_targets(_split_fences(page.read_text())[0])), \
        f"docs/{page.name} does not link back to the README"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_images_resolve(doc):
  broken = []
  for target in _link_targets(_split_fences(doc.read_text())[0]):
    if re.match(r"(https?|mailto|ftp):", target) or target.startswith("#"):
      continue
    path = target.split("#", 1)[0].split("?", 1)[0]
    if not (doc.parent / path).exists():
      broken.append(target)
  assert not broken, f"{doc.relative_to(ROOT)}: links to missing files: {broken}"


def test_make_targets_exist():
  makefile = (ROOT / "Makefile").read_text()
  defined = set(re.findall(r"^([\w.-]+)\s*:(?!=)", makefile, flags=re.M))
  missing = sorted({f"{doc}: make {t}" for doc, t in MAKE_TARGETS if t not in defined})
  assert not missing, f"Makefile targets the docs use but the Makefile lacks: {missing}"


def test_entry_points_exist():
  missing = sorted({f"{c.doc}: python {c.entry}" for c in COMMANDS
                    if (_is_ours(c.entry) or c.entry.endswith(".py")) and not _entry_file(c.entry).exists()})
  assert not missing, f"commands whose module or script is not in the tree: {missing}"


@pytest.fixture(scope="module")
def help_texts():
  """`--help` of every entry point the docs pass flags to, run once each, in parallel."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")

  def run(entry):
    argv = [sys.executable, *entry.split(), "--help"]
    p = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=HELP_TIMEOUT_S)
    # absl prints its flags to stdout and exits 1 on --help; argparse exits 0. Booleans show as --[no]flag.
    return entry, (p.stdout + p.stderr).replace("--[no]", "--")

  with ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2))) as pool:
    return dict(pool.map(run, HELP_ENTRIES))


@pytest.mark.parametrize("entry", HELP_ENTRIES)
def test_documented_flags_appear_in_help(entry, help_texts):
  text = help_texts[entry]
  unknown = collections.defaultdict(set)
  for c in COMMANDS:
    if c.entry != entry:
      continue
    for flag in _flags(c.args):
      if flag.startswith("config."):
        continue   # a config override: test_config_overrides_exist
      if not re.search(rf"(?<![\w-])--{re.escape(flag)}(?![\w-])", text):
        unknown[flag].add(c.doc)
  assert not unknown, (f"python {entry}: flags the docs use that --help does not list: "
                       f"{ {f: sorted(d) for f, d in unknown.items()} }\n--- help output (tail) ---\n{text[-3000:]}")


def _load_config(spec: str):
  """`configs/lm.py:ARG` -> configs.lm.get_config(ARG) (ARG may be empty)."""
  path, _, arg = spec.partition(":")
  if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
  module = importlib.import_module(".".join(pathlib.Path(path).with_suffix("").parts))
  return module.get_config(arg or None)


def _has_key(node, keys: list[str]) -> bool:
  for key in keys:
    if not hasattr(node, "keys") or key not in node.keys():
      return False
    node = node[key]
  return True


def test_config_overrides_exist():
  """`--config.a.b=v` on a train command names a field of the config that its `--config=FILE:ARG` builds."""
  problems, configs = [], {}
  for c in COMMANDS:
    overrides = [f for f in _flags(c.args) if f.startswith("config.")]
    if not overrides:
      continue
    specs = [a.split("=", 1)[1] for a in c.args if a.startswith("--config=")]
    if len(specs) != 1:
      problems.append(f"{c.doc}: {c.text!r} sets {overrides} without one --config=FILE:ARG")
      continue
    if specs[0] not in configs:
      configs[specs[0]] = _load_config(specs[0])
    problems += [f"{c.doc}: --{flag} is not a field of the config of --config={specs[0]}"
                 for flag in overrides if not _has_key(configs[specs[0]], flag.split(".")[1:])]
  assert not problems, "config overrides the docs quote that the config lacks:\n" + "\n".join(problems)


def test_config_keys_named_in_prose_exist():
  """`config.data.x` / `--config.model.y=N` quoted in the prose (`config.distributed.{x,y}` expanded) is a field of
  the default config of configs/lm.py (every variant has the same fields). Only spans that start with one of the
  config's sections count: `config.json` and the placeholder `--config.a.b=value` are not keys."""
  config = _load_config("configs/lm.py")
  missing = []
  for path in DOCS:
    for span in _code_spans(_split_fences(path.read_text())[0]):
      m = re.fullmatch(r"(?:--)?config\.([\w.]+?)(?:\.\{([\w,]+)\})?(?:=\S*)?", span)
      if not m:
        continue
      for leaf in (m.group(2).split(",") if m.group(2) else [None]):
        keys = m.group(1).split(".") + ([leaf] if leaf else [])
        if len(keys) > 1 and keys[0] in config.keys() and not _has_key(config, keys):
          missing.append(f"{path.relative_to(ROOT)}: `{span}`")
  assert not missing, "config keys the docs name that configs/lm.py lacks:\n" + "\n".join(missing)
