"""Runs sharded computations on simulated CPU devices for tests/test_sharding.py and prints one JSON line.

    python tests/sharding_worker.py MODE [ARGS...]      (XLA_FLAGS sets the device count before jax starts)

Modes:
  collectives            compiled b158 / fp / b158-with-global-statistics train steps on a tensor-parallel and an
                         FSDP mesh: collective counts and bytes by dtype.
  equivalence            a b158 model on a (1, 2, 4) mesh against the same model (same groups) on one device:
                         logits, loss and gradients.
  train_save WORKDIR     trains a tiny b158 run on mesh (data 2, tensor 4) with fixed groups, and prints its logits.
  load WORKDIR D T       restores that run onto mesh (data D, tensor T) and prints the logits.
  multihost WORKDIR I N  process I of N (coordinator on localhost) trains a tiny run on a (data 2, tensor 2) mesh.
  dry_run NAME           `train.dry_run` of configs/lm.py:NAME with the mesh given by the remaining args.
"""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bitnet_jax import sharding, train  # noqa: E402
from bitnet_jax.model import ModelConfig, Transformer  # noqa: E402
from configs import lm  # noqa: E402

TINY = dict(vocab_size=264, d_model=64, n_layers=2, n_heads=4, max_seq_len=64)


def _tokens(batch: int = 8, length: int = 33, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 259, size=(batch, length), dtype=np.int32)


def _tiny_config(steps: int = 4):
  config = lm.get_config("b158-tiny")
  config.model.vocab_size = 264   # divisible by the tensor shards
  config.train.steps, config.train.batch_size, config.train.seq_len = steps, 8, 32
  config.train.eval_every = config.train.checkpoint_every = 2
  config.train.log_every = 1
  config.train.async_checkpoint = False
  config.data.eval_batches = 1
  return config


def collectives() -> dict:
  out = {}
  # The successors (a4.8's top-K and absmean, v2's Hadamard, ParetoQ's learned scales) under tensor parallelism.
  successors = (("a48", "a48", True), ("v2_a4", "v2-a4", True), ("b158_seq", "b158-seq", True))
  for mesh_name, sizes in (("tp", dict(data=2, tensor=4)), ("fsdp", dict(data=2, fsdp=4))):
    for label, variant, per_shard in (("fp", "fp", True), ("b158", "b158", True), ("b158_global", "b158", False),
                                      *(successors if mesh_name == "tp" else ())):
      config = _tiny_config()
      config.model = lm.get_config(f"{variant}-tiny").model
      config.model.vocab_size = 264
      config.mesh = dict(sizes)
      config.sharding.per_shard_groups = per_shard
      lowered, model_cfg, abstract = train.lower_train_step(config)
      stats = sharding.collective_stats(lowered.compile().as_text())
      bitlinear = sum(int(np.prod(v.shape)) for p, v in nnx.to_flat_state(abstract["model"])
                      if p[-1] == "kernel" and any(k.endswith("proj") for k in map(str, p)))
      out[f"{mesh_name}/{label}"] = {**stats, "groups": [model_cfg.groups, model_cfg.fsdp_groups],
                                     "bitlinear_elements": bitlinear}
  return out


def _quantized_kernels(model) -> list[np.ndarray]:
  from bitnet_jax.layers import BitLinear
  layers = [m for _, m in nnx.iter_graph(model) if isinstance(m, BitLinear)]
  return [np.asarray(k) for k in nnx.jit(lambda ls: [l.quantized_kernel() for l in ls])(layers)]


