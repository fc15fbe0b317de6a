"""interop/lm_eval: our models as the lm-evaluation-harness model `bitnet_jax` (model -> generate -> interop).

    python -m bitnet_jax.interop.lm_eval --model_args workdir=runs/quickstart/b158-small --tasks arc_easy,piqa
        [--include_path my_tasks/ --limit 100 --batch_size 16 --output_path results/ --log_samples]
    python -m bitnet_jax.interop.lm_eval --model_args hf_path=bitnet-b1.58-2B-4T/ --tasks hellaswag,winogrande

    import lm_eval, bitnet_jax.interop.lm_eval   # the import registers "bitnet_jax" with the harness
    results = lm_eval.simple_evaluate(model="bitnet_jax", model_args={"workdir": "runs/b158-small"},
                                      tasks=["arc_easy"], batch_size=16)

The harness's own `lm-eval` command does not import this module, so it cannot find the model; the entry point
above imports it (which registers the model), puts `--model bitnet_jax` in front of the arguments unless another
`--model` is given, and hands the rest to the harness's own CLI (`lm_eval.__main__.cli_evaluate`): every option
of `lm-eval run` works (`--num_fewshot`, `--gen_kwargs`, `--log_samples`, `--seed`, `lm-eval ls tasks`, ...).
The papers' zero-shot tasks (b1.58: arc_easy, arc_challenge, hellaswag, boolq, openbookqa, piqa, winogrande;
BitNet Table 3 also has Winograd, `wsc273`, and StoryCloze, whose data must be requested; ../shared/PAPERS.md
sections 1-2) are multiple-choice `loglikelihood` tasks; they run wherever their datasets can be downloaded.
`--include_path DIR` adds task YAMLs of your own (e.g. over local jsonl files). A bad model argument or a missing
directory ends the command with one `lm_eval: error:` line; `--debug` (or BITNET_JAX_DEBUG=1) shows the traceback.

Model arguments (`--model_args key=value ...`):
  workdir=DIR | hf_path=DIR  exactly one: a training run (its latest checkpoint, `step=N` for another, and the
                             tokenizer of its config) or a Hugging Face checkpoint directory (`interop.hf`; its
                             tokenizer.json, else the byte tokenizer when the model's vocabulary covers it).
  tokenizer=SPEC             another tokenizer (`tokenizer.make_tokenizer` spec: byte, hf:PATH, sentencepiece:PATH).
  max_length=N               the context window (default: the model's max_seq_len, the most it accepts).
  max_gen_toks=256           generate_until's default number of new tokens (a task's gen_kwargs override it).
  kv_dtype=bfloat16          generate_until's KV cache (`generate.generate`; float32 is the full forward exactly).
  prefix_token=auto          the token a text is conditioned on when it has no context: eos for a run (our corpus
                             puts EOS between documents and never BOS), bos (else eos) for a HF checkpoint.
  seed=0                     the sampling seed when a task samples (temperature > 0).
`--batch_size N` is the number of sequences per forward (an int: there is no "auto"); `--device` is ignored (JAX
uses its default backend).

What the harness asks for:
  * loglikelihood(context, continuation): the sum of log p(continuation token | everything before it) and whether
    every continuation token is the argmax, from one full forward (`Transformer.__call__`) of context +
    continuation. A pair longer than the window keeps its rightmost max_length + 1 tokens (the continuation must
    fit). The harness splits the text (`TemplateLM`): trailing spaces of the context move to the continuation,
    and an empty context becomes `prefix_token`.
  * loglikelihood_rolling(text): the log-likelihood of the whole text, conditioned on `prefix_token`, in windows
    of max_length tokens (`lm_eval.utils.get_rolling_token_windows` with context_len=1, `make_disjoint_window`,
    as the harness's HF model does); every token is predicted exactly once.
  * generate_until(context, gen_kwargs): `generate.generate` (greedy unless the task sets do_sample/temperature;
    top_k and top_p pass through) for max_gen_toks tokens, cut at the first EOS token and then at the first of the
    `until` strings. The prompt keeps its rightmost max_length - max_gen_toks tokens.

Shapes: scoring pads each batch to `batch_size` rows and to a length bucket (powers of two from 16, capped at
max_length), so jit compiles a handful of programs whatever the requests (on TPU each new shape is a compile).
Rows are right-padded; the model is causal, so padding never changes a real position's logits. Generation
batches requests with the same prompt length and settings (`generate` has no attention mask for left padding),
padding a short batch to `batch_size` rows: one compile per distinct (prompt length, max_gen_toks). Both run the
model's inference form (`generate.inference_form`): per-token activation scales, so a request's scores do not
depend on what it is batched with (BitNet's per-tensor training scales would make them).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

import lm_eval.models   # noqa: F401  the harness's own models first: a registry holding only ours hides them
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs

from bitnet_jax import cli, generate, kv_cache
from bitnet_jax import tokenizer as tokenizers
from bitnet_jax.model import Transformer

__all__ = ["BitNetLM", "MODEL_NAME", "main"]

MODEL_NAME = "bitnet_jax"
_MIN_BUCKET = 16                                  # shortest padded length of a scoring batch
_PREFIX_TOKENS = ("auto", "bos", "eos")
_SAMPLING_KEYS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")


def _bucket(n: int, max_length: int) -> int:
  """The padded length for n tokens: the next power of two >= n (at least _MIN_BUCKET), capped at max_length."""
  return min(max_length, max(_MIN_BUCKET, 1 << (n - 1).bit_length()))


def _int_arg(name: str, value: Any, minimum: int) -> int:
  """`value` (an int, or a string of one, as the harness's arg parsers give) as an int >= minimum."""
  if isinstance(value, str) and value.strip().lstrip("-").isdigit():
    value = int(value)
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
    raise ValueError(f"bitnet_jax lm_eval model: {name} must be an int >= {minimum}, got {value!r}")
  return int(value)


@nnx.jit
def _target_scores(model: Transformer, inputs_bt: jax.Array, targets_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(log p(target) (B, T) float32, target == argmax (B, T) bool) at every position of one forward."""
  logits = model(inputs_bt).astype(jnp.float32)                                     # (B, T, V)
  logp = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(logp, targets_bt[..., None], axis=-1)[..., 0]         # (B, T)
  return picked, jnp.argmax(logits, axis=-1) == targets_bt


# --------------------------------------------------------------------------------------------------------------
# The harness model.
# --------------------------------------------------------------------------------------------------------------
class BitNetLM(TemplateLM):
  """A bitnet_jax Transformer and its tokenizer behind lm_eval's `LM` interface (see the module docstring)."""

  def __init__(self, workdir: str | None = None, hf_path: str | None = None, *, step: int | None = None,
               tokenizer: str | None = None, batch_size: int | str | None = 1, max_length: int | None = None,
               max_gen_toks: int = 256, kv_dtype: str = "bfloat16", prefix_token: str = "auto", seed: int = 0,
               device: str | None = None, max_batch_size: int | None = None, **unknown: Any):
    """Loads the model: exactly one of `workdir` (a training run) and `hf_path` (a HF checkpoint directory).

    `device` and `max_batch_size` are the harness's own arguments, accepted and ignored.
    Raises:
      ValueError: neither or both of workdir / hf_path, an unknown argument, a bad value (named), a tokenizer
        whose ids do not fit the model's vocabulary.
      FileNotFoundError: the directory (named) does not exist, is not a run / checkpoint, or lacks the step.
    """
    super().__init__()
    del device, max_batch_size
    if unknown:
      raise ValueError(f"bitnet_jax lm_eval model: unknown model_args {sorted(unknown)}; known: workdir, hf_path, "
                       "step, tokenizer, max_length, max_gen_toks, kv_dtype, prefix_token, seed (and batch_size)")
    if (workdir is None) == (hf_path is None):
      raise ValueError("bitnet_jax lm_eval model: give exactly one of model_args workdir=DIR (a training run) and "
                       f"hf_path=DIR (a Hugging Face checkpoint), got workdir={workdir!r}, hf_path={hf_path!r}")
    name, path = ("workdir", workdir) if workdir is not None else ("hf_path", hf_path)
    directory = Path(str(path)).expanduser()
    if not directory.is_dir():
      raise FileNotFoundError(f"bitnet_jax lm_eval model: {name}={str(path)!r} is not a directory")
    if step is not None and hf_path is not None:
      raise ValueError(f"bitnet_jax lm_eval model: step={step!r} selects a checkpoint of a run (workdir), "
                       "not of hf_path")
    if prefix_token not in _PREFIX_TOKENS:
      raise ValueError(f"bitnet_jax lm_eval model: prefix_token must be one of {_PREFIX_TOKENS}, got {prefix_token!r}")
    if kv_dtype not in kv_cache.KV_KINDS:
      raise ValueError(f"bitnet_jax lm_eval model: kv_dtype must be one of {kv_cache.KV_KINDS}, "
                       f"got {kv_dtype!r}")
    self.batch_size = _int_arg("batch_size", 1 if batch_size is None else batch_size, 1)
    self.max_gen_toks = _int_arg("max_gen_toks", max_gen_toks, 1)
    self.seed = _int_arg("seed", seed, 0)
    self.kv_dtype = kv_dtype

    if workdir is not None:
      model, tok = generate.load_run(directory, step=None if step is None else _int_arg("step", step, 0))
    else:
      from bitnet_jax.interop import hf   # its own optional dependencies only when used
      model, tok = hf.load_pretrained(directory)
      if tok is None and tokenizer is None:
        if model.cfg.vocab_size < tokenizers.ByteTokenizer.vocab_size:
          raise ValueError(f"bitnet_jax lm_eval model: hf_path={str(path)!r} has no tokenizer.json and its "
                           f"vocab_size={model.cfg.vocab_size} is smaller than the byte tokenizer's "
                           f"{tokenizers.ByteTokenizer.vocab_size}: give model_args tokenizer=SPEC")
        tok = tokenizers.make_tokenizer("byte")
    if tokenizer is not None:
      tok = tokenizers.make_tokenizer(tokenizer)
    if tok.vocab_size > model.cfg.vocab_size:
      raise ValueError(f"bitnet_jax lm_eval model: tokenizer {tok.name} has {tok.vocab_size} ids, more than the "
                       f"model's vocab_size={model.cfg.vocab_size}")
    max_seq_len = model.cfg.max_seq_len
    self.max_length = max_seq_len if max_length is None else _int_arg("max_length", max_length, 2)
    if self.max_length > max_seq_len:
      raise ValueError(f"bitnet_jax lm_eval model: max_length={self.max_length} exceeds the model's "
                       f"max_seq_len={max_seq_len}")
    if prefix_token == "auto":
      prefix_token = "bos" if hf_path is not None and tok.bos_id is not None else "eos"
    self._prefix_id = tok.bos_id if prefix_token == "bos" else tok.eos_id
    if self._prefix_id is None:
      raise ValueError(f"bitnet_jax lm_eval model: tokenizer {tok.name} has no {prefix_token.upper()} id for "
                       "prefix_token; choose another prefix_token")
    self.model = generate.inference_form(model)
    self.tokenizer = tok
    self._info = {"bitnet_jax_source": f"{name}={directory}", "variant": model.cfg.variant,
                  "max_length": self.max_length, "tokenizer": tok.name}

  # ---------------------------------------------------------------- what TemplateLM needs
  @property
  def eot_token_id(self) -> int | None:
    return self.tokenizer.eos_id

  @property
  def prefix_token_id(self) -> int:
    return self._prefix_id

  @property
  def tokenizer_name(self) -> str:
    return self.tokenizer.name

  def get_model_info(self) -> dict:
    """Recorded in the results' config by `simple_evaluate`."""
    return dict(self._info)

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    """The tokenizer's ids of `string`; our tokenizers never add special tokens."""
    return self.tokenizer.encode(string).tolist()

  def tok_decode(self, ids) -> str:
    return self.tokenizer.decode(ids)

  # ---------------------------------------------------------------- scoring
  def _score(self, rows: list[tuple[list[int], list[int], int]], disable_tqdm: bool = True) -> list[tuple[float, bool]]:
    """(sum of log p, all greedy) over the last n positions of each (inputs, targets, n) row, in batches of
    `batch_size` rows padded to a length bucket; longest rows first so a batch holds similar lengths."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out: list[tuple[float, bool] | None] = [None] * len(rows)
    starts = range(0, len(order), self.batch_size)
    for start in tqdm(starts, desc="bitnet_jax scoring", disable=disable_tqdm or len(starts) < 2):
      chunk = order[start:start + self.batch_size]
      T = _bucket(max(len(rows[i][0]) for i in chunk), self.max_length)
      inputs = np.zeros((self.batch_size, T), np.int32)                              # (B, T), right-padded
      targets = np.zeros((self.batch_size, T), np.int32)
      for r, i in enumerate(chunk):
        n = len(rows[i][0])
        inputs[r, :n], targets[r, :n] = rows[i][0], rows[i][1]
      logp, greedy = jax.device_get(_target_scores(self.model, jnp.asarray(inputs), jnp.asarray(targets)))
      for r, i in enumerate(chunk):
        n, k = len(rows[i][0]), rows[i][2]
        out[i] = (float(np.sum(logp[r, n - k:n], dtype=np.float64)), bool(np.all(greedy[r, n - k:n])))
    return out

  def _loglikelihood_tokens(self, requests: Sequence[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                            **kwargs) -> list[tuple[float, bool]]:
    """(log p(continuation | context), greedy) of each (cache key, context ids, continuation ids) request."""
    rows = []
    for key, context, continuation in requests:
      if len(continuation) > self.max_length:
        raise ValueError(f"bitnet_jax lm_eval model: a continuation of {len(continuation)} tokens does not fit the "
                         f"context window max_length={self.max_length} (request {key!r:.80})")
      if not context:
        raise ValueError(f"bitnet_jax lm_eval model: request {key!r:.80} has no context token to condition on")
      window = (list(context) + list(continuation))[-(self.max_length + 1):]        # left truncation
      rows.append((window[:-1], window[1:], len(continuation)))
    results = self._score(rows, disable_tqdm)
    for (key, _, _), result in zip(requests, results):
      if key is not None:
        self.cache_hook.add_partial("loglikelihood", key, result)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """The log-likelihood of each whole text, over rolling windows of max_length tokens (module docstring)."""
    windows, owners = [], []
    for j, (text,) in enumerate(req.args for req in requests):
      pairs = lm_utils.get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                                 max_seq_len=self.max_length, context_len=1)
      for context, predicted in map(lm_utils.make_disjoint_window, pairs):
        windows.append((None, context, predicted))
        owners.append(j)
    totals = [0.0] * len(requests)
    for j, (logp, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
      totals[j] += logp
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  # ---------------------------------------------------------------- generation
  def _sampling(self, gen_kwargs: dict) -> tuple[list[str], int, float, int | None, float | None]:
    """(until, max_gen_toks, temperature, top_k, top_p) of a request's gen_kwargs, as the harness normalises them."""
    if not isinstance(gen_kwargs, dict):
      raise ValueError(f"bitnet_jax lm_eval model: gen_kwargs must be a dict, got {type(gen_kwargs).__name__}")
    kw = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
    unsupported = sorted(set(kw) - set(_SAMPLING_KEYS))
    if unsupported:
      raise ValueError(f"bitnet_jax lm_eval model: gen_kwargs {unsupported} are not supported (supported: "
                       f"{', '.join(_SAMPLING_KEYS)})")
    until = [s for s in kw["until"] if s]
    if not all(isinstance(s, str) for s in until):
      raise ValueError(f"bitnet_jax lm_eval model: gen_kwargs until must hold strings, got {kw['until']!r}")
    n = kw["max_gen_toks"]
    if n < 1 or n >= self.max_length:
      raise ValueError(f"bitnet_jax lm_eval model: max_gen_toks={n} must be in [1, max_length={self.max_length}) to "
                       "leave room for the prompt")
    temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0
    if temperature == 0.0:
      return until, n, 0.0, None, None
    top_k, top_p = kw.get("top_k"), kw.get("top_p")
    return until, n, temperature, None if top_k is None else int(top_k), None if top_p is None else float(top_p)

  def _finish(self, new_tokens: np.ndarray, until: list[str]) -> str:
    """The text of `new_tokens` up to the first EOS token, then up to the first of the `until` strings."""
    tokens = new_tokens.tolist()
    if self.eot_token_id is not None and self.eot_token_id in tokens:
      tokens = tokens[:tokens.index(self.eot_token_id)]
    text = self.tok_decode(tokens)
    cut = min((i for i in (text.find(s) for s in until) if i >= 0), default=len(text))
    return text[:cut]

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """`generate.generate` for each (context, gen_kwargs) request, cut at EOS and its `until` strings."""
    groups: dict[tuple, list[int]] = {}
    jobs = []
    for i, (context, gen_kwargs) in enumerate(req.args for req in requests):
      until, n, temperature, top_k, top_p = self._sampling(gen_kwargs)
      prompt = self.tok_encode(context)[-(self.max_length - n):] or [self.prefix_token_id]
      jobs.append((prompt, until))
      groups.setdefault((len(prompt), n, temperature, top_k, top_p), []).append(i)
    out: list[str | None] = [None] * len(requests)
    batches = [(key, ids[s:s + self.batch_size]) for key, ids in groups.items()
               for s in range(0, len(ids), self.batch_size)]
    for (_, n, temperature, top_k, top_p), ids in tqdm(batches, desc="bitnet_jax generating",
                                                       disable=disable_tqdm or len(batches) < 2):
      prompts = np.asarray([jobs[i][0] for i in ids] + [jobs[ids[0]][0]] * (self.batch_size - len(ids)), np.int32)
      tokens = np.asarray(generate.generate(self.model, prompts, n, temperature=temperature, top_k=top_k,
                                            top_p=top_p, seed=self.seed, kv_dtype=self.kv_dtype))
      for r, i in enumerate(ids):
        out[i] = self._finish(tokens[r, prompts.shape[1]:], jobs[i][1])
        self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
    return out


# --------------------------------------------------------------------------------------------------------------
# CLI: the harness's own, with our model registered.
# --------------------------------------------------------------------------------------------------------------
_SUBCOMMANDS = ("run", "ls", "validate")


def main(argv: Sequence[str] | None = None) -> None:
  """`lm-eval` (the harness's CLI, `lm_eval.__main__.cli_evaluate`) with the `bitnet_jax` model registered and
  `--model bitnet_jax` the default: `main(["--model_args", "workdir=DIR", "--tasks", "arc_easy"])`. `--debug` is
  ours (`cli.run`: the traceback of an error), never passed to the harness."""
  from absl import logging
  from lm_eval.__main__ import cli_evaluate
  logging.set_verbosity(logging.WARNING)   # orbax logs every checkpoint restore at INFO

  args = cli.strip_debug(sys.argv[1:] if argv is None else argv) or ["--help"]
  if args[0] not in _SUBCOMMANDS:
    args.insert(0, "run")
  if args[0] == "run" and not any(a in ("--model", "-M") or a.startswith("--model=") for a in args):
    args[1:1] = ["--model", MODEL_NAME]
  saved = sys.argv
  sys.argv = [f"{sys.executable} -m bitnet_jax.interop.lm_eval", *args]   # the harness's parser reads sys.argv
  try:
    cli_evaluate()
  except ValueError as e:   # the harness's own checks of its arguments ("Tasks not found: ...") are the user's
    import lm_eval as harness
    if cli.raised_in(e, Path(harness.__file__).parent):
      raise cli.UserError(str(e)) from e
    raise
  finally:
    sys.argv = saved


if __name__ == "__main__":
  # Run as a script this file is `__main__`; the model class registered is the importable module's, so a later
  # `import bitnet_jax.interop.lm_eval` finds the name taken by the same class.
  from bitnet_jax.interop.lm_eval import main as _main
  cli.run("lm_eval", _main)
else:
  register_model(MODEL_NAME)(BitNetLM)
