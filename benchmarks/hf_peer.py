"""The PyTorch peer of benchmarks/train_step.py: Hugging Face transformers' BitNet train step, timed on its own.

    python benchmarks/hf_peer.py --variant b158 [--compile] [--d-model 512 --layers 6 --heads 8 --d-ff 1408 ...]

`BitNetForCausalLM` (squared-ReLU GLU, block RMSNorms plus the attention / FFN sub-norms, tied head: the b1.58 2B4T
layout) with AdamW, float32, torch on the CPU. `--variant fp` keeps transformers' `nn.Linear`; `--variant b158`
swaps every decoder projection for transformers' own `AutoBitLinear(online_quant=True)`, the layer its BitNet
quantizer builds for quantisation-aware training (absmean ternary weights, per-token absmax int8 activations, both
straight-through). `--compile` wraps the model in `torch.compile`; otherwise torch runs eagerly (the quantisers'
own `@torch.compile` included, through TORCHDYNAMO_DISABLE).

Prints one JSON line: the step times in seconds after warm-up, and the versions. `train_step.py --peer` runs this in
a subprocess (so torch and jax never share a process or its thread pools) before and after our own rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def build(args):
  import torch
  import transformers
  from transformers.integrations import bitnet as hf_bitnet

  torch.manual_seed(0)
  config = transformers.BitNetConfig(
      vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.d_ff, num_hidden_layers=args.layers,
      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads or args.heads, hidden_act="relu2",
      max_position_embeddings=args.seq, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)
  model = transformers.BitNetForCausalLM(config).float()
  if args.variant == "b158":
    for name, module in list(model.model.layers.named_modules()):
      if isinstance(module, torch.nn.Linear):
        layer = hf_bitnet.AutoBitLinear(module.in_features, module.out_features, bias=False, online_quant=True)
        layer.weight.data.copy_(module.weight.data)
        model.model.layers.set_submodule(name, layer)
    assert any(isinstance(m, hf_bitnet.AutoBitLinear) for m in model.modules())
  elif args.variant != "fp":
    raise SystemExit(f"error: --variant must be fp or b158, got {args.variant!r}")
  model.train()
  return model, config


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--variant", default="fp", help="fp (nn.Linear) or b158 (AutoBitLinear, online quantisation)")
  parser.add_argument("--compile", action="store_true", help="torch.compile the model (default: eager)")
  parser.add_argument("--d-model", type=int, default=512)
  parser.add_argument("--layers", type=int, default=6)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--kv-heads", type=int, default=None)
  parser.add_argument("--d-ff", type=int, default=1408)
  parser.add_argument("--vocab", type=int, default=256)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  args = parser.parse_args(argv)
  if not args.compile:
    os.environ["TORCHDYNAMO_DISABLE"] = "1"   # before torch is imported: the quantisers are @torch.compile'd
  import torch
  import transformers

  model, _ = build(args)
  step_model = torch.compile(model) if args.compile else model
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
  gen = torch.Generator().manual_seed(1)
  batch = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen)
  inputs, targets = batch[:, :-1], batch[:, 1:]

  def step():
    optimizer.zero_grad(set_to_none=True)
    logits = step_model(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
    loss.backward()
    optimizer.step()
    return loss.detach().item()

  t0 = time.perf_counter()
  for _ in range(args.warmup):
    step()
  warmup_s = time.perf_counter() - t0
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  print(json.dumps({"variant": args.variant, "compile": args.compile, "times_s": times, "warmup_s": warmup_s,
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "threads": torch.get_num_threads(), "machine": platform.machine()}))
  sys.stdout.flush()


if __name__ == "__main__":
  main()
