"""launch/: the TPU and SLURM scripts lint clean and, in a dry run, print the gcloud commands a
v5p-64 run needs. gcloud is never called: a fake one on PATH records calls, and dry runs must
make none."""

import glob
import os
import re
import shlex
import shutil
import signal
import subprocess
import sysconfig
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
TPU_SCRIPTS = ["create.sh", "setup.sh", "run.sh", "logs.sh", "stop.sh", "delete.sh", "keep_running.sh"]
V5P_ENV = """\
PROJECT=my-project
ZONE=us-east5-a
TPU_NAME=jaxcov-v5p
ACCELERATOR_TYPE=v5p-64
RUNTIME_VERSION=v2-alpha-tpuv5
BUCKET=gs://my-bucket
CONFIG=configs/paper_qwen2.5_7b_klcov.yaml
TRAIN_ARGS="train.steps=500"
SPOT=true
QUEUED={queued}
"""
GCLOUD = "gcloud compute tpus"
RUN_DIR = ("train.run_dir=runs/jaxcov-v5p "
           "train.checkpoint_dir=gs://my-bucket/runs/jaxcov-v5p/checkpoints")


def _shellcheck():
    found = shutil.which("shellcheck") or os.path.join(sysconfig.get_path("scripts"), "shellcheck")
    assert os.path.exists(found), "shellcheck is missing: pip install -r requirements-test.txt"
    return found


def _fake_tools(bin_dir, log):
    """gcloud and git stand-ins that log their arguments; describe answers NOT_FOUND."""
    os.makedirs(bin_dir, exist_ok=True)
    for tool in ("gcloud", "git"):
        path = os.path.join(bin_dir, tool)
        with open(path, "w") as f:
            f.write(f"#!/usr/bin/env bash\necho \"{tool} $*\" >> {shlex.quote(str(log))}\n"
                    'if [[ " $* " == *" describe "* ]]; then\n'
                    "  echo \"ERROR: (gcloud) NOT_FOUND: Resource 'x' was not found\" >&2; exit 1\n"
                    "fi\n")
        os.chmod(path, 0o755)


@pytest.fixture
def launch(tmp_path):
    """Runs a launch/ script with a v5p-64 env file and the fake gcloud and git first on PATH."""
    bin_dir = tmp_path / "bin"
    _fake_tools(bin_dir, tmp_path / "calls.log")

    def call(script, *args, queued=False, env_text=None, dry_run=True):
        env_file = tmp_path / "tpu.env"
        env_file.write_text(env_text if env_text is not None else V5P_ENV.format(queued=str(queued).lower()))
        env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", TMPDIR=str(tmp_path),
                   DRY_RUN="1" if dry_run else "0")
        return subprocess.run([os.path.join(LAUNCH, script), "--env", str(env_file), *args],
                              capture_output=True, text=True, env=env, timeout=30)

    def calls():
        log = tmp_path / "calls.log"
        return log.read_text().splitlines() if log.exists() else []

    call.calls = calls
    call.gcloud_calls = lambda: [c for c in calls() if c.startswith("gcloud")]
    return call


def _ok(result):
    assert result.returncode == 0, result.stderr
    return result.stdout


def _remote_command(line):
    """The --command=... a printed `gcloud ... ssh` line sends to the workers."""
    return next(a.split("=", 1)[1] for a in shlex.split(line) if a.startswith("--command="))


def test_every_script_passes_shellcheck():
    scripts = glob.glob(os.path.join(LAUNCH, "**", "*.sh"), recursive=True)
    scripts += glob.glob(os.path.join(LAUNCH, "**", "*.sbatch"), recursive=True)
    assert len(scripts) >= len(TPU_SCRIPTS) + 2  # + common.sh and train.sbatch
    lint = subprocess.run([_shellcheck(), "-x", *scripts], capture_output=True, text=True, cwd=ROOT)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    # The env file template is sourced bash; its assignments are used elsewhere.
    env_lint = subprocess.run([_shellcheck(), "-s", "bash", "-e", "SC2034",
                               os.path.join(LAUNCH, "tpu.env.example")], capture_output=True, text=True)
    assert env_lint.returncode == 0, env_lint.stdout


