#!/usr/bin/env bash
# Starts training on every worker of the TPU VM, in the background: CONFIG with
# train.run_dir=runs/RUN_NAME (metrics and plots, on worker 0) and
# train.checkpoint_dir=BUCKET/runs/RUN_NAME/checkpoints, then TRAIN_ARGS, then any overrides given
# here. The checkpoints are in the bucket, so starting again on a new VM resumes from the latest.
# Each worker appends its output to ~/LOG_DIR/RUN_NAME-HOSTNAME.log (see launch/logs.sh).
#
# Usage: launch/run.sh --env FILE [--dry-run] [section.key=value ...]
#   --env FILE   settings (template: launch/tpu.env.example)
#   --dry-run    print the gcloud command instead of running it (also DRY_RUN=1)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

train_command() {
    local env_overrides overrides=() arg
    read -ra env_overrides <<<"$TRAIN_ARGS"
    for arg in "$(remote_path "$VENV_DIR")/bin/python" -m jaxcov train; do overrides+=("$arg"); done
    for arg in "$CONFIG" "train.run_dir=$RUN_DIR" "train.checkpoint_dir=$CHECKPOINT_DIR" \
        "${env_overrides[@]}" "${EXTRA_ARGS[@]}"; do
        overrides+=("$(printf '%q' "$arg")")
    done
    echo "${overrides[*]}"
}

start_command() {
    local logs run pid log guard
    logs=$(remote_path "$LOG_DIR")
    run=$(printf '%q' "$RUN_NAME")
    pid="$logs/$run.pid" log="$logs/$run-\$(hostname).log"
    # A second trainer on the same TPU would fail to get the chips; say so instead.
    guard="if kill -0 \"\$(cat $pid 2>/dev/null)\" 2>/dev/null; then"
    guard+=" echo \"jaxcov is already running on \$(hostname)\" >&2; exit 1; fi"
    # TPU VMs describe their slice only in the metadata server: let jax read it (jaxcov/distributed.py).
    join_by '; ' "set -e" "cd $(remote_path "$REPO_DIR")" "mkdir -p $logs" "$guard" \
        "JAXCOV_DISTRIBUTED=jax nohup $(train_command) >> $log 2>&1 < /dev/null & echo \$! > $pid"
}

parse_args "$@"
load_env
on_workers all "$(start_command)"
