# Shared helpers for the launch/ scripts; sourced, never run. Provides argument parsing (--env,
# --dry-run, --help), loading and checking the env file, the `run` wrapper that prints commands
# instead of running them in a dry run, and gcloud TPU helpers.
# shellcheck shell=bash

if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
    echo "launch: error: needs bash >= 4.4 (macOS: brew install bash)" >&2
    exit 2
fi

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck disable=SC2034  # used by the scripts that source this file
REPO_ROOT=$(dirname "$LAUNCH_DIR")
DRY_RUN=${DRY_RUN:-0}
ENV_FILE=""
EXTRA_ARGS=()
REQUIRED_VARS=(PROJECT ZONE TPU_NAME ACCELERATOR_TYPE RUNTIME_VERSION BUCKET CONFIG)
OPTIONAL_VARS=(SPOT QUEUED RUN_NAME TRAIN_ARGS REPO_DIR VENV_DIR LOG_DIR PYTHON_VERSION
               ASSETS_URI POLL_SECONDS MAX_RESTARTS)
# Dry-run commands go to fd 3, the script's stdout, so they show even from inside $(...).
exec 3>&1

die() { echo "launch: error: $*" >&2; exit 2; }
note() { echo "launch: $*" >&2; }
is_dry_run() { [[ $DRY_RUN == 1 || $DRY_RUN == true ]]; }

# --help prints the comment block at the top of the calling script.
print_help() { awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; }

# Handles --env FILE, --dry-run and --help; whatever else is left lands in EXTRA_ARGS.
parse_args() {
    while (($#)); do
        case $1 in
            --env) (($# >= 2)) || die "--env needs a file"; ENV_FILE=$2; shift ;;
            --env=*) ENV_FILE=${1#--env=} ;;
            --dry-run) DRY_RUN=1 ;;
            -h | --help) print_help; exit 0 ;;
            *) EXTRA_ARGS+=("$1") ;;
        esac
        shift
    done
    export DRY_RUN  # keep_running.sh's child scripts inherit it
}

