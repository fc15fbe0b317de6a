"""Language-model training configs: BitNet b1.58, BitNet and the FP baseline on the embedded corpus.

Launch:
  python -m bitnet_jax.train --config=configs/lm.py:b158-tiny --workdir=runs/b158-tiny
  python -m bitnet_jax.train --config=configs/lm.py:fp-small --workdir=runs/fp-small --config.train.steps=200
  python -m bitnet_jax.train --config=configs/lm.py:b158-700m,seq_len=2048 --workdir=gs://bucket/b158-700m

Variants (`:NAME`), decoded by `VARIANTS` below:
  * `{b158,fp,bitnet}-tiny`   ~0.3M parameters, a step in well under a second on a CPU: tests and smoke runs.
  * `{b158,fp,bitnet}-small`  the quickstart's size (`make train` trains b158-small and fp-small side by side).
  * `{a48,v2-a8,v2-a4,b158-seq}-{tiny,small}`  the successors (model variants a48, v2_a8, v2_a4, b158_seq:
    `bitnet_jax.model_config`) at the same sizes, with b1.58's two-stage recipe and its small-size learning rate,
    as a4.8 (Table 7) and v2 (Table 9) train with b1.58's recipe. ParetoQ fine-tunes pretrained models (lr 2e-5,
    no weight decay); `b158-seq` here trains from scratch like b158 so that only the quantiser differs.
  * a model preset name from `bitnet_jax.model.PRESETS` (`bitnet-125m` ... `bitnet-30b`, `b158-700m` ...
    `b158-3.9b`, `llama-700m` ... `llama-3b`, `b158-2b4t`, `a48-700m` ... `a48-7b`, `v2-a8-400m` ... `v2-a4-7b`)
    with the paper's recipe for that size (BitNet Table 5-6, b1.58 FAQ Table 2, a4.8 Table 7, v2 Table 9).
Options after the name: `steps=`, `batch=`, `seq_len=`, `smoke` (a 20-step run of the same code path).
Pick the variant by name rather than `--config.model.variant`, which does not re-derive the variant's defaults.
"""

from __future__ import annotations

import ml_collections

from bitnet_jax import data, optim, sharding
from bitnet_jax.model import PRESETS, ModelConfig, preset
from configs.common import model_config_dict, parse_arg

_VOCAB = data.ByteTokenizer.vocab_size
# name: (model variant, optimisation recipe, model dims, train defaults)
_SMALL_SIZES = {
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, max_seq_len=128),
    "small": dict(d_model=192, n_layers=4, n_heads=4, max_seq_len=256),
}
_TRAIN = {
    "tiny": dict(steps=200, batch_size=8, seq_len=64, eval_every=100, checkpoint_every=100),
    "small": dict(steps=400, batch_size=16, seq_len=128, eval_every=100, checkpoint_every=100),
    "paper": dict(steps=40000, batch_size=256, seq_len=2048, eval_every=1000, checkpoint_every=1000),
}
_RECIPE = {"b158": "b158", "bitnet": "bitnet", "fp": "llama", "fp_bitnet": "bitnet", "a48": "b158", "v2_a8": "b158",
           "v2_a4": "b158", "b158_seq": "b158"}
# The successors' two-stage peaks (stage 1, stage 2) per size: a4.8 Table 7, v2 Table 9 (v2-a8 and v2-a4 alike).
_SUCCESSOR_LR = {
    "a48-700m": (1.5e-3, 1e-3), "a48-1.3b": (1.2e-3, 8e-4), "a48-3b": (1.2e-3, 6.4e-4), "a48-7b": (1e-3, 6e-4),
    **{f"v2-{a}-{size}": lr for a in ("a8", "a4") for size, lr in
       {"400m": (1.8e-3, 1.2e-3), "1.3b": (1.2e-3, 8e-4), "3b": (1.2e-3, 6.4e-4), "7b": (1e-3, 6e-4)}.items()},
}
_TWO_STAGE = ("a48", "v2_a4")   # trained 95% with 8-bit activations first (a4.8 and v2 section 3)
# config name prefix -> model variant
_KINDS = {"b158": "b158", "fp": "fp", "bitnet": "bitnet", "a48": "a48", "v2-a8": "v2_a8", "v2-a4": "v2_a4",
          "b158-seq": "b158_seq"}
# The byte-level corpus is tiny next to the papers'; our small models use the learning rate of the papers'
# smallest size for their recipe, except where a size-matched value exists.
_SMALL_LR = {"b158": (1.5e-3, 1e-3), "bitnet": 2.4e-3, "llama": 2.5e-4}


def config_name(model_variant: str, size: str) -> str:
  """The config name of a model variant at a small size: config_name("v2_a4", "small") == "v2-a4-small"."""
  kinds = {v: k for k, v in _KINDS.items()}
  if model_variant not in kinds or size not in _SMALL_SIZES:
    raise ValueError(f"config_name: no config for variant {model_variant!r} at size {size!r}; variants "
                     f"{tuple(kinds)}, sizes {tuple(_SMALL_SIZES)}")
  return f"{kinds[model_variant]}-{size}"


