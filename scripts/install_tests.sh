#!/usr/bin/env bash
# Installs what the test suite needs with the lightest torch this machine can get: the CPU-only
# build from PyTorch's own index (about 200 MB, no CUDA libraries, no triton) where that index is
# reachable, else PyPI's default build (on Linux x86-64 the CUDA one: about 3 GB of NVIDIA
# libraries and 1 GB of triton, which run on the CPU all the same). Then ".[dev]".
# Usage: bash scripts/install_tests.sh && bash scripts/test_deps.sh && cargo test --workspace && pytest
set -euo pipefail
cd "$(dirname "$0")/.."
cpu_index="https://download.pytorch.org/whl/cpu"
if python3 -c "import torch" 2>/dev/null; then
  echo "torch $(python3 -c 'import torch; print(torch.__version__)') is installed: kept"
elif pip install --timeout 20 --retries 1 torch --index-url "$cpu_index"; then
  echo "installed the CPU-only torch from $cpu_index"
else
  echo "the CPU-only index is not reachable from here: installing PyPI's torch (about 3 GB)"
fi
pip install ".[dev]"
