"""Tests for bitnet_jax/optim.py: the schedules at their breakpoints against the recipes' formulas (computed here,
in float64, from BitNet Tables 5-6 and FAQ Table 2 as written in ../shared/PAPERS.md), and AdamW's behaviour."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bitnet_jax import optim

REL = 1e-6   # schedules are evaluated in float32


def _f(x):
  return float(np.asarray(x))


def _cfg(recipe, size=None, **overrides):
  cfg = optim.default_optim_config(recipe, size)
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def _params(seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {"kernel": jax.random.normal(k1, (4, 3), jnp.float32), "gain": 1.0 + jax.random.normal(k2, (3,))}


def _zeros(params):
  return jax.tree.map(jnp.zeros_like, params)


def _find(state, cls):
  """The first sub-state of type `cls` in a nested optax state."""
  if isinstance(state, cls):
    return state
  if isinstance(state, (tuple, list)):
    for child in state:
      found = _find(child, cls)
      if found is not None:
        return found
  return None


# ---------------------------------------------------------------- the papers' tables
@pytest.mark.parametrize("size,lr", [("125m", 2.4e-3), ("350m", 1.2e-3), ("760m", 1e-3), ("1.3b", 8e-4),
                                     ("2.7b", 6.4e-4), ("6.7b", 4.8e-4), ("13b", 4e-4), ("30b", 4e-4)])
def test_bitnet_table5_lr_and_table6_recipe(size, lr):
  cfg = optim.default_optim_config("bitnet", size)
  assert cfg.recipe == "bitnet" and cfg.lr == lr
  assert cfg.weight_decay == (0.05 if size in ("13b", "30b") else 0.01)
  assert (cfg.b1, cfg.b2, cfg.eps) == (0.9, 0.98, 1e-8)
  assert cfg.warmup_steps == 750 and cfg.clip_norm == 0.0
  assert cfg.power == 1.0 and cfg.end_lr == 0.0
  assert cfg.lr2 is None and cfg.stage1_end_ratio is None


@pytest.mark.parametrize("size,lr,lr2", [("700m", 1.5e-3, 1e-3), ("1.3b", 1.2e-3, 8e-4), ("3b", 1.2e-3, 8e-4),
                                         ("3.9b", 1.2e-3, 8e-4)])
def test_b158_faq_table2(size, lr, lr2):
  cfg = optim.default_optim_config("b158", size)
  assert (cfg.lr, cfg.lr2) == (lr, lr2)
  assert (cfg.b1, cfg.b2) == (0.9, 0.95)
  assert cfg.warmup_steps == 375 and cfg.weight_decay == 0.1 and cfg.clip_norm == 0.0
  assert cfg.stage1_end_ratio == 0.8 and cfg.end_lr == 0.0
  assert cfg.lr * cfg.stage1_end_ratio > cfg.lr2, "the midpoint must be a drop to lr2"


@pytest.mark.parametrize("size,lr", [("700m", 2.5e-4), ("1.3b", 2e-4), ("3b", 2e-4)])
def test_llama_faq_table2(size, lr):
  cfg = optim.default_optim_config("llama", size)
  assert cfg.lr == lr and cfg.end_lr == pytest.approx(0.1 * lr, rel=1e-12)
  assert (cfg.b1, cfg.b2) == (0.9, 0.95)
  assert cfg.warmup_steps == 375 and cfg.weight_decay == 0.1 and cfg.clip_norm == 1.0


def test_constant_recipe_and_smallest_size_default():
  cfg = optim.default_optim_config("constant")
  assert (cfg.lr, cfg.warmup_steps, cfg.weight_decay, cfg.clip_norm) == (1e-3, 0, 0.0, 0.0)
  assert optim.default_optim_config("bitnet").lr == 2.4e-3
  assert (optim.default_optim_config("b158").lr, optim.default_optim_config("b158").lr2) == (1.5e-3, 1e-3)
  assert optim.default_optim_config("llama").lr == 2.5e-4
  assert optim.default_optim_config("bitnet", "1.3B").lr == 8e-4      # sizes are case-insensitive
  assert optim.RECIPES == ("bitnet", "b158", "llama", "constant")


def test_llama_end_lr_follows_lr_until_set():
  cfg = optim.default_optim_config("llama")
  cfg.lr = 1e-3
  assert cfg.end_lr == pytest.approx(1e-4, rel=1e-12)
  assert _f(optim.learning_rate_schedule(cfg, 1000)(1000)) == pytest.approx(1e-4, rel=REL)
  cfg.end_lr = 0.0
  cfg.lr = 2e-3
  assert cfg.end_lr == 0.0


# ---------------------------------------------------------------- errors
def test_unknown_recipe_or_size_raises_listing_valid_ones():
  with pytest.raises(ValueError, match="recipe.*bitnet.*b158.*llama.*constant.*'adam'"):
    optim.default_optim_config("adam")
  with pytest.raises(ValueError, match=r"size.*'125m'.*'30b'.*'7b'"):
    optim.default_optim_config("bitnet", "7b")
  with pytest.raises(ValueError, match=r"size.*'700m'.*'3.9b'"):
    optim.default_optim_config("b158", "125m")
  with pytest.raises(ValueError, match=r"size.*'700m'.*'3b'"):
    optim.default_optim_config("llama", "3.9b")
  cfg = optim.default_optim_config("bitnet")
  cfg.recipe = "sgd"
  with pytest.raises(ValueError, match="recipe"):
    optim.make_optimizer(cfg, 100)


@pytest.mark.parametrize("recipe", optim.RECIPES)
@pytest.mark.parametrize("total_steps", [0, -5, 2.5, True])
def test_bad_total_steps_raises(recipe, total_steps):
  cfg = optim.default_optim_config(recipe)
  for fn in (optim.learning_rate_schedule, optim.weight_decay_schedule, optim.make_optimizer):
    with pytest.raises(ValueError, match="total_steps"):
      fn(cfg, total_steps)


def test_bad_fields_raise_naming_the_field():
  with pytest.raises(ValueError, match="warmup_steps.*-1"):
    optim.learning_rate_schedule(_cfg("bitnet", warmup_steps=-1), 1000)
  with pytest.raises(ValueError, match="lr2.*None"):
    optim.learning_rate_schedule(_cfg("b158", lr2=None), 1000)
  with pytest.raises(ValueError, match="clip_norm.*-1"):
    optim.make_optimizer(_cfg("llama", clip_norm=-1.0), 1000)
  with pytest.raises(ValueError, match="b2.*1.5"):
    optim.make_optimizer(_cfg("llama", b2=1.5), 1000)
  with pytest.raises(ValueError, match="no injected learning_rate"):
    optim.current_lr(optax.adam(1e-3).init(_params()))


# ---------------------------------------------------------------- schedules at their breakpoints
def test_bitnet_schedule_breakpoints():
  T, W, lr = 40_000, 750, 2.4e-3                 # Table 6: 40K updates
  s = optim.learning_rate_schedule(optim.default_optim_config("bitnet", "125m"), T)
  assert _f(s(0)) == 0.0
  assert _f(s(W // 2)) == pytest.approx(lr * (W // 2) / W, rel=REL)
  assert _f(s(W)) == pytest.approx(lr, rel=REL)
  k = 10_000                                     # power 1 to 0: lr * (1 - k / (T - W))
  assert _f(s(W + k)) == pytest.approx(lr * (1 - k / (T - W)), rel=REL)
  assert _f(s(T - 1)) == pytest.approx(lr / (T - W), rel=1e-2)   # float32 cancellation in 1 - k / (T - W)
  assert _f(s(T)) == 0.0 and _f(s(T + 100)) == 0.0


def test_bitnet_schedule_power_and_end_lr():
  T, W, lr, end, power = 1000, 100, 1e-3, 1e-4, 2.0
  s = optim.learning_rate_schedule(_cfg("bitnet", lr=lr, end_lr=end, power=power, warmup_steps=W), T)
  for k in (0, 300, 899):
    assert _f(s(W + k)) == pytest.approx(end + (lr - end) * (1 - k / (T - W)) ** power, rel=REL)
  assert _f(s(T)) == pytest.approx(end, rel=REL)


def test_b158_two_stage_schedule_breakpoints():
  T, W, lr, lr2, r = 10_000, 375, 1.5e-3, 1e-3, 0.8
  mid = T // 2
  s = optim.learning_rate_schedule(optim.default_optim_config("b158", "700m"), T)
  assert _f(s(0)) == 0.0
  assert _f(s(100)) == pytest.approx(lr * 100 / W, rel=REL)
  assert _f(s(W)) == pytest.approx(lr, rel=REL)
  k = (mid - W) // 2                             # stage 1: linear from lr to lr * r at mid
  assert _f(s(W + k)) == pytest.approx(lr + (lr * r - lr) * k / (mid - W), rel=REL)
  before = _f(s(mid - 1))
  assert before == pytest.approx(lr + (lr * r - lr) * (mid - 1 - W) / (mid - W), rel=REL)
  assert before == pytest.approx(lr * r, rel=1e-3)
  assert _f(s(mid)) == pytest.approx(lr2, rel=REL) and before > lr2   # the drop
  k = (T - mid) // 4                             # stage 2: linear from lr2 to 0 at T
  assert _f(s(mid + k)) == pytest.approx(lr2 * (1 - k / (T - mid)), rel=REL)
  assert _f(s(T)) == 0.0 and _f(s(T + 50)) == 0.0


def test_b158_odd_total_steps_midpoint_is_floor():
  T = 1001
  s = optim.learning_rate_schedule(_cfg("b158", "1.3b"), T)
  assert _f(s(500)) == pytest.approx(8e-4, rel=REL)
  assert _f(s(499)) > 8e-4


def test_b158_weight_decay_schedule():
  T = 1000
  wd = optim.weight_decay_schedule(optim.default_optim_config("b158"), T)
  assert _f(wd(0)) == pytest.approx(0.1, rel=REL)
  assert _f(wd(T // 2 - 1)) == pytest.approx(0.1, rel=REL)
  assert _f(wd(T // 2)) == 0.0 and _f(wd(T)) == 0.0
  for recipe, value in (("bitnet", 0.01), ("llama", 0.1), ("constant", 0.0)):
    wd = optim.weight_decay_schedule(optim.default_optim_config(recipe), T)
    assert _f(wd(0)) == pytest.approx(value, rel=REL) and _f(wd(T)) == pytest.approx(value, rel=REL)


def test_llama_schedule_breakpoints():
  T, W, lr = 10_000, 375, 2e-4
  end = 0.1 * lr
  s = optim.learning_rate_schedule(optim.default_optim_config("llama", "3b"), T)
  assert _f(s(0)) == 0.0
  assert _f(s(W // 3)) == pytest.approx(lr * (W // 3) / W, rel=REL)
  assert _f(s(W)) == pytest.approx(lr, rel=REL)
  for k in (1000, (T - W) // 2, 8000):
    want = end + (lr - end) * 0.5 * (1 + math.cos(math.pi * k / (T - W)))
    assert _f(s(W + k)) == pytest.approx(want, rel=1e-5)
  assert _f(s(T)) == pytest.approx(end, rel=REL)


def test_constant_schedule_and_zero_warmup():
  s = optim.learning_rate_schedule(optim.default_optim_config("constant"), 100)
  assert [_f(s(i)) for i in (0, 1, 50, 100, 1000)] == pytest.approx([1e-3] * 5, rel=REL)
  s = optim.learning_rate_schedule(_cfg("constant", warmup_steps=10), 100)
  assert _f(s(0)) == 0.0 and _f(s(5)) == pytest.approx(5e-4, rel=REL) and _f(s(10)) == pytest.approx(1e-3, rel=REL)
  for recipe in ("bitnet", "b158", "llama"):      # no warmup: the peak at step 0
    s = optim.learning_rate_schedule(_cfg(recipe, warmup_steps=0), 1000)
    assert _f(s(0)) == pytest.approx(optim.default_optim_config(recipe).lr, rel=REL)


def test_too_long_warmup_is_clamped_with_a_warning():
  T = 100
  with pytest.warns(UserWarning, match="warmup_steps=750.*clamping.*10"):
    s = optim.learning_rate_schedule(optim.default_optim_config("bitnet"), T)
  assert _f(s(5)) == pytest.approx(2.4e-3 * 5 / 10, rel=REL)
  assert _f(s(10)) == pytest.approx(2.4e-3, rel=REL)
  assert _f(s(T)) == 0.0
  # b158: the warmup must end before the midpoint (375 >= 600 // 2): clamped to 60.
  with pytest.warns(UserWarning, match="midpoint"):
    s = optim.learning_rate_schedule(optim.default_optim_config("b158"), 600)
  assert _f(s(60)) == pytest.approx(1.5e-3, rel=REL)
  assert _f(s(300)) == pytest.approx(1e-3, rel=REL)
  with pytest.warns(UserWarning, match="clamping"):
    s = optim.learning_rate_schedule(optim.default_optim_config("llama"), 375)
  assert _f(s(37)) == pytest.approx(2.5e-4, rel=REL)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    optim.learning_rate_schedule(optim.default_optim_config("b158"), 752)    # warmup 375 < mid 376: kept
    optim.learning_rate_schedule(optim.default_optim_config("bitnet"), 751)
  with pytest.warns(UserWarning, match="midpoint"):                          # warmup 375 == mid 375: clamped
    optim.learning_rate_schedule(optim.default_optim_config("b158"), 751)


@pytest.mark.parametrize("recipe", optim.RECIPES)
def test_one_step_run_is_finite(recipe):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    s = optim.learning_rate_schedule(optim.default_optim_config(recipe), 1)
  values = [_f(s(0)), _f(s(1))]
  assert all(np.isfinite(values)) and values[0] > 0


# ---------------------------------------------------------------- the optimizer
@pytest.mark.parametrize("recipe", ["bitnet", "llama"])   # bare and chained after clipping
def test_current_lr_reads_the_injected_lr(recipe):
  T = 50
  cfg = _cfg(recipe, warmup_steps=4)
  sched = optim.learning_rate_schedule(cfg, T)
  tx = optim.make_optimizer(cfg, T)
  params = _params()
  state = tx.init(params)
  assert _f(optim.current_lr(state)) == pytest.approx(_f(sched(0)), rel=REL)
  update = jax.jit(tx.update)
  grads = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), params)
  for n in range(1, 8):                          # after n updates: the LR the n-th update used
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    assert _f(optim.current_lr(state)) == pytest.approx(_f(sched(n - 1)), rel=REL)
  assert _f(optim.current_lr(state)) > 0.0
  lr = jax.jit(optim.current_lr)(state)          # jit-safe
  assert lr.dtype == jnp.float32


def test_current_lr_through_multisteps():
  cfg = _cfg("b158", warmup_steps=2)
  tx = optax.MultiSteps(optim.make_optimizer(cfg, 20), every_k_schedule=2)
  state = tx.init(_params())
  assert _f(optim.current_lr(state)) == 0.0


def test_weight_decay_applies_to_matrices_only():
  """Zero gradients: Adam's part is 0, so each step is p <- p - lr_t * wd * p on the 2-D param only."""
  T, W, wd = 100, 2, 0.01
  cfg = _cfg("bitnet", warmup_steps=W)
  sched = optim.learning_rate_schedule(cfg, T)
  tx = optim.make_optimizer(cfg, T)
  params = _params(1)
  state = tx.init(params)
  want = np.asarray(params["kernel"], np.float64)
  gain = np.asarray(params["gain"])
  for step in range(4):                          # steps 0 (lr 0), 1 (warmup), 2, 3 (decay)
    updates, state = tx.update(_zeros(params), state, params)
    before = np.asarray(params["kernel"], np.float64)
    params = optax.apply_updates(params, updates)
    lr_t = _f(sched(step))
    want = want - lr_t * wd * want
    np.testing.assert_allclose(np.asarray(updates["kernel"]), -lr_t * wd * before, rtol=1e-5, atol=1e-30)
    np.testing.assert_array_equal(np.asarray(updates["gain"]), 0.0)
    np.testing.assert_allclose(np.asarray(params["kernel"]), want, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(params["gain"]), gain)
  assert not np.array_equal(np.asarray(params["kernel"]), np.asarray(_params(1)["kernel"]))


