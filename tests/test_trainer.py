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

from jaxcov import compiles, trainer
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
        # The mean of the per-token changes against the change of the means: equal up to fp32
        # rounding of sums of entropies near 10.8 (a few ulps of 9.5e-7); other rows' entropies
        # would differ by 1e-2.
        assert r["entropy/measured_dH"] == pytest.approx(
            r["entropy/after"] - r["entropy/before"], abs=4e-6)
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


def test_the_run_says_what_it_does_and_ends_with_the_held_out_change(tmp_path, capsys):
    path = _config(tmp_path, data={"eval_size": 4},
                   train={"progress": True, "eval_every": 2, "eval_samples": 2,
                          "checkpoint_every": 0})
    assert train(load_config(path)) == 0
    out, err = capsys.readouterr()
    said = [line[len("jaxcov: "):] for line in err.splitlines() if line.startswith("jaxcov: ")]
    records = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    before, after = records[0], records[-1]
    n = before["eval/examples"]  # 4 drawn, those longer than max_prompt_len dropped
    assert [line.split(" ")[0] for line in said] == [
        "loading", "loaded", "evaluating", "held-out", "training", "evaluating", "held-out"]
    assert said[0] == "loading the model random:llama and the data times_table"
    assert said[2] == f"evaluating {n} held-out prompts before training (greedy and 2 samples each)"
    assert said[3].startswith(f"held-out before training: greedy_acc {before['eval/greedy_acc']:.3f}"
                              f", avg@2 {before['eval/avg@2']:.3f} (")
    assert said[4] == ("training steps 1-2; the first compiles (or loads) the rollout, scoring "
                       "and update programs")
    assert said[5].startswith(f"evaluating {n} held-out prompts after step 2")
    table = out[out.index(f"held-out eval ({n} prompts)"):].splitlines()
    assert table[1].split() == ["metric", "step", "0", "step", "2", "change"]
    greedy = next(row.split() for row in table if row.startswith("eval/greedy_acc"))
    assert [float(v) for v in greedy[1:]] == pytest.approx(
        [before["eval/greedy_acc"], after["eval/greedy_acc"],
         after["eval/greedy_acc"] - before["eval/greedy_acc"]], abs=1e-3)


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


def test_a_checkpoint_save_failing_mid_run_ends_the_run_with_its_error(tmp_path):
    # Checkpoint 1 is written, then the checkpoint directory turns immutable (as a full or
    # revoked disk would): the next save fails in orbax's background thread. The run must say
    # so and exit, not hang in those threads at exit, with checkpoint 1 intact.
    path = _config(tmp_path, train={"steps": 50, "checkpoint_every": 1})
    checkpoints = tmp_path / "run" / "checkpoints"
    proc = _run(path)
    try:
        _wait_for_step(str(tmp_path / "run" / "metrics.jsonl"), 1, proc)
        deadline = time.time() + 120
        while not (checkpoints / "1").is_dir() and time.time() < deadline:
            time.sleep(0.05)  # "1" appears when the step's save is committed
        if subprocess.run(["chattr", "+i", str(checkpoints)], capture_output=True).returncode:
            pytest.skip("chattr +i is not available here")
        out, err = proc.communicate(timeout=300)
    finally:
        subprocess.run(["chattr", "-i", str(checkpoints)], capture_output=True)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith("jaxcov: error: saving step ") and f" to {checkpoints} failed: " \
        in last_line and last_line.endswith(" is the last good checkpoint"), last_line
    assert "1" in os.listdir(checkpoints)


def test_nonfinite_steps_are_never_saved_and_stop_the_run(tmp_path):
    # One update per step. Step 1 runs at lr 0 (warmup) and is saved; step 2's lr of 5e29 gives
    # finite but absurd parameters, whose entropy after the update is NaN: a bad step, as is
    # every later one. Two in a row stop the run, naming checkpoint 1, which trains on at a sane
    # learning rate.
    path = _config(tmp_path, optim={"lr": 1e30, "warmup_steps": 2},
                   train={"steps": 6, "max_bad_steps": 2, "mini_batch_prompts": 4})
    proc = _run(path)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1
    checkpoints = tmp_path / "run" / "checkpoints"
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith("jaxcov: error: 2 steps in a row were non-finite (last: step 3")
    assert last_line.endswith(f"Checkpoint 1 in {checkpoints} holds the last good state.")
    records = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    assert records[2]["entropy/after"] is None  # NaN; the step the old guard let through
    assert sorted(int(d) for d in os.listdir(checkpoints) if d.isdigit()) == [1]

    resumed = _run(path, "optim.lr=1e-3", "optim.warmup_steps=0", "train.steps=3")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    records = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert all(r["actor/nonfinite"] == 0 and r["entropy/after"] > 0 for r in records[1:])


