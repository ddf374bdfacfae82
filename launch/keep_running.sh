#!/usr/bin/env bash
# Keeps a run going through preemptions: every POLL_SECONDS it checks the TPU state, and when
# the TPU is preempted or gone it deletes what is left, recreates it, sets it up and starts the
# run again, which resumes from the latest checkpoint in the bucket. Gives up after MAX_RESTARTS
# recreations. It watches the TPU, not the trainer: a run that crashes on a healthy TPU is not
# restarted (see launch/logs.sh). Can start from nothing: a missing TPU is created first.
# A dry run prints one iteration's commands, as if the TPU had been preempted.
#
# Usage: launch/keep_running.sh --env FILE [--dry-run] [section.key=value ...]
#   --env FILE   settings (template: launch/tpu.env.example)
#   --dry-run    print the commands instead of running them (also DRY_RUN=1)
#   overrides    passed on to launch/run.sh
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

# The state that decides: the queued resource's while it is not ACTIVE, then the TPU VM's.
current_state() {
    local state
    if [[ $QUEUED == true ]]; then
        state=$(qr_state SUSPENDED)
        if [[ $state != ACTIVE ]]; then echo "$state"; return; fi
    fi
    vm_state PREEMPTED
}

# Wait out states that settle by themselves; UNKNOWN is a failed poll, not a dead TPU.
is_transient() {
    case $1 in
        UNKNOWN | CREATING | STARTING | RESTARTING | REIMAGING | REPAIRING | STOPPING | DELETING | \
            ACCEPTED | PROVISIONING | WAITING_FOR_RESOURCES | SUSPENDING) return 0 ;;
        *) return 1 ;;
    esac
}

# Each step is its own script, so each stops at its first failing command.
step() { "$LAUNCH_DIR/$1" --env "$ENV_FILE" "${@:2}"; }

# Recreates the TPU unless it is READY (then only setup and run are redone), setup, run.
restart() {
    if [[ $1 != READY ]]; then
        step delete.sh --if-exists && step create.sh || return 1
    fi
    step setup.sh && step run.sh "${EXTRA_ARGS[@]}"
}

keep_running() {
    local restarts=0 pending=false state
    while true; do
        state=$(current_state)
        if ! is_transient "$state" && [[ $pending == true || $state != READY ]]; then
            ((restarts < MAX_RESTARTS)) || die "TPU is $state after $MAX_RESTARTS restarts; giving up"
            restarts=$((restarts + 1))
            note "TPU is $state: restart $restarts of $MAX_RESTARTS"
            if restart "$state"; then
                pending=false
            else
                pending=true  # redo at the next poll, even if the TPU then looks READY
                note "restart failed; trying again in ${POLL_SECONDS}s"
            fi
        fi
        if is_dry_run; then return; fi
        sleep "$POLL_SECONDS"
    done
}

parse_args "$@"
load_env
keep_running