def _sharded_vs_single(cfg: ModelConfig, mesh, rules, tokens) -> dict:
  def loss_and_grads(model, batch):
    loss, grads = nnx.value_and_grad(train.loss_fn)(model, batch)
    return loss, grads, model(batch[:, :-1])

  ref_model = nnx.jit(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))()   # one device, no mesh
  ref_loss, ref_grads, ref_logits = nnx.jit(loss_and_grads)(ref_model, jnp.asarray(tokens))
  ref_kernels = _quantized_kernels(ref_model)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    model = nnx.jit(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))()
    batch = sharding.shard_batch(tokens, sharding.batch_sharding(mesh, rules))
    loss, grads, logits = nnx.jit(loss_and_grads)(model, batch)
    kernels = _quantized_kernels(model)
    specs = {"q": str(model.blocks[0].attn.q_proj.kernel[...].sharding.spec),
             "o": str(model.blocks[0].attn.o_proj.kernel[...].sharding.spec),
             "logits": str(logits.sharding.spec)}
  leaves = lambda t: jax.tree.leaves(nnx.to_pure_dict(t))
  return {"loss": [float(ref_loss), float(loss)],
          "logit_rel_diff": float(jnp.max(jnp.abs(ref_logits - logits)) / jnp.max(jnp.abs(ref_logits))),
          "grad_rel_diff": max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(leaves(ref_grads), leaves(grads)))
                           / max(float(jnp.max(jnp.abs(a))) for a in leaves(ref_grads)),
          "kernels_equal": all(np.array_equal(a, b) for a, b in zip(ref_kernels, kernels)),
          # code flips: entries off by more than float32 rounding of the scale
          "kernel_code_flips": sum(int(np.sum(np.abs(a - b) > 1e-5 * np.max(np.abs(a))))
                                   for a, b in zip(ref_kernels, kernels)),
          "kernel_max_rel_diff": max(float(np.max(np.abs(a - b)) / np.max(np.abs(a)))
                                     for a, b in zip(ref_kernels, kernels)),
          "n_kernels": len(kernels), "specs": specs}


def equivalence() -> dict:
  mesh = sharding.make_mesh(dict(data=1, fsdp=2, tensor=4))
  rules = sharding.DEFAULT_RULES
  tokens = _tokens()
  b158 = sharding.with_quant_groups(ModelConfig(variant="b158", **TINY), mesh, rules)
  out = {"groups": [b158.groups, b158.fsdp_groups],
         "b158": _sharded_vs_single(b158, mesh, rules, tokens),
         "bitnet": _sharded_vs_single(sharding.with_quant_groups(ModelConfig(variant="bitnet", **TINY), mesh, rules),
                                      mesh, rules, tokens),
         "fp": _sharded_vs_single(ModelConfig(variant="fp", **TINY), mesh, rules, tokens)}
  # Control: the same latent weights quantised with one global statistic give other kernels.
  glob = Transformer(ModelConfig(variant="b158", **TINY), rngs=nnx.Rngs(0))
  grouped = Transformer(b158, rngs=nnx.Rngs(0))
  out["global_vs_grouped_kernel_max_rel_diff"] = max(
      float(np.max(np.abs(a - b)) / np.max(np.abs(a)))
      for a, b in zip(_quantized_kernels(glob), _quantized_kernels(grouped)))
  return out


def _logits(model) -> list:
  return np.asarray(jax.jit(lambda m, t: m(t))(model, jnp.asarray(_tokens(2, 16, seed=1)))).tolist()


def train_save(workdir: str) -> dict:
  config = _tiny_config()
  config.mesh = dict(data=2, fsdp=1, tensor=4)
  config.sharding.per_shard_groups = False
  config.model.groups = 4
  summary = train.train_and_evaluate(config, workdir, progress=False)
  model, _ = train.load_checkpoint(workdir)
  return {"eval_loss": summary["eval_loss"], "mesh": summary["mesh"], "logits": _logits(model)}


def load(workdir: str, data: str, tensor: str) -> dict:
  config = train.ml_collections.ConfigDict(json.loads(open(os.path.join(workdir, "config.json")).read()))
  config.mesh = dict(data=int(data), fsdp=1, tensor=int(tensor))
  model, config = train.load_checkpoint(workdir, config)
  return {"logits": _logits(model), "devices": jax.device_count(),
          "q_spec": str(model.blocks[0].attn.q_proj.kernel[...].sharding.spec)}


def multihost(workdir: str, index: str, count: str) -> dict:
  config = _tiny_config(steps=3)
  config.mesh = dict(data=2, fsdp=1, tensor=2)
  if int(count) > 1:
    config.distributed.coordinator_address = os.environ["COORDINATOR"]
    config.distributed.num_processes, config.distributed.process_id = int(count), int(index)
  summary = train.train_and_evaluate(config, workdir, progress=False)
  return {"process": jax.process_index(), "processes": jax.process_count(), "devices": jax.device_count(),
          "eval_loss": summary["eval_loss"]}


def dry_run(name: str, data: str, fsdp: str, tensor: str) -> dict:
  config = lm.get_config(name)
  config.mesh = dict(data=int(data), fsdp=int(fsdp), tensor=int(tensor))
  report = train.dry_run(config)
  report["text"] = train.format_dry_run(report)
  return report


if __name__ == "__main__":
  mode, *args = sys.argv[1:]
  result = globals()[mode](*args)
  print("RESULT " + json.dumps(result))