class _Checkpoints:
    """The two things `_judge_step` asks of a checkpointer."""

    def __init__(self, good_step):
        self.good_step, self.directory = good_step, "/runs/x/checkpoints"

    def wait(self):
        pass

    def latest_good_step(self):
        return self.good_step


def test_bad_step_judgement_counts_and_names_what_is_left():
    good = {"actor/nonfinite": 0.0, "entropy/after": 0.5, "reward/mean": 0.25}
    meta = {"bad_steps": 0}
    assert trainer._judge_step(good, meta, 2, 1, _Checkpoints(None)) and meta["bad_steps"] == 0
    nan_metric = {**good, "entropy/after": float("nan")}
    assert not trainer._judge_step(nan_metric, meta, 2, 2, _Checkpoints(None))
    assert trainer._judge_step(good, meta, 2, 3, _Checkpoints(None)) and meta["bad_steps"] == 0
    assert not trainer._judge_step({**good, "actor/nonfinite": 1.0}, meta, 2, 4, _Checkpoints(3))
    with pytest.raises(trainer.TrainingStopped) as stopped:
        trainer._judge_step({**good, "reward/mean": float("inf")}, meta, 2, 5, _Checkpoints(None))
    assert str(stopped.value) == (  # lr = inf: no good state ever reached a checkpoint
        "2 steps in a row were non-finite (last: step 5, non-finite reward/mean); stopped. "
        "No good state was checkpointed before them.")
    meta["bad_steps"] = 1
    with pytest.raises(trainer.TrainingStopped, match="Checkpoint 3 in /runs/x/checkpoints holds"):
        trainer._judge_step({**good, "actor/nonfinite": 2.0}, meta, 2, 6, _Checkpoints(3))


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


# ------------------------------------------------------------- dynamic sampling, old log-probs, eval

import dataclasses  # noqa: E402
import types  # noqa: E402

from jaxcov.batch import concat  # noqa: E402
from jaxcov.checkpoint import Checkpointer  # noqa: E402
from tests.test_batch import assert_rows_of_groups, hand_batch  # noqa: E402

U, V = [1.0, 1.0], [0.0, 1.0]  # the rewards of a uniform and of a varied group of two


class _Rounds:
    """`ctx.data` and `trainer.sample_and_score` for `collect_rollouts`: round r draws the
    prompts 4r .. 4r+3, and its groups get the scripted rewards."""

    def __init__(self, rewards_per_round):
        self.rewards = rewards_per_round
        self.batches, self.keys = [], []

    def next_batch(self):
        r = len(self.batches)
        return [{"id": 4 * r + g} for g in range(4)]

    def sample_and_score(self, ctx, params, examples, key):
        r = len(self.batches)
        assert [e["id"] for e in examples] == [4 * r + g for g in range(4)]
        batch = hand_batch([x for group in self.rewards[r] for x in group], first_row=8 * r)
        self.batches.append(batch)
        self.keys.append(tuple(np.asarray(jax.random.key_data(key))))
        return batch, {"reward/mean": 10.0 * r, "time/sample": 1.0 + r, "time/reward": 0.5}


