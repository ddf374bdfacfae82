#!/usr/bin/env bash
# Deletes the TPU VM, or with QUEUED=true its queued resource together with the VM. Checkpoints
# in the bucket stay. Stop the run first (launch/stop.sh) to save the current step.
#
# Usage: launch/delete.sh --env FILE [--if-exists] [--dry-run]
#   --env FILE    settings (template: launch/tpu.env.example)
#   --if-exists   do nothing when there is nothing to delete (used by keep_running.sh)
#   --dry-run     print the gcloud commands instead of running them (also DRY_RUN=1)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

exists() {
    local state
    if [[ $QUEUED == true ]]; then state=$(qr_state SUSPENDED); else state=$(vm_state PREEMPTED); fi
    [[ $state != GONE ]]
}

delete_tpu() {
    if [[ $QUEUED == true ]]; then
        gcloud_tpus queued-resources delete "$QR_NAME" --force
    else
        gcloud_tpus tpu-vm delete "$TPU_NAME"
    fi
}

parse_args "$@"
if_exists=false
for arg in "${EXTRA_ARGS[@]}"; do
    case $arg in
        --if-exists) if_exists=true ;;
        *) die "unknown argument: $arg (see --help)" ;;
    esac
done
load_env
if [[ $if_exists == false ]] || exists; then delete_tpu; fi
