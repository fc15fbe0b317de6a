"""experiments/kv_cache: eval loss of a trained run with a quantised KV cache (none, bfloat16, int8, int4, int3).

    .venv/bin/python experiments/kv_cache.py [--workdir runs/quickstart/b158-small] [--eval-batches 32]
    .venv/bin/python experiments/kv_cache.py --smoke     # trains b158-tiny,smoke first (~20 s), then the same

The FAQ of "The Era of 1-bit LLMs: Training Tips, Code and FAQ" (PAPERS.md section 2) states that a 4-bit KV
cache is lossless for b1.58 models; BitNet a4.8 (arXiv 2411.04965) runs a 3-bit one with position 0 at 4 bits.
This measures it on our own run, teacher-forced: the run's latest checkpoint is restored with
`ModelConfig.kv_quant` set to each kind, which rounds K and V in the full forward exactly as a `kv_cache.KVCache`
of that kind stores them (per token per head absmax, see `bitnet_jax/kv_cache.py`; cached decoding with kind X
computes the full forward with kv_quant=X, tested in tests/test_generate.py), and the loss is taken on the run's
validation windows (`data.eval_batches` over its corpus, batch size and sequence length, as training evaluates,
with `--eval-batches` batches). The change against "none" is reported with the standard
error of its per-batch paired differences. Writes `experiments/results/kv_cache.json` (default `--out`) and
prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # run from a checkout: bitnet_jax and configs/

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from bitnet_jax import cli, data, train  # noqa: E402
from bitnet_jax.kv_cache import KV_QUANT  # noqa: E402

BITS = {"bfloat16": 16, "int8": 8, "int4": 4, "int3": 3}   # bits per cached K/V value; "none": the compute dtype's


def cache_bytes_per_token(model_cfg, kind: str, bits: int) -> float:
  """K and V bytes per token over all layers for a cache of `kind` (int kinds: + a float32 scale per head; int3's
  4-bit copy of position 0 is a fixed cost per sequence, not counted)."""
  values = 2 * model_cfg["n_layers"] * model_cfg["n_kv_heads"] * (model_cfg["d_model"] // model_cfg["n_heads"])
  scales = 2 * model_cfg["n_layers"] * model_cfg["n_kv_heads"] * 4 if kind in ("int8", "int4", "int3") else 0
  return values * bits / 8 + scales


def evaluate(workdir: Path, eval_batches: int | None = None) -> dict:
  """Eval loss per KV cache kind on the run's validation windows."""
  config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  tokenizer = data.make_tokenizer(config.data.get("tokenizer", "byte"))
  corpus = data.load_corpus(config.data.source, valid_fraction=config.data.valid_fraction,
                            text_key=config.data.text_key, tokenizer=tokenizer)
  t = config.train
  batches = data.eval_batches(corpus.valid, batch_size=t.batch_size, seq_len=t.seq_len,
                              max_batches=eval_batches or config.data.eval_batches)
  losses, bits = {}, dict(BITS)
  for kind in KV_QUANT:   # "none" first
    run_config = config.copy_and_resolve_references()
    run_config.model.kv_quant = kind
    model, _ = train.load_checkpoint(workdir, run_config)
    bits.setdefault("none", jnp.dtype(model.cfg.compute_dtype).itemsize * 8)
    losses[kind] = np.array([float(train.eval_step(model, jnp.asarray(b))) for b in batches])
  rows = []
  for kind, loss in losses.items():
    diff = loss - losses["none"]
    rows.append({"kv_cache": kind, "bits": bits[kind], "eval_loss": float(loss.mean()),
                 "eval_ppl": math.exp(float(loss.mean())), "delta": float(diff.mean()),
                 "delta_se": float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0,
                 "max_batch_delta": float(np.abs(diff).max()),
                 "cache_bytes_per_token": cache_bytes_per_token(config.model, kind, bits[kind])})
  step = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  return {"workdir": str(workdir), "name": config.get("name", ""), "variant": config.model.variant,
          "checkpoint_step": step, "eval": {"batches": len(batches), "batch_size": t.batch_size,
                                            "seq_len": t.seq_len, "tokens": len(batches) * t.batch_size * t.seq_len},
          "device": jax.devices()[0].device_kind, "rows": rows}


def markdown(result: dict) -> str:
  e = result["eval"]
  lines = [f"{result['name']} ({result['variant']}, step {result['checkpoint_step']}): {e['batches']} batches x "
           f"{e['batch_size']} x {e['seq_len']} = {e['tokens']:,} validation tokens, teacher-forced",
           "", "| KV cache | bits | cache bytes/token | eval loss (nats) | change vs none | +- s.e. | ppl |",
           "|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    lines.append(f"| {r['kv_cache']} | {r['bits']} | {r['cache_bytes_per_token']:.0f} | {r['eval_loss']:.5f} | "
                 f"{r['delta']:+.5f} | {r['delta_se']:.5f} | {r['eval_ppl']:.4f} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
  argv = cli.strip_debug(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   epilog="--debug shows the traceback of an error")
  parser.add_argument("--workdir", default="runs/quickstart/b158-small", help="a trained run (after `make train`)")
  parser.add_argument("--eval-batches", type=int, default=None, help="default: the run's data.eval_batches")
  parser.add_argument("--out", default=str(ROOT / "experiments" / "results" / "kv_cache.json"))
  parser.add_argument("--smoke", action="store_true", help="train b158-tiny,smoke first and measure that run")
  parser.add_argument("--smoke-dir", default=None, help="where --smoke trains (default: a temporary directory)")
  args = parser.parse_args(argv)
  from absl import logging
  logging.set_verbosity(logging.WARNING)   # orbax logs every restore at INFO

  workdir = Path(args.workdir)
  if args.smoke:
    from configs import lm
    workdir = Path(args.smoke_dir or tempfile.mkdtemp(prefix="kv_cache_smoke_"))
    train.train_and_evaluate(lm.get_config("b158-tiny,smoke"), workdir, progress=False)
  if not (workdir / "config.json").exists():
    raise FileNotFoundError(f"{workdir} is not a training run (no config.json); train one with `make train`, or "
                            "use --smoke")
  result = evaluate(workdir, args.eval_batches)
  result["command"] = "python experiments/kv_cache.py " + " ".join(argv)
  print(markdown(result))
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(result, indent=2))
  print(f"\nwritten: {args.out}")
  return result


if __name__ == "__main__":
  cli.run("kv_cache", main)
