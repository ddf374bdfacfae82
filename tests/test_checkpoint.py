"""Checkpoints that go wrong (issue 18): a damaged newest checkpoint falls back to the newest one
that restores, and a save that fails reports itself and lets the process exit."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

from jaxcov.checkpoint import Checkpointer
from jaxcov.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(step: int) -> dict:
    # Random values: constant arrays compress to a few bytes, leaving nothing to truncate.
    return {"params": {"w": jax.random.normal(jax.random.key(step), (64, 64))},
            "step": jnp.int32(step)}


def _save_steps(directory, steps) -> None:
    saver = Checkpointer(str(directory), keep=5, asynchronous=False)
    for step in steps:
        saver.save(step, _state(step), {"data": step})
    saver.close()


def _truncate_state_files(step_dir) -> None:
    """Halves every data file of the saved state, as a crash or a full disk would leave it."""
    data_files = [os.path.join(root, f) for root, _, files in os.walk(step_dir / "state")
                  for f in files if os.path.basename(root) == "d"]
    assert data_files
    for path in data_files:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)


def test_damaged_newest_checkpoint_falls_back_to_the_newest_good_one(tmp_path, capsys):
    directory = tmp_path / "checkpoints"
    _save_steps(directory, [1, 2, 3])
    _truncate_state_files(directory / "3")
    checkpointer = Checkpointer(str(directory))
    step, state, meta = checkpointer.restore_newest(_state(0))
    assert step == 2 and meta == {"data": 2} and int(state["step"]) == 2
    assert jnp.array_equal(state["params"]["w"], _state(2)["params"]["w"])
    warning = capsys.readouterr().err.strip().splitlines()[-1]
    assert warning.startswith("jaxcov: warning: checkpoint 3 cannot be restored (")
    assert warning.endswith(f"moved it to {directory / '3'}.damaged and resuming from step 2")
    assert sorted(os.listdir(directory)) == ["1", "2", "3.damaged"]
    # The resumed run saves its step 3 again, and that one restores.
    checkpointer.save(3, _state(3), {"data": 3})
    checkpointer.wait()
    assert checkpointer.restore_newest(_state(0))[0] == 3
    checkpointer.close()


def test_every_checkpoint_damaged_is_one_error_and_renames_nothing(tmp_path):
    directory = tmp_path / "checkpoints"
    _save_steps(directory, [1, 2])
    for step in (1, 2):
        _truncate_state_files(directory / str(step))
    checkpointer = Checkpointer(str(directory))
    with pytest.raises(ConfigError) as error:
        checkpointer.restore_newest(_state(0))
    checkpointer.close()
    message = str(error.value)
    assert message.startswith(f"no checkpoint in {directory} can be restored (step 2: ")
    assert "; step 1: " in message and message.endswith("move them away to start the run afresh")
    assert "\n" not in message and sorted(os.listdir(directory)) == ["1", "2"]


def test_another_models_checkpoint_is_an_error_not_damage(tmp_path):
    directory = tmp_path / "checkpoints"
    _save_steps(directory, [1, 2])
    wider = {"params": {"w": jnp.zeros((64, 128))}, "step": jnp.int32(0)}
    checkpointer = Checkpointer(str(directory))
    with pytest.raises(ConfigError, match=r"checkpoint .*/2 does not fit the model: params/w has "
                                          r"shape \[64, 64\] in it, the model's is \[64, 128\]"):
        checkpointer.restore_newest(wider)
    checkpointer.close()
    assert sorted(os.listdir(directory)) == ["1", "2"]  # nothing set aside


def _chattr(flag: str, path) -> bool:
    return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0


# Saves step 1, makes the directory immutable (the test does, between the two lines it reads),
# then saves step 2, which fails inside orbax's background commit thread.
FAILING_SAVE = textwrap.dedent("""
    import sys
    import jax.numpy as jnp
    from jaxcov.checkpoint import CheckpointSaveError, Checkpointer, exit_abandoning_failed_saves
    checkpointer = Checkpointer(sys.argv[1])
    checkpointer.save(1, {"w": jnp.arange(4.0)}, {})
    checkpointer.wait()
    print("saved 1", flush=True)
    sys.stdin.readline()
    try:
        checkpointer.save(2, {"w": jnp.arange(4.0) + 1}, {})
        checkpointer.wait()
    except CheckpointSaveError as e:
        print(e, flush=True)
    checkpointer.close()
    exit_abandoning_failed_saves(3)
""")


def test_failed_asynchronous_save_is_reported_and_the_process_exits(tmp_path):
    directory = tmp_path / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-c", FAILING_SAVE, str(directory)], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "saved 1\n", proc.stderr.read()
        if not _chattr("+i", directory):
            proc.kill()
            pytest.skip("chattr +i is not available here")
        proc.stdin.write("\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=60)  # before the fix: hung at exit forever
    finally:
        _chattr("-i", directory)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, err
    assert out.startswith(f"saving step 2 to {directory} failed: ")
    assert out.rstrip().endswith("; step 1 is the last good checkpoint")
    step, state, _ = Checkpointer(str(directory)).restore_newest({"w": jnp.zeros(4)})
    assert step == 1 and jnp.array_equal(state["w"], jnp.arange(4.0))
