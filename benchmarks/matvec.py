"""Matrix-vector time with 2-bit ternary weights: the Pallas kernel vs XLA bf16 vs XLA "unpack then dot".

    python benchmarks/matvec.py                 # GPU: 4096x11008, 11008x4096, 8192x28672 at batch 1 and 16
    python benchmarks/matvec.py --small         # tiny shapes, XLA paths only (automatic on CPU)
    python benchmarks/matvec.py --sweep         # GPU: also time a grid of kernel block sizes per shape and batch

The b1.58 paper's latency and memory figures (Table 1, PAPERS.md section 2) were measured with weights stored in
2 bits; decoding is memory bound, so the figure of merit is how fast the weights stream from memory. Each timed
call runs `--layers` (>= 8) separate weight copies one after the other, so that every layer's weights come from
HBM and not from L2 (H100 L2: 50 MB), and reports the median time per layer, the effective bandwidth (weight
bytes read per layer / time: bf16 2 bytes per weight, 2-bit 0.25 bytes plus scales) and the speedup over the
XLA bf16 matmul measured in the same run (round-robin over the paths, after warm-up calls).

Two more rows run the layers as one `lax.scan` over a stack of the 2-bit weights [L, K, P], as the stacked
decoder does (`generate.inference_form(layers="stacked")`): the kernel reading each layer in place
(`ternary_matmul(..., layer=i)`), and XLA slicing each layer out of the stack for the kernel (a copy of its
weights). Against "Pallas 2-bit int8" (one call per separate weight) they show what reading a stack costs.

On CPU the Pallas kernel only runs in the interpreter, which says nothing about speed: it is not timed, only
checked against the XLA path once.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from bitnet_jax import packing, quant
from bitnet_jax.kernels.ternary_matmul import ACCELERATORS, reference_matmul, ternary_matmul

FULL_SHAPES = ((4096, 11008), (11008, 4096), (8192, 28672))   # [K, N]: LLaMA-7B FFN up/down, a 70B-class FFN
SMALL_SHAPES = ((256, 512), (512, 256), (512, 1024))


def _shape(text: str) -> tuple[int, int]:
  k, n = text.lower().split("x")
  return int(k), int(n)


def make_layers(k: int, n: int, layers: int, seed: int = 0):
  """`layers` independent weights on the device: bf16 [K, N], and 2-bit packed ternary codes [K, N/4] + scale."""
  @jax.jit
  def one(key):
    kc, kw = jax.random.split(key)
    codes = jax.random.randint(kc, (k, n), -1, 2, jnp.int8)
    return (jax.random.normal(kw, (k, n), jnp.bfloat16) * 0.02, packing.pack_2bit(codes, axis=-1),
            jnp.full((1, 1), 0.02, jnp.float32))
  return [one(key) for key in jax.random.split(jax.random.key(seed), layers)]


def stacked(matmul_fn):
  """Runs one matmul per layer with the same input and sums the outputs (so no layer is dead code)."""
  def run(x, weights):
    out = None
    for w in weights:
      y = matmul_fn(x, w)
      out = y if out is None else out + y
    return out
  return jax.jit(run)


def round_robin_medians(fns: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
  """Median seconds per call of each thunk, one call of each per round, after `warmup` calls each."""
  for fn in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - t0)
  return {name: statistics.median(ts) for name, ts in times.items()}


def _int8_matmul(x, w, n, kernel_options):
  """The deployed b1.58 path: per-token int8 activation codes (quant.activation_codes) into the kernel."""
  codes, x_scale = quant.activation_codes(x)
  return ternary_matmul(codes, w[0], w[1], n_out=n, x_scale=x_scale, **kernel_options)


def scanned_layers(in_kernel: bool, n: int, kernel_options: dict):
  """The layers as one `lax.scan`, as a stacked decoder runs them, int8 activations, outputs summed: the kernel
  reading layer i of the stack in place (`layer=i`, in_kernel) or XLA slicing layer i out of the stack as the
  scan's input (a copy of its weights per layer) and the kernel multiplying the copy."""
  def run(x, stack):
    codes, x_scale = quant.activation_codes(x)

    def body(acc, xs):
      if in_kernel:
        y = ternary_matmul(codes, *stack, n_out=n, x_scale=x_scale, layer=xs, **kernel_options)
      else:
        y = ternary_matmul(codes, *xs, n_out=n, x_scale=x_scale, **kernel_options)
      return acc + y, None
    xs = jnp.arange(stack[0].shape[0]) if in_kernel else stack
    return jax.lax.scan(body, jnp.zeros((x.shape[0], n), jnp.float32), xs)[0]
  return jax.jit(run)


