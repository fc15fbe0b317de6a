"""Decoding speed with a KV cache, b158 against fp, random weights: tokens/s at batch 1 and 16.

    python benchmarks/decode.py                        # small config (CPU default, under ~2 min on 2 cores)
    python benchmarks/decode.py --device-config 3b     # the b1.58 FAQ's 3B config (b158-3b vs llama-3b), GPU
    python benchmarks/decode.py --layers-form both     # blocks unrolled against stacked (one lax.scan)
    python benchmarks/decode.py --device-config 3b --compile-only --layers-form both   # compile time, no weights

Each timed call is one `generate.generate` (greedy, bfloat16 KV cache): a prefill of `--prompt` tokens, then
`--new-tokens` single-token decode steps in a `lax.fori_loop`. tokens/s = batch * new tokens / median call time
(prefill included), ms/step = median call time / new tokens (one step gives one token per sequence; at batch 1
this is the b1.58 paper's Table 1 latency, "ms per output token", which it measured with 2-bit weight kernels).

Models are put in their inference forms once before timing (`generate.inference_form`), and b158 is timed in
both: "dense" (weights quantised once and stored de-quantised in the compute dtype, the fp model's bytes per
weight: the cost of b158's activation quantisation and extra norms alone) and "packed" (2-bit codes and int8
activations through `kernels.matmul`: the Pallas kernel on GPU/TPU, the XLA unpack-then-dot on CPU), the
deployed form the b1.58 paper's latency figures assume. Every (model, batch) is timed round-robin after a
warm-up call each, so drifting load on a shared machine hits all alike (3B: fp and b158 dense in bfloat16,
about 13 GB, and b158 packed, about 1.5 GB with its 16-bit embeddings). The first call's time, compilation
included, is printed too.

--layers-form: "unrolled" (the blocks one after another in the program), "stacked" (stored stacked once and run
as one `lax.scan` over a stacked KV cache, `generate.inference_form(layers="stacked")`; b158 packed reads each
layer's codes in place from the stack, dense weights are sliced out of it per step), or "both", timed
side by side. --compile-only lowers and compiles the generate program ahead of time from abstract shapes
(`nnx.eval_shape`: no weights are made), and prints the compile seconds per model: how long a full-depth
decoder takes to compile, on any machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # run from a checkout

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from bitnet_jax import generate  # noqa: E402
from bitnet_jax.model import ModelConfig, Transformer, count_params, preset  # noqa: E402

# name: {variant: ModelConfig overrides}; the small one is sized for a 2-core CPU.
CONFIGS = {
    "small": {v: dict(variant=v, vocab_size=259, d_model=512, n_layers=6, n_heads=8, max_seq_len=256)
              for v in ("fp", "b158")},
    "3b": {"fp": "llama-3b", "b158": "b158-3b"},   # b1.58 FAQ Table 1: hidden 3200, GLU 8640, 32 heads, 26 layers
}


def make_config(spec, dtype: str | None, **overrides) -> ModelConfig:
  return preset(spec, dtype=dtype, **overrides) if isinstance(spec, str) else ModelConfig(**spec, dtype=dtype,
                                                                                           **overrides)


def make_models(cfg: ModelConfig, forms: tuple[tuple[str, str], ...], abstract: bool = False) -> dict:
  """A random-weight model (created inside one jit) in each inference form (weights, layers) of `forms`; the
  latent float32 weights are dropped once the forms are made. abstract: shapes only (`nnx.eval_shape`)."""
  if abstract:
    return {form: nnx.eval_shape(lambda form=form: generate.inference_form(
        Transformer(cfg, rngs=nnx.Rngs(0)), *form)) for form in forms}
  model = nnx.jit(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))()
  return {form: generate.inference_form(model, *form) for form in forms}


def compile_seconds(model, batch: int, prompt: int, new_tokens: int, kv_cache: str) -> float:
  """Seconds to lower and compile `generate`'s program for an abstract model (ahead of time, no execution)."""
  graphdef, state = nnx.split(model)
  program = jax.jit(lambda state, prompt, seed: generate.generate_program(
      nnx.merge(graphdef, state), prompt, seed, new_tokens, kv_cache, generate.Sampler()))
  t0 = time.perf_counter()
  program.lower(state, jax.ShapeDtypeStruct((batch, prompt), jnp.int32),
                jax.ShapeDtypeStruct((), jnp.int32)).compile()
  return time.perf_counter() - t0


