"""Multi-host training: start-up from the environment, the host <-> global helpers, and a real
two-process `jax.distributed` run on localhost (2 processes x 4 CPU devices) whose training step
must match the same step in one process with 8 devices."""

import dataclasses
import os
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxcov import distributed
from jaxcov.config import ConfigError, RewardConfig, load_config
from jaxcov.metrics import read_metrics
from jaxcov.rewards.scoring import RewardScorer, RowScores, score_batch, score_batch_part
from jaxcov.trainer import train
from tests.tiny_run import write_tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ------------------------------------------------------------------------------ launch plan

EXPLICIT = {"JAXCOV_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAXCOV_NUM_PROCESSES": "4",
            "JAXCOV_PROCESS_ID": "3"}
SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "2",
         "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}


@pytest.mark.parametrize("environ,plan", [
    ({}, None),
    (EXPLICIT, {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}),
    ({**EXPLICIT, "JAXCOV_NUM_PROCESSES": "1", "JAXCOV_PROCESS_ID": "0"}, None),
    ({**EXPLICIT, "JAXCOV_DISTRIBUTED": "off"}, None),
    (SLURM, {}),
    ({**SLURM, "SLURM_NTASKS": "1"}, None),
    ({"TPU_WORKER_HOSTNAMES": "t1v-w-0,t1v-w-1"}, {}),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),
    ({"TPU_HOST_BOUNDS": "1,2,1"}, {}),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2"}, {}),
    ({"JAXCOV_DISTRIBUTED": "jax"}, {}),
])
def test_launch_plan_reads_the_environment(environ, plan):
    assert distributed.launch_plan(environ) == plan


