#!/usr/bin/env bash
# Fills .whl/ with the wheels bench/gpu_check.sh installs on the GPU machine (see bench/README.md, "GPU").
#
# That machine has no network. Its python3 (3.12, x86_64) already holds torch, lightning, transformers, peft,
# accelerate, tokenizers, pandas, pyarrow, fsspec, huggingface-hub, xxhash, httpx, psutil, pytest; it lacks what
# isdpo's launch.py and the TRL comparison need beyond that: hydra-core, omegaconf (+ antlr4-python3-runtime),
# submitit, datasets (+ dill, multiprocess) and trl. Each is fetched for cp312 / manylinux x86_64 with --no-deps
# (their other requirements are on the machine already; gpu_check.sh installs them with --no-deps too). W&B is
# left out (~20 MB with its own needs): gpu_check.sh runs with logger=csv/none.
#
#   bash bench/fetch_gpu_wheels.sh [DIR]        # DIR defaults to .whl (about 2 MB)
#
# DIR is added to .git/info/exclude (never committed) and travels with the device tool's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
mkdir -p "$DEST"
EXCLUDE=$(git rev-parse --git-path info/exclude)
grep -qxF "/$DEST/" "$EXCLUDE" 2>/dev/null || echo "/$DEST/" >> "$EXCLUDE"

# The versions this repository's tests pass with (.venv); one version of each, or the install there stops.
PKGS=(hydra-core==1.3.8 omegaconf==2.3.1 submitit==1.5.4 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
      trl==1.16.0)
PLATFORM=(--python-version 3.12 --implementation cp --abi cp312 --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: "${PLATFORM[@]}" -d "$DEST" "${PKGS[@]}"
# omegaconf's grammar runtime is published as a source archive only; its wheel is pure Python, built here.
python3 -m pip wheel -q --no-deps -w "$DEST" antlr4-python3-runtime==4.9.3
ls -l "$DEST"
du -sh "$DEST"
