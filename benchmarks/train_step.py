"""Train-step time of our variants, and of the PyTorch peer on the same work, side by side in one run (CPU default).

    python benchmarks/train_step.py [--d-model 512 --layers 6 --seq 256 --batch 8 --repeats 15] [--ablate]
                                    [--peer [--peer-compile]] [--profile] [--exact]

Prints a Markdown table of median step times after compilation (our rows interleaved round-robin, so drifting load
hits every row alike), tokens/s, the ratio to our fp step of the same layout, and the achieved FLOP/s against this
machine's float32 matmul peak measured in the same run (a 2048^3 matmul). FLOPs per step are 6 N T (N non-embedding
parameters, T tokens) plus the attention term 12 L T S D (Kaplan et al., 2020, eq. 2.1 with the backward pass), and
the head 6 D V T.

Rows:
  * `fp`, `b158`, `bitnet`: the papers' layouts (b158 in the FAQ form: an RMSNorm inside every BitLinear).
  * `--ablate`: b158 with one ingredient removed at a time (activation quantisation, weight quantisation, both).
  * `--exact`: b158 with `exact_quant=True` (the reference operation order, pinned; what the parity tests run).
  * `--peer`: Hugging Face transformers' `BitNetForCausalLM` (`benchmarks/hf_peer.py`; fp `nn.Linear` and b1.58
    `AutoBitLinear` with online quantisation, torch eager, and with `--peer-compile` also `torch.compile`), and
    our model in the same architecture (the 2B4T layout: squared-ReLU GLU, block norms plus sub-norms, tied
    head). The peer runs in a subprocess before and after our rows (peer, ours, peer): its medians pool both runs.
  * `--profile`: after timing, a `jax.profiler` trace of 3 steps of each of our rows, summed by op kind.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from bitnet_jax import train
from bitnet_jax.model import ModelConfig, Transformer, count_params

LAYOUT_2B4T = dict(ffn="relu2_glu", linear_norm=None, block_norm="rms", sub_norms=True, tie_embeddings=True)


def cpu_model() -> str:
  """The CPU's model name (Linux /proc/cpuinfo), or what `platform` knows."""
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def cpu_flags() -> str:
  """The vector extensions that decide XLA:CPU's kernels: avx2, avx512f, avx512_bf16, amx."""
  try:
    text = Path("/proc/cpuinfo").read_text()
  except OSError:
    return "?"
  flags = set(next((l.split(":", 1)[1].split() for l in text.splitlines() if l.startswith("flags")), []))
  return " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags) or "-"


