#!/usr/bin/env bash
# Shows the end of the run's log on a worker, or collects every worker's logs into a local folder.
#
# Usage: launch/logs.sh --env FILE [--worker=N|all] [--lines=N] [--follow] [--collect DIR] [--dry-run]
#   --env FILE      settings (template: launch/tpu.env.example)
#   --worker=W      worker number or "all" (default: 0 to show, all to collect)
#   --lines=N       how many lines to show (default 50)
#   --follow        keep printing new lines (tail -F) until Ctrl-C
#   --collect DIR   copy ~/LOG_DIR from the workers into DIR instead of showing it
#   --dry-run       print the gcloud commands instead of running them (also DRY_RUN=1)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

worker="" lines=50 follow=false collect_dir=""

parse_logs_args() {
    set -- "${EXTRA_ARGS[@]}"
    while (($#)); do
        case $1 in
            --worker=*) worker=${1#--worker=} ;;
            --lines=*) lines=${1#--lines=} ;;
            --follow) follow=true ;;
            --collect) (($# >= 2)) || die "--collect needs a folder"; collect_dir=$2; shift ;;
            *) die "unknown argument: $1 (see --help)" ;;
        esac
        shift
    done
    [[ -z $worker || $worker == all || $worker =~ ^[0-9]+$ ]] ||
        die "--worker must be a number or all, got '$worker'"
    [[ $lines =~ ^[0-9]+$ ]] || die "--lines must be a number, got '$lines'"
}

show_logs() {
    local tail_args="-n $lines"
    if [[ $follow == true ]]; then tail_args+=" -F"; fi
    on_workers "${worker:-0}" "tail $tail_args $(remote_path "$LOG_DIR")/$(printf '%q' "$RUN_NAME")-*.log"
}

# Log files carry the worker's host name, so copies from all workers land side by side.
collect_logs() {
    run mkdir -p "$collect_dir"
    gcloud_tpus tpu-vm scp --recurse --worker="${worker:-all}" "$TPU_NAME:$LOG_DIR" "$collect_dir"
}

parse_args "$@"
parse_logs_args
load_env
if [[ -n $collect_dir ]]; then collect_logs; else show_logs; fi