@pytest.mark.parametrize("filter_groups, max_rounds, rewards, groups, kept", [
    # 2 varied groups, then 2 more: enough after the second round, the varied ones in order.
    (True, 2, [[U, V, U, V], [V, U, V, U]], [1, 3, 4, 6], 4),
    # Never enough: 1 + 2 rounds, then topped up with the first uniform groups.
    (True, 2, [[U, U, V, U], [U, U, U, U], [U, U, U, U]], [2, 0, 1, 3], 1),
    # No resampling allowed; the varied group still goes first.
    (True, 0, [[U, V, U, U]], [1, 0, 2, 3], 1),
    # Filtering off: the first round as it came, all uniform.
    (False, 2, [[U, U, U, U]], [0, 1, 2, 3], 0),
])
def test_dynamic_sampling_rounds_and_the_chosen_groups(monkeypatch, filter_groups, max_rounds,
                                                        rewards, groups, kept):
    rounds = _Rounds(rewards)
    monkeypatch.setattr(trainer, "sample_and_score", rounds.sample_and_score)
    config = load_config(None, ["algo.group_size=2", "train.prompts_per_step=4",
                                "train.mini_batch_prompts=4", f"algo.filter_groups={filter_groups}",
                                f"train.max_resample_rounds={max_rounds}"])
    key = jax.random.key(4)
    chosen, metrics = trainer.collect_rollouts(types.SimpleNamespace(config=config, data=rounds),
                                               None, key)
    assert len(rounds.batches) == len(rewards)  # stopped as soon as enough groups varied
    assert rounds.keys == [tuple(np.asarray(jax.random.key_data(jax.random.fold_in(key, r))))
                           for r in range(len(rewards))]
    assert_rows_of_groups(chosen, concat(rounds.batches), groups)
    n = len(rewards)
    assert metrics == pytest.approx({
        "reward/mean": 0.0,  # of the first round only: an unbiased sample of the prompts
        "time/sample": sum(1.0 + r for r in range(n)), "time/reward": 0.5 * n,
        "batch/rounds": n, "batch/informative_groups": kept, "batch/informative_frac": kept / 4})


def test_old_logprobs_from_the_sampler_equal_recomputed_ones(tmp_path):
    """train.old_logprobs=sampler: the sampler's T=1 log-probs sit at the same [row, column] as
    the teacher-forced ones and equal them to 1e-5, and one RL step from the same state gives
    the same metrics either way."""
    config = load_config(_config(tmp_path, train={"steps": 1}))
    os.makedirs(config.train.run_dir)
    with_mode = {mode: dataclasses.replace(config, train=dataclasses.replace(
        config.train, old_logprobs=mode)) for mode in ("recompute", "sampler")}
    ctx = trainer.build_context(with_mode["recompute"])
    state, position = trainer.initial_state(ctx), ctx.data.state_dict()
    rollout, _ = trainer.collect_rollouts(ctx, state["params"], jax.random.key(0))
    plan = trainer.mini_batch_rows(ctx, jax.random.key(1))
    old = {mode: np.asarray(trainer.prepare_batch(dataclasses.replace(ctx, config=c),
                                                  state["params"], rollout, plan)[0][
                                                      "old_logp_bt"])
           for mode, c in with_mode.items()}
    mask = rollout.response_mask
    assert mask.sum() >= 16 and np.std(old["recompute"][mask]) > 0.1  # a shift would show
    np.testing.assert_array_equal(old["sampler"], rollout.sampler_logp)
    np.testing.assert_allclose(old["sampler"][mask], old["recompute"][mask], atol=1e-5)

    metrics = {}
    for mode, c in with_mode.items():
        ctx.data.load_state_dict(position)  # the same prompts
        _, step_metrics = trainer.rl_step(dataclasses.replace(ctx, config=c),
                                          trainer._copy_tree(state))  # the update donates
        metrics[mode] = {k: v for k, v in _comparable([step_metrics])[0].items()
                         if "compiles" not in k}
    assert metrics["sampler"].keys() == metrics["recompute"].keys()
    assert metrics["sampler"]["rollout/sampler_logp_gap"] < 1e-5
    assert metrics["sampler"]["actor/grad_norm"] > 0
    # The instrument's would-be KL-Cov pick (6 of the 128 tokens, by covariance with the old
    # log-probs) meets near-ties on the near-uniform random policy (entropy 10.79 of at most
    # 10.80) that 1e-7 noise can reorder: one token more or less moves the share by ~1e-4.
    tolerance = {"entropy/dH_share_selected": 1e-3}
    for key, value in metrics["recompute"].items():
        assert metrics["sampler"][key] == pytest.approx(
            value, rel=1e-4, abs=tolerance.get(key, 1e-5)), key


