"""export: a trained run written as a GGUF file or a Hugging Face directory (train -> interop -> export).

    python -m bitnet_jax.export --workdir=runs/b158 --format=gguf --ftype=TQ1_0 --out=model.gguf
    python -m bitnet_jax.export --workdir=runs/b158 --format=hf --form=packed --out=hf_dir/

GGUF (`interop.gguf.export`): llama.cpp's `bitnet` architecture, ftype TQ2_0 (2-bit), TQ1_0 (1.6-bit) or F16
codes, each with its per-tensor scale; the run must be a b158 model with tied embeddings in the 2B4T or FAQ
layout (the error says which field is not). HF (`interop.hf.save`): transformers' `bitnet` layout, packed
("packed", as the 2B4T release) or latent weights, or `llama` for an fp run; a run trained with a tokenizer.json
gets it copied in. Bad arguments, a missing run or checkpoint, a tokenizer file that is not the run's, or an
`--out` that would overwrite a run end the process with a one-line message (`cli`).
"""

from __future__ import annotations

import argparse

from bitnet_jax.interop import gguf, hf
from bitnet_jax.tokenizer import HFTokenizer


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description="Write a trained bitnet_jax run as GGUF (llama.cpp) or Hugging Face.",
                                   epilog="--debug shows the traceback of an error")
  parser.add_argument("--workdir", required=True, help="a training run directory (config.json, checkpoints/)")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  parser.add_argument("--format", required=True, choices=("gguf", "hf"))
  parser.add_argument("--out", required=True, help="the .gguf file, or the Hugging Face directory, to write")
  parser.add_argument("--ftype", default="TQ2_0", choices=gguf.FTYPES, help="gguf: weight storage")
  parser.add_argument("--embedding_type", default="F16", choices=("F16", "F32"), help="gguf: token_embd storage")
  parser.add_argument("--form", default=None, choices=hf.SAVE_FORMS, help="hf: packed (default) or latent weights")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                      help="hf: float tensors' dtype")
  args = parser.parse_args(argv)
  from absl import logging
  logging.set_verbosity(logging.WARNING)   # orbax logs every restore at INFO

  from bitnet_jax import runs
  from bitnet_jax.generate import load_run   # loading needs train (orbax, grain)
  runs.check_not_a_run(args.out, args.workdir)
  model, tok = load_run(args.workdir, step=args.step)
  if args.format == "gguf":
    summary = gguf.export(model, args.out, ftype=args.ftype, tokenizer=tok, embedding_type=args.embedding_type)
    print(f"wrote {summary['path']}: {summary['bytes'] / 2**20:.2f} MiB, {summary['ternary_weights']:,} ternary "
          f"weights at {summary['bits_per_weight']:.4f} bits each ({summary['ftype']}, {summary['layout']} layout, "
          f"{summary['vocab']} vocabulary)")
  else:
    hf.save(model, args.out, form=args.form, dtype=args.dtype,
            tokenizer=tok if isinstance(tok, HFTokenizer) else None)
    summary = {"path": args.out, "format": "hf", "form": args.form}
    print(f"wrote {args.out} (transformers layout; AutoModelForCausalLM.from_pretrained loads it)")
  return summary


if __name__ == "__main__":
  from bitnet_jax import cli
  cli.run("export", main)