def _decode(variant: str) -> tuple[ModelConfig, ml_collections.ConfigDict, dict]:
  """variant name -> (model config, optim config, train defaults)."""
  if variant in PRESETS:
    cfg = preset(variant)
    recipe = _RECIPE[cfg.variant]
    size = variant.rsplit("-", 1)[1]
    try:
      opt = optim.default_optim_config(recipe, size)
    except ValueError:   # e.g. b158-2b4t: no paper LR for this size in the recipe's table
      opt = optim.default_optim_config(recipe)
    if variant in _SUCCESSOR_LR:   # their own tables of b1.58's two-stage peaks
      opt.lr, opt.lr2 = _SUCCESSOR_LR[variant]
    return cfg, opt, _TRAIN["paper"]
  kind, _, size = variant.rpartition("-")
  model_variant = _KINDS.get(kind)
  if model_variant is None or size not in _SMALL_SIZES:
    raise ValueError(f"unknown config variant {variant!r}; valid: "
                     f"{', '.join(f'{k}-{s}' for s in _SMALL_SIZES for k in _KINDS)}, "
                     f"or a model preset: {', '.join(PRESETS)}")
  cfg = ModelConfig(variant=model_variant, vocab_size=_VOCAB, **_SMALL_SIZES[size])
  recipe = _RECIPE[model_variant]
  opt = optim.default_optim_config(recipe)
  lr = _SMALL_LR[recipe]
  if isinstance(lr, tuple):
    opt.lr, opt.lr2 = lr
  else:
    opt.lr = lr
  opt.warmup_steps = _TRAIN[size]["steps"] // 10   # the papers' 375-750 warmup steps outlast these short runs
  return cfg, opt, _TRAIN[size]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_arg(arg, variant="b158-tiny", steps=0, batch=0, seq_len=0, smoke=False)
  for key in ("steps", "batch", "seq_len"):   # 0: the variant's default
    if arg[key] < 0:
      raise ValueError(f"config arg {key}={arg[key]}: expected a positive int (or 0 for the variant's default)")
  model_cfg, optim_cfg, train_defaults = _decode(arg.variant)

  config = ml_collections.ConfigDict()
  config.name = arg.variant
  config.model = model_config_dict(model_cfg)
  config.optim = optim_cfg

  config.data = ml_collections.ConfigDict()
  config.data.source = "stdlib"         # stdlib | python_paths | text_dir:PATH | tfds:NAME[:SPLIT]
  config.data.tokenizer = "byte"        # byte | sentencepiece:PATH | hf:PATH (then set config.model.vocab_size)
  config.data.valid_fraction = 0.02     # held out by file
  config.data.test_fraction = 0.0       # a test split held out by file too (experiments/scaling.py reports on it)
  config.data.text_key = "text"         # the feature to read from a TFDS dataset
  config.data.eval_batches = 8          # fixed evenly spaced validation windows

  # Devices: a (data, fsdp, tensor) mesh, one size may be -1 for "the rest"; the default is pure data parallel.
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.sharding = ml_collections.ConfigDict()
  config.sharding.rules = sharding.DEFAULT_RULES   # logical axis -> mesh axes, for parameters and activations
  config.sharding.per_shard_groups = True          # quantisation groups = shard counts (False: model.groups as set)
  # Multi-host: empty address = from the environment (TPU pod, SLURM) or single process.
  config.distributed = ml_collections.ConfigDict(dict(coordinator_address="", num_processes=1, process_id=0))

  config.train = ml_collections.ConfigDict()
  config.train.steps = arg.steps or train_defaults["steps"]
  config.train.batch_size = arg.batch or train_defaults["batch_size"]
  config.train.seq_len = arg.seq_len or train_defaults["seq_len"]
  config.train.eval_every = train_defaults["eval_every"]
  config.train.checkpoint_every = train_defaults["checkpoint_every"]
  config.train.keep_checkpoints = 3     # the last k checkpoints are kept
  config.train.log_every = 10           # metrics.jsonl / progress bar cadence
  config.train.seed = 0                 # model init and data order
  config.train.async_checkpoint = True  # orbax writes in the background; a killed run keeps the last complete one
  # Quantisation warm-up (fine-tuning an FP checkpoint into b1.58): lambda ramps 0 -> 1 over this many steps in
  # `x + lambda * stop_gradient(q(x) - x)` for every BitLinear's weights and activations; 0 = off.
  config.train.quant_warmup_steps = 0
  # Start a fresh run from other weights: "hf:DIR" (a transformers BitNet / LLaMA checkpoint) or "run:WORKDIR"
  # (one of our runs); an FP model converts into b158 (`train.init_from`). "" = random init. Resuming ignores it.
  config.train.init_from = ""
  # The two-stage recipe of a4.8 and v2-a4 (their section 3: 95B tokens with 8-bit activations, then 5B with the
  # 4-bit hybrid, optimiser state kept): every named activation quantiser is `stage1_act_quant` for the first
  # round(fraction x steps) steps, the variant's own after; 0.0 = off (the variant's quantisers from the start).
  config.train.act_stage1_fraction = 0.95 if model_cfg.variant in _TWO_STAGE else 0.0
  config.train.stage1_act_quant = "absmax8"

  if arg.smoke:   # same code path, tiny sizes
    config.train.steps = 20
    config.train.eval_every = config.train.checkpoint_every = 10
    config.train.log_every = 5
    config.data.eval_batches = 2
  if config.train.seq_len > model_cfg.max_seq_len:
    config.model.max_seq_len = config.train.seq_len
  return config
