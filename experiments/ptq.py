"""experiments/ptq: PTQ of the FP runs vs QAT, BitNet Table 3 (train -> experiments).

    .venv/bin/python experiments/ptq.py --train                # trains the fixed-token runs first (~2 h, 2 cores)
    .venv/bin/python experiments/ptq.py --workdir runs/fixed_tokens --out experiments/results   # on finished runs
    .venv/bin/python experiments/ptq.py --smoke                # trains tiny fp / b158 / bitnet runs itself, ~1 min

The shape of BitNet (2310.11453) Table 3, which quantises a trained FP16 model after training (absmax W8A8,
W4A4, W1A8; SmoothQuant; GPTQ, QuIP) and compares it with BitNet trained at 1 bit, on the fixed-token runs of
`experiments/sizes.py` (sizes s0-s5, 1.2M training tokens each at the recipes' learning rates: the first scaling
sweep's runs, which the committed results come from; `--train` trains the missing ones into the workdir): for
every size whose `fp-<size>` run has finished, the trained FP model is restored (`train.load_checkpoint`) and
quantised after training with the same quantisers training uses (`bitnet_jax.quant`):

  * W8A8, W4A8   absmax weights, one scale per tensor (`quant.quantize_activations(w, bits, per_token=False)`:
                 symmetric, codes in [-(2^(b-1) - 1), 2^(b-1) - 1] times max|W| / (2^(b-1) - 1)).
  * W1.58A8      b1.58 absmean ternary weights (`quant.ternary_weights`).
  * W1A8         BitNet sign binary weights (`quant.binary_weights`).
  * every method quantises the input activations of each linear layer to 8 bits, absmax per token (BitLinear's
    `act_bits=8, act_per_token=True`, as b1.58 and BitNet at inference).

What is quantised: every BitLinear kernel (attention q/k/v/o, FFN gate/up/down) and the activations entering it.
Kept in full precision, as both papers keep them: the embedding, the output head, the norms and the attention
score computation. Each model is scored with the trainer's own evaluation (`train._evaluate` over the eval
batches `train.train_and_evaluate` builds from the run's config), so the numbers are comparable with the runs'
`eval_loss`: the re-measured FP loss is checked against the run's `summary.json`. The QAT columns are the
`b158-<size>` and `bitnet-<size>` runs' `eval_loss` (re-measured from their final checkpoints on the FP run's
batches when `--eval-batches` changes the batches, or when a run was evaluated on other batches). Losses are
nats per token; the tokenizer is byte level, so nats per byte.

Writes `OUT/ptq.json` (one row per size, the settings and the versions) and `OUT/ptq.png`, and prints the table
for the README.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # run from a checkout: configs/ sits at the repository root

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import flax  # noqa: E402
import jax  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from flax import nnx  # noqa: E402

from bitnet_jax import cli, data, quant, sharding, train  # noqa: E402
from bitnet_jax.layers import BitLinear  # noqa: E402
from experiments import sizes  # noqa: E402  (experiments/ as a namespace package, from ROOT)

ACT_BITS = 8          # activations of every PTQ method: 8 bits, absmax per token
FP_CHECK_TOL = 1e-4   # |re-measured FP loss - summary eval_loss| allowed, nats
SMOKE_SIZES = ("s1",)   # one size: the smoke is mostly the XLA compiles of its three runs (~15 s each)
SMOKE_TOKENS = 4 * 32 * 150   # 150 steps of the smoke batches (4 x 32): enough to learn past init

# method: (label, weight bits, act bits, weight fake-quantiser (kernel, layer) -> kernel, what it is)
PTQ = {
    "w8a8": ("PTQ absmax W8A8", 8, ACT_BITS, lambda w, layer: quant.quantize_activations(w, 8, per_token=False),
             "quant.quantize_activations(w, 8, per_token=False): absmax, one scale per tensor"),
    "w4a8": ("PTQ absmax W4A8", 4, ACT_BITS, lambda w, layer: quant.quantize_activations(w, 4, per_token=False),
             "quant.quantize_activations(w, 4, per_token=False): absmax, one scale per tensor"),
    "w1.58a8": ("PTQ absmean W1.58A8", 1.58, ACT_BITS,
                lambda w, layer: quant.ternary_weights(w, groups=layer.weight_groups),
                "quant.ternary_weights: b1.58 absmean ternary, one scale per tensor (the layer's weight groups)"),
    "w1a8": ("PTQ sign W1A8", 1, ACT_BITS, lambda w, layer: quant.binary_weights(w, groups=layer.weight_groups),
             "quant.binary_weights: BitNet Sign(W - mean W) * mean|W|, one scale per tensor (the layer's groups)"),
}
QAT = {"qat_b158": ("QAT BitNet b1.58 (W1.58A8)", "b158", 1.58, ACT_BITS),
       "qat_bitnet": ("QAT BitNet (W1A8)", "bitnet", 1, ACT_BITS)}
METHODS = ("fp", *PTQ, *QAT)
LABELS = {"fp": "FP (FP32)", **{k: v[0] for k, v in PTQ.items()}, **{k: v[0] for k, v in QAT.items()}}
BITS = {"fp": (32, 32), **{k: (v[1], v[2]) for k, v in PTQ.items()}, **{k: (v[2], v[3]) for k, v in QAT.items()}}
# distinct values a fake-quantised kernel can take: codes in [-q, q] for absmax, {-1, 0, 1}, {-1, 1}
MAX_DISTINCT = {"w8a8": 255, "w4a8": 15, "w1.58a8": 3, "w1a8": 2}
# BitNet (2310.11453) Table 3, 6.7B models: perplexity (PAPERS.md section 1); its Absmax rows are W8A8, W4A4, W1A8
PAPER_TABLE3_PPL = {"FP16": 15.19, "8-bit Absmax (W8A8)": 21.43, "4-bit Absmax (W4A4)": 4.8e4,
                    "1-bit Absmax (W1A8)": 3.5e23, "1-bit BitNet (QAT, W1A8)": 17.07}


# --------------------------------------------------------------------------------------------------------------
# Quantising a trained FP model.
# --------------------------------------------------------------------------------------------------------------
def quantize_model(model: nnx.Module, method: str) -> tuple[nnx.Module, list[str]]:
  """A clone of the FP `model` with every BitLinear kernel replaced by its fake-quantised value under `method`
  and 8-bit per-token activation quantisation switched on; returns (clone, paths of the quantised layers).
  The embedding, the output head and the norms are left as they are; `model` itself is not changed."""
  if method not in PTQ:
    raise ValueError(f"quantize_model: method must be one of {tuple(PTQ)}, got {method!r}")
  weight_fn = PTQ[method][3]
  q = nnx.clone(model)
  names = []
  for path, layer in nnx.iter_graph(q):
    if not isinstance(layer, BitLinear):
      continue
    if layer.weight_quant != "none" or layer.act_bits is not None:
      raise ValueError(f"quantize_model: {'/'.join(map(str, path))} is already quantised "
                       f"(weight_quant={layer.weight_quant!r}, act_bits={layer.act_bits!r}): PTQ needs an FP model")
    layer.kernel[...] = weight_fn(layer.kernel[...], layer)
    layer.act_bits, layer.act_per_token = ACT_BITS, True
    names.append("/".join(map(str, path)))
  if not names:
    raise ValueError("quantize_model: the model has no BitLinear layer to quantise")
  return q, names


def distinct_values(model: nnx.Module) -> int:
  """The largest number of distinct values in one BitLinear kernel of `model`."""
  return max(int(np.unique(np.asarray(layer.kernel[...])).size)
             for _, layer in nnx.iter_graph(model) if isinstance(layer, BitLinear))


# --------------------------------------------------------------------------------------------------------------
# The trainer's evaluation, rebuilt from a run's config.
# --------------------------------------------------------------------------------------------------------------
class Evaluator:
  """The eval batches `train.train_and_evaluate` builds from a config (corpora loaded once), and `_evaluate`."""

  def __init__(self, eval_batches: int | None = None):
    self.eval_batches = eval_batches
    self._corpora = {}

  def settings(self, config: ml_collections.ConfigDict) -> dict:
    """What decides the eval batches of a run (two runs with equal settings are scored on the same tokens)."""
    return {"source": config.data.source, "valid_fraction": config.data.valid_fraction,
            "text_key": config.data.text_key, "tokenizer": config.data.get("tokenizer", "byte"),
            "batch_size": config.train.batch_size, "seq_len": config.train.seq_len,
            "eval_batches": self.eval_batches or config.data.eval_batches}

  def corpus(self, config: ml_collections.ConfigDict) -> data.Corpus:
    s = self.settings(config)
    key = (s["source"], s["valid_fraction"], s["text_key"], s["tokenizer"])
    if key not in self._corpora:
      self._corpora[key] = data.load_corpus(s["source"], valid_fraction=s["valid_fraction"], text_key=s["text_key"],
                                            tokenizer=data.make_tokenizer(s["tokenizer"]))
    return self._corpora[key]

  def batches(self, config: ml_collections.ConfigDict) -> list[np.ndarray]:
    s = self.settings(config)
    return data.eval_batches(self.corpus(config).valid, batch_size=s["batch_size"], seq_len=s["seq_len"],
                             max_batches=s["eval_batches"])

  def __call__(self, models: dict[str, nnx.Module], config: ml_collections.ConfigDict) -> dict[str, float]:
    """eval_loss of each model on the run's eval batches, sharded and scored under the run's mesh and rules as
    in `train_and_evaluate`."""
    mesh, rules, _ = train.setup_mesh(config)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    eval_set = [sharding.shard_batch(b, batch_sharding) for b in self.batches(config)]
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
      return {name: train._evaluate(model, eval_set)["eval_loss"] for name, model in models.items()}


# --------------------------------------------------------------------------------------------------------------
# Runs.
# --------------------------------------------------------------------------------------------------------------
def _config(run: Path) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(json.loads((run / "config.json").read_text()))


def _finished(run: Path) -> str | None:
  """None if `run` has a summary.json and a config.json, else why not (its final checkpoint is checked on load)."""
  if not run.is_dir():
    return "no run directory"
  missing = [f for f in ("config.json", "summary.json") if not (run / f).exists()]
  return f"unfinished: no {' or '.join(missing)}" if missing else None


def _restore(run: Path):
  """(model, config) at the run's final step: a run with a summary but no final checkpoint is refused."""
  steps = _config(run).train.steps
  return train.load_checkpoint(run, step=steps)


