#!/usr/bin/env bash
# Accelerator check for a machine with a GPU or a TPU (issue 15 item 6): sets up jaxcov
# (scripts/setup.sh --test, which installs CPU jax), installs the accelerator jax of the version
# that requirements.txt pins, then runs bench/accelerator_check.py: attention kernel numerics on
# the device, SmolLM2-135M train-step and sampler timings, MFU and decode bandwidth against the
# chip's peak. The check itself is bounded to under 5 minutes (--budget 240, hard stop at 300 s).
#   bash scripts/accelerator_check.sh                 install, then check
#   bash scripts/accelerator_check.sh --no-install    check only (accelerator jax already there)
#   bash scripts/accelerator_check.sh --smoke         CPU smoke run: tiny random model, no installs
# Other arguments go to bench/accelerator_check.py (e.g. --budget 200 --remat none).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
install=1
args=()
for arg in "$@"; do
  case "$arg" in
    --no-install) install=0 ;;
    --smoke) install=0; args+=("$arg") ;;
    *) args+=("$arg") ;;
  esac
done
jax_version=$(sed -n 's/^jax==//p' requirements.txt)

pip_install() { python3 -m pip install --quiet --disable-pip-version-check "$@"; }

# gpu (nvidia-smi sees a GPU), tpu (accel or vfio device nodes, or TPU VM variables), or cpu.
detect_platform() {
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo gpu
  elif compgen -G "/dev/accel*" >/dev/null || compgen -G "/dev/vfio/[0-9]*" >/dev/null \
      || [[ -n "${TPU_ACCELERATOR_TYPE:-}${TPU_NAME:-}${TPU_WORKER_ID:-}" ]]; then
    echo tpu
  else
    echo cpu
  fi
}

# The newest CUDA major version the driver supports ("CUDA Version: 12.8" in nvidia-smi).
driver_cuda_major() { nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p' | head -n 1; }

jax_backend() { python3 -c 'import jax; print(jax.default_backend())' 2>/dev/null || true; }

# jax[cuda13] (jax-cuda13-plugin, CUDA 13 wheels; needs a driver for CUDA >= 13), else
# jax[cuda12]; both plugins exist for jax 0.10.2. Falls back to cuda12 when cuda13 finds no GPU.
install_gpu_jax() {
  local major extra=cuda12
  major=$(driver_cuda_major)
  if [[ "${major:-0}" -ge 13 ]]; then extra=cuda13; fi
  echo "driver CUDA ${major:-unknown}: installing jax[$extra]==$jax_version"
  pip_install "jax[$extra]==$jax_version"
  if [[ "$extra" == cuda13 && "$(jax_backend)" != gpu ]]; then
    echo "jax[cuda13] sees no GPU; falling back to jax[cuda12]==$jax_version"
    python3 -m pip uninstall --quiet -y jax-cuda13-plugin jax-cuda13-pjrt
    pip_install "jax[cuda12]==$jax_version"
  fi
}

install_accelerator_jax() {
  local platform
  platform=$(detect_platform)
  echo "platform: $platform"
  bash scripts/setup.sh --test
  case "$platform" in
    gpu) install_gpu_jax ;;
    tpu) echo "installing jax[tpu]==$jax_version"; pip_install "jax[tpu]==$jax_version" ;;
    *) echo "no GPU or TPU found (use --smoke for the CPU smoke run)" >&2; exit 2 ;;
  esac
  local backend
  backend=$(jax_backend)
  if [[ "$backend" != gpu && "$backend" != tpu ]]; then
    echo "jax's backend is '${backend:-none}' after the install, not the $platform" >&2
    exit 2
  fi
  echo "setup done in $((SECONDS - start)) s"
}

if [[ "$install" == 1 ]]; then install_accelerator_jax; fi
check_start=$SECONDS
status=0
timeout -k 10 "${ACCELERATOR_CHECK_TIMEOUT:-300}" \
  python3 bench/accelerator_check.py ${args[@]+"${args[@]}"} || status=$?
if [[ "$status" == 124 || "$status" == 137 ]]; then
  echo "accelerator check: stopped by the ${ACCELERATOR_CHECK_TIMEOUT:-300} s limit" >&2
fi
echo "check $((SECONDS - check_start)) s, total $((SECONDS - start)) s (exit $status)"
exit "$status"
