"""Train-step time of the fp, b158 and bitnet variants, side by side in one run (CPU by default).

    python benchmarks/train_step.py [--d-model 512 --layers 6 --seq 256 --batch 8 --repeats 15] [--ablate]

Prints a Markdown table of median step times after compilation, the ratio to fp, and the fp step's achieved
FLOP/s against this machine's float32 matmul peak measured in the same run (a 2048^3 matmul). FLOPs per step are
counted as 6 N T (N non-embedding parameters, T tokens) plus the attention term 12 L T S D (Kaplan et al.,
2020, eq. 2.1 with the backward pass), and the head 6 D V T. `--ablate` adds b158 rows with one ingredient
removed at a time (activation quantisation, weight quantisation, the per-BitLinear RMSNorms), to show where
b158's extra time over fp goes.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from bitnet_jax import train
from bitnet_jax.model import ModelConfig, Transformer, count_params


def _time_once(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def interleaved_medians(fns: dict, repeats: int) -> dict[str, float]:
  """Median time of each callable, measured round-robin (one call of each per round) after one warm-up call
  each, so that drifting load on a shared machine hits every variant alike."""
  for fn in fns.values():
    fn()
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      times[name].append(_time_once(fn))
  return {name: statistics.median(ts) for name, ts in times.items()}


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  return 2 * n ** 3 / interleaved_medians({"mm": lambda: f(a, b).block_until_ready()}, repeats)["mm"]


ABLATIONS = {   # row name: (variant, ModelConfig overrides)
    "b158 without act quant": ("b158", dict(act_bits=None)),
    "b158 without weight quant": ("b158", dict(weight_quant="none")),
    "b158 without quant (norms only)": ("b158", dict(act_bits=None, weight_quant="none")),
}


def step_fn(variant: str, args, **overrides):
  """(a callable running one train step, its ModelConfig)."""
  cfg = ModelConfig(variant=variant, vocab_size=259, d_model=args.d_model, n_layers=args.layers,
                    n_heads=args.d_model // 64, max_seq_len=args.seq, dtype="float32", **overrides)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.inject_hyperparams(optax.adamw)(learning_rate=1e-4), wrt=nnx.Param)
  batch = jax.random.randint(jax.random.key(1), (args.batch, args.seq + 1), 0, 259, jnp.int32)
  return (lambda: jax.block_until_ready(train.train_step(model, optimizer, batch))), cfg


def step_flops(cfg: ModelConfig, batch: int, seq: int) -> float:
  tokens = batch * seq
  n = count_params(cfg)["non_embedding"]
  return 6 * n * tokens + 12 * cfg.n_layers * tokens * seq * cfg.d_model + 6 * cfg.d_model * cfg.vocab_size * tokens


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--d-model", type=int, default=512)
  parser.add_argument("--layers", type=int, default=6)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--variants", default="fp,b158,bitnet")
  parser.add_argument("--ablate", action="store_true", help="add b158 rows with one ingredient removed")
  args = parser.parse_args()

  peak = matmul_peak()
  rows = {v: step_fn(v, args) for v in args.variants.split(",")}
  if args.ablate:
    rows.update({name: step_fn(v, args, **kw) for name, (v, kw) in ABLATIONS.items()})
  medians = interleaved_medians({name: fn for name, (fn, _) in rows.items()}, args.repeats)
  results = {name: (medians[name], cfg) for name, (_, cfg) in rows.items()}
  fp_time, fp_cfg = results.get("fp", next(iter(results.values())))
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()} ({platform.processor() or platform.machine()}), "
        f"jax {jax.__version__}; d_model {args.d_model}, {args.layers} layers, seq {args.seq}, batch {args.batch}; "
        f"median of {args.repeats} steps after compilation, variants interleaved round-robin")
  print(f"float32 matmul peak (2048^3, same run): {peak / 1e9:.1f} GFLOP/s\n")
  print("| variant | step (ms) | ratio to fp | tokens/s | achieved GFLOP/s | of matmul peak |")
  print("|---|---|---|---|---|---|")
  for variant, (t, cfg) in results.items():
    flops = step_flops(cfg, args.batch, args.seq)
    print(f"| {variant} | {t * 1e3:.1f} | {t / fp_time:.3f} | {args.batch * args.seq / t:.0f} | "
          f"{flops / t / 1e9:.1f} | {flops / t / peak:.0%} |")


if __name__ == "__main__":
  main()
