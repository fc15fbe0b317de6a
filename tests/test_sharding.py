"""Meshes, logical-axis rules, per-shard group quantisation, FSDP of codes, multi-host, AOT (bitnet_jax.sharding).

Multi-device checks run `tests/sharding_worker.py` in subprocesses with simulated CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=N` set before jax starts); the rest runs in-process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh

from bitnet_jax import sharding, train
from bitnet_jax.model import ModelConfig, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "sharding_worker.py")
TINY = dict(vocab_size=264, d_model=64, n_layers=2, n_heads=4, max_seq_len=64)


def _worker(*args, devices: int = 8, env: dict | None = None, timeout: int = 600) -> dict:
  full_env = {**os.environ, "JAX_PLATFORMS": "cpu",
              "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **(env or {})}
  out = subprocess.run([sys.executable, WORKER, *map(str, args)], cwd=ROOT, env=full_env, capture_output=True,
                       text=True, timeout=timeout)
  lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
  assert out.returncode == 0 and lines, f"worker {args} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
  return json.loads(lines[-1][len("RESULT "):])


def _abstract_mesh(data=1, fsdp=1, tensor=1) -> AbstractMesh:
  return AbstractMesh((data, fsdp, tensor), sharding.MESH_AXES)


# ---------------------------------------------------------------- meshes and rules (in-process)
def test_mesh_shape_fills_the_free_axis_and_refuses_mismatches():
  assert sharding.mesh_shape(dict(data=-1, fsdp=2, tensor=2), 16) == (4, 2, 2)
  assert sharding.mesh_shape(dict(data=2, tensor=-1), 8) == (2, 1, 4)
  with pytest.raises(ValueError, match=r"needs 6 devices but 8 are available"):
    sharding.mesh_shape(dict(data=3, fsdp=2), 8)
  with pytest.raises(ValueError, match=r"at most one axis may be -1"):
    sharding.mesh_shape(dict(data=-1, tensor=-1), 8)
  with pytest.raises(ValueError, match=r"do not divide the 8 available devices"):
    sharding.mesh_shape(dict(data=-1, tensor=3), 8)
  with pytest.raises(ValueError, match=r"mesh.fsdp=0"):
    sharding.mesh_shape(dict(fsdp=0), 8)


def test_make_mesh_on_this_process_devices():
  mesh = sharding.make_mesh(dict(data=-1))
  assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}
  with pytest.raises(ValueError, match="devices"):
    sharding.make_mesh(dict(data=jax.device_count() + 1))


def test_rules_from_config_lists_and_bad_axes():
  rules = sharding.rules_from([["batch", ["data", "fsdp"]], ["embed", "fsdp"], ["mlp", None]])
  assert rules == (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", None))
  with pytest.raises(ValueError, match=r"unknown mesh axis 'model'"):
    sharding.rules_from([["mlp", "model"]])
  assert sharding.logical_spec(sharding.DEFAULT_RULES, ("batch", "length", "act_mlp")) == \
      jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor")
  with pytest.raises(ValueError, match=r"no rule for the logical axis 'experts'"):
    sharding.logical_spec(sharding.DEFAULT_RULES, ("experts",))


def test_per_shard_groups_follow_the_mesh():
  cfg = sharding.with_quant_groups(ModelConfig(variant="b158", **TINY), _abstract_mesh(2, 2, 4))
  assert (cfg.groups, cfg.fsdp_groups) == (4, 2)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  assert model.blocks[0].attn.q_proj.weight_groups == (2, 4)    # column-parallel: (fsdp on in, tensor on out)
  assert model.blocks[0].attn.o_proj.weight_groups == (4, 2)    # row-parallel: (tensor on in, fsdp on out)
  assert sharding.data_parallel_size(_abstract_mesh(2, 2, 4)) == 4


def test_model_not_fitting_the_mesh_is_refused_by_name():
  with pytest.raises(ValueError, match=r"(?s)vocab.*not divisible by its 4 shards.*pad vocab_size"):
    sharding.check_model(ModelConfig(variant="b158", **{**TINY, "vocab_size": 259}), _abstract_mesh(tensor=4))
  with pytest.raises(ValueError, match=r"n_heads=4 is not divisible by the 8 tensor shards"):
    sharding.check_model(ModelConfig(variant="fp", **{**TINY, "d_model": 128, "d_ff": 256}), _abstract_mesh(tensor=8))
  sharding.check_model(ModelConfig(variant="b158", **TINY), _abstract_mesh(2, 2, 4))   # fits: no error


def test_collective_stats_parses_sync_async_and_tuple_ops():
  hlo = "\n".join([
      "%all-reduce.1 = f32[8,128]{1,0} all-reduce(f32[8,128]{1,0} %x), replica_groups={}",
      "%ag-start = (s8[16,64]{1,0}, s8[64,64]{1,0}) all-gather-start(s8[16,64]{1,0} %c), dimensions={0}",
      "%ag-done = s8[64,64]{1,0} all-gather-done((s8[16,64]{1,0}, s8[64,64]{1,0}) %ag-start)",
      "%all-gather.2 = (f32[4]{0}, bf16[8,2]{1,0}) all-gather(f32[1]{0} %a, bf16[2,2]{1,0} %b), dimensions={0}",
      "%cp = f32[2]{0} collective-permute(f32[2]{0} %y), source_target_pairs={{0,1}}",
      "%add = f32[8] add(f32[8] %p, f32[8] %q)",
  ])
  stats = sharding.collective_stats(hlo)
  assert stats["counts"] == {"all-reduce": 1, "all-gather": 2, "reduce-scatter": 0, "all-to-all": 0,
                             "collective-permute": 1}
  assert stats["bytes_by_dtype"]["all-gather"] == {"s8": 64 * 64, "f32": 16, "bf16": 32}
  assert stats["bytes"]["all-reduce"] == 8 * 128 * 4


def test_distributed_config_is_checked_and_single_process_is_a_no_op(monkeypatch):
  for key in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(key, raising=False)
  assert sharding.initialize_distributed({"coordinator_address": ""}) is False
  with pytest.raises(ValueError, match=r"process_id < num_processes"):
    sharding.initialize_distributed({"coordinator_address": "127.0.0.1:1", "num_processes": 2, "process_id": 2})


def test_remat_and_layer_scan_change_memory_and_compile_time_not_values():
  tokens = jax.random.randint(jax.random.key(0), (2, 17), 0, 264)
  out = {}
  for remat, scan in (("none", False), ("dots", False), ("full", False), ("none", True), ("full", True)):
    model = Transformer(ModelConfig(variant="b158", remat=remat, scan_layers=scan, **TINY), rngs=nnx.Rngs(0))
    step = nnx.jit(nnx.value_and_grad(train.loss_fn))
    loss, grads = step(model, tokens)
    out[remat, scan] = (float(loss), jax.tree.leaves(nnx.to_pure_dict(grads)))
    if scan:   # one block body in the compiled program, inside a while loop
      hlo = step.lower(model, tokens).as_text()
      assert "while" in hlo
  for key in (("dots", False), ("full", False), ("none", True), ("full", True)):
    assert out[key][0] == pytest.approx(out["none", False][0], rel=1e-6)
    for a, b in zip(out[key][1], out["none", False][1]):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match=r"remat must be one of"):
    ModelConfig(variant="b158", remat="some", **TINY)


# ---------------------------------------------------------------- 8 simulated devices
@pytest.fixture(scope="module")
def collectives():
  return _worker("collectives")


def test_b158_adds_no_collective_to_the_fp_step_under_tensor_parallelism(collectives):
  fp, b158, glob = collectives["tp/fp"], collectives["tp/b158"], collectives["tp/b158_global"]
  assert b158["groups"] == [4, 1] and glob["groups"] == [1, 1]
  assert fp["counts"]["all-reduce"] > 0                       # the counter sees the Megatron all-reduces
  assert b158["counts"] == fp["counts"], (b158["counts"], fp["counts"])
  # Not blind: one global statistic over a tensor-sharded weight needs extra reductions.
  assert glob["counts"]["all-reduce"] > fp["counts"]["all-reduce"], glob["counts"]


@pytest.mark.parametrize("variant", ["a48", "v2_a4", "b158_seq"])
def test_the_successors_add_no_collective_under_tensor_parallelism(collectives, variant):
  """a4.8's per-token top-K and absmean, v2's Hadamard (block-diagonal within a shard) and ParetoQ's per-channel
  learned scales all work on each device's shard alone: the step has exactly the FP step's collectives."""
  got, fp = collectives[f"tp/{variant}"], collectives["tp/fp"]
  assert got["groups"] == [4, 1]
  assert got["counts"] == fp["counts"], (variant, got["counts"], fp["counts"])


def test_fsdp_all_gathers_int8_codes_instead_of_float32_latent_weights(collectives):
  fp, b158 = collectives["fsdp/fp"], collectives["fsdp/b158"]
  n = b158["bitlinear_elements"]
  fp_ag, b_ag = fp["bytes_by_dtype"]["all-gather"], b158["bytes_by_dtype"]["all-gather"]
  assert "s8" not in fp_ag
  assert b_ag["s8"] == n                      # every BitLinear weight crosses the wire once, as one byte
  saved = fp_ag["f32"] - b_ag["f32"]          # the float32 latent weights fp gathers and b1.58 does not
  assert 4 * n * 0.95 <= saved <= 4 * n, (saved, n)
  print(f"FSDP all-gather bytes per device: fp {sum(fp_ag.values()):.0f}, b158 {sum(b_ag.values()):.0f}; "
        f"BitLinear weights {4 * n} -> {n + 4 * n - saved:.0f} bytes")


@pytest.fixture(scope="module")
def equivalence():
  return _worker("equivalence")


def test_sharded_model_equals_the_unsharded_model_with_the_same_groups(equivalence):
  assert equivalence["groups"] == [4, 2]
  for variant in ("b158", "bitnet"):
    r = equivalence[variant]
    # Each device's weight codes are the single-device codes; the scales agree to float32 reduction order.
    assert r["kernel_code_flips"] == 0 and r["kernel_max_rel_diff"] < 1e-5, r
    assert r["loss"][1] == pytest.approx(r["loss"][0], rel=2e-5)
    # Matmul partial sums add in another order across shards; an 8-bit activation code at a rounding boundary
    # can then flip (one step is 1/127 of a row's absmax), which bounds the logit difference.
    assert r["logit_rel_diff"] < 0.05 and r["grad_rel_diff"] < 0.05, r
    assert r["specs"]["q"] == "P('fsdp', 'tensor')" and r["specs"]["o"] == "P('tensor', 'fsdp')"
  fp = equivalence["fp"]
  assert fp["kernels_equal"] and fp["logit_rel_diff"] < 1e-5
  # Control: a single global statistic quantises the same latent weights differently.
  assert equivalence["global_vs_grouped_kernel_max_rel_diff"] > 1e-2


def test_checkpoint_restores_onto_other_mesh_shapes(tmp_path):
  saved = _worker("train_save", tmp_path / "run")
  assert saved["mesh"] == {"data": 2, "fsdp": 1, "tensor": 4} and np.isfinite(saved["eval_loss"])
  other = _worker("load", tmp_path / "run", 4, 2)
  assert other["q_spec"] == "P('fsdp', 'tensor')"
  np.testing.assert_allclose(other["logits"], saved["logits"], rtol=1e-5, atol=1e-5)
  # and on this process's single device
  config = train.ml_collections.ConfigDict(json.loads((tmp_path / "run" / "config.json").read_text()))
  config.mesh = dict(data=1, fsdp=1, tensor=1)
  model, config = train.load_checkpoint(tmp_path / "run", config)
  assert config.model.groups == 4
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 259, size=(2, 16), dtype=np.int32))
  np.testing.assert_allclose(np.asarray(model(tokens)), saved["logits"], rtol=1e-5, atol=1e-5)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"has no config.json"):
    train.load_checkpoint(tmp_path)


def test_two_processes_train_like_one(tmp_path):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "COORDINATOR": f"127.0.0.1:{port}"}
  procs = [subprocess.Popen([sys.executable, WORKER, "multihost", str(tmp_path / "two"), str(i), "2"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (stdout, stderr) in zip(procs, outs):
    assert p.returncode == 0, stderr[-4000:]
  results = [json.loads(next(l for l in o.splitlines() if l.startswith("RESULT "))[7:]) for o, _ in outs]
  assert sorted(r["process"] for r in results) == [0, 1] and all(r["devices"] == 4 for r in results)
  one = _worker("multihost", tmp_path / "one", 0, 1, devices=4)
  rows = lambda d: [json.loads(l) for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
  two_rows, one_rows = rows("two"), rows("one")
  assert [r["step"] for r in two_rows] == [1, 2, 3]              # written once, by process 0
  assert [r["loss"] for r in two_rows] == [r["loss"] for r in one_rows]
  assert results[0]["eval_loss"] == results[1]["eval_loss"] == one["eval_loss"]


def test_dry_run_plans_the_papers_3b_model_on_64_simulated_devices():
  report = _worker("dry_run", "b158-3b", 4, 4, 4, devices=64)
  assert report["mesh"] == {"data": 4, "fsdp": 4, "tensor": 4} and report["devices"] == 64
  assert report["groups"] == 4 and report["fsdp_groups"] == 4
  total = report["params"]["total"]
  # float32 latent weights split 16 ways (fsdp x tensor): the per-device share, give or take replicated norms
  assert total * 4 / 16 <= report["params_bytes_per_device"] <= total * 4 / 16 * 1.01
  assert report["optimizer_bytes_per_device"] >= 2 * report["params_bytes_per_device"]   # Adam's two moments
  assert report["compiled"]["temp_size"] > 0 and report["collectives"]["all-gather"] > 0
  assert "per device: parameters" in report["text"]