def find_sizes(workdir: Path) -> tuple[list[str], dict[str, str]]:
  """(sizes with a finished fp run, {size: why skipped}) for the `fp-<size>` runs in `workdir`."""
  if not workdir.is_dir():
    raise ValueError(f"--workdir {str(workdir)!r} does not exist: expected a workdir of fixed-token runs "
                     "(subdirectories fp-<size>, b158-<size>, bitnet-<size>); or run with --smoke")
  found, skipped = [], {}
  for run in sorted(workdir.glob("fp-*")):
    size = run.name[len("fp-"):]
    why = _finished(run)
    if why is None:
      found.append(size)
    else:
      skipped[size] = why
  if not found:
    raise ValueError(f"--workdir {str(workdir)!r} has no finished fp-<size> run (a subdirectory with config.json, "
                     f"summary.json and its final checkpoint); found: {sorted(skipped) or 'no fp-* directory'}. "
                     "Train them with --train, or use --smoke")
  return found, skipped


def evaluate_size(workdir: Path, size: str, evaluator: Evaluator) -> dict:
  """One row: FP re-measured, every PTQ method, and the QAT runs of the same size."""
  fp_run = workdir / f"fp-{size}"
  summary = json.loads((fp_run / "summary.json").read_text())
  model, config = _restore(fp_run)
  if config.model.variant != "fp":
    raise ValueError(f"{fp_run}: expected an fp run, its config.json says model.variant={config.model.variant!r}")
  corpus_fp = evaluator.corpus(config).summary()["fingerprint"]
  trained_fp = json.loads((fp_run / "data.json").read_text())["fingerprint"]
  if corpus_fp != trained_fp:
    raise ValueError(f"{fp_run}: the corpus {config.data.source!r} loaded here (fingerprint {corpus_fp[:12]}) is not "
                     f"the one it was trained and evaluated on ({trained_fp[:12]}): the losses would not compare")
  models, distinct, names = {"fp": model}, {}, []
  for method in PTQ:
    models[method], names = quantize_model(model, method)
    distinct[method] = distinct_values(models[method])
  losses = evaluator(models, config)
  own_batches = evaluator.settings(config)["eval_batches"] == config.data.eval_batches
  diff = abs(losses["fp"] - summary["eval_loss"])
  row = {"size": size, "n_params": summary["params"]["non_embedding"], "n_params_total": summary["params"]["total"],
         "losses": losses, "fp_summary_eval_loss": summary["eval_loss"],
         "fp_check": {"abs_diff": diff, "ok": diff <= FP_CHECK_TOL if own_batches else None},
         "distinct_kernel_values_max": distinct, "quantized_modules": names, "eval": evaluator.settings(config),
         "workdirs": {"fp": str(fp_run)}, "qat_source": {}}
  for method, (_, variant, _, _) in QAT.items():
    run = workdir / f"{variant}-{size}"
    why = _finished(run)
    if why is not None:
      row["losses"][method], row["qat_source"][method] = None, why
      continue
    row["workdirs"][method] = str(run)
    if own_batches and evaluator.settings(_config(run)) == evaluator.settings(config):
      row["losses"][method] = json.loads((run / "summary.json").read_text())["eval_loss"]
      row["qat_source"][method] = "summary.json eval_loss"
    else:   # other eval batches than the fp run's: score its final checkpoint on the fp run's batches
      row["losses"][method] = evaluator({method: _restore(run)[0]}, config)[method]
      row["qat_source"][method] = "re-measured from the final checkpoint on the fp run's eval batches"
  return row


