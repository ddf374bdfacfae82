#!/usr/bin/env bash
# Copies the code at git HEAD to every worker of the TPU VM and installs it: a Python 3.11 venv
# (made with uv, because TPU images ship an older Python than jax needs), then scripts/setup.sh
# inside it plus jax[tpu] at the version requirements.txt pins, then ASSETS_URI if set (e.g.
# model weights and data the config names). Safe to rerun.
#
# Usage: launch/setup.sh --env FILE [--dry-run]
#   --env FILE   settings (template: launch/tpu.env.example)
#   --dry-run    print the commands instead of running them (also DRY_RUN=1)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

LIBTPU_RELEASES=https://storage.googleapis.com/jax-releases/libtpu_releases.html

pinned_jax_version() {
    local version
    version=$(sed -n 's/^jax==\([^ ]*\).*/\1/p' "$REPO_ROOT/requirements.txt")
    [[ -n $version ]] || die "requirements.txt pins no jax version (expected a line jax==X)"
    echo "$version"
}

# Shipping a commit (not the working tree) keeps every run traceable to the code it ran.
ship_code() {
    local tarball="${TMPDIR:-/tmp}/jaxcov-$TPU_NAME.tar.gz"
    git -C "$REPO_ROOT" diff --quiet HEAD 2>/dev/null ||
        note "uncommitted changes are not shipped (git HEAD is)"
    run git -C "$REPO_ROOT" archive --format=tar.gz -o "$tarball" HEAD
    gcloud_tpus tpu-vm scp "$tarball" "$TPU_NAME:jaxcov.tar.gz" --worker=all
}

install_command() {
    local repo venv make_venv steps
    repo=$(remote_path "$REPO_DIR")
    venv=$(remote_path "$VENV_DIR")
    make_venv="python3 -m pip install --user --quiet uv"
    make_venv+=" && ~/.local/bin/uv venv --seed --python $PYTHON_VERSION $venv"
    steps=(
        "mkdir -p $repo"
        "tar -xzf ~/jaxcov.tar.gz -C $repo"
        "{ test -x $venv/bin/python || { $make_venv; }; }"
        ". $venv/bin/activate"
        "cd $repo"
        "python3 -m pip install --quiet --upgrade pip setuptools"
        "bash scripts/setup.sh"
        "python3 -m pip install --quiet \"jax[tpu]==$JAX_VERSION\" -f $LIBTPU_RELEASES"
    )
    if [[ -n $ASSETS_URI ]]; then
        steps+=("gcloud storage rsync --recursive $(printf '%q' "$ASSETS_URI") .")
    fi
    join_by ' && ' "${steps[@]}"
}

parse_args "$@"
no_extra_args
load_env
JAX_VERSION=$(pinned_jax_version)
install=$(install_command)
ship_code
on_workers all "$install"
