"""Tests for bitnet_jax/interop/lm_eval.py: the `bitnet_jax` lm-evaluation-harness model against direct oracles
(log_softmax of the full forward, `generate.generate`), and local tasks through the harness's real evaluator and CLI.

Nothing is downloaded: the tasks are YAMLs over local jsonl files, and the hub is switched off."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

os.environ["HF_DATASETS_OFFLINE"] = "1"   # before datasets / huggingface_hub are imported
os.environ["HF_HUB_OFFLINE"] = "1"

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("lm_eval")
import lm_eval   # noqa: E402
from lm_eval.api.instance import Instance   # noqa: E402
from lm_eval.tasks import TaskManager   # noqa: E402

from bitnet_jax import generate, train   # noqa: E402
from bitnet_jax.interop import hf   # noqa: E402
from bitnet_jax.interop.lm_eval import BitNetLM, main   # noqa: E402
from bitnet_jax.model import ModelConfig, Transformer   # noqa: E402
from bitnet_jax.tokenizer import ByteTokenizer   # noqa: E402
from configs import lm   # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WINDOW = 64            # the trained run's max_seq_len: short enough for texts longer than the window
BATCH = 4
EOS = ByteTokenizer.EOS
# init_std 0.1 spreads the logits of an untrained model, so greedy choices are not near-ties.
HF_TINY = dict(variant="fp", vocab_size=264, d_model=32, n_layers=1, n_heads=2, max_seq_len=32, dtype="float32",
               init_std=0.1)


# ---------------------------------------------------------------------------------------------------------------
# Fixtures and oracles.
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
  """A b158-tiny training run of 2 steps, shrunk to one layer and a 64-token window (byte tokenizer)."""
  config = lm.get_config("b158-tiny")
  config.model.update(dict(d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=128, max_seq_len=WINDOW))
  config.train.update(dict(steps=2, eval_every=2, checkpoint_every=2, log_every=1, seq_len=32, batch_size=4))
  config.data.eval_batches = 1
  workdir = tmp_path_factory.mktemp("lm_eval") / "run"
  train.train_and_evaluate(config, workdir, progress=False)
  return workdir


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
  """A random LLaMA-layout (fp) checkpoint without tokenizer.json: the byte tokenizer covers its 264 ids."""
  directory = tmp_path_factory.mktemp("lm_eval") / "hf"
  hf.save(Transformer(ModelConfig(**HF_TINY), rngs=nnx.Rngs(0)), directory)
  return directory


@pytest.fixture(scope="module")
def run_model(run) -> Transformer:
  """The run's model in its training form, for the oracles."""
  return generate.load_run(run)[0]


@pytest.fixture(scope="module")
def run_lm(run) -> BitNetLM:
  return BitNetLM(workdir=str(run), batch_size=BATCH, kv_dtype="float32")


@pytest.fixture(scope="module")
def hf_lm(hf_dir) -> BitNetLM:
  return BitNetLM(hf_path=str(hf_dir), batch_size=BATCH, kv_dtype="float32")


@nnx.jit
def _forward(model, tokens):   # jitted: an eager forward compiles op by op
  return model(tokens)


def _log_probs(model: Transformer, tokens: list[int]) -> np.ndarray:
  """log_softmax of the full forward of one sequence: (T, V). The forward always runs at max_seq_len (one
  compile per model; right padding leaves earlier positions unchanged, the model being causal) and the padded
  positions are dropped."""
  T, L = len(tokens), model.cfg.max_seq_len
  padded = jnp.asarray([list(tokens) + [0] * (L - T)], jnp.int32)
  return np.asarray(jax.nn.log_softmax(_forward(model, padded)[0, :T], axis=-1), np.float64)


def _oracle(model: Transformer, context: list[int], continuation: list[int], window: int) -> tuple[float, bool]:
  """(sum log p(continuation), all greedy) from the rightmost window + 1 tokens, computed directly."""
  whole = (context + continuation)[-(window + 1):]
  logp = _log_probs(model, whole[:-1])
  n, k = len(whole) - 1, len(continuation)
  positions = np.arange(n - k, n)
  targets = np.asarray(whole)[positions + 1]
  return float(logp[positions, targets].sum()), bool((logp[positions].argmax(-1) == targets).all())


def _encode(text: str) -> list[int]:
  return ByteTokenizer().encode(text).tolist()


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
  return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in args]


@pytest.fixture(scope="module", params=["workdir", "hf_path"])
def source(request, hf_dir):
  """(BitNetLM, the loaded model in its training form, the prefix id) for each way of naming a model: a run
  conditions on EOS (its corpus separator), a HF checkpoint on BOS (here the byte tokenizer's, no tokenizer.json)."""
  if request.param == "workdir":
    return request.getfixturevalue("run_lm"), request.getfixturevalue("run_model"), EOS
  return request.getfixturevalue("hf_lm"), hf.load(hf_dir), ByteTokenizer.BOS