no_extra_args() { ((${#EXTRA_ARGS[@]} == 0)) || die "unknown argument: ${EXTRA_ARGS[0]} (see --help)"; }

# Sources the env file, which is the only source of settings: variables of the same name in the
# calling shell are ignored, so a forgotten line fails loudly instead of picking up a stale export.
load_env() {
    [[ -n $ENV_FILE ]] || die "no env file: pass --env FILE (template: launch/tpu.env.example)"
    [[ -f $ENV_FILE ]] || die "env file not found: $ENV_FILE"
    unset "${REQUIRED_VARS[@]}" "${OPTIONAL_VARS[@]}"
    # shellcheck source=/dev/null
    source "$ENV_FILE"
    local name
    for name in "${REQUIRED_VARS[@]}"; do
        [[ -n ${!name:-} ]] || die "$ENV_FILE: $name is not set (see launch/tpu.env.example)"
    done
    SPOT=${SPOT:-false} QUEUED=${QUEUED:-false} RUN_NAME=${RUN_NAME:-$TPU_NAME}
    TRAIN_ARGS=${TRAIN_ARGS:-} REPO_DIR=${REPO_DIR:-jaxcov} VENV_DIR=${VENV_DIR:-jaxcov-venv}
    LOG_DIR=${LOG_DIR:-jaxcov-logs} PYTHON_VERSION=${PYTHON_VERSION:-3.11}
    ASSETS_URI=${ASSETS_URI:-} POLL_SECONDS=${POLL_SECONDS:-60} MAX_RESTARTS=${MAX_RESTARTS:-10}
    check_env
    QR_NAME="$TPU_NAME-qr"
    # Metrics and plots go to a run directory on worker 0 (process 0 writes them); checkpoints to
    # the bucket, so a run recreated on a new VM resumes from them.
    # shellcheck disable=SC2034  # used by the scripts that source this file
    RUN_DIR="runs/$RUN_NAME" CHECKPOINT_DIR="${BUCKET%/}/runs/$RUN_NAME/checkpoints"
}

check_env() {
    local name
    for name in SPOT QUEUED; do
        [[ ${!name} == true || ${!name} == false ]] ||
            die "$ENV_FILE: $name must be true or false, got '${!name}'"
    done
    for name in POLL_SECONDS MAX_RESTARTS; do
        [[ ${!name} =~ ^[0-9]+$ ]] || die "$ENV_FILE: $name must be a whole number, got '${!name}'"
    done
    # Checkpoints must outlive the VM, or a recreated VM starts from scratch.
    [[ $BUCKET == gs://* ]] || die "$ENV_FILE: BUCKET must start with gs://, got '$BUCKET'"
    [[ -z $ASSETS_URI || $ASSETS_URI == gs://* ]] ||
        die "$ENV_FILE: ASSETS_URI must start with gs://, got '$ASSETS_URI'"
}

# Quotes one word for the shell, leaving plain words bare so printed commands stay readable.
shell_quote() {
    if [[ $1 =~ ^[A-Za-z0-9_./:=@,+%-]*$ ]]; then echo "$1"; else echo "'${1//\'/\'\\\'\'}'"; fi
}

# Quotes a command line; --flag=value keeps the flag bare: --command='...'.
shell_join() {
    local out=() arg
    for arg in "$@"; do
        if [[ $arg =~ ^(--[A-Za-z0-9-]+=)(.*)$ ]]; then
            out+=("${BASH_REMATCH[1]}$(shell_quote "${BASH_REMATCH[2]}")")
        else
            out+=("$(shell_quote "$arg")")
        fi
    done
    echo "${out[*]}"
}

# join_by SEP WORD... prints the words separated by SEP.
join_by() {
    local sep=$1 joined=$2 word
    shift 2
    for word in "$@"; do joined+="$sep$word"; done
    echo "$joined"
}

# Runs a command, or in a dry run prints it, ready to paste.
run() {
    if is_dry_run; then shell_join "$@" >&3; else "$@"; fi
}

# --quiet: no prompts (ssh key creation, delete confirmation), so keep_running.sh runs unattended.
gcloud_tpus() { run gcloud compute tpus "$@" --project="$PROJECT" --zone="$ZONE" --quiet; }

# Runs COMMAND through ssh on WORKER (a number or "all") of the TPU VM.
on_workers() { gcloud_tpus tpu-vm ssh "$TPU_NAME" --worker="$1" --command="$2"; }

# A path on the workers for a remote command: relative paths are taken from the home directory.
remote_path() {
    # shellcheck disable=SC2088  # the tilde is for the worker's shell to expand
    if [[ $1 == /* ]]; then printf '%q' "$1"; else printf '~/%q' "$1"; fi
}

# Prints the state of a TPU resource, GONE if it does not exist, or UNKNOWN if gcloud failed for
# another reason (network, auth): a failed poll must never look like a preemption.
# A dry run prints the describe command and pretends the state is PRETEND.
describe_state() {
    local pretend=$1 kind=$2 name=$3 format=$4 out err
    local cmd=(gcloud compute tpus "$kind" describe "$name"
               --project="$PROJECT" --zone="$ZONE" --format="$format")
    if is_dry_run; then run "${cmd[@]}"; echo "$pretend"; return; fi
    err=$(mktemp)
    if out=$("${cmd[@]}" 2>"$err"); then echo "${out:-UNKNOWN}"
    elif grep -q NOT_FOUND "$err"; then echo GONE
    else note "describe $name failed: $(tail -n 1 "$err")"; echo UNKNOWN
    fi
    rm -f "$err"
}

vm_state() { describe_state "$1" tpu-vm "$TPU_NAME" 'value(state)'; }
qr_state() { describe_state "$1" queued-resources "$QR_NAME" 'value(state.state)'; }
