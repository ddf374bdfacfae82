#!/usr/bin/env bash
# Creates the TPU VM described by the env file: a queued resource when QUEUED=true (waits until
# it is ACTIVE), else a plain TPU VM; both as Spot capacity when SPOT=true.
#
# Usage: launch/create.sh --env FILE [--dry-run]
#   --env FILE   settings (template: launch/tpu.env.example)
#   --dry-run    print the gcloud commands instead of running them (also DRY_RUN=1)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

wait_until_active() {
    local state
    while state=$(qr_state ACTIVE) && [[ $state != ACTIVE ]]; do
        case $state in FAILED | SUSPENDED | GONE) die "queued resource $QR_NAME is $state" ;; esac
        note "queued resource $QR_NAME is $state; checking again in ${POLL_SECONDS}s"
        sleep "$POLL_SECONDS"
    done
}

create_tpu() {
    local spot_flag=()
    if [[ $SPOT == true ]]; then spot_flag=(--spot); fi
    if [[ $QUEUED == true ]]; then
        gcloud_tpus queued-resources create "$QR_NAME" --node-id="$TPU_NAME" \
            --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" "${spot_flag[@]}"
        wait_until_active
    else
        gcloud_tpus tpu-vm create "$TPU_NAME" \
            --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${spot_flag[@]}"
    fi
}

parse_args "$@"
no_extra_args
load_env
create_tpu