# ---------------------------------------------------------------------------------------------------------------
# loglikelihood.
# ---------------------------------------------------------------------------------------------------------------
def test_loglikelihood_is_the_full_forward_oracle_batched_and_alone(source):
  lm_, model, prefix = source
  window = lm_.max_length
  long_context = "x = [i * i for i in range(10)]\n" * 4                      # longer than either window
  pairs = [("def f(x):", " return x"), ("import os\n", "import sys"), ("", "hello"),
           ("x = 1 ", "+ 2"), (long_context, " # squares")]
  # The harness's split (TemplateLM): an empty context becomes the prefix token, trailing whitespace ("\n"
  # included) moves to the continuation.
  expected_split = [(_encode("def f(x):"), _encode(" return x")), (_encode("import os"), _encode("\nimport sys")),
                    ([prefix], _encode("hello")), (_encode("x = 1"), _encode(" + 2")),
                    (_encode(long_context[:-1]), _encode("\n # squares"))]
  batched = lm_.loglikelihood(_requests("loglikelihood", pairs))
  alone = [lm_.loglikelihood(_requests("loglikelihood", [p]))[0] for p in pairs]   # other buckets and companions
  oracle = [_oracle(model, c, t, window) for c, t in expected_split]
  assert len(_encode(long_context)) > window
  for b, a, o in zip(batched, alone, oracle, strict=True):
    assert b[0] == pytest.approx(a[0], rel=1e-5, abs=1e-5) and b[1] == a[1]
    assert b[0] == pytest.approx(o[0], rel=1e-4, abs=1e-4) and b[1] == o[1]
    assert b[0] < 0


def test_greedy_continuation_is_flagged_greedy(run_lm, run_model):
  model = run_model
  context = _encode("for i in ")
  out = np.asarray(generate.greedy(model, np.asarray([context]), 3, kv_dtype="float32"))
  greedy = out[0, len(context):].tolist()
  other = [(greedy[0] + 1) % 256] + greedy[1:]
  (logp, is_greedy), (logp2, is_greedy2) = run_lm._loglikelihood_tokens([(None, context, greedy),
                                                                          (None, context, other)])
  assert is_greedy and not is_greedy2
  assert logp == pytest.approx(_oracle(model, context, greedy, WINDOW)[0], abs=1e-4)


def test_continuation_longer_than_the_window_is_refused(run_lm):
  with pytest.raises(ValueError, match=f"65 tokens does not fit the context window max_length={WINDOW}"):
    run_lm.loglikelihood(_requests("loglikelihood", [("a", "b" * 65)]))


# ---------------------------------------------------------------------------------------------------------------
# loglikelihood_rolling.
# ---------------------------------------------------------------------------------------------------------------
def test_rolling_loglikelihood_of_a_text_within_one_window(run_lm, run_model):
  model = run_model
  text = "def add(a, b):\n  return a + b\n"
  tokens = _encode(text)
  logp = _log_probs(model, [EOS] + tokens[:-1])                 # conditioned on the prefix token
  direct = logp[np.arange(len(tokens)), tokens].sum()
  (rolled,) = run_lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
  assert rolled == pytest.approx(direct, rel=1e-4, abs=1e-4)


def test_rolling_loglikelihood_of_a_text_longer_than_the_window(run_lm, run_model):
  model = run_model
  text = "".join(f"line {i}: value = {i * 7}\n" for i in range(8))[:150]
  t = _encode(text)
  assert len(t) == 150
  # Windows of 64 inputs, each token predicted once (context_len=1): t[0:64] from [EOS] + t[0:63],
  # t[64:128] from t[63:127], then t[128:150] from the last full window t[85:149] (its last 22 positions).
  direct = 0.0
  for inputs, first, count in [([EOS] + t[:63], 0, 64), (t[63:127], 64, 64), (t[85:149], 128, 22)]:
    logp = _log_probs(model, inputs)
    direct += sum(logp[len(inputs) - count + j, t[first + j]] for j in range(count))
  short = "x = 1\n"
  rolled = run_lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,), (short,)]))
  assert rolled[0] == pytest.approx(direct, rel=1e-4, abs=1e-4)
  assert rolled[1] == pytest.approx(run_lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(short,)]))[0],
                                    rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# generate_until.
