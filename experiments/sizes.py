"""experiments/sizes: the model sizes and the fixed-token run recipe shared by lr_sweep, variants and ptq
(train -> experiments).

`SIZES` (s0-s5, 55.5K to 3.21M non-embedding parameters) and `run_config` are the first scaling sweep's: every run
trains on the same `TOKENS` (1.2M) in batches of 16 x 128 with the variant's `-small` recipe at that size. The
learning-rate sweep (`lr_sweep.py`), the variants comparison (`variants.py`) and PTQ against QAT (`ptq.py`) are
defined on these runs; the scaling-law sweep itself (`scaling.py`) has its own ladder and k x N tokens per run.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # run from a checkout: configs/ sits at the repository root

from bitnet_jax import train  # noqa: E402
from configs import lm  # noqa: E402

VARIANTS = ("fp", "bitnet", "b158")
# name: (d_model, n_layers, n_heads)
SIZES = {
    "s0": (48, 2, 4),
    "s1": (64, 2, 4),
    "s2": (96, 3, 4),
    "s3": (128, 3, 4),
    "s4": (192, 4, 4),
    "s5": (256, 4, 4),
}
SMOKE_SIZES = {"s1": (32, 1, 2), "s2": (48, 1, 2), "s3": (64, 2, 4)}
SEQ_LEN, BATCH = 128, 16
SMOKE_SEQ_LEN, SMOKE_BATCH = 32, 4
TOKENS = 1_200_000   # training tokens per run


def run_config(variant: str, size: tuple[int, int, int], tokens: int, seed: int, smoke: bool):
  """The training config of one run: the variant's `-small` recipe (any model variant of configs/lm.py) with this
  size (d_model, n_layers, n_heads; d_ff 4 d for bitnet, else 8/3 d rounded up to 64) and `tokens` of training."""
  d_model, n_layers, n_heads = size
  config = lm.get_config(lm.config_name(variant, "small"))
  config.name = f"{variant}-d{d_model}-l{n_layers}"
  config.model.d_model, config.model.n_layers = d_model, n_layers
  config.model.n_heads = config.model.n_kv_heads = n_heads
  config.model.d_ff = 4 * d_model if variant == "bitnet" else 64 * math.ceil(8 * d_model / 3 / 64)
  batch, seq = (SMOKE_BATCH, SMOKE_SEQ_LEN) if smoke else (BATCH, SEQ_LEN)
  steps = max(tokens // (batch * seq), 2)
  config.train.batch_size, config.train.seq_len, config.train.steps = batch, seq, steps
  config.model.max_seq_len = max(config.model.max_seq_len, seq)
  config.train.eval_every = config.train.checkpoint_every = steps if smoke else max(steps // 4, 1)
  config.train.log_every = max(steps // 20, 1)
  config.train.seed = seed
  config.optim.warmup_steps = max(steps // 10, 1)
  if smoke:
    config.data.eval_batches = 1
  return config


def train_or_find(config, run_dir: Path) -> dict:
  """The run's summary: trained into `run_dir` (resuming if interrupted), or read when it finished already."""
  summary_path = run_dir / "summary.json"
  if summary_path.exists():
    summary = json.loads(summary_path.read_text())
    if summary.get("steps") == config.train.steps:
      return summary
  return train.train_and_evaluate(config, run_dir, progress=False)
