"""The training loop end to end on a tiny random model: every loss, resume after SIGKILL,
SIGTERM, the NaN guard, no new programs after warm-up on prompts of varied length, and config
errors caught before any compile."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxcov import compiles
from jaxcov.config import ConfigError, load_config
from jaxcov.data import load_datasets
from jaxcov.metrics import read_metrics
from jaxcov.models.registry import load_tokenizer
from jaxcov.trainer import train
from tests.tiny_run import write_tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def _config(tmp_path, **sections):
    sections["train"] = {"run_dir": str(tmp_path / "run"), **sections.get("train", {})}
    return write_tiny_config(tmp_path / "exp.yaml", **sections)


def _comparable(records):
    """Metrics that must repeat exactly (timings and throughput do not)."""
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/")) and "time" not in k}
            for r in records]


@pytest.mark.parametrize("loss", ["ppo_clip", "clip_cov", "kl_cov"])
def test_two_steps_of_each_loss_on_8_devices(tmp_path, loss):
    path = _config(tmp_path, algo={"policy_loss": loss})
    assert train(load_config(path)) == 0
    records = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    assert [r["step"] for r in records] == [0, 1, 2]
    last = records[-1]
    for key in ("reward/mean", "rollout/entropy", "cov/mean", "entropy/measured_dH",
                "entropy/pred_dH", "actor/loss", "actor/grad_norm", "response/length_mean"):
        assert last[key] is not None and np.isfinite(last[key]), key
    assert last["actor/grad_norm"] > 0  # the update really ran
    assert last["entropy/measured_dH"] != 0.0  # ... and changed the policy
    if loss == "clip_cov":
        assert last["clip_cov/clipped_frac"] > 0
    if loss == "kl_cov":
        assert last["kl_cov/penalized_frac"] > 0
    assert os.path.exists(tmp_path / "run" / "entropy.png")


@pytest.mark.parametrize("entropy_rows", [0, 4])
def test_entropy_instrument_on_the_mesh(tmp_path, entropy_rows):
    """The exact instrument on every row (or a 4-row subset): its entropy before the update is
    the scoring pass's on the same tokens, its predictions are finite, and each step writes its
    sampled positions; switched off, only the measured change remains."""
    path = _config(tmp_path, train={"entropy_rows": entropy_rows})
    assert train(load_config(path)) == 0
    records = [r for r in read_metrics(str(tmp_path / "run" / "metrics.jsonl")) if r["step"]]
    for r in records:
        for key in ("entropy/dH_first_order", "entropy/dH_midpoint", "entropy/pred_dH_pg",
                    "entropy/dH_share_selected", "entropy/dH_share_top2pct", "time/entropy"):
            assert np.isfinite(r[key]), key
        assert r["entropy/measured_dH"] == pytest.approx(
            r["entropy/after"] - r["entropy/before"], abs=1e-6)
        if not entropy_rows:
            assert r["entropy/before"] == pytest.approx(r["rollout/entropy"], abs=1e-5)
    lines = read_metrics(str(tmp_path / "run" / "entropy_tokens.jsonl"))
    assert [line["step"] for line in lines] == [1, 2]
    most = (entropy_rows or 16) * 8  # rows x response tokens
    assert all(0 < len(line["measured"]) <= min(64, most) for line in lines)

    (tmp_path / "off").mkdir()
    off = _config(tmp_path / "off", train={"entropy_instrument": False})
    assert train(load_config(off)) == 0
    last = read_metrics(str(tmp_path / "off" / "run" / "metrics.jsonl"))[-1]
    assert "entropy/dH_first_order" not in last and np.isfinite(last["entropy/measured_dH"])


# Prompt lengths per step (chat template included) of the varied-length run: steps 1-3 meet
# both prompt widths (16, 32); step 4 brings new lengths (22 would be width 24 on a 1.5x
# ladder) and a longer shared prefix (the template's 8 tokens and 3 words, cut to 8).
VARIED_LENGTHS = [(16, 15), (31, 20), (15, 16), (22, 17)]
WORDS = "apple river stone cloud green house water light paper table music money world".split()


def _varied_prompts(path) -> str:
    """A verl-layout jsonl of prompts of VARIED_LENGTHS: 14 template tokens and one per word,
    the first word different from the batch-mate's (the last step: the first 3 shared)."""
    rows = []
    for step, lengths in enumerate(VARIED_LENGTHS):
        for i, length in enumerate(lengths):
            shared = ["money", "music", "world"] if step == len(VARIED_LENGTHS) - 1 else []
            words = (shared + [WORDS[(2 * step + i) % 10]] + WORDS * 2)[:length - 14]
            rows.append({"prompt": [{"role": "user", "content": " ".join(words)}],
                         "reward_model": {"ground_truth": "1"}, "data_source": "varied"})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


