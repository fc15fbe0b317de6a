"""batches: deterministic batch iterators over token arrays (data side: batches -> data -> train).

Batches: a training example is an int32 window of `seq_len + 1` consecutive tokens (inputs `w[:-1]`, targets
`w[1:]`); windows start at multiples of `seq_len`, so targets never overlap. `train_iterator` is a grain
pipeline (shuffle with a per-epoch reseed, repeat forever, batch) whose `get_state()` / `set_state()` resume
bit-identically and which `grain.checkpoint.CheckpointSave` / `CheckpointRestore` store inside orbax.
`eval_batches` is a fixed list of evenly spaced validation windows, the same in every run.
"""

from __future__ import annotations

import grain
import numpy as np


def _num_windows(tokens: np.ndarray, batch_size: int, seq_len: int, what: str) -> int:
  """Validates the arguments and returns the number of non-overlapping windows of `seq_len + 1` tokens."""
  if np.ndim(tokens) != 1:
    raise ValueError(f"{what}: tokens must be a 1-D array, got shape {np.shape(tokens)}")
  for arg, value in (("batch_size", batch_size), ("seq_len", seq_len)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{what}: {arg} must be a positive int, got {value!r}")
  n_windows = (len(tokens) - 1) // seq_len if len(tokens) else 0
  if n_windows < max(1, batch_size):
    raise ValueError(
        f"{what}: corpus too short: {len(tokens)} tokens give {n_windows} windows of seq_len={seq_len} (+1), "
        f"fewer than batch_size={batch_size}")
  return n_windows


class _Window:
  """Window index -> int32 tokens `[i * seq_len, i * seq_len + seq_len + 1)`; picklable for grain workers."""

  def __init__(self, tokens: np.ndarray, seq_len: int):
    self.tokens = tokens
    self.seq_len = seq_len

  def __call__(self, index) -> np.ndarray:
    start = int(index) * self.seq_len
    return np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int32)


def train_iterator(tokens: np.ndarray, *, batch_size: int, seq_len: int, seed: int) -> grain.DatasetIterator:
  """An endless, deterministic iterator of int32 batches `[batch_size, seq_len + 1]` of training windows.

  `MapDataset.range(n_windows).shuffle(seed).repeat()`: every epoch visits every window once, in an order
  reshuffled per epoch (grain folds the epoch into the seed); batches run across epoch boundaries. The
  iterator's `get_state()` / `set_state()` (and `grain.checkpoint.CheckpointSave` / `CheckpointRestore`)
  resume bit-identically.

  Raises:
    ValueError: if `tokens` hold fewer than `batch_size` windows (`(len(tokens) - 1) // seq_len`).
  """
  n_windows = _num_windows(tokens, batch_size, seq_len, "train_iterator")
  tokens = np.asarray(tokens)
  ds = (grain.MapDataset.range(n_windows)
        .shuffle(seed=int(seed))
        .repeat()
        .map(_Window(tokens, seq_len))
        .batch(batch_size, drop_remainder=True)
        .to_iter_dataset())
  return iter(ds)


def eval_batches(tokens: np.ndarray, *, batch_size: int, seq_len: int, max_batches: int) -> list[np.ndarray]:
  """A fixed list of at most `max_batches` int32 batches `[batch_size, seq_len + 1]` over `tokens`.

  No randomness: the `n_batches * batch_size` windows are spread evenly over all `n_windows` windows
  (window `j * n_windows // count` for j = 0..count-1), so the same tokens give the same batches in every run.

  Raises:
    ValueError: if the validation tokens hold fewer than `batch_size` windows (not even one batch).
  """
  if not isinstance(max_batches, (int, np.integer)) or max_batches < 1:
    raise ValueError(f"eval_batches: max_batches must be a positive int, got {max_batches!r}")
  try:
    n_windows = _num_windows(tokens, batch_size, seq_len, "eval_batches")
  except ValueError as e:
    raise ValueError(f"{e}; the validation tokens are too short for even one eval batch") from None
  n_batches = min(int(max_batches), n_windows // batch_size)
  count = n_batches * batch_size
  starts = (np.arange(count, dtype=np.int64) * n_windows // count) * seq_len
  offsets = starts[:, None] + np.arange(seq_len + 1, dtype=np.int64)[None, :]
  windows = np.asarray(tokens)[offsets].astype(np.int32)
  return [windows[b * batch_size:(b + 1) * batch_size] for b in range(n_batches)]
