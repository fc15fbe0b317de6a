"""CPU decoding, ours against llama.cpp on the same b1.58 model: tokens/s at batch 1, side by side in one run.

    python benchmarks/cpu_decode.py                      # d_model 512, 6 layers: about 2 minutes on 2 cores
    python benchmarks/cpu_decode.py --d-model 256 --d-ff 256 --layers 1 --new-tokens 8 --repeats 2   # quick

Which to use for CPU inference of a model trained here? One random-weight b1.58 model in the layout llama.cpp's
`bitnet` graph computes (the 2B4T options with a SiLU GLU, tied head, one weight scale per tensor, every matmul
input a multiple of 256 wide: `bitnet_jax/interop/gguf.py`) is exported with `gguf.export` (TQ2_0: 2-bit
ternary codes, F16 embedding) and decoded greedily by

  * ours: `generate.generate` (batch 1, one jitted program: prefill, then a `lax.fori_loop` of decode steps,
    bfloat16 KV cache) in the "dense" form (weights quantised once, stored de-quantised in float32) and the
    "packed" form (2-bit codes, int8 activations, the XLA unpack-then-dot on CPU);
  * llama.cpp through llama-cpp-python (`Llama.eval` of the prompt, then one `eval` per greedy token, f16 KV cache,
    `--threads` threads, default the machine's cores), its TQ2_0 CPU kernels.

tokens/s = new tokens / median wall time of a whole decode (prefill included), each engine timed round-robin
after one warm-up (compilation) so drift hits both alike. Both decode the same prompt; the share of greedy tokens
on which they agree is printed as a check that both run the same model (they differ in activation quantisation:
llama.cpp per 256-wide block, ours per token, equal when every matmul input is 256 wide: `--d-model 256
--d-ff 256`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)   # run from a checkout

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.decode import median_times  # noqa: E402
from benchmarks.train_step import cpu_model  # noqa: E402
from bitnet_jax import generate  # noqa: E402
from bitnet_jax.interop import gguf  # noqa: E402
from bitnet_jax.model import ModelConfig, Transformer, count_params  # noqa: E402
from bitnet_jax.tokenizer import ByteTokenizer  # noqa: E402


def model_config(d_model: int, d_ff: int, layers: int, max_seq_len: int) -> ModelConfig:
  """b1.58 in the 2B4T layout with a SiLU GLU (what llama.cpp's `bitnet` graph computes)."""
  if d_model % 256 or d_ff % 256:
    raise ValueError(f"--d-model and --d-ff must be multiples of 256 (llama.cpp's TQ2_0 blocks), got {d_model}, "
                     f"{d_ff}")
  return ModelConfig(variant="b158", vocab_size=259, d_model=d_model, d_ff=d_ff, n_layers=layers,
                     n_heads=d_model // 64, n_kv_heads=d_model // 64, max_seq_len=max_seq_len, tie_embeddings=True,
                     block_norm="rms", linear_norm=None, sub_norms=True, ffn="swiglu", rope_theta=500000.0,
                     norm_eps=1e-5)


def llama_decoder(path: str, n_ctx: int, threads: int, prompt: list[int], new_tokens: int):
  """A function that decodes `new_tokens` greedy tokens after `prompt` with llama.cpp; returns the tokens."""
  import llama_cpp
  llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, n_threads_batch=threads,
                        logits_all=True, verbose=False)   # llama-cpp-python keeps logits only with logits_all

  def run() -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(new_tokens):
      token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
      out.append(token)
      llm.eval([token])
    return out
  return run


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split("\n\n", 1)[1])
  parser.add_argument("--d-model", type=int, default=512)
  parser.add_argument("--d-ff", type=int, default=None, help="default 3 x d_model")
  parser.add_argument("--layers", type=int, default=6)
  parser.add_argument("--prompt", type=int, default=16, help="prompt tokens")
  parser.add_argument("--new-tokens", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp threads (default: all cores)")
  args = parser.parse_args(argv)
  if min(args.layers, args.prompt, args.new_tokens, args.repeats, args.threads) < 1:
    parser.error("--layers, --prompt, --new-tokens, --repeats and --threads must be positive")
  # llama.cpp allocates at least 256 positions and warns when that exceeds the trained length; our KV cache is
  # sized by prompt + new tokens whatever max_seq_len is
  try:
    cfg = model_config(args.d_model, args.d_ff or 3 * args.d_model, args.layers,
                       max(256, args.prompt + args.new_tokens))
  except ValueError as e:
    parser.error(str(e))
  model = nnx.jit(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))()
  prompt = np.random.default_rng(0).integers(0, 256, size=args.prompt).tolist()
  path = os.path.join(tempfile.mkdtemp(prefix="cpu-decode-"), "b158.gguf")
  gguf.export(model, path, ftype="TQ2_0", tokenizer=ByteTokenizer())

  fns, first, tokens = {}, {}, {}
  for form in ("dense", "packed"):
    m = generate.inference_form(model, form, "unrolled")
    p = jnp.asarray([prompt], jnp.int32)
    fns[f"ours, b158 {form}"] = lambda m=m, p=p: np.asarray(generate.generate(m, p, args.new_tokens))[0, args.prompt:]
  fns["llama.cpp, TQ2_0"] = llama_decoder(path, cfg.max_seq_len, args.threads, prompt, args.new_tokens)
  for name, fn in fns.items():
    t0 = time.perf_counter()
    tokens[name] = np.asarray(fn())
    first[name] = time.perf_counter() - t0
  times = median_times(fns, args.repeats)

  params = count_params(cfg)["total"]
  print(f"CPU: {cpu_model()} ({os.cpu_count()} cores), jax {jax.__version__}, "
        f"llama.cpp threads {args.threads}; b1.58 2B4T layout, d_model {args.d_model}, d_ff {cfg.d_ff}, "
        f"{args.layers} layers, "
        f"{params / 1e6:.2f}M params, GGUF {os.path.getsize(path) / 1e6:.2f} MB; prompt {args.prompt}, "
        f"{args.new_tokens} new tokens, greedy, batch 1; median of {args.repeats} decodes, prefill included\n")
  ref = "llama.cpp, TQ2_0"
  print("| engine | tokens/s | ms/token | vs llama.cpp | first call s | greedy tokens equal to llama.cpp's |")
  print("|---|---|---|---|---|---|")
  for name, t in times.items():
    agree = float(np.mean(tokens[name] == tokens[ref]))
    print(f"| {name} | {args.new_tokens / t:.0f} | {t / args.new_tokens * 1e3:.2f} | {times[ref] / t:.2f}x | "
          f"{first[name]:.1f} | {agree:.0%} |")
  return {"times": times, "first": first, "agree": {n: float(np.mean(tokens[n] == tokens[ref])) for n in tokens}}


if __name__ == "__main__":
  main()
