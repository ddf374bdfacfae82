#!/usr/bin/env bash
# Stops the run on every worker with SIGTERM, which makes jaxcov finish its step, save a
# checkpoint and exit; waits until it has. The TPU VM keeps running (launch/delete.sh removes it).
#
# Usage: launch/stop.sh --env FILE [--dry-run]
#   --env FILE   settings (template: launch/tpu.env.example)
#   --dry-run    print the gcloud command instead of running it (also DRY_RUN=1)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

stop_command() {
    local pid alive
    pid="$(remote_path "$LOG_DIR")/$(printf '%q' "$RUN_NAME").pid"
    alive="kill -0 \"\$(cat $pid 2>/dev/null)\" 2>/dev/null"
    echo "if $alive; then kill -TERM \"\$(cat $pid)\"; while $alive; do sleep 1; done;" \
        "echo \"stopped on \$(hostname)\"; else echo \"no run on \$(hostname)\"; fi"
}

parse_args "$@"
no_extra_args
load_env
on_workers all "$(stop_command)"