SWEEP = [dict(block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)
         for bn in (32, 64, 128) for bk in (128, 256) for warps, stages in ((4, 2), (8, 3), (8, 4))]
SWEEP_GEMV = [dict(gemv=True, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)   # batch 1 only
              for bn in (64, 128, 256) for bk in (16, 32, 64) for warps, stages in ((4, 2), (8, 3))]


def sweep(x, packed_w, n, repeats, base_per_layer):
  """Per-layer median time of the kernel for each option set in SWEEP (the XLA bf16 time passed in as base)."""
  rows = [(None, base_per_layer, base_per_layer)]
  layers = len(packed_w)
  for options in SWEEP + (SWEEP_GEMV if x.shape[0] == 1 else []):
    try:
      fn = stacked(lambda x, w, o=options: _int8_matmul(x, w, n, o))
      t = round_robin_medians({"k": lambda: fn(x, packed_w)}, max(repeats // 3, 5), warmup=1)["k"] / layers
    except Exception as err:   # an option set that does not compile (shared memory, registers) is skipped
      print(f"# sweep: {options} failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}")
      continue
    rows.append((options, t, base_per_layer))
  return rows


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument("--small", action="store_true", help="tiny shapes, XLA paths only (default on CPU)")
  parser.add_argument("--shapes", nargs="+", type=_shape, help="weight shapes KxN (default: see above)")
  parser.add_argument("--batches", nargs="+", type=int, default=[1, 16], help="rows of x (default: 1 16)")
  parser.add_argument("--layers", type=int, default=8, help="weight copies cycled per call (>= 8; default 8)")
  parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 30, 20 with --small)")
  parser.add_argument("--block-m", type=int, default=None, help="kernel rows per tile (default: auto)")
  parser.add_argument("--block-n", type=int, default=None, help="kernel packed byte columns per tile")
  parser.add_argument("--block-k", type=int, default=None, help="kernel K rows per inner step")
  parser.add_argument("--k-steps", type=int, default=None, help="kernel inner steps per program")
  parser.add_argument("--num-warps", type=int, default=None, help="Triton warps per program (default 4)")
  parser.add_argument("--num-stages", type=int, default=None, help="Triton pipeline stages (default 2)")
  parser.add_argument("--sweep", action="store_true", help="time a grid of kernel options per shape and batch")
  parser.add_argument("--interpret", action="store_true",
                      help="run the kernel rows in the Pallas interpreter: checks this script end to end on a CPU "
                           "(the times mean nothing)")
  args = parser.parse_args(argv)
  if args.layers < 8:
    parser.error(f"--layers={args.layers}: at least 8 copies are needed to stream weights from HBM")

  on_accelerator = jax.default_backend() in ACCELERATORS
  small = args.small or not on_accelerator
  use_kernel = (on_accelerator and not small) or args.interpret
  shapes = args.shapes or (SMALL_SHAPES if small else FULL_SHAPES)
  repeats = args.repeats or (20 if small else 30)
  kernel_options = {k: v for k, v in dict(block_m=args.block_m, block_n=args.block_n, block_k=args.block_k,
                                          k_steps=args.k_steps, num_warps=args.num_warps,
                                          num_stages=args.num_stages).items() if v is not None}
  if args.interpret:
    kernel_options["interpret"] = True

  device = jax.devices()[0]
  print(f"# matvec: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
        f"python {platform.python_version()}; {args.layers} weight copies per call, median of {repeats} rounds")
  if args.interpret:
    print("# --interpret: the kernel rows run in the Pallas interpreter; their times are not speed measurements")
  elif not use_kernel:
    print("# XLA paths only: the Pallas kernel runs here only in interpret mode, which is not a speed "
          "measurement (it is checked for correctness below instead).")
  print("| K x N | batch | path | median us / layer | GB/s of weights | speedup vs bf16 |")
  print("|---|---|---|---|---|---|")

  checks, sweeps, stack_checks = [], [], []
  for k, n in shapes:
    layers = make_layers(k, n, args.layers)
    bf16_w = [w for w, _, _ in layers]
    packed_w = [(p, s) for _, p, s in layers]
    jax.block_until_ready(layers)
    packed_bytes = k * -(-n // 4) + 4
    weight_bytes = {"XLA bf16": 2 * k * n, "XLA unpack+dot": packed_bytes, "Pallas 2-bit": packed_bytes,
                    "Pallas 2-bit int8": packed_bytes, "Pallas 2-bit shift": packed_bytes,
                    "scan: kernel reads the stack": packed_bytes, "scan: XLA slices the stack": packed_bytes}
    paths = {
        "XLA bf16": (stacked(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32)), bf16_w),
        "XLA unpack+dot": (stacked(lambda x, w: reference_matmul(x, w[0], w[1], n_out=n)), packed_w),
    }
    if use_kernel:
      paths["Pallas 2-bit"] = (stacked(lambda x, w: ternary_matmul(x, w[0], w[1], n_out=n, **kernel_options)),
                               packed_w)
      paths["Pallas 2-bit int8"] = (stacked(lambda x, w: _int8_matmul(x, w, n, kernel_options)), packed_w)
      paths["Pallas 2-bit shift"] = (stacked(lambda x, w: ternary_matmul(x, w[0], w[1], n_out=n, **{
          **kernel_options, "decode": "shift"})), packed_w)
      stack = (jnp.stack([p for p, _ in packed_w]), jnp.stack([s for _, s in packed_w]))   # [L, K, P], [L, 1, 1]
      paths["scan: kernel reads the stack"] = (scanned_layers(True, n, kernel_options), stack)
      paths["scan: XLA slices the stack"] = (scanned_layers(False, n, kernel_options), stack)
    for batch in args.batches:
      x = jax.random.normal(jax.random.key(batch), (batch, k), jnp.bfloat16)
      if use_kernel:   # the timed kernel must also be right
        got = ternary_matmul(x, *packed_w[0], n_out=n, **kernel_options)
        ref = reference_matmul(x, *packed_w[0], n_out=n)
        checks.append((k, n, batch, float(jnp.max(jnp.abs(got - ref))), float(jnp.max(jnp.abs(ref)))))
        layer_sums = [f(x, w) for f, w in (paths["Pallas 2-bit int8"], paths["scan: kernel reads the stack"],
                                           paths["scan: XLA slices the stack"])]
        stack_checks.append((k, n, batch, max(float(jnp.max(jnp.abs(y - layer_sums[0]))) for y in layer_sums[1:])))
      medians = round_robin_medians({name: (lambda f=f, w=w: f(x, w)) for name, (f, w) in paths.items()}, repeats)
      base = medians["XLA bf16"]
      for name, t in medians.items():
        per_layer = t / args.layers
        print(f"| {k}x{n} | {batch} | {name} | {per_layer * 1e6:.1f} | {weight_bytes[name] / per_layer / 1e9:.1f} | "
              f"{base / t:.2f}x |")
      if args.sweep:
        sweeps.append(((k, n, batch), sweep(x, packed_w, n, repeats, base / args.layers)))
    del layers, bf16_w, packed_w, paths

  if not use_kernel:   # correctness only, on the smallest shape: interpret mode
    k, n = min(shapes, key=lambda s: s[0] * s[1])
    (_, packed, scale), = make_layers(k, n, 1, seed=1)
    x = jax.random.normal(jax.random.key(0), (1, k), jnp.bfloat16)
    got = ternary_matmul(x, packed, scale, n_out=n, interpret=True, **kernel_options)
    ref = reference_matmul(x, packed, scale, n_out=n)
    checks.append((k, n, 1, float(jnp.max(jnp.abs(got - ref))), float(jnp.max(jnp.abs(ref)))))
  for (k, n, batch), rows in sweeps:
    print(f"\n# sweep {k}x{n} batch {batch} (int8 activations; bf16 XLA: {rows[0][2] * 1e6:.1f} us / layer)")
    print("| gemv | block_n | block_k | k_steps | warps | stages | us / layer | speedup vs bf16 |")
    print("|---|---|---|---|---|---|---|---|")
    for options, t, base in sorted(rows[1:], key=lambda r: r[1])[:12]:
      print(f"| {options.get('gemv', False)} | {options['block_n']} | {options['block_k']} | {options.get('k_steps', 'auto')} | "
            f"{options['num_warps']} | {options['num_stages']} | {t * 1e6:.1f} | {base / t:.2f}x |")
  for k, n, batch, err, size in checks:
    mode = "compiled" if use_kernel and not args.interpret else "interpret mode"
    print(f"# kernel check ({mode}) {k}x{n} batch {batch}: max |kernel - XLA| = {err:.3g} (max |y| = {size:.3g})")
  for k, n, batch, err in stack_checks:
    print(f"# stack check {k}x{n} batch {batch}: max |scanned over the stack - one call per layer| = {err:.3g}")


if __name__ == "__main__":
  main()