def median_times(fns: dict, repeats: int) -> dict:
  """Median seconds per call of each (already compiled) fn, timed round-robin."""
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--device-config", default=None, choices=tuple(CONFIGS),
                      help="model size (default: 3b on an accelerator, small on CPU)")
  parser.add_argument("--batches", default="1,16")
  parser.add_argument("--prompt", type=int, default=16, help="prompt tokens")
  parser.add_argument("--new-tokens", type=int, default=None, help="default: 64 (small), 128 (3b)")
  parser.add_argument("--repeats", type=int, default=None, help="default: 5 (small), 10 (3b)")
  parser.add_argument("--kv-cache", default="bfloat16")
  parser.add_argument("--layers", type=int, default=None, help="override the config's depth (a quick check)")
  parser.add_argument("--layers-form", default="unrolled", choices=("unrolled", "stacked", "both"),
                      help="blocks unrolled in the program, stacked and scanned, or both side by side")
  parser.add_argument("--compile-only", action="store_true",
                      help="only compile the generate programs from abstract shapes and print the seconds")
  args = parser.parse_args(argv)
  accelerator = jax.default_backend() != "cpu"
  name = args.device_config or ("3b" if accelerator else "small")
  new_tokens = args.new_tokens or (128 if name == "3b" else 64)
  repeats = args.repeats or (10 if name == "3b" else 5)
  dtype = None   # bfloat16 on accelerators, float32 on CPU (ModelConfig.compute_dtype)
  batches = [int(b) for b in args.batches.split(",")]

  layer_forms = ("unrolled", "stacked") if args.layers_form == "both" else (args.layers_form,)
  params, fns, tokens, first = {}, {}, {}, {}
  for variant, spec in CONFIGS[name].items():
    weights = ("dense",) if variant == "fp" else ("dense", "packed")
    cfg = make_config(spec, dtype, **({"n_layers": args.layers} if args.layers else {}))
    params[variant] = count_params(cfg)["total"]
    models = make_models(cfg, tuple((w, lf) for w in weights for lf in layer_forms), abstract=args.compile_only)
    for (form, layers), model in models.items():
      label = f"{variant} {form}" + (f" {layers}" if len(layer_forms) > 1 else "")
      for b in batches:
        if args.compile_only:
          first[label, b] = compile_seconds(model, b, args.prompt, new_tokens, args.kv_cache)
          print(f"compiled {label} batch {b} in {first[label, b]:.1f} s", flush=True)
          continue
        prompt = jax.random.randint(jax.random.key(b), (b, args.prompt), 0, model.cfg.vocab_size, jnp.int32)
        fns[label, b] = (lambda m=model, p=prompt: jax.block_until_ready(
            generate.generate(m, p, new_tokens, kv_dtype=args.kv_cache)))
        t0 = time.perf_counter()
        out = fns[label, b]()   # compiles
        first[label, b] = time.perf_counter() - t0
        if b == batches[0]:   # every b158 form must decode the same tokens (greedy)
          tokens[label] = out
  results = {} if args.compile_only else median_times(fns, repeats)

  depth = f" with {args.layers} layers" if args.layers else ""
  sizes = ", ".join(f"{v} {params[v] / 1e6:.1f}M params" for v in params)
  head = (f"device: {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()}), jax "
          f"{jax.__version__}; config {name}{depth} ({sizes}); prompt {args.prompt}, {new_tokens} new tokens, "
          f"{args.kv_cache} KV cache, greedy")
  labels = list(dict.fromkeys(label for label, _ in first))
  fp = {lf: next(lab for lab in labels if lab.startswith("fp") and lab.endswith(lf)) for lf in layer_forms}
  base = lambda label: fp[next(lf for lf in layer_forms if label.endswith(lf))]   # fp of the same layer form
  if args.compile_only:
    print(f"{head}; ahead-of-time compile of the generate program (abstract shapes)\n")
    print("| batch | model | compile s |")
    print("|---|---|---|")
    for b in batches:
      for label in labels:
        print(f"| {b} | {label} | {first[label, b]:.1f} |")
    return {f"{label}/{b}": t for (label, b), t in first.items()}
  print(f"{head}; median of {repeats} calls after compilation, prefill included\n")
  print("| batch | model | tokens/s | ms/step | speedup vs fp | first call s |")
  print("|---|---|---|---|---|---|")
  for b in batches:
    for label in labels:
      t = results[label, b]
      print(f"| {b} | {label} | {b * new_tokens / t:.0f} | {t / new_tokens * 1e3:.2f} | "
            f"{results[base(label), b] / t:.2f}x | {first[label, b]:.1f} |")
  b158 = [label for label in labels if label.startswith("b158")]
  for label in b158[1:]:
    agree = float(jnp.mean(tokens[b158[0]] == tokens[label]))
    print(f"# {label} vs {b158[0]}, batch {batches[0]}: {agree:.1%} of greedy tokens equal (random weights; "
          f"packed: int8 x 2-bit integer sums against the de-quantised float dot, equal up to float32 rounding)")
  return {f"{label}/{b}": t for (label, b), t in results.items()}

if __name__ == "__main__":
  main()
