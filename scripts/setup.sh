#!/usr/bin/env bash
# Set up pybilayer on a fresh machine (Python, gcc, CMake; nvcc optional).
#   bash scripts/setup.sh          # the engine: torch (CPU build pinned), pybilayer + its native core
#   bash scripts/setup.sh --test   # plus everything the test suite uses (landmarks, video, training)
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip install --disable-pip-version-check -q"

# torch first and pinned: an unpinned torch (or a package asking for a newer one) pulls CUDA wheels.
$PIP torch==2.13.0
$PIP -r requirements.txt
if [[ "${1:-}" == "--test" ]]; then
  $PIP -r requirements-test.txt
  # Packages whose declared dependencies would pull another torch, jax or opencv: installed without them.
  $PIP --no-deps -r requirements-nodeps.txt
fi
# --no-build-isolation: builds against the pinned pybind11 above, no second download of the toolchain.
$PIP --no-build-isolation -e .
python3 -c "from pybilayer import native; print(native.capabilities())"