def train_runs(workdir: Path, seed: int, smoke: bool) -> None:
  """The fp, b158 and bitnet runs of every size (`sizes.SIZES` at `sizes.TOKENS`; smoke: `SMOKE_SIZES`, tiny)
  into `workdir/<variant>-<size>`, smallest first; finished runs are skipped, interrupted ones resume."""
  names = SMOKE_SIZES if smoke else tuple(sizes.SIZES)
  table, tokens = (sizes.SMOKE_SIZES, SMOKE_TOKENS) if smoke else (sizes.SIZES, sizes.TOKENS)
  plan = [(size, variant) for size in names for variant in ("fp", "b158", "bitnet")]
  for size, variant in tqdm(plan, desc="ptq: training the runs", disable=smoke):
    config = sizes.run_config(variant, table[size], tokens, seed, smoke=smoke)
    sizes.train_or_find(config, workdir / f"{variant}-{size}")


# --------------------------------------------------------------------------------------------------------------
# Outputs.
# --------------------------------------------------------------------------------------------------------------
def plot(rows: list[dict], out: Path) -> None:
  fig, ax = plt.subplots(figsize=(7.5, 4.8))
  styles = {"fp": ("black", "o", "-"), "w8a8": ("tab:blue", "s", "--"), "w4a8": ("tab:cyan", "v", "--"),
            "w1.58a8": ("tab:red", "^", "--"), "w1a8": ("tab:orange", "D", "--"),
            "qat_b158": ("darkred", "*", "-"), "qat_bitnet": ("saddlebrown", "P", "-")}
  n = [r["n_params"] for r in rows]
  for method in METHODS:
    pts = [(x, r["losses"][method]) for x, r in zip(n, rows) if r["losses"].get(method) is not None]
    if not pts:
      continue
    color, marker, line = styles[method]
    ax.plot(*zip(*pts), color=color, marker=marker, markersize=8 if marker == "*" else 6, linestyle=line, lw=1.5,
            label=LABELS[method])
  ax.set_xscale("log")
  ax.set_xlabel("non-embedding parameters N (log scale)")
  ax.set_ylabel("eval loss (nats per byte)")
  ax.set_title("Post-training quantisation vs quantisation-aware training (BitNet Table 3)")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out, dpi=130)
  plt.close(fig)


