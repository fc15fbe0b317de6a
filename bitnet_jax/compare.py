"""compare: the quickstart job, BitNet b1.58 against its FP baseline side by side (train, generate -> compare).

    python -m bitnet_jax.compare --workdir=runs/quickstart [--size=small] [--steps=600] [--variants=b158,fp]

Trains each variant of the same size on the embedded corpus (the standard library's source) through
`train.train_and_evaluate`, each in `WORKDIR/<variant>` (resumable; a finished run is only re-evaluated), then
prints a table (eval loss, perplexity, tokens/s, weight memory as trained and packed), writes
`WORKDIR/loss_curves.png`, and prints a sampled continuation of a prompt from each model (its latest checkpoint,
reloaded with `generate.load_run` and decoded by `generate.generate` with a KV cache; temperature 0.8, top-p
0.95, seed 0 by default, `--temperature=0` for greedy).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bitnet_jax import cli, generate, train  # noqa: E402


def _load_config(name: str, steps: int | None):
  sys.path.insert(0, os.getcwd())
  from configs import lm   # configs/ sits at the repository root
  config = lm.get_config(name)
  if steps:
    config.train.steps = steps
    config.train.eval_every = min(config.train.eval_every, steps)
    config.train.checkpoint_every = min(config.train.checkpoint_every, steps)
  return config


PROMPT = "def fibonacci(n):\n    "


def sample(run_dir: Path, n_tokens: int, prompt: str = PROMPT, *, temperature: float = 0.8, top_p: float = 0.95,
           seed: int = 0) -> str:
  """A continuation of `prompt` by the latest checkpoint in `run_dir`, decoded with the run's tokenizer: sampled
  (temperature, nucleus top-p, a fixed seed: the same text every time on one machine) or, with `temperature=0`,
  greedy. Greedy decoding of a byte-level model this small loops ("the the the"); sampling shows what it learned."""
  model, tok = generate.load_run(run_dir)
  out = generate.generate(model, jnp.asarray(tok.encode(prompt), jnp.int32)[None], n_tokens,
                          temperature=temperature, top_p=top_p if temperature else None, seed=seed)
  return tok.decode(np.asarray(out[0]))


def plot_curves(workdir: Path, names: list[str], out: Path) -> None:
  fig, ax = plt.subplots(figsize=(7, 4.2))
  for name, color in zip(names, ("tab:red", "tab:blue", "tab:green", "tab:purple")):
    rows = train.read_metrics(workdir / name / "metrics.jsonl")
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], color=color, alpha=0.5, lw=1,
            label=f"{name} train")
    ev = [r for r in rows if "eval_loss" in r]
    ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", color=color, lw=2, label=f"{name} eval")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats per byte)")
  ax.set_title("BitNet b1.58 vs FP baseline on the Python standard library (byte level)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)


def table(summaries: list[dict]) -> str:
  head = ("| run | eval loss (nats/byte) | eval ppl | bits/byte | tokens/s | weights trained (MB) "
          "| packed 2-bit (MB) | packed 1.6-bit (MB) |")
  rows = [head, "|" + "---|" * 8]
  for s in summaries:
    m = s["weight_memory"]
    rows.append(f"| {s['name']} | {s['eval_loss']:.4f} | {s['eval_ppl']:.3f} | {s['eval_bits_per_token']:.3f} | "
                f"{s['tokens_per_s']:.0f} | {m['trained_mb']:.2f} | {m['packed_2bit_mb']:.2f} | "
                f"{m['packed_1.6bit_mb']:.2f} |")
  return "\n".join(rows)


def main(argv=None) -> dict:
  argv = cli.strip_debug(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   epilog="--debug shows the traceback of an error")
  parser.add_argument("--workdir", default="runs/quickstart")
  parser.add_argument("--size", default="small", help="config size suffix in configs/lm.py (tiny, small)")
  parser.add_argument("--variants", default="b158,fp", help="comma-separated: b158, fp, bitnet")
  parser.add_argument("--steps", type=int, default=None, help="override train.steps")
  parser.add_argument("--sample-tokens", type=int, default=120, help="tokens sampled from each model (0: none)")
  parser.add_argument("--prompt", default=PROMPT, help="the samples' prompt")
  parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0: greedy")
  parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling")
  parser.add_argument("--seed", type=int, default=0, help="sampling seed")
  args = parser.parse_args(argv)
  if args.steps is not None and args.steps < 1:
    parser.error(f"--steps must be a positive int, got {args.steps}")
  from absl import logging
  logging.set_verbosity(logging.WARNING)   # orbax logs every save at INFO

  workdir = Path(args.workdir)
  names = [f"{v}-{args.size}" for v in args.variants.split(",") if v]
  if not names:
    raise ValueError(f"--variants={args.variants!r} names no variant (expected e.g. b158,fp)")
  configs = {name: _load_config(name, args.steps) for name in names}   # a bad name fails before any training
  summaries = []
  for name in names:
    print(f"== {name} ==", flush=True)
    summary = train.train_and_evaluate(configs[name], workdir / name)
    if args.sample_tokens:
      summary["sample"] = sample(workdir / name, args.sample_tokens, args.prompt, temperature=args.temperature,
                                 top_p=args.top_p, seed=args.seed)
    summaries.append(summary)
  plot_curves(workdir, names, workdir / "loss_curves.png")

  print("\n" + table(summaries))
  for s in summaries:
    how = ("greedy" if args.temperature == 0 else
           f"temperature {args.temperature}, top-p {args.top_p}, seed {args.seed}")
    print(f"\n{s['name']} sample ({how}):\n{s.get('sample', '')}")
  print(f"\nloss curves: {workdir / 'loss_curves.png'}; per-run metrics and checkpoints in {workdir}/<run>/")
  (workdir / "comparison.json").write_text(json.dumps(summaries, indent=2))
  return {s["name"]: s for s in summaries}


if __name__ == "__main__":
  cli.run("compare", main)