def test_b158_stage2_has_no_weight_decay():
  T, W = 20, 2
  mid = T // 2
  tx = optim.make_optimizer(_cfg("b158", warmup_steps=W), T)
  params = _params(2)
  p0 = np.asarray(params["kernel"])
  state = tx.init(params)
  step = jax.jit(lambda p, s: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(_zeros(p), s, p)))
  for _ in range(mid):                           # stage 1: decayed
    params, state = step(params, state)
  p_mid = np.asarray(params["kernel"])
  assert np.all(np.abs(p_mid) < np.abs(p0))
  for _ in range(T - mid + 3):                   # stage 2 and past the end: untouched
    params, state = step(params, state)
  np.testing.assert_array_equal(np.asarray(params["kernel"]), p_mid)


def test_clipping_for_llama_and_none_for_bitnet():
  """Adam's first moment after one step is (1 - b1) * g: it sees the clipped gradient."""
  params = _params()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 100.0 / math.sqrt(15)), params)   # global norm 100
  assert float(optax.tree.norm(grads)) == pytest.approx(100.0, rel=REL)

  def mu_norm(cfg):
    tx = optim.make_optimizer(cfg, 1000)
    _, state = tx.update(grads, tx.init(params), params)
    return float(optax.tree.norm(_find(state, optax.ScaleByAdamState).mu))

  assert mu_norm(optim.default_optim_config("llama")) == pytest.approx(0.1 * 1.0, rel=1e-5)
  assert mu_norm(optim.default_optim_config("bitnet")) == pytest.approx(0.1 * 100.0, rel=1e-5)
  assert mu_norm(optim.default_optim_config("b158")) == pytest.approx(0.1 * 100.0, rel=1e-5)
  assert mu_norm(_cfg("bitnet", clip_norm=1.0)) == pytest.approx(0.1 * 1.0, rel=1e-5)
  # Structure: bitnet is the bare injected AdamW; llama is chain(clip, injected AdamW).
  assert hasattr(optim.make_optimizer(optim.default_optim_config("bitnet"), 1000).init(params), "hyperparams")
  llama_state = optim.make_optimizer(optim.default_optim_config("llama"), 1000).init(params)
  assert not hasattr(llama_state, "hyperparams") and len(llama_state) == 2 and hasattr(llama_state[1], "hyperparams")


