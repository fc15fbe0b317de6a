"""experiments/scaling: L(N) of fp, BitNet and b1.58, each point at its own tuned learning rate (-> experiments).

    .venv/bin/python experiments/scaling.py            # 7 sizes x 3 variants x ~3.5 rates + 1 seed: ~2 h
    .venv/bin/python experiments/scaling.py --smoke    # the same code path, tiny: about 2 minutes on 2 cores
    .venv/bin/python experiments/scaling.py --report   # fits and plots of the runs recorded so far

The design (the first, fixed-token sweep with recipe learning rates is in git history before this file):
  * Data grows with the model: every run trains on k x N tokens (N: non-embedding parameters, k =
    `--tokens_per_param`, default 10), batch 8 x 128, from the embedded corpus without repeating data (the
    largest run must fit in the training split once; checked). Sizes: `LADDER`, 7 sizes over ~47x in N.
  * Learning rate per variant and size: a factor-2 grid of 3 around a predicted optimum (the first size: our
    committed learning-rate sweep's optimum at s1; then a line through log lr* against log N of the sizes done,
    or the previous size's lr* with only one), extended by one step while the best run sits at an edge (up to
    `--extend` times). lr* is the vertex of a parabola through the best run and its two neighbours in log2(lr).
    Every run is recorded, diverged ones too.
  * Selection apart from reporting: the corpus holds out a test split by file (`data.test_fraction`, 2%) beside
    validation; the learning rate is chosen on the validation loss, and the fits use the chosen run's test loss.
  * Evaluation in the papers' inference mode: losses are per-token (`generate.inference_form(model, "dense")`:
    BitNet's activation absmax per token, not per batch), with the standard error over test sequences; BitNet's
    training-mode (per-tensor) test loss is recorded beside it.
  * Fits (`experiments/scaling_fit.py`): Huber on log residuals from a grid of starts, c free and c fixed at 0,
    paired bootstrap intervals (sizes resampled, losses perturbed by their s.e.), the held-out largest size, and
    each quantised variant's gap to fp with its slope per decade.
  * Training noise: the chosen learning rate of every point is trained again at `--seeds` - 1 more seeds
    (default 2 seeds in all). A point's loss is the mean over its seeds, and its standard error adds the
    between-seed variance (pooled over the variant's points) to the test sequences' sampling error; the gaps'
    paired errors add both variants'. One seed alone understates the error several times at these sizes.
  * Mechanics: every finished run is written to OUT/scaling.json at once (atomically); a run recorded there
    is never trained again, even without its run directory, so the sweep resumes across sessions from the
    committed file. `done` in the file says which (variant, size) points' grids are finished; `points` holds
    each chosen point (rate, seeds, mean test loss and its s.e.). Plot and tables: `experiments/scaling_report.py`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # run from a checkout: configs/ sits at the repository root

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from bitnet_jax import cli, data, generate, train, weights  # noqa: E402
from bitnet_jax.model import count_params  # noqa: E402
from experiments import lr_sweep, sizes  # noqa: E402  (experiments/ as a namespace package, from ROOT)
from experiments import scaling_fit as sf  # noqa: E402
from experiments.scaling_report import markdown, plot  # noqa: E402
from experiments.variants import _sequence_losses  # noqa: E402  (per-sequence mean loss, jitted)

VARIANTS = ("fp", "bitnet", "b158")
# name: (d_model, n_layers, n_heads); N (non-embedding) from ~7K to ~330K
LADDER = {"t0": (24, 1, 2), "t1": (32, 1, 2), "t2": (32, 2, 2), "t3": (48, 2, 4), "t4": (64, 2, 4),
          "t5": (64, 3, 4), "t6": (96, 3, 4)}
SMOKE_LADDER = {"t0": (16, 1, 2), "t1": (24, 1, 2), "t2": (32, 1, 2), "t3": (32, 2, 2)}
BATCH, SEQ = 8, 128
# The first size's grid centre: the committed learning-rate sweep's optimum at s1 (experiments/results/
# lr_sweep.json: fp 0.004, b158 0.032; variants.json: b158 0.016); BitNet is not in that sweep: b158's.
FIRST_LR = {"fp": 4e-3, "bitnet": 1.6e-2, "b158": 1.6e-2}
LATTICE = 1e-3     # every learning rate is 1e-3 x 2^k, so grids of neighbouring sizes share points
TEST_FRACTION = 0.02
# what the results file's "points" keep of each chosen point (`selected`): what the fits and the tables read
POINT_KEYS = ("size", "n_params", "tokens", "lr", "seeds", "test_loss_by_seed", "test_loss", "test_loss_se")


# --------------------------------------------------------------------------------------------------------------
# Runs.
# --------------------------------------------------------------------------------------------------------------
def run_config(variant: str, size, tokens_per_param: float, lr: float, seed: int, smoke: bool):
  """One run: the variant's `-small` recipe at `size`, k x N tokens (smoke: 4 steps), batch 8 x 128, test split."""
  config = sizes.run_config(variant, size, 1, seed, smoke)
  n = count_params(train.model_config_from(config))["non_embedding"]
  batch, seq = (4, 32) if smoke else (BATCH, SEQ)
  steps = 4 if smoke else max(int(round(tokens_per_param * n / (batch * seq))), 10)
  config.train.batch_size, config.train.seq_len, config.train.steps = batch, seq, steps
  config.train.eval_every = config.train.checkpoint_every = steps if smoke else max(steps // 4, 1)
  config.train.log_every = max(steps // 20, 1)
  config.optim.warmup_steps = max(steps // 10, 1)
  config.data.test_fraction = TEST_FRACTION
  return lr_sweep.with_lr(config, lr)


def _snap(lr: float) -> float:
  return LATTICE * 2.0 ** round(math.log2(lr / LATTICE))


def _split_losses(model, tokens, config, eval_batches: int) -> np.ndarray:
  batches = data.eval_batches(tokens, batch_size=config.train.batch_size, seq_len=config.train.seq_len,
                              max_batches=eval_batches)
  return np.concatenate([np.asarray(_sequence_losses(model, jnp.asarray(b))) for b in batches])


def _mean_se(losses: np.ndarray) -> tuple[float, float]:
  return float(losses.mean()), float(losses.std(ddof=1) / math.sqrt(len(losses)))


def evaluate(run_dir: Path, eval_batches: int) -> dict:
  """Validation and test losses of a finished run in inference mode (per-token activation scales), with their
  standard errors over sequences; BitNet's training-mode (per-tensor) test loss beside them."""
  model, config = weights.load_checkpoint(run_dir)
  corpus = data.load_corpus(config.data.source, valid_fraction=config.data.valid_fraction,
                            test_fraction=config.data.test_fraction, text_key=config.data.text_key,
                            tokenizer=config.data.tokenizer)
  inference = generate.inference_form(model, "dense", "unrolled")
  out = {}
  for split, tokens in (("val", corpus.valid), ("test", corpus.test)):
    losses = _split_losses(inference, tokens, config, eval_batches)
    out[f"{split}_loss"], out[f"{split}_loss_se"] = _mean_se(losses)
    out[f"{split}_tokens"] = int(losses.size * config.train.seq_len)
  if config.model.variant == "bitnet":
    out["test_loss_train_mode"], _ = _mean_se(_split_losses(model, corpus.test, config, eval_batches))
  out["test_sequence_losses"] = [round(float(x), 4) for x in losses]   # paired gaps between variants
  return out


def train_point(workdir: Path, variant: str, size_name: str, size, lr: float, args, seed: int | None = None) -> dict:
  """Trains (or finds finished on disk) one (variant, size, lr, seed) run and evaluates it; its record."""
  seed = args.seed if seed is None else seed
  config = run_config(variant, size, args.tokens_per_param, lr, seed, args.smoke)
  run_dir = workdir / size_name / (f"{variant}-lr{lr:.4g}" + ("" if seed == args.seed else f"-seed{seed}"))
  summary = lr_sweep._finished(run_dir, config.train.steps)
  if summary is None:
    lr_sweep._check_same_run(run_dir, config)
    summary = lr_sweep._train_one(config, run_dir)
  diverged, reason = lr_sweep._diverged(summary, math.log(config.model.vocab_size))
  params = count_params(train.model_config_from(config))
  record = {"variant": variant, "size": size_name, "d_model": size[0], "n_layers": size[1], "n_heads": size[2],
            "n_params": params["non_embedding"], "n_params_total": params["total"], "lr": lr, "seed": seed,
            "tokens": config.train.steps * config.train.batch_size * config.train.seq_len,
            "steps": config.train.steps, "diverged": diverged, "reason": reason, "wall_s": summary["wall_s"],
            "val_loss_train_mode": None if diverged else summary["eval_loss"]}
  if not diverged:
    record |= evaluate(run_dir, 2 if args.smoke else args.eval_batches)
  return record


# --------------------------------------------------------------------------------------------------------------
# Learning rates.
# --------------------------------------------------------------------------------------------------------------
def lr_optimum(runs: list[dict]) -> dict:
  """The best run on validation loss among one (variant, size)'s runs; `at_edge`: "low" / "high" when it is the
  smallest / largest learning rate tried (a larger one that diverged closes the high edge: None; all diverged:
  "low"); lr*: the vertex
  of the parabola in log2(lr) through the best run and its two neighbours (the best run's lr without both)."""
  ok = sorted((r for r in runs if not r["diverged"]), key=lambda r: r["lr"])
  if not ok:   # every rate diverged: look lower
    return {"lr": None, "lr_star": None, "at_edge": "low", "best": None}
  i = min(range(len(ok)), key=lambda j: ok[j]["val_loss"])
  lrs = sorted(r["lr"] for r in runs)
  at_edge = "low" if ok[i]["lr"] == lrs[0] else "high" if ok[i]["lr"] == lrs[-1] else None
  lr_star = ok[i]["lr"]
  if 0 < i < len(ok) - 1:
    x = np.log2([ok[j]["lr"] for j in (i - 1, i, i + 1)])
    a, b, _ = np.polyfit(x, [ok[j]["val_loss"] for j in (i - 1, i, i + 1)], 2)
    if a > 0:
      lr_star = float(2.0 ** np.clip(-b / (2 * a), x[0], x[2]))
  return {"lr": ok[i]["lr"], "lr_star": lr_star, "at_edge": at_edge, "best": ok[i]}


def grid_centre(variant: str, done: list[tuple[float, float]], n_next: float) -> float:
  """The next size's grid centre from the sizes done (`done`: [(N, lr*)], N ascending): FIRST_LR with none, the
  lr* of the one, else the least-squares line through log lr* against log N at `n_next`, kept within a factor 2
  of the last size's lr* (the sizes are about 2x apart; a line through noisy optima must not run away)."""
  if not done:
    return FIRST_LR[variant]
  last = done[-1][1]
  if len(done) == 1:
    return last
  slope, icpt = np.polyfit(np.log([d[0] for d in done]), np.log([d[1] for d in done]), 1)
  return float(np.clip(np.exp(icpt + slope * np.log(n_next)), last / 2, last * 2))


def runs_of(records: list[dict], variant: str, size_name: str, seed: int, lr: float | None = None) -> list[dict]:
  """The recorded runs of one (variant, size) at `seed` (and at `lr`, when given)."""
  return [r for r in records if r["variant"] == variant and r["size"] == size_name and r["seed"] == seed
          and (lr is None or math.isclose(r["lr"], lr))]


def sweep_point(workdir, variant, size_name, size, centre, records, args, save, bar, cost) -> dict:
  """Every run of one (variant, size): the grid around `centre`, extended while the best sits at an edge."""
  grid = [_snap(centre) * f for f in ((1.0, 2.0) if args.smoke else (0.5, 1.0, 2.0))]
  mine = lambda: runs_of(records, variant, size_name, args.seed)
  for extension in range(args.extend + 1):
    for lr in grid:
      if not any(math.isclose(r["lr"], lr) for r in mine()):
        bar.set_postfix_str(f"{size_name} {variant} lr {lr:.4g}")
        records.append(train_point(workdir, variant, size_name, size, lr, args))
        save()
      bar.update(cost)
    opt = lr_optimum(mine())
    if opt["at_edge"] is None or extension == args.extend:
      return opt
    lrs = sorted(r["lr"] for r in mine())
    grid = [lrs[-1] * 2] if opt["at_edge"] == "high" else [lrs[0] / 2]   # "low": also when all diverged
    bar.total += cost
  return opt


def replicate_point(workdir, variant, size_name, size, opt, records, args, save, bar, cost) -> None:
  """The chosen learning rate of one (variant, size) trained again at seeds base + 1 ... base + seeds - 1."""
  for seed in range(args.seed + 1, args.seed + args.seeds):
    if opt["lr"] is not None and not runs_of(records, variant, size_name, seed, opt["lr"]):
      bar.set_postfix_str(f"{size_name} {variant} lr {opt['lr']:.4g} seed {seed}")
      records.append(train_point(workdir, variant, size_name, size, opt["lr"], args, seed=seed))
      save()
    bar.update(cost)


# --------------------------------------------------------------------------------------------------------------
# Analysis.
# --------------------------------------------------------------------------------------------------------------
def merge_seeds(runs: list[dict]) -> dict:
  """One point from the runs of one (variant, size, lr) at several seeds (the first is the base seed's, which
  chose the rate): test loss and per-sequence losses averaged over the seeds that did not diverge, the seeds'
  own test losses beside; `test_loss_se_sequences` is the test sequences' sampling error of the mean."""
  ok = [r for r in runs if not r["diverged"]]
  seqs = np.mean([r["test_sequence_losses"] for r in ok], axis=0)
  se = float(seqs.std(ddof=1) / math.sqrt(len(seqs)))
  return {**runs[0], "seeds": [r["seed"] for r in ok], "seeds_diverged": [r["seed"] for r in runs if r["diverged"]],
          "test_loss_by_seed": [r["test_loss"] for r in ok], "test_loss": float(np.mean([r["test_loss"] for r in ok])),
          "test_loss_se_sequences": se, "test_loss_se": se, "test_sequence_losses": [round(float(x), 4) for x in seqs]}


def seed_variance(points: list[dict]) -> dict:
  """The between-seed variance of the test loss, pooled over the points that have two seeds or more (the test
  sequences are the same for every seed, so this is training noise alone): {"var", "sd", "dof", "points"}."""
  many = [p["test_loss_by_seed"] for p in points if len(p["test_loss_by_seed"]) > 1]
  dof = sum(len(x) - 1 for x in many)
  var = sum(float(np.var(x, ddof=1)) * (len(x) - 1) for x in many) / dof if dof else None
  return {"var": var, "sd": None if var is None else math.sqrt(var), "dof": dof, "points": len(many)}


def selected(records: list[dict], done: dict, variants, base_seed: int = 0) -> tuple[dict, dict]:
  """(variant -> the chosen point per finished size, N ascending; variant -> its pooled seed variance). A point
  is the best base-seed run on validation merged with its replicates (`merge_seeds`); with a pooled seed
  variance, its standard error is sqrt(sequence s.e.^2 + seed variance / seeds)."""
  out, noise = {}, {}
  for v in variants:
    rows = []
    for s, opt in done[v].items():
      if opt["best"] is None:
        continue
      reps = [r for r in records if r["variant"] == v and r["size"] == s and math.isclose(r["lr"], opt["best"]["lr"])
              and r["seed"] != base_seed]
      rows.append(merge_seeds([opt["best"], *sorted(reps, key=lambda r: r["seed"])]))
    noise[v] = seed_variance(rows)
    for p in rows:
      p["seed_var_pooled"] = noise[v]["var"]
      if noise[v]["var"] is not None:
        p["test_loss_se"] = math.sqrt(p["test_loss_se_sequences"] ** 2 + noise[v]["var"] / len(p["seeds"]))
    out[v] = sorted(rows, key=lambda r: r["n_params"])
  return out, noise


def _paired_se(a: dict, b: dict) -> float:
  """Standard error of a's test loss minus b's over the same sequences (the sequences' own spread in difficulty
  cancels), plus each point's training noise (pooled seed variance / its seeds) where measured; without both
  sequence lists, that of independent losses."""
  x, y = a.get("test_sequence_losses"), b.get("test_sequence_losses")
  if not (x and y and len(x) == len(y)):
    return math.hypot(a["test_loss_se"], b["test_loss_se"])
  d = np.subtract(x, y)
  var = float(d.var(ddof=1) / len(d))
  for p in (a, b):
    if p.get("seed_var_pooled") is not None:
      var += p["seed_var_pooled"] / len(p.get("seeds") or [None])
  return math.sqrt(var)


def analyse(chosen: dict, draws: int, seed: int, screen: int | None = None) -> dict:
  """Fits per variant (c free and c = 0), the held-out largest size, and the paired bootstrap over the sizes
  every variant has finished; gaps to fp per size, with the paired standard error over the same test sequences."""
  fits = {}
  for v, rows in chosen.items():
    n = [r["n_params"] for r in rows]
    loss = [r["test_loss"] for r in rows]
    if len(set(n)) < 3:
      fits[v] = {"sizes": len(rows), "note": "fewer than 3 sizes finished: no fit yet"}
      continue
    fits[v] = {"sizes": len(rows), "free_c": sf.fit(n, loss, screen=screen),
               "c_0": sf.fit(n, loss, c=0.0, screen=screen), "held_out": sf.held_out(n, loss, screen=screen),
               "held_out_c_0": sf.held_out(n, loss, c=0.0, screen=screen)}
  common = sorted(set.intersection(*[{r["size"] for r in rows} for rows in chosen.values()])) if chosen else []
  by = {(r["variant"], r["size"]): r for rows in chosen.values() for r in rows}
  common.sort(key=lambda s: by[(next(iter(chosen)), s)]["n_params"])
  gaps = []
  for s in common:
    if "fp" not in chosen:
      break
    ref = by[("fp", s)]
    gaps.append({"size": s, "n_params": ref["n_params"], **{
        f"{v}_minus_fp": by[(v, s)]["test_loss"] - ref["test_loss"] for v in chosen if v != "fp"}, **{
        f"{v}_minus_fp_se": _paired_se(by[(v, s)], ref) for v in chosen if v != "fp"}})
  out = {"fits": fits, "gaps": gaps, "common_sizes": common}
  if len(common) >= 4:
    n = [by[("fp" if "fp" in chosen else next(iter(chosen)), s)]["n_params"] for s in common]
    losses = {v: [by[(v, s)]["test_loss"] for s in common] for v in chosen}
    ses = {v: [by[(v, s)]["test_loss_se"] for s in common] for v in chosen}
    for c, key in ((None, "bootstrap_free_c"), (0.0, "bootstrap_c_0")):
      bs = sf.bootstrap(n, losses, ses, draws=draws, seed=seed, c=c, ref="fp" if "fp" in chosen else None,
                        screen=screen)
      bs.pop("fits")
      out[key] = bs
    for v in chosen:
      iv = out["bootstrap_free_c"]["intervals"][v]["c"]
      if v in fits and "free_c" in fits[v]:
        fits[v]["c_identified"] = sf.c_identified(iv, min(losses[v]))
    if "fp" in chosen:
      out["gap_slope_per_decade"] = {v: sf.gap_slope(n, np.subtract(losses[v], losses["fp"])) for v in chosen
                                     if v != "fp"}
  return out


# --------------------------------------------------------------------------------------------------------------
# Main.
# --------------------------------------------------------------------------------------------------------------
def _write(path: Path, result: dict) -> None:
  tmp = path.with_suffix(".json.tmp")   # whole file, then renamed: a killed run leaves the previous one intact
  tmp.write_text(json.dumps(result, indent=2))
  tmp.replace(path)


def main(argv=None) -> dict:
  argv = cli.strip_debug(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                                   epilog="--debug shows the traceback of an error")
  parser.add_argument("--workdir", default="runs/scaling", help="one folder per size, one run per (variant, lr)")
  parser.add_argument("--out", default="experiments/results", help="where scaling.json and scaling.png go")
  parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"of {VARIANTS}")
  parser.add_argument("--sizes", nargs="+", default=None, help="of the ladder (default: all, smallest first)")
  parser.add_argument("--tokens_per_param", type=float, default=10.0, help="k: training tokens = k x N")
  parser.add_argument("--extend", type=int, default=None,
                      help="grid extensions while the best rate is at an edge (default 6; --smoke 0)")
  parser.add_argument("--eval_batches", type=int, default=1000,
                      help="at most this many validation and test batches of 8 x 128 tokens (default: all)")
  parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap draws per fit")
  parser.add_argument("--seed", type=int, default=0, help="the seed whose runs choose the learning rate")
  parser.add_argument("--seeds", type=int, default=None,
                      help="seeds per point: the chosen rate is retrained at seed+1 ... (default 2; --smoke 1)")
  parser.add_argument("--smoke", action="store_true", help="tiny sizes and 4 steps per run: the same code path")
  parser.add_argument("--report", action="store_true", help="fit and plot the recorded runs; train nothing")
  args = parser.parse_args(argv)
  ladder = SMOKE_LADDER if args.smoke else LADDER
  args.extend = (0 if args.smoke else 6) if args.extend is None else args.extend
  args.seeds = (1 if args.smoke else 2) if args.seeds is None else args.seeds
  sizes = args.sizes or list(ladder)
  if [v for v in args.variants if v not in VARIANTS] or len(set(args.variants)) < len(args.variants):
    parser.error(f"--variants must be distinct names of {VARIANTS}, got {args.variants}")
  if [s for s in sizes if s not in ladder]:
    parser.error(f"--sizes must be of {tuple(ladder)}, got {sizes}")
  if not args.tokens_per_param > 0 or min(args.eval_batches, args.bootstrap, args.seeds) < 1 or args.extend < 0:
    parser.error("--tokens_per_param, --eval_batches, --bootstrap and --seeds must be positive, --extend "
                 "non-negative")
  sizes.sort(key=lambda s: list(ladder).index(s))
  workdir, out = Path(args.workdir), Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  path = out / "scaling.json"
  setting = {"tokens_per_param": args.tokens_per_param, "batch": [4, 32] if args.smoke else [BATCH, SEQ],
             "seed": args.seed, "smoke": args.smoke, "test_fraction": TEST_FRACTION, "ladder": ladder}
  records = []
  if path.exists():
    old = json.loads(path.read_text())
    if old.get("setting") == json.loads(json.dumps(setting)):
      records = old["runs"]   # recorded runs are never trained again
      for r in records:      # runs recorded before replicates existed are the base seed's
        r.setdefault("seed", args.seed)
  n_of = {(v, s): count_params(train.model_config_from(run_config(v, ladder[s], 1, 1e-3, 0, args.smoke)))
          for v in args.variants for s in sizes}
  if not args.smoke:   # the largest run must see each training token at most once
    corpus = data.load_corpus("stdlib", test_fraction=TEST_FRACTION)
    worst = max(args.tokens_per_param * n_of[k]["non_embedding"] for k in n_of)
    if worst > corpus.train.size:
      parser.error(f"k x N = {worst:,.0f} tokens exceeds the training split's {corpus.train.size:,}: the data would "
                   "repeat; lower --tokens_per_param or drop the largest sizes")
  done = {v: {} for v in args.variants}
  t0 = time.perf_counter()

  def save():
    _write(path, {"setting": setting, "runs": records, "done": {v: sorted(d) for v, d in done.items()},
                  "wall_s_this_invocation": time.perf_counter() - t0})

  cost = {k: n_of[k]["total"] * (4 if args.smoke else args.tokens_per_param * n_of[k]["non_embedding"])
          for k in n_of}
  grid_len = 2 if args.smoke else 3
  with tqdm(total=sum(cost.values()) * (grid_len + args.seeds - 1), desc="scaling", unit="", unit_scale=True,
            dynamic_ncols=True,
            bar_format="{l_bar}{bar}| {percentage:.0f}% [{elapsed}<{remaining}] {postfix}",
            disable=args.report) as bar:
    for s in sizes:
      for v in args.variants:
        n_next = n_of[(v, s)]["non_embedding"]
        prior = [(done[v][t]["best"]["n_params"], done[v][t]["lr_star"]) for t in done[v]
                 if done[v][t]["lr_star"] is not None]
        if args.report:   # finished: an interior optimum, or every extension spent (a sweep still running
          mine = runs_of(records, v, s, args.seed)   # may hold unfinished points)
          opt = lr_optimum(mine) if mine else None
          if opt and (opt["at_edge"] is None or len(mine) >= grid_len + args.extend):
            done[v][s] = opt
          continue
        done[v][s] = sweep_point(workdir, v, s, ladder[s], grid_centre(v, prior, n_next), records, args, save, bar,
                                 cost[(v, s)])
        save()
        replicate_point(workdir, v, s, ladder[s], done[v][s], records, args, save, bar, cost[(v, s)])
  chosen, noise = selected(records, done, args.variants, args.seed)
  analysis = analyse(chosen, 20 if args.smoke else args.bootstrap, args.seed, screen=10 if args.smoke else None)
  analysis["seed_noise"] = noise
  result = {"setting": setting, "runs": records, "done": {v: sorted(d) for v, d in done.items()},
            "points": {v: [{k: p[k] for k in POINT_KEYS} for p in rows] for v, rows in chosen.items()},
            "lr_optima": {v: {s: {k: o[k] for k in ("lr", "lr_star", "at_edge")} for s, o in d.items()}
                          for v, d in done.items()},
            "analysis": analysis, "wall_s_this_invocation": time.perf_counter() - t0,
            "loss": "nats per byte, per-token (inference-mode) activation scales, test split"}
  _write(path, result)
  plot(records, chosen, analysis, out / "scaling.png", base_seed=args.seed)
  print(markdown(chosen, analysis))
  print(f"\nwrote {path} and {out / 'scaling.png'}")
  return result


if __name__ == "__main__":
  cli.run("scaling", main)