@pytest.mark.parametrize("environ,message", [
    ({"JAXCOV_COORDINATOR_ADDRESS": "h:1"},
     "JAXCOV_COORDINATOR_ADDRESS set but JAXCOV_NUM_PROCESSES, JAXCOV_PROCESS_ID not"),
    ({**EXPLICIT, "JAXCOV_PROCESS_ID": "4"}, "JAXCOV_PROCESS_ID=4 must lie in [0, "),
    ({**EXPLICIT, "JAXCOV_NUM_PROCESSES": "two"}, "JAXCOV_NUM_PROCESSES: must be an integer"),
    ({"SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"}, "start each process with srun"),
    ({"JAXCOV_DISTRIBUTED": "yes"}, "JAXCOV_DISTRIBUTED: must be one of"),
])
def test_launch_plan_names_what_is_missing_or_wrong(environ, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        distributed.launch_plan(environ)


def test_single_process_needs_no_initialization():
    assert distributed.maybe_initialize({}) is False
    assert distributed.log_prefix() == ""
    assert distributed.is_main_process()


# ------------------------------------------------------------------- rows split over processes


def test_process_rows_split_contiguously_and_evenly():
    for total in (0, 1, 5, 8, 13):
        for count in (1, 2, 3, 4):
            parts = [distributed.process_rows(total, i, count) for i in range(count)]
            covered = [r for part in parts for r in range(total)[part]]
            assert covered == list(range(total))
            sizes = [len(range(total)[part]) for part in parts]
            assert max(sizes) - min(sizes) <= 1


def test_scoring_in_parts_joins_to_the_whole_batch():
    config = RewardConfig(format_weight=0.5)
    rows = [{"ground_truth": str(i), "task": "math" if i % 3 else "countdown"} for i in range(7)]
    responses = [f"\\boxed{{{i if i % 2 else i + 1}}}" for i in range(7)]
    lengths = list(range(7))
    want_rewards, want_metrics = score_batch(responses, rows, lengths, config)
    scorer = RewardScorer(config)
    parts = [scorer.score_rows(responses[p], rows[p], lengths[p])  # two processes' parts
             for p in (slice(0, 3), slice(3, 7))]
    joined = _concatenate(parts)
    rewards, metrics = score_batch_part(responses, rows, lengths, config, slice(0, 0),
                                        join=lambda _: joined)
    np.testing.assert_array_equal(rewards, want_rewards)
    drop_time = lambda m: {k: v for k, v in m.items() if "time" not in k}  # noqa: E731
    assert drop_time(metrics) == drop_time(want_metrics)
    assert metrics["reward/errors"] > 0 and "reward/accuracy/countdown" in metrics


def _concatenate(parts: list) -> RowScores:
    arrays = {f.name: np.concatenate([getattr(p, f.name) for p in parts])
              for f in dataclasses.fields(RowScores) if f.name != "terms"}
    return RowScores(**arrays, terms={k: np.concatenate([p.terms[k] for p in parts])
                                      for k in parts[0].terms})


def test_host_helpers_are_plain_in_one_process():
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    x = np.arange(16, dtype=np.float32)
    on_mesh = distributed.to_global(x, sharding)
    assert on_mesh.sharding == sharding
    np.testing.assert_array_equal(distributed.to_host(on_mesh), x)
    np.testing.assert_array_equal(distributed.gather_rows(x[2:5], 3), x[2:5])
    assert distributed.any_process(True) and not distributed.any_process(False)


# ---------------------------------------------------------------- two processes vs one process

# The e2e run of tests/tiny_run.py for one step (a checkpoint at the end, no eval), with one
# optimizer update of two micro-batches: cross-process collectives on CPU (gloo) are slow.
ONE_STEP = {"steps": 1, "mini_batch_prompts": 4, "micro_batch_size": 8}

# Metrics of the step compared (not those near zero, like adv/mean: they agree only to rounding).
KEY_METRICS = ("reward/mean", "reward/std", "response/length_mean", "rollout/entropy",
               "actor/loss", "actor/grad_norm", "cov/mean", "cov/std", "entropy/after")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAXCOV_", "SLURM_", "TPU_", "MEGASCALE_"))}
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    return {**env, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", **extra}


def _train(config_path, run_dir, env, log_name):
    """`jaxcov train` in a subprocess, its stdout and stderr going to files next to the config
    (a pipe nobody reads while waiting could fill up and stall it)."""
    logs = [open(config_path.parent / f"{log_name}.{kind}", "w") for kind in ("out", "err")]
    proc = subprocess.Popen([sys.executable, "-m", "jaxcov", "train", str(config_path),
                             f"train.run_dir={run_dir}"], stdout=logs[0], stderr=logs[1],
                            text=True, env=env, cwd=ROOT)
    for f in logs:
        f.close()  # the child has its own copy
    proc.logs = [f.name for f in logs]
    return proc


def _finish(procs, timeout=600):
    """(stdout, stderr) of every process; all are killed if one fails (the others would wait
    for it in a collective)."""
    deadline = time.time() + timeout
    while time.time() < deadline and any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs):
            break
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    outputs = [tuple(open(name).read() for name in p.logs) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    return outputs


def _restore_state(run_dir) -> dict:
    """The step-1 checkpoint's state as numpy arrays (whatever devices wrote it)."""
    path = os.path.join(run_dir, "checkpoints", "1", "state")
    checkpointer = ocp.StandardCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    return jax.tree.map(np.asarray, checkpointer.restore(path, target))


def _max_relative_difference(a, b) -> float:
    """Largest |a - b| of any leaf, relative to that leaf's largest |a|."""
    def leaf(x, y):
        scale = max(float(np.max(np.abs(x))), 1e-30)
        return float(np.max(np.abs(x.astype(np.float64) - y))) / scale
    return max(jax.tree.leaves(jax.tree.map(leaf, a, b)))


def test_two_processes_make_the_same_step_as_one(tmp_path):
    config = tmp_path / "exp.yaml"
    write_tiny_config(config, train=ONE_STEP)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    address = f"localhost:{_free_port()}"
    procs = [_train(config, two, _env(4, JAXCOV_COORDINATOR_ADDRESS=address,
                                      JAXCOV_NUM_PROCESSES="2", JAXCOV_PROCESS_ID=str(i)),
                    f"process{i}") for i in range(2)]
    try:  # meanwhile the same step here, in one process with 8 devices
        assert train(load_config(str(config), [f"train.run_dir={one}"])) == 0
    finally:
        (out0, err0), (out1, err1) = _finish(procs)

    # Process 0 alone writes metrics and the summary; every log line says which process wrote it.
    assert "plots:" in out0 and "plots:" not in out1
    assert "[process 0/2]" in err0 and "[process 1/2]" in err1
    want, got = (read_metrics(os.path.join(d, "metrics.jsonl")) for d in (one, two))
    assert [r["step"] for r in got] == [0, 1]
    for key in KEY_METRICS:
        assert got[-1][key] == pytest.approx(want[-1][key], rel=1e-5, abs=1e-7), key

    # The checkpoint both processes wrote holds the single-process parameters and optimizer state.
    want_state, got_state = _restore_state(one), _restore_state(two)
    assert int(got_state["step"]) == int(want_state["step"]) == 1
    assert jax.tree.structure(got_state) == jax.tree.structure(want_state)
    # The gradient moments (AdamW mu, nu) agree to fp32 summation order (6e-7). Adam's first
    # step, lr * g / (|g| + eps), turns that noise into lr-sized moves for elements whose
    # gradient is near zero, hence the looser bound on the parameters (2.6e-5 of a leaf with
    # XNNPACK dots, 4e-8 without; 1.3e-4 seen on 2026-12-03 with the moments still <= 1e-5).
    assert _max_relative_difference(want_state["opt_state"], got_state["opt_state"]) <= 1e-5
    assert _max_relative_difference(want_state["params"], got_state["params"]) <= 3e-4