def markdown(rows: list[dict]) -> str:
  fmt = lambda b: "FP32" if b == 32 else f"{b:g}"
  header = " | ".join(f"{r['size']} (N={r['n_params']:,})" for r in rows)
  lines = [f"| method | weight bits | act bits | {header} |",
           "|---|---|---|" + "---|" * len(rows)]
  for method in METHODS:
    w, a = BITS[method]
    cells = [("n/a" if r["losses"].get(method) is None else f"{r['losses'][method]:.4f}") for r in rows]
    lines.append(f"| {LABELS[method]} | {fmt(w)} | {fmt(a)} | " + " | ".join(cells) + " |")
  if all(r["fp_check"]["ok"] is not None for r in rows):
    checks = ", ".join(f"{r['size']} {r['fp_check']['abs_diff']:.1e}" for r in rows)
    note = f"FP re-measured vs its summary.json eval_loss, |difference|: {checks}"
  else:
    note = "--eval-batches changed the eval batches: QAT losses re-measured on them, no FP check against summaries"
  lines += ["", f"eval loss in nats per byte; {note}"]
  return "\n".join(lines)


def main(argv=None) -> dict:
  argv = cli.strip_debug(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split("\n\n", 1)[1] + "\n--debug shows the traceback of an error")
  parser.add_argument("--workdir", default=None,
                      help="the fixed-token runs <variant>-<size> (default runs/fixed_tokens; with --smoke a "
                           "temporary folder)")
  parser.add_argument("--out", default=None,
                      help="where ptq.json and ptq.png go (default experiments/results; with --smoke the workdir, "
                           "so a smoke run never overwrites the real results)")
  parser.add_argument("--eval-batches", type=int, default=None,
                      help="eval batches per model (default: each run's own config.data.eval_batches, which makes "
                           "the numbers comparable with the runs' summaries; otherwise QAT runs are re-measured)")
  parser.add_argument("--seed", type=int, default=0, help="seed of the runs --train or --smoke trains")
  parser.add_argument("--train", action="store_true",
                      help=f"first train the missing fp / b158 / bitnet runs of sizes {', '.join(sizes.SIZES)} "
                           f"({sizes.TOKENS:,} tokens each; about 2 hours on 2 CPU cores) into the workdir")
  parser.add_argument("--smoke", action="store_true",
                      help=f"first train tiny fp / b158 / bitnet runs (smoke size {', '.join(SMOKE_SIZES)}, "
                           f"{SMOKE_TOKENS:,} tokens each) into the workdir: about a minute on 2 CPU cores")
  args = parser.parse_args(argv)
  if args.eval_batches is not None and args.eval_batches < 1:
    parser.error(f"--eval-batches must be a positive int, got {args.eval_batches}")
  t0 = time.perf_counter()
  if args.smoke:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ptq-smoke-"))
    train_runs(workdir, args.seed, smoke=True)
  else:
    workdir = Path(args.workdir or "runs/fixed_tokens")
    if args.train:
      train_runs(workdir, args.seed, smoke=False)
  out = Path(args.out or (workdir if args.smoke else "experiments/results"))
  found, skipped = find_sizes(workdir)
  evaluator = Evaluator(args.eval_batches)
  rows = sorted((evaluate_size(workdir, size, evaluator) for size in found), key=lambda r: r["n_params"])
  result = {
      "source": "BitNet (2310.11453) Table 3: post-training quantisation of an FP model vs BitNet trained at 1 bit",
      "rows": rows, "skipped_sizes": skipped, "workdir": str(workdir), "smoke": args.smoke,
      "loss": "eval loss, nats per token = nats per byte (byte-level tokenizer)",
      "methods": {m: {"label": LABELS[m], "weight_bits": BITS[m][0], "act_bits": BITS[m][1]} for m in METHODS},
      "quantized": "every BitLinear kernel (attention q/k/v/o, FFN gate/up/down), fake-quantised after training, and "
                   f"its input activations ({ACT_BITS}-bit absmax per token); row['quantized_modules'] lists them",
      "full_precision": ["embedding", "output head", "norms", "attention scores"],
      "weight_quantizers": {m: spec[4] for m, spec in PTQ.items()}, "distinct_kernel_values_bound": MAX_DISTINCT,
      "paper_table3_ppl_6.7b": PAPER_TABLE3_PPL,
      "qat_note": "QAT losses are the b158/bitnet runs' own eval; bitnet evaluates with its training-mode per-tensor "
                  "activation absmax (ModelConfig variant 'bitnet'), b158 per token",
      "fp_check_tolerance": FP_CHECK_TOL, "eval_batches_override": args.eval_batches,
      "versions": {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
                   "numpy": np.__version__},
      "wall_s": time.perf_counter() - t0,
  }
  out.mkdir(parents=True, exist_ok=True)
  (out / "ptq.json").write_text(json.dumps(result, indent=2))
  plot(rows, out / "ptq.png")
  print(markdown(rows))
  bad = [r["size"] for r in rows if r["fp_check"]["ok"] is False]
  if bad:
    print(f"\nWARNING: re-measured FP loss differs from summary.json by more than {FP_CHECK_TOL} for {bad}")
  if skipped:
    print(f"\nskipped (fp run not finished): {skipped}")
  print(f"\nwrote {out / 'ptq.json'} and {out / 'ptq.png'} ({result['wall_s']:.0f} s)")
  return result


if __name__ == "__main__":
  cli.run("ptq", main)
