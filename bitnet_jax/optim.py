"""optim: the papers' optimisation recipes as optax transformations (optim -> train).

One `ml_collections.ConfigDict` per recipe holds the hyperparameters; `make_optimizer(cfg, total_steps)` turns
it into an `optax.adamw` wrapped in `optax.inject_hyperparams`, so the learning rate (and weight decay) of the
current step live in the optimizer state and `current_lr(opt_state)` can log them. Every schedule is built from
optax's own schedules (`linear_schedule`, `polynomial_schedule`, `join_schedules`,
`warmup_cosine_decay_schedule`); no schedule arithmetic is written by hand here.

Recipes (see ../shared/PAPERS.md):
  * `bitnet`   BitNet (2310.11453) Table 5 (LR per size) and Table 6: Adam (0.9, 0.98), eps 1e-8, 750 warmup
               steps, polynomial decay (power 1.0 to 0.0, fairseq's default), weight decay 0.01 (0.05 for
               13B/30B), no gradient clipping.
  * `b158`     BitNet b1.58, "Training Tips, Code and FAQ" Table 2: Adam (0.9, 0.95), 375 warmup steps, the
               two-stage schedule (high peak, linear decay; at the midpoint a drop to the lower second peak,
               linear decay to 0), weight decay 0.1 in stage 1 and 0 in stage 2, no clipping.
  * `llama`    the FAQ Table 2 LLaMA baseline: LR per size, Adam (0.9, 0.95), 375 warmup steps, weight decay
               0.1; cosine decay to 10% of the peak and gradient clipping at 1.0 from the LLaMA paper.
  * `constant` a constant LR of 1e-3, no warmup, no decay, no weight decay: for debugging.

Conventions, named:
  * Weight decay is decoupled and multiplied by the learning rate (`optax.adamw`, the PyTorch AdamW and fairseq
    Adam convention): one step does `p <- p - lr_t * (adam_update + wd_t * p)`.
  * Only parameters with `ndim >= 2` are decayed (kernels, embeddings, the output head); 1-D parameters (norm
    gains, biases if any) are not. This is the common modern practice; the papers do not say which parameters
    are decayed.
  * Latent weights and optimizer state stay float32: the moments follow the parameters' dtype (the trainer keeps
    the latent weights in float32) and the injected hyperparameters are stored in float32 whatever it is.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

__all__ = [
    "RECIPES",
    "default_optim_config",
    "learning_rate_schedule",
    "weight_decay_schedule",
    "make_optimizer",
    "current_lr",
]

RECIPES = ("bitnet", "b158", "llama", "constant")

# --------------------------------------------------------------------------------------------------------------
# The papers' numbers.
# --------------------------------------------------------------------------------------------------------------
# BitNet Table 5 (BitNet's LR per model size); Table 6 gives the rest of the recipe.
BITNET_LR = {"125m": 2.4e-3, "350m": 1.2e-3, "760m": 1e-3, "1.3b": 8e-4, "2.7b": 6.4e-4, "6.7b": 4.8e-4,
             "13b": 4e-4, "30b": 4e-4}
# BitNet Table 6: weight decay 0.01, 0.05 for the two largest models.
BITNET_WD = {size: (0.05 if size in ("13b", "30b") else 0.01) for size in BITNET_LR}
# FAQ Table 2: b1.58 (first-stage peak, second-stage peak).
B158_LR = {"700m": (1.5e-3, 1e-3), "1.3b": (1.2e-3, 8e-4), "3b": (1.2e-3, 8e-4), "3.9b": (1.2e-3, 8e-4)}
# FAQ Table 2: the LLaMA baseline.
LLAMA_LR = {"700m": 2.5e-4, "1.3b": 2e-4, "3b": 2e-4}

# Our reading of the b1.58 two-stage schedule: the FAQ says stage 1 decays linearly from the high peak and that
# the LR "drops" to the second peak at the midpoint, but not where stage 1 ends. We end it at 0.8 x the first
# peak, which is above the second peak for every size of FAQ Table 2 (1.2e-3 > 1e-3, 9.6e-4 > 8e-4), so the
# midpoint is a drop, as the FAQ describes.
B158_STAGE1_END_RATIO = 0.8
# LLaMA paper: cosine decay to 10% of the peak.
LLAMA_END_RATIO = 0.1

_SIZES = {"bitnet": BITNET_LR, "b158": B158_LR, "llama": LLAMA_LR}


# --------------------------------------------------------------------------------------------------------------
# Configs.
# --------------------------------------------------------------------------------------------------------------
def _check_recipe(recipe: Any) -> str:
  if recipe not in RECIPES:
    raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
  return recipe


def default_optim_config(recipe: str, size: str | None = None) -> ml_collections.ConfigDict:
  """The paper's optimisation hyperparameters for `recipe`, at the LR of the named model `size`.

  Fields (every recipe has all of them; `None` where a field means nothing for the recipe):
    recipe            one of RECIPES.
    lr                peak learning rate (b158: the first-stage peak).
    lr2               b158: the second-stage peak (FAQ Table 2); None otherwise.
    warmup_steps      linear warmup from 0 to `lr`.
    b1, b2, eps       Adam.
    weight_decay      decoupled, multiplied by the LR (AdamW); b158: stage 1 only.
    clip_norm         global-norm gradient clipping; 0.0 = no clipping.
    end_lr            the LR at `total_steps`: bitnet 0.0 (fairseq's polynomial decay default), llama
                      0.1 x lr (a lazy reference: overriding `lr` moves it, until `end_lr` itself is set),
                      b158 0.0 (the end of stage 2); None for constant.
    power             bitnet: the polynomial decay power (1.0, i.e. linear); None otherwise.
    stage1_end_ratio  b158: stage 1 decays linearly from `lr` to `lr * stage1_end_ratio` at the midpoint
                      (0.8, our reading: the FAQ does not say where stage 1 ends); None otherwise.

  Sizes (case-insensitive, e.g. "1.3b"): bitnet: BitNet Table 5 ("125m" ... "30b"), weight decay 0.05 for
  "13b" and "30b" (Table 6); b158: FAQ Table 2 ("700m", "1.3b", "3b", "3.9b"); llama: FAQ Table 2 ("700m",
  "1.3b", "3b"). `size=None` takes the smallest size's values. The constant recipe has no sizes and ignores
  `size`. An unknown recipe or size raises ValueError listing the valid ones.
  """
  _check_recipe(recipe)
  key = None
  if recipe != "constant":
    table = _SIZES[recipe]
    if size is None:
      key = next(iter(table))                    # the tables are written smallest first
    elif isinstance(size, str) and size.lower() in table:
      key = size.lower()
    else:
      raise ValueError(f"size for recipe {recipe!r} must be one of {tuple(table)} (or None), got {size!r}")

  cfg = ml_collections.ConfigDict()
  cfg.recipe = recipe
  cfg.lr2 = None
  cfg.end_lr = None
  cfg.power = None
  cfg.stage1_end_ratio = None
  cfg.eps = 1e-8
  if recipe == "bitnet":                         # BitNet Tables 5-6
    cfg.lr = BITNET_LR[key]
    cfg.warmup_steps = 750
    cfg.b1, cfg.b2 = 0.9, 0.98
    cfg.weight_decay = BITNET_WD[key]
    cfg.clip_norm = 0.0
    cfg.end_lr = 0.0
    cfg.power = 1.0
  elif recipe == "b158":                         # FAQ Table 2, b1.58 columns
    cfg.lr, cfg.lr2 = B158_LR[key]
    cfg.warmup_steps = 375
    cfg.b1, cfg.b2 = 0.9, 0.95
    cfg.weight_decay = 0.1
    cfg.clip_norm = 0.0
    cfg.end_lr = 0.0
    cfg.stage1_end_ratio = B158_STAGE1_END_RATIO
  elif recipe == "llama":                        # FAQ Table 2, LLaMA columns; LLaMA paper for decay and clipping
    cfg.lr = LLAMA_LR[key]
    cfg.warmup_steps = 375
    cfg.b1, cfg.b2 = 0.9, 0.95
    cfg.weight_decay = 0.1
    cfg.clip_norm = 1.0
    cfg.end_lr = cfg.get_ref("lr") * LLAMA_END_RATIO
  else:                                          # constant: Adam as in b1.58 / LLaMA, nothing scheduled
    cfg.lr = 1e-3
    cfg.warmup_steps = 0
    cfg.b1, cfg.b2 = 0.9, 0.95
    cfg.weight_decay = 0.0
    cfg.clip_norm = 0.0
  return cfg


# --------------------------------------------------------------------------------------------------------------
# Validation helpers.
# --------------------------------------------------------------------------------------------------------------
def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_total_steps(total_steps) -> int:
  if not _is_int(total_steps) or total_steps < 1:
    raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
  return int(total_steps)


def _check_nonneg(cfg, name: str) -> float:
  value = cfg[name]
  if (value is None or not isinstance(value, (int, float, np.number)) or isinstance(value, bool)
      or not np.isfinite(value) or value < 0):
    raise ValueError(f"optim config field {name} must be a finite number >= 0 for recipe {cfg.recipe!r}, "
                     f"got {value!r}")
  return float(value)


def _midpoint(total_steps: int) -> int:
  """The b1.58 stage boundary: stage 2 starts at step `total_steps // 2`."""
  return total_steps // 2


def _warmup_steps(cfg, total_steps: int) -> int:
  """`cfg.warmup_steps`, clamped (with a warning) to `total_steps // 10` when it leaves no room for the decay.

  The warmup must end before the first decay does: before `total_steps` (bitnet, llama, constant), before the
  midpoint (b158, whose stage 1 is the first half). A warmup of `warmup_steps >= that end` (e.g. the papers'
  750 or 375 steps in a 100-step smoke run) is clamped to `total_steps // 10` and a UserWarning names both.
  """
  warmup = cfg.warmup_steps
  if not _is_int(warmup) or warmup < 0:
    raise ValueError(f"optim config field warmup_steps must be an int >= 0, got {warmup!r}")
  end = _midpoint(total_steps) if cfg.recipe == "b158" else total_steps
  if warmup > 0 and warmup >= end:
    clamped = total_steps // 10
    what = "the b158 midpoint" if cfg.recipe == "b158" else "total_steps"
    warnings.warn(f"optim: warmup_steps={warmup} does not end before {what} ({end}) with "
                  f"total_steps={total_steps}; clamping warmup_steps to total_steps // 10 = {clamped}", stacklevel=3)
    warmup = clamped
  return int(warmup)


def _with_warmup(peak: float, warmup: int, after: optax.Schedule) -> optax.Schedule:
  """Linear warmup 0 -> peak over `warmup` steps, then `after(step - warmup)`."""
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


# --------------------------------------------------------------------------------------------------------------
# Schedules.
# --------------------------------------------------------------------------------------------------------------
def learning_rate_schedule(cfg, total_steps: int) -> optax.Schedule:
  """The learning rate as a function of the step (0-based) for `cfg.recipe`, over `total_steps` updates.

  All recipes start with a linear warmup from 0 to `cfg.lr` over `warmup_steps` (see `_warmup_steps` for the
  clamp when it is too long), then:
    * bitnet (BitNet Table 6): `optax.polynomial_schedule(lr, end_lr, power, total_steps - warmup)`, reaching
      `end_lr` at `total_steps`.
    * b158 (FAQ Table 2): two stages around `mid = total_steps // 2`. Stage 1 decays linearly from `lr` to
      `lr * stage1_end_ratio` (reached at `mid`, never taken: the step before is the last stage-1 value);
      stage 2 starts at exactly `lr2` at step `mid` and decays linearly to `end_lr` (0) at `total_steps`.
    * llama (LLaMA paper): `optax.warmup_cosine_decay_schedule(0, lr, warmup, total_steps, end_lr)`, cosine
      down to `end_lr` = 0.1 x lr at `total_steps`.
    * constant: `lr` after the warmup (none by default).
  Past `total_steps` every schedule holds its final value. `total_steps < 1` raises ValueError.
  """
  recipe = _check_recipe(cfg.recipe)
  total_steps = _check_total_steps(total_steps)
  lr = _check_nonneg(cfg, "lr")
  warmup = _warmup_steps(cfg, total_steps)

  if recipe == "bitnet":
    power = cfg.power
    if not isinstance(power, (int, float)) or isinstance(power, bool) or power <= 0:
      raise ValueError(f"optim config field power must be a number > 0 for recipe 'bitnet', got {power!r}")
    decay = optax.polynomial_schedule(lr, _check_nonneg(cfg, "end_lr"), float(power), total_steps - warmup)
    return _with_warmup(lr, warmup, decay)

  if recipe == "b158":
    lr2, end_lr = _check_nonneg(cfg, "lr2"), _check_nonneg(cfg, "end_lr")
    ratio = _check_nonneg(cfg, "stage1_end_ratio")
    mid = _midpoint(total_steps)
    stage1 = optax.linear_schedule(lr, lr * ratio, mid - warmup)
    stage2 = optax.linear_schedule(lr2, end_lr, total_steps - mid)
    if mid == 0:                                 # total_steps == 1 (so warmup == 0): stage 2 only
      return stage2
    return _with_warmup(lr, warmup, optax.join_schedules([stage1, stage2], [mid - warmup]))

  if recipe == "llama":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=total_steps,
        end_value=_check_nonneg(cfg, "end_lr"))

  return _with_warmup(lr, warmup, optax.constant_schedule(lr))


def weight_decay_schedule(cfg, total_steps: int) -> optax.Schedule:
  """The weight decay coefficient as a function of the step.

  b158 (FAQ Table 2, "weight decay 0.1 -> 0"): `cfg.weight_decay` for steps < `total_steps // 2`, 0.0 from
  the midpoint on (stage 2). Every other recipe: the constant `cfg.weight_decay`. optax.adamw multiplies it by
  the current learning rate.
  """
  recipe = _check_recipe(cfg.recipe)
  total_steps = _check_total_steps(total_steps)
  wd = _check_nonneg(cfg, "weight_decay")
  if recipe == "b158":
    return optax.join_schedules([optax.constant_schedule(wd), optax.constant_schedule(0.0)],
                                [_midpoint(total_steps)])
  return optax.constant_schedule(wd)


# --------------------------------------------------------------------------------------------------------------
# The optimizer.
# --------------------------------------------------------------------------------------------------------------
def _decay_mask(params):
  """True for the parameters that are weight-decayed: those with ndim >= 2 (not norm gains)."""
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(cfg, total_steps: int) -> optax.GradientTransformation:
  """AdamW with the recipe's schedules, its LR and weight decay injected into the optimizer state.

  `optax.inject_hyperparams(optax.adamw)(learning_rate=learning_rate_schedule(...), b1, b2, eps,
  weight_decay=weight_decay_schedule(...), mask=ndim >= 2)`, preceded by `optax.clip_by_global_norm(clip_norm)`
  when `cfg.clip_norm > 0` (llama), alone otherwise (bitnet and b158: the papers clip nothing).

  The weight decay is decoupled and scaled by the learning rate (`optax.adamw`, the PyTorch AdamW convention):
  each update adds `-lr_t * wd_t * p` to every parameter with `ndim >= 2`; 1-D parameters (norm gains) are
  never decayed. The injected hyperparameters are kept in float32; the Adam moments follow the parameters'
  dtype (float32 latent weights -> float32 state). Read the current LR with `current_lr(opt_state)`.
  """
  lr_sched = learning_rate_schedule(cfg, total_steps)
  wd_sched = weight_decay_schedule(cfg, total_steps)
  for name in ("b1", "b2"):
    value = cfg[name]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
      raise ValueError(f"optim config field {name} must be a number in [0, 1), got {value!r}")
  eps = _check_nonneg(cfg, "eps")
  clip_norm = _check_nonneg(cfg, "clip_norm")

  adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",), hyperparam_dtype=jnp.float32)(
      learning_rate=lr_sched, b1=float(cfg.b1), b2=float(cfg.b2), eps=eps, weight_decay=wd_sched,
      mask=_decay_mask)
  if clip_norm > 0.0:
    return optax.chain(optax.clip_by_global_norm(clip_norm), adamw)
  return adamw


def _unwrap(x):
  """An injected hyperparameter as an array: Flax NNX's `nnx.Optimizer` wraps state leaves in Variables."""
  if hasattr(x, "get_value") and not isinstance(x, (jax.Array, np.ndarray)):
    return x.get_value()
  return x


def _find_hyperparam(state, name: str):
  """Depth-first search of a (possibly nested) optax state for an injected hyperparameter `name`."""
  hyperparams = getattr(state, "hyperparams", None)
  if isinstance(hyperparams, dict) and name in hyperparams:
    return hyperparams[name]
  if isinstance(state, dict):
    children = state.values()
  elif isinstance(state, (tuple, list)):
    children = state
  else:
    return None
  for child in children:
    found = _find_hyperparam(child, name)
    if found is not None:
      return found
  return None


def current_lr(opt_state) -> float | jax.Array:
  """The injected learning rate in `opt_state` (a `make_optimizer` state, bare, chained, or nested in another
  transformation such as `optax.MultiSteps`, or an `nnx.Optimizer.opt_state`).

  optax's `inject_hyperparams` stores the value it used for the last update: after n updates this is
  `learning_rate_schedule(cfg, total_steps)(n - 1)`, the LR of the step just taken (before any update, the
  step-0 value). Returns a float32 scalar array (jit-safe); raises ValueError if there is no injected LR.
  """
  found = _find_hyperparam(opt_state, "learning_rate")
  if found is None:
    raise ValueError("opt_state has no injected learning_rate: build the optimizer with make_optimizer "
                     f"(optax.inject_hyperparams); got a state of type {type(opt_state).__name__}")
  return _unwrap(found)