def _time_once(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def interleaved_medians(fns: dict, repeats: int) -> dict[str, float]:
  """Median time of each callable, measured round-robin (one call of each per round) after one warm-up call each,
  so that drifting load on a shared machine hits every row alike."""
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


def model_config(variant: str, args, **overrides) -> ModelConfig:
  return ModelConfig(**{**dict(variant=variant, vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers,
                               n_heads=args.d_model // 64, max_seq_len=args.seq, dtype="float32"), **overrides})


def step_fn(variant: str, args, **overrides):
  """(a callable running one train step, its ModelConfig)."""
  cfg = model_config(variant, args, **overrides)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.inject_hyperparams(optax.adamw)(learning_rate=1e-4), wrt=nnx.Param)
  batch = jax.random.randint(jax.random.key(1), (args.batch, args.seq + 1), 0, args.vocab, jnp.int32)
  return (lambda: jax.block_until_ready(train.train_step(model, optimizer, batch))), cfg


def step_flops(cfg: ModelConfig, batch: int, seq: int) -> float:
  tokens = batch * seq
  n = count_params(cfg)["non_embedding"]
  return 6 * n * tokens + 12 * cfg.n_layers * tokens * seq * cfg.d_model + 6 * cfg.d_model * cfg.vocab_size * tokens


def run_peer(args, variant: str, compiled: bool) -> dict:
  """One subprocess run of benchmarks/hf_peer.py on our dims; its JSON record."""
  cmd = [sys.executable, str(Path(__file__).with_name("hf_peer.py")), "--variant", variant,
         "--d-model", str(args.d_model), "--layers", str(args.layers), "--heads", str(args.d_model // 64),
         "--d-ff", str(args.d_ff), "--vocab", str(args.vocab), "--seq", str(args.seq), "--batch", str(args.batch),
         "--repeats", str(args.peer_repeats)] + (["--compile"] if compiled else [])
  out = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if out.returncode:
    raise SystemExit(f"error: the peer benchmark failed ({' '.join(cmd)}):\n{out.stderr[-2000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


# Op kinds of an XLA:CPU profile, by the fusion's name: first match wins.
OP_KINDS = (("dots", r"ynn_fusion|^dot|convolution|xnn|onednn"), ("transposes and copies", r"transpose|copy"),
            ("reductions", r"reduce"), ("elementwise and other fusions", r"fusion|^wrapped|^select|^add|^mul"))


def profile_breakdown(fn, steps: int = 3) -> dict[str, float]:
  """Milliseconds per step by op kind (`OP_KINDS`) from a `jax.profiler` trace of `steps` calls of fn, plus the
  wall time per step and the time no kernel ran (dispatch, waits)."""
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d)
    t0 = time.perf_counter()
    for _ in range(steps):
      fn()
    wall = (time.perf_counter() - t0) / steps
    jax.profiler.stop_trace()
    events = json.load(gzip.open(sorted(glob.glob(f"{d}/**/*.trace.json.gz", recursive=True))[-1]))["traceEvents"]
  kinds, spans = collections.Counter(), []
  for e in events:
    name = e.get("name", "")
    if e.get("ph") != "X" or "dur" not in e or name.startswith("$") or not e.get("args", {}).get("hlo_op"):
      continue
    kind = next((k for k, pat in OP_KINDS if re.search(pat, name)), "elementwise and other fusions")
    kinds[kind] += e["dur"] / 1e3 / steps
    spans.append((e["ts"], e["ts"] + e["dur"]))
  busy, end = 0.0, -1.0   # the union of the kernels' spans: time any kernel ran
  for a, b in sorted(spans):
    busy += max(0.0, b - max(a, end))
    end = max(end, b)
  return {**{k: kinds.get(k, 0.0) for k, _ in OP_KINDS}, "kernels busy": busy / 1e3 / steps,
          "wall": wall * 1e3}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--d-model", type=int, default=512)
  parser.add_argument("--layers", type=int, default=6)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--vocab", type=int, default=256)
  parser.add_argument("--d-ff", type=int, default=1408, help="FFN width of the 2B4T rows and the peer")
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--variants", default="fp,b158,bitnet")
  parser.add_argument("--ablate", action="store_true", help="add b158 rows with one ingredient removed")
  parser.add_argument("--exact", action="store_true", help="add a b158 row in exact (pinned) quantisation mode")
  parser.add_argument("--peer", action="store_true", help="time Hugging Face transformers' BitNet too (torch)")
  parser.add_argument("--peer-compile", action="store_true", help="with --peer: also the torch.compile'd peer")
  parser.add_argument("--peer-repeats", type=int, default=8, help="peer steps per subprocess run (two runs)")
  parser.add_argument("--profile", action="store_true", help="print an op-kind breakdown of each of our rows")
  args = parser.parse_args()
  for name in ("d_model", "layers", "seq", "batch", "vocab", "d_ff", "repeats", "peer_repeats"):
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be positive")
  if args.d_model % 64:
    parser.error("--d-model must be a multiple of 64 (heads of 64)")

  peer_modes = [(v, c) for c in ([False, True] if args.peer_compile else [False]) for v in ("fp", "b158")]
  peer_times = {m: [] for m in peer_modes}
  if args.peer:   # peer, ours, peer
    for m in peer_modes:
      peer_times[m] += run_peer(args, *m)["times_s"]
  peak = matmul_peak()
  rows = {v: step_fn(v, args) for v in args.variants.split(",")}
  if args.ablate:
    rows.update({name: step_fn(v, args, **kw) for name, (v, kw) in ABLATIONS.items()})
  if args.exact:
    rows["b158 exact"] = step_fn("b158", args, exact_quant=True)
  if args.peer:
    rows["fp 2B4T"] = step_fn("fp", args, d_ff=args.d_ff, **LAYOUT_2B4T)
    rows["b158 2B4T"] = step_fn("b158", args, d_ff=args.d_ff, **LAYOUT_2B4T)
  medians = interleaved_medians({name: fn for name, (fn, _) in rows.items()}, args.repeats)
  record = None
  if args.peer:
    for m in peer_modes:
      record = run_peer(args, *m)
      peer_times[m] += record["times_s"]

  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, {cpu_model()} ({os.cpu_count()} cores; "
        f"{cpu_flags()}); jax {jax.__version__}"
        + (f", torch {record['torch']} ({record['threads']} threads), transformers {record['transformers']}"
           if record else "")
        + f"; compiler options {train.compiler_options(jax.default_backend()) or 'none'}")
  print(f"d_model {args.d_model}, {args.layers} layers, seq {args.seq}, batch {args.batch}, vocab {args.vocab}, "
        f"float32; median of {args.repeats} steps after compilation, our rows interleaved round-robin"
        + (f"; peer: median of 2 x {args.peer_repeats} steps, run before and after ours" if args.peer else ""))
  print(f"float32 matmul peak (2048^3, same run): {peak / 1e9:.1f} GFLOP/s\n")
  print("| row | step (ms) | tokens/s | ratio to our fp | ratio to the peer | achieved GFLOP/s | of matmul peak |")
  print("|---|---|---|---|---|---|---|")
  tokens = args.batch * args.seq
  peer_med = {m: statistics.median(ts) for m, ts in peer_times.items() if ts}
  for name, (t, cfg) in ((n, (medians[n], cfg)) for n, (_, cfg) in rows.items()):
    base = medians["fp 2B4T"] if "2B4T" in name else medians.get("fp", next(iter(medians.values())))
    peer = peer_med.get((cfg.variant, False)) if "2B4T" in name else None
    flops = step_flops(cfg, args.batch, args.seq)
    print(f"| {name} | {t * 1e3:.1f} | {tokens / t:.0f} | {t / base:.3f} | "
          f"{f'{t / peer:.3f}' if peer else '-'} | {flops / t / 1e9:.1f} | {flops / t / peak:.0%} |")
  peer_flops = step_flops(rows["fp 2B4T"][1], args.batch, args.seq) if args.peer else 0.0   # the same model
  for (variant, compiled), t in peer_med.items():
    label = f"peer: HF BitNet {'fp nn.Linear' if variant == 'fp' else 'b1.58 AutoBitLinear'}, " \
            f"{'torch.compile' if compiled else 'eager'}"
    print(f"| {label} | {t * 1e3:.1f} | {tokens / t:.0f} | {t / medians['fp 2B4T']:.3f} | "
          f"{t / peer_med[(variant, False)]:.3f} | {peer_flops / t / 1e9:.1f} | {peer_flops / t / peak:.0%} |")

  if args.profile:
    print("\nProfile of 3 steps per row (ms per step; kernels may overlap, so kinds can sum past the busy time):\n")
    breakdown = {name: profile_breakdown(fn) for name, (fn, _) in rows.items()}
    cols = [k for k, _ in OP_KINDS] + ["kernels busy", "wall"]
    print("| row | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for name, b in breakdown.items():
      print(f"| {name} | " + " | ".join(f"{b[c]:.0f}" for c in cols) + " |")


if __name__ == "__main__":
  main()