@pytest.mark.parametrize("pad_prompts", ["dataset", "batch"])
def test_prompts_of_varied_length_compile_nothing_after_step_3(tmp_path, capsys, pad_prompts):
    path = _config(tmp_path, data={"source": _varied_prompts(tmp_path / "varied.jsonl"),
                                   "shuffle": False, "prompt_suffix": ""},
                   train={"steps": len(VARIED_LENGTHS), "prompts_per_step": 2,
                          "checkpoint_every": 0},
                   sampler={"pad_prompts": pad_prompts})
    config = load_config(path)
    train_set, _ = load_datasets(config.data, load_tokenizer(config.model.tokenizer))
    assert [len(e["prompt_ids"]) for e in train_set.examples] == [
        n for lengths in VARIED_LENGTHS for n in lengths]
    jax.clear_caches()  # a program another test traced would otherwise be reused uncounted
    before = compiles.metrics()  # the counts are per process: other tests compile too
    assert train(config) == 0
    records = [r for r in read_metrics(str(tmp_path / "run" / "metrics.jsonl")) if r["step"]]
    for name, already in before.items():
        counts = [r[name] - already for r in records]
        if pad_prompts == "dataset":  # every batch padded to the longest prompt's width
            assert counts == [1] * len(VARIED_LENGTHS), (name, counts)
        else:  # two prompt widths, both met by step 3
            assert 0 < counts[2] == counts[-1] <= 2, (name, counts)
    assert "compiled the" not in capsys.readouterr().err


def _run(path, *overrides):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.Popen([sys.executable, "-m", "jaxcov", "train", path, *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=ROOT)


def _wait_for_step(metrics_path, step, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(metrics_path) and any(
                r["step"] >= step for r in read_metrics(metrics_path)):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout} s")


def test_resume_after_sigkill_is_exact(tmp_path):
    path = _config(tmp_path, train={"steps": 3})
    reference_dir, killed_dir = str(tmp_path / "reference"), str(tmp_path / "killed")
    reference = _run(path, f"train.run_dir={reference_dir}")
    # The killed run keeps its checkpoints outside its run directory (as on a TPU pod, where
    # they go to a gs:// bucket): resuming must find them there.
    outside = f"train.checkpoint_dir={tmp_path / 'bucket' / 'checkpoints'}"
    killed = _run(path, f"train.run_dir={killed_dir}", outside)
    _wait_for_step(os.path.join(killed_dir, "metrics.jsonl"), 2, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert reference.wait() == 0, reference.communicate()
    assert not os.path.exists(os.path.join(killed_dir, "checkpoints"))
    resumed = _run(path, f"train.run_dir={killed_dir}", outside)
    out, err = resumed.communicate()
    assert resumed.returncode == 0, err
    assert "resumed from step" in err
    want = read_metrics(os.path.join(reference_dir, "metrics.jsonl"))
    got = read_metrics(os.path.join(killed_dir, "metrics.jsonl"))
    assert [r["step"] for r in got] == [0, 1, 2, 3]
    for a, b in zip(_comparable(got), _comparable(want)):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], float):
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key)
            else:
                assert a[key] == b[key], (a["step"], key)


def test_sigterm_saves_and_exits_zero(tmp_path):
    path = _config(tmp_path, train={"steps": 50, "checkpoint_every": 0})
    proc = _run(path)
    _wait_for_step(str(tmp_path / "run" / "metrics.jsonl"), 1, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "saved step" in err
    saved = sorted(int(d) for d in os.listdir(tmp_path / "run" / "checkpoints") if d.isdigit())
    assert saved and 1 <= saved[-1] < 50


def test_nonfinite_updates_are_skipped_then_stop_the_run(tmp_path):
    # Warmup keeps step 1 finite (lr 0, then 5e29), after which the absurd learning rate has
    # made the parameters overflow: every later update is non-finite and must be skipped, and two
    # bad steps in a row stop the run with step 1's checkpoint intact.
    path = _config(tmp_path, optim={"lr": 1e30, "warmup_steps": 2},
                   train={"steps": 6, "max_bad_steps": 2})
    proc = _run(path)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1
    assert "non-finite loss or gradient" in err.strip().splitlines()[-1]
    records = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    assert [r["actor/nonfinite"] > 0 for r in records if r["step"] > 0][-2:] == [True, True]
    saved = sorted(int(d) for d in os.listdir(tmp_path / "run" / "checkpoints") if d.isdigit())
    bad_steps = {r["step"] for r in records if r["step"] > 0 and r["actor/nonfinite"] > 0}
    assert saved == [1] and bad_steps == {2, 3}  # no checkpoint was written after a bad update


@pytest.mark.parametrize("sections,message", [
    ({"train": {"mini_batch_prompts": 3}}, "train.mini_batch_prompts: (3) must divide"),
    ({"train": {"mini_batch_prompts": 8}}, "must be <= prompts_per_step"),
    ({"algo": {"policy_loss": "clip_higher"}}, "algo.policy_loss: must be one of"),
    ({"algo": {"group_size": 1, "advantage": "rloo"}}, "rloo needs group_size >= 2"),
])
def test_bad_config_values_fail_in_config(tmp_path, sections, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(_config(tmp_path, **sections))


def test_batch_not_divisible_by_mesh_fails_before_compile(tmp_path):
    path = _config(tmp_path, mesh={"data": 8, "fsdp": 1, "tensor": 1},
                   algo={"group_size": 2}, train={"micro_batch_size": 0})
    proc = subprocess.run([sys.executable, "-m", "jaxcov", "train", path],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "jaxcov: error: train.mini_batch_prompts: 2 prompts x 2 samples = 4 rows is not "
        "divisible by the mesh batch axes (data x fsdp = 8)"]