def test_state_is_float32():
  params = _params()
  for recipe in optim.RECIPES:
    state = optim.make_optimizer(optim.default_optim_config(recipe), 1000).init(params)
    for leaf in jax.tree.leaves(state):
      assert leaf.dtype in (jnp.float32, jnp.int32), (recipe, leaf.dtype)
  bf16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  state = optim.make_optimizer(optim.default_optim_config("b158"), 1000).init(bf16)
  assert optim.current_lr(state).dtype == jnp.float32


def test_with_nnx_optimizer():
  """The trainer's path: nnx.Optimizer around make_optimizer; the decay mask sees NNX parameter states."""

  class Tiny(nnx.Module):
    def __init__(self, rngs):
      self.norm = nnx.RMSNorm(3, rngs=rngs)
      self.dense = nnx.Linear(3, 2, use_bias=False, rngs=rngs)

    def __call__(self, x):
      return self.dense(self.norm(x))

  T, W = 30, 3
  cfg = _cfg("llama", warmup_steps=W)
  sched = optim.learning_rate_schedule(cfg, T)
  model = Tiny(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optim.make_optimizer(cfg, T), wrt=nnx.Param)
  kernel0 = np.asarray(model.dense.kernel[...], np.float64)
  scale0 = np.asarray(model.norm.scale[...])

  @nnx.jit
  def step(m, opt):
    grads = jax.tree.map(jnp.zeros_like, nnx.state(m, nnx.Param))
    opt.update(m, grads)

  for _ in range(5):
    step(model, optimizer)
  assert _f(optim.current_lr(optimizer.opt_state)) == pytest.approx(_f(sched(4)), rel=REL)
  shrink = np.prod([1 - _f(sched(i)) * 0.1 for i in range(5)])
  np.testing.assert_allclose(np.asarray(model.dense.kernel[...]), kernel0 * shrink, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(model.norm.scale[...]), scale0)