@pytest.mark.parametrize("updates, auto_scores", [(1, [8]), (2, [8, 8])])
def test_the_first_update_takes_old_logprobs_and_entropy_from_its_gradient_pass(
        tmp_path, updates, auto_scores):
    """old_logprobs=auto scores only the rows outside the step's first update (none with one
    update; then the instrument's 8 rows, for its covariances): the first update's gradient pass
    runs the rollout policy itself. The metrics are those of the full recomputation, the
    entropy before the updates included."""
    config = load_config(_config(tmp_path, train={"steps": 1, "mini_batch_prompts": 4 // updates}))
    os.makedirs(config.train.run_dir)
    assert config.train.updates_per_step == updates and config.train.old_logprobs == "auto"
    with_mode = {mode: dataclasses.replace(config, train=dataclasses.replace(
        config.train, old_logprobs=mode)) for mode in ("recompute", "auto")}
    ctx = trainer.build_context(config)
    state, position = trainer.initial_state(ctx), ctx.data.state_dict()
    metrics, scored_rows = {}, {}
    for mode, c in with_mode.items():
        rows = scored_rows[mode] = []

        def score(params, tokens_bt, mask_bt, score_fn=ctx.score_fn, rows=rows):
            rows.append(tokens_bt.shape[0])
            return score_fn(params, tokens_bt, mask_bt)
        ctx.data.load_state_dict(position)  # the same prompts
        _, step_metrics = trainer.rl_step(dataclasses.replace(ctx, config=c, score_fn=score),
                                          trainer._copy_tree(state))  # the update donates
        metrics[mode] = {k: v for k, v in _comparable([step_metrics])[0].items()
                         if "compiles" not in k}
    assert scored_rows == {"recompute": [16], "auto": auto_scores}
    gap = {"rollout/sampler_logp_gap"} if updates == 1 else set()  # nothing scored to compare
    assert metrics["recompute"].keys() - metrics["auto"].keys() == gap
    assert metrics["auto"]["rollout/entropy"] == pytest.approx(
        metrics["recompute"]["rollout/entropy"], abs=1e-6)
    assert metrics["auto"]["actor/grad_norm"] > 0
    metrics["auto"].pop("rollout/sampler_logp_gap", None)  # over the scored rows only
    tolerance = {"entropy/dH_share_selected": 1e-3}  # near-ties: see the test above
    for key, value in metrics["auto"].items():
        assert value == pytest.approx(metrics["recompute"][key], rel=1e-5,
                                      abs=tolerance.get(key, 1e-6)), key


def test_eval_command_evaluates_the_latest_checkpoint_or_else_the_model(tmp_path, monkeypatch,
                                                                        capsys):
    """`jaxcov eval` hands `evaluate` the restored parameters of the run's latest checkpoint (the
    model's own without one), the held-out split and the eval key, and prints what it returns."""
    path = write_tiny_config(tmp_path / "exp.yaml", data={"eval_size": 4},
                             train={"run_dir": str(tmp_path / "run")})
    config = load_config(path)
    calls = []

    def evaluate(model, params, dataset, config, key, prompt_width):
        calls.append({"params": jax.device_get(params), "dataset": dataset, "key": key,
                      "prompt_width": prompt_width})
        return {"eval/avg@4": 0.25, "eval/examples": len(dataset)}

    monkeypatch.setattr(trainer, "evaluate", evaluate)
    args = types.SimpleNamespace(config=path, overrides=[], checkpoint="")
    ctx = trainer.build_context(config)
    state = trainer.initial_state(ctx)
    initial = jax.device_get(state["params"])
    assert trainer.eval_command(args) == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        f"evaluating the model random:llama itself (no checkpoint in {tmp_path / 'run'})")

    changed = jax.tree.map(lambda x: 2 * x + 1, state["params"])
    saver = Checkpointer(config.train.checkpoints, asynchronous=False)
    saver.save(3, {**state, "params": changed}, {"data": ctx.data.state_dict()})
    saver.close()
    assert trainer.eval_command(args) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"evaluating step 3 of {tmp_path / 'run'}", "eval/avg@4           0.2500",
        "eval/examples        3"]
    for call, expected in zip(calls, (initial, jax.device_get(changed))):
        jax.tree.map(np.testing.assert_array_equal, call["params"], expected)
        assert [e["prompt_ids"] for e in call["dataset"].examples] == [
            e["prompt_ids"] for e in ctx.eval_data.examples] and len(call["dataset"]) == 3
        assert call["prompt_width"] == ctx.prompt_width
        np.testing.assert_array_equal(jax.random.key_data(call["key"]), jax.random.key_data(
            jax.random.fold_in(jax.random.key(config.seed), 10**6)))