# ---------------------------------------------------------------------------------------------------------------
def _generated_text(lm_: BitNetLM, prompt: str, n: int, **sampling) -> str:
  """Oracle: `generate.generate` on the prompt (as a full batch: the same compiled program), cut at EOS, decoded."""
  ids = np.repeat(np.asarray([_encode(prompt)], np.int32), lm_.batch_size, axis=0)
  new = np.asarray(generate.generate(lm_.model, ids, n, kv_dtype="float32", **sampling))[0, ids.shape[1]:].tolist()
  return ByteTokenizer().decode(new[:new.index(EOS)] if EOS in new else new)


def test_generate_until_is_generate_cut_at_the_stop_string(hf_lm):
  n = 12
  prompts = ["def ", "import ", "class A"]                       # two of one length batch together
  full = [_generated_text(hf_lm, p, n) for p in prompts]
  assert len(full[0]) >= 4, full
  stop = full[0][len(full[0]) // 2]                             # a character the greedy text does contain
  requests = [(prompts[0], {"until": [stop], "max_gen_toks": n}),
              (prompts[1], {"until": ["\n\n"], "max_gen_toks": n, "do_sample": False}),
              (prompts[2], {"until": [], "max_gen_toks": n})]
  out = hf_lm.generate_until(_requests("generate_until", requests))
  assert out[0] == full[0][:full[0].index(stop)]
  assert out[1] == full[1].split("\n\n")[0]
  assert out[2] == full[2]
  sampled = hf_lm.generate_until(_requests("generate_until", [(prompts[0], {"until": [], "max_gen_toks": n,
                                                                            "temperature": 1.5, "top_k": 20})]))
  assert sampled == [_generated_text(hf_lm, prompts[0], n, temperature=1.5, top_k=20)]


def test_generate_until_refuses_bad_gen_kwargs(hf_lm):
  with pytest.raises(ValueError, match="max_gen_toks=32 must be in"):
    hf_lm.generate_until(_requests("generate_until", [("a", {"until": [], "max_gen_toks": 32})]))
  with pytest.raises(ValueError, match=r"gen_kwargs \['num_beams'\] are not supported"):
    hf_lm.generate_until(_requests("generate_until", [("a", {"until": [], "num_beams": 4})]))


# ---------------------------------------------------------------------------------------------------------------
# Bad model arguments.
# ---------------------------------------------------------------------------------------------------------------
def test_bad_model_args_are_refused_naming_them(tmp_path, run, hf_dir):
  with pytest.raises(ValueError, match="exactly one of model_args workdir=DIR"):
    BitNetLM()
  with pytest.raises(ValueError, match="exactly one of model_args workdir=DIR"):
    BitNetLM(workdir=str(run), hf_path=str(hf_dir))
  with pytest.raises(FileNotFoundError, match=re.escape(f"workdir='{tmp_path / 'absent'}' is not a directory")):
    BitNetLM(workdir=str(tmp_path / "absent"))
  with pytest.raises(FileNotFoundError, match=re.escape(f"hf_path='{tmp_path / 'gone'}' is not a directory")):
    BitNetLM(hf_path=str(tmp_path / "gone"))
  with pytest.raises(FileNotFoundError, match="not a training run directory"):
    BitNetLM(workdir=str(tmp_path))
  with pytest.raises(ValueError, match=r"unknown model_args \['pretrained'\]"):
    BitNetLM(workdir=str(run), pretrained="gpt2")
  with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 'auto'"):
    BitNetLM(workdir=str(run), batch_size="auto")
  with pytest.raises(ValueError, match="max_length=65 exceeds the model's max_seq_len=64"):
    BitNetLM(workdir=str(run), max_length=65)
  small = tmp_path / "small_vocab"
  hf.save(Transformer(ModelConfig(**{**HF_TINY, "vocab_size": 64}), rngs=nnx.Rngs(0)), small)
  with pytest.raises(ValueError, match="has no tokenizer.json and its vocab_size=64 is smaller than the byte"):
    BitNetLM(hf_path=str(small))


# ---------------------------------------------------------------------------------------------------------------
# Local tasks through the harness: simple_evaluate and the CLI.
# ---------------------------------------------------------------------------------------------------------------
MC_DOCS = [("What does def start?", ["a function", "a loop", "a class body"]),
           ("Which keyword imports?", ["import", "while", "lambda"]),
           ("How is a list written?", ["[1, 2]", "{1: 2}", "(1)"]),
           ("What ends a block?", ["dedent", "brace", "semicolon"])]
TEXTS = ["short text for a window", "".join(f"row {i} holds {i * i}\n" for i in range(9))]   # 24 and ~120 bytes


def _mc_scores(model, question: str, choices: list[str]) -> list[float]:
  """The oracle's loglikelihood of each choice after the task's prompt (target_delimiter " ")."""
  context = _encode(f"Question: {question}\nAnswer:")
  return [_oracle(model, context, _encode(" " + c), WINDOW)[0] for c in choices]


@pytest.fixture(scope="module")
def tasks(run_model, tmp_path_factory):
  """Task YAMLs over local jsonl files: a 4-doc multiple-choice task whose labels are the oracle's choice for
  docs 0-1 and another choice for docs 2-3 (so acc is 0.5 exactly when our scores agree with the oracle), and a
  rolling perplexity task. Returns (directory, oracle word perplexity)."""
  model = run_model
  directory = tmp_path_factory.mktemp("tasks")
  docs = []
  for i, (question, choices) in enumerate(MC_DOCS):
    best = int(np.argmax(_mc_scores(model, question, choices)))
    docs.append(dict(question=question, choices=choices, label=best if i < 2 else (best + 1) % len(choices)))
  (directory / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
  (directory / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
  common = (f"dataset_path: json\ntest_split: test\nmetadata:\n  version: 1.0\n"
            f"dataset_kwargs:\n  cache_dir: {directory / 'hf_cache'}\n  data_files:\n    test: ")
  (directory / "mc.yaml").write_text(
      "task: bitnet_local_mc\noutput_type: multiple_choice\n" + common + f"{directory / 'mc.jsonl'}\n"
      'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
      "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
  (directory / "rolling.yaml").write_text(
      "task: bitnet_local_rolling\noutput_type: loglikelihood_rolling\n" + common + f"{directory / 'text.jsonl'}\n"
      'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
      "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
  total, words = 0.0, 0
  for text in TEXTS:
    t = _encode(text)
    for start in range(0, len(t), WINDOW):                       # the windows of the rolling test above
      chunk = t[start:start + WINDOW]
      end = start + len(chunk)
      inputs = [EOS] + chunk[:-1] if start == 0 else t[end - WINDOW - 1:end - 1]
      logp = _log_probs(model, inputs)
      total += sum(logp[len(inputs) - len(chunk) + j, tok] for j, tok in enumerate(chunk))
    words += len(re.split(r"\s+", text))                       # the harness's word count (Task.count_words)
  return directory, float(np.exp(-total / words))


def test_simple_evaluate_runs_local_tasks_with_our_scores(run, tasks):
  directory, word_perplexity = tasks
  results = lm_eval.simple_evaluate(
      model="bitnet_jax", model_args={"workdir": str(run), "kv_dtype": "float32"},
      tasks=["bitnet_local_mc", "bitnet_local_rolling"], batch_size=BATCH,
      task_manager=TaskManager(include_path=str(directory), include_defaults=False))
  mc, rolling = results["results"]["bitnet_local_mc"], results["results"]["bitnet_local_rolling"]
  assert mc["acc,none"] == 0.5                                  # the oracle's choice on docs 0-1, not on 2-3
  assert "acc_stderr,none" in mc
  assert rolling["word_perplexity,none"] == pytest.approx(word_perplexity, rel=1e-4)
  assert {"byte_perplexity,none", "bits_per_byte,none"} <= set(rolling)
  assert results["config"]["model"] == "bitnet_jax" and results["config"]["variant"] == "b158"


def test_cli_entry_point_runs_the_harness_cli(run, tasks, tmp_path, monkeypatch, capsys):
  """`main` (what `python -m bitnet_jax.interop.lm_eval` runs): lm_eval's own CLI parses the arguments, builds the
  model from --model_args, prints the table and writes --output_path. The CLI's TaskManager also indexes the
  harness's ~15k built-in tasks (~15 s on a small CPU); here it sees only ours (include_defaults=False)."""
  import functools
  import lm_eval.tasks
  monkeypatch.setattr(lm_eval.tasks, "TaskManager", functools.partial(TaskManager, include_defaults=False))
  directory, _ = tasks
  main(["--model_args", f"workdir={run}", "--tasks", "bitnet_local_mc", "--include_path", str(directory),
        "--limit", "2", "--batch_size", "4", "--output_path", str(tmp_path / "results")])
  printed = capsys.readouterr().out
  assert "bitnet_jax" in printed and "bitnet_local_mc" in printed and "acc" in printed
  written = list((tmp_path / "results").rglob("results_*.json"))
  assert len(written) == 1
  saved = json.loads(written[0].read_text())
  assert saved["results"]["bitnet_local_mc"]["acc,none"] == 1.0   # docs 0-1: the oracle's choice is the label
  assert saved["config"]["model_args"] == {"workdir": str(run)}


def test_module_runs_as_a_script():
  """`python -m`: the file runs as __main__ and imports itself, registering the model once (a second class under
  the same name would be refused by the harness's registry); with no arguments it prints `lm-eval run`'s help,
  `--model bitnet_jax` already in place."""
  out = subprocess.run([sys.executable, "-m", "bitnet_jax.interop.lm_eval"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-3000:]
  assert "--model_args" in out.stdout and "--include_path" in out.stdout