@pytest.mark.parametrize("script", TPU_SCRIPTS + ["slurm/train.sbatch"])
def test_help_exits_zero(script):
    result = subprocess.run(["bash", os.path.join(LAUNCH, script), "--help"], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0 and "Usage:" in result.stdout, result.stderr


@pytest.mark.parametrize("queued", [False, True])
def test_create_uses_accelerator_runtime_and_spot(launch, queued):
    out = _ok(launch("create.sh", queued=queued))
    if queued:
        assert (f"{GCLOUD} queued-resources create jaxcov-v5p-qr --node-id=jaxcov-v5p "
                "--accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5 --spot") in out
        assert "queued-resources describe jaxcov-v5p-qr" in out  # waits for ACTIVE
    else:
        assert (f"{GCLOUD} tpu-vm create jaxcov-v5p --accelerator-type=v5p-64 "
                "--version=v2-alpha-tpuv5 --spot --project=my-project --zone=us-east5-a") in out
    assert launch.gcloud_calls() == []


def test_setup_ships_code_and_installs_jax_tpu_on_all_workers(launch):
    jax_version = re.search(r"^jax==(\S+)", open(os.path.join(ROOT, "requirements.txt")).read(), re.M)[1]
    lines = _ok(launch("setup.sh")).splitlines()
    assert any(l.startswith(f"git -C {ROOT} archive") for l in lines)
    assert any(l.startswith(f"{GCLOUD} tpu-vm scp") and "--worker=all" in l for l in lines)
    ssh = next(l for l in lines if l.startswith(f"{GCLOUD} tpu-vm ssh jaxcov-v5p --worker=all "))
    install = _remote_command(ssh)
    assert f'"jax[tpu]=={jax_version}"' in install and "libtpu_releases.html" in install
    assert "bash scripts/setup.sh" in install and "--python 3.11" in install
    subprocess.run(["bash", "-n", "-c", install], check=True)
    assert launch.gcloud_calls() == []


def test_run_starts_the_config_on_all_workers_with_the_bucket_run_dir(launch):
    out = _ok(launch("run.sh", "optim.lr=2e-6"))
    ssh = next(l for l in out.splitlines() if l.startswith(f"{GCLOUD} tpu-vm ssh jaxcov-v5p --worker=all "))
    start = _remote_command(ssh)
    assert "JAXCOV_DISTRIBUTED=jax nohup ~/jaxcov-venv/bin/python" in start  # metadata-server slices
    assert (f"-m jaxcov train configs/paper_qwen2.5_7b_klcov.yaml {RUN_DIR} train.steps=500 "
            "optim.lr=2e-6 >> ~/jaxcov-logs/jaxcov-v5p-$(hostname).log") in start
    subprocess.run(["bash", "-n", "-c", start], check=True)


@pytest.mark.parametrize("queued", [False, True])
def test_delete(launch, queued):
    out = _ok(launch("delete.sh", queued=queued))
    expected = ("queued-resources delete jaxcov-v5p-qr --force" if queued
                else "tpu-vm delete jaxcov-v5p")
    assert out.strip() == f"{GCLOUD} {expected} --project=my-project --zone=us-east5-a --quiet"


def test_logs_show_and_collect(launch):
    show = _ok(launch("logs.sh", "--worker=3", "--lines=20"))
    assert "--worker=3" in show and "tail -n 20 ~/jaxcov-logs/jaxcov-v5p-*.log" in _remote_command(show)
    collect = _ok(launch("logs.sh", "--collect", "out/logs"))
    assert f"{GCLOUD} tpu-vm scp --recurse --worker=all jaxcov-v5p:jaxcov-logs out/logs" in collect


def test_keep_running_dry_run_prints_one_recovery(launch):
    out = _ok(launch("keep_running.sh", queued=True))
    order = ["queued-resources describe", "queued-resources delete", "queued-resources create",
             "tpu-vm scp", "tpu-vm ssh jaxcov-v5p --worker=all --command='mkdir",
             f"{RUN_DIR}"]
    positions = [out.find(text) for text in order]
    assert -1 not in positions and positions == sorted(positions), out
    assert launch.gcloud_calls() == []


def test_keep_running_recreates_a_missing_tpu_and_gives_up_after_max_restarts(launch):
    env_text = V5P_ENV.format(queued="false") + "POLL_SECONDS=0\nMAX_RESTARTS=1\n"
    result = launch("keep_running.sh", env_text=env_text, dry_run=False)
    assert result.returncode != 0 and "giving up" in result.stderr
    calls = launch.calls()
    assert sum("tpu-vm create jaxcov-v5p" in c for c in calls) == 1
    assert not any("delete" in c for c in calls)  # nothing to delete: the TPU was NOT_FOUND
    assert sum("tpu-vm ssh" in c for c in calls) == 2  # setup, then run


def test_dry_run_flag_equals_env_variable(launch):
    assert _ok(launch("create.sh", "--dry-run", dry_run=False)) == _ok(launch("create.sh"))


def test_missing_variable_is_a_one_line_error(launch):
    env_text = V5P_ENV.format(queued="false").replace("BUCKET=gs://my-bucket\n", "")
    result = launch("create.sh", env_text=env_text)
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "BUCKET is not set" in result.stderr


def test_bad_values_and_missing_env_file_are_one_line_errors(launch):
    bad = launch("create.sh", env_text=V5P_ENV.format(queued="maybe"))
    assert bad.returncode != 0 and "QUEUED must be true or false" in bad.stderr
    no_env = subprocess.run([os.path.join(LAUNCH, "create.sh"), "--dry-run"], capture_output=True, text=True)
    assert no_env.returncode != 0 and no_env.stderr.count("\n") == 1 and "--env" in no_env.stderr


def test_remote_start_and_stop_commands_work(launch, tmp_path):
    """Runs the start/stop commands the workers get, in a fake home with a fake trainer."""
    home = tmp_path / "home"
    (home / "jaxcov").mkdir(parents=True)
    (home / "jaxcov-venv" / "bin").mkdir(parents=True)
    trainer = home / "jaxcov-venv" / "bin" / "python"
    trainer.write_text("#!/usr/bin/env bash\ntrap 'echo saved; kill $!; exit 0' TERM\n"
                       'echo "started $*"\nsleep 60 & wait\n')
    trainer.chmod(0o755)
    env = dict(os.environ, HOME=str(home))
    start = _remote_command(_ok(launch("run.sh")))
    stop = _remote_command(_ok(launch("stop.sh")))
    pid_file = home / "jaxcov-logs" / "jaxcov-v5p.pid"
    read_log = lambda: "".join(p.read_text() for p in (home / "jaxcov-logs").glob("*.log"))  # noqa: E731
    try:
        assert subprocess.run(["bash", "-c", start], env=env, timeout=10).returncode == 0
        deadline = time.monotonic() + 10
        while "started" not in read_log() and time.monotonic() < deadline:  # its TERM trap is set
            time.sleep(0.05)
        again = subprocess.run(["bash", "-c", start], env=env, capture_output=True, text=True, timeout=10)
        assert again.returncode != 0 and "already running" in again.stderr
        stopped = subprocess.run(["bash", "-c", stop], env=env, capture_output=True, text=True, timeout=10)
        assert "stopped on" in stopped.stdout
        log = read_log()
        assert f"started -m jaxcov train configs/paper_qwen2.5_7b_klcov.yaml {RUN_DIR}" in log
        assert "saved" in log
    finally:
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
