"""The run directory (issue 18): one `jaxcov train` at a time holds it, a killed holder never
blocks the resume, and a checkpoint directory that cannot be written is one error line before
anything loads."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from jaxcov import rundir, trainer
from jaxcov.cli import main
from jaxcov.config import ConfigError
from tests.tiny_run import write_tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ModelLoadReached(Exception):
    pass


@pytest.fixture
def no_model_load(monkeypatch):
    """Makes reaching the model load an exception: the errors tested come before it."""
    def build_context(config):
        raise ModelLoadReached
    monkeypatch.setattr(trainer, "build_context", build_context)


def _config(tmp_path, **train) -> str:
    return write_tiny_config(tmp_path / "exp.yaml", train={"run_dir": str(tmp_path / "run"),
                                                           **train})


def test_a_held_run_directory_refuses_a_second_train(tmp_path, capsys, no_model_load):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("the first run's\n")
    with rundir.run_directory_lock(str(run_dir)):
        assert main(["train", _config(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"jaxcov: error: train.run_dir {run_dir} is in use by another jaxcov process "
                   f"(pid {os.getpid()}); wait for it to end or choose another train.run_dir")
    assert (run_dir / "config.yaml").read_text() == "the first run's\n"  # left as it was
    with pytest.raises(ModelLoadReached):  # released: the next train gets past the lock
        main(["train", _config(tmp_path)])


HOLDER = textwrap.dedent("""
    import sys, time
    from jaxcov.rundir import run_directory_lock
    with run_directory_lock(sys.argv[1]):
        print("holding", flush=True)
        time.sleep(600)
""")


def test_a_killed_holder_leaves_no_lock_behind(tmp_path):
    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, run_dir], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "holding\n"
        with pytest.raises(ConfigError, match=rf"in use by another jaxcov process \(pid "
                                              rf"{holder.pid}\)"):
            with rundir.run_directory_lock(run_dir):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert os.path.exists(os.path.join(run_dir, rundir.LOCK_FILE))  # stale file, no lock
    with rundir.run_directory_lock(run_dir):
        with open(os.path.join(run_dir, rundir.LOCK_FILE)) as f:
            assert f.read() == f"{os.getpid()}\n"


def _chattr(flag: str, path) -> bool:
    return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0


def test_an_immutable_checkpoint_dir_is_one_error_before_the_model_loads(
        tmp_path, capsys, no_model_load):
    # The repro: with an asynchronous save failing in orbax's threads, this hung forever.
    checkpoints = tmp_path / "ck"
    checkpoints.mkdir()
    if not _chattr("+i", checkpoints):
        pytest.skip("chattr +i is not available here")
    try:
        assert main(["train", _config(tmp_path), f"train.checkpoint_dir={checkpoints}"]) == 2
    finally:
        _chattr("-i", checkpoints)
    assert capsys.readouterr().err.strip() == (
        f"jaxcov: error: train.checkpoint_dir {checkpoints}: cannot write there "
        "(Operation not permitted)")
