#!/usr/bin/env bash
# The GPU checks in one command, under 8 minutes on one H200 (bench/README.md, "GPU"):
#   1. a venv over the machine's python3 (torch, lightning, transformers there) plus the carried wheels of .whl/
#      (bench/fetch_gpu_wheels.sh fills it here: hydra-core, omegaconf, submitit, datasets, trl);
#   2. pytest -m gpu (tests/test_gpu.py);
#   3. the synthetic and the text pipeline (local stand-ins) with hardware=gpu1 and with FSDP on one device;
#   4. bench/bench_dpo.py at TL;DR lengths, isdpo vs TRL, bf16, on SmolLM2-135M's and Llama-3.2-1B's
#      architectures (random init): tokens/s, peak memory, MFU;
#   5. one JSON summary, gpu_check.json, and the log, gpu_check.log, under $OUT (or bench/results/gpu_check/).
# Each step has a time limit (the whole stays under DEADLINE_S); a failed step is recorded and the next one runs.
#
#   bash bench/fetch_gpu_wheels.sh                 # here, once (needs the network)
#   device tool: run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=560)
#   bash bench/gpu_check.sh --cpu-dry-run          # here: every step on the CPU at small sizes (~4 min on 2 cores)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0
[ "${1:-}" = "--cpu-dry-run" ] && DRY=1
RESULTS=${OUT:-$ROOT/bench/results/gpu_check}
WORK=${GPU_CHECK_WORK:-/tmp/isdpo-gpu-check}
DEADLINE_S=${DEADLINE_S:-470}
START=$(date +%s)
rm -rf "$WORK"
mkdir -p "$RESULTS" "$WORK"
exec > >(tee "$RESULTS/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
echo "[gpu_check] $(date -u +%FT%TZ) dry_run=$DRY work=$WORK results=$RESULTS"

left() { echo $(( DEADLINE_S - ($(date +%s) - START) )); }
# step NAME LIMIT_S CMD...: runs CMD under min(LIMIT_S, time left), records rc and seconds in steps.jsonl
step() {
  local name=$1 limit=$2; shift 2
  local t0 rc budget
  budget=$(left); [ "$budget" -lt "$limit" ] && limit=$budget
  if [ "$limit" -lt 5 ]; then
    echo "{\"step\": \"$name\", \"rc\": \"skipped: out of time\"}" >> "$WORK/steps.jsonl"; return
  fi
  echo "[gpu_check] --- $name (limit ${limit}s)"
  t0=$(date +%s)
  timeout --kill-after=15 "$limit" "$@"
  rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - t0 )), \"limit_s\": $limit}" >> "$WORK/steps.jsonl"
  echo "[gpu_check] --- $name: rc=$rc in $(( $(date +%s) - t0 ))s"
}

# 1. the environment. python3 on the GPU machine is itself a venv (/opt/torch/.venv): a venv made from it with
# --system-site-packages sees the base interpreter's packages, not torch's; a .pth file adds its site-packages.
setup_env() {
  python3 -m venv --system-site-packages "$WORK/venv" 2>/dev/null \
    || python3 -m venv --system-site-packages --without-pip "$WORK/venv" || return 1
  local py=$WORK/venv/bin/python
  if ! "$py" -c "import torch" 2>/dev/null; then
    python3 -c "import site; print('\n'.join(site.getsitepackages()))" \
      > "$("$py" -c 'import site; print(site.getsitepackages()[0])')/parent-python.pth"
  fi
  local pip=("$py" -m pip)
  "$py" -m pip --version >/dev/null 2>&1 || pip=(python3 -m pip --python "$py")  # a venv without pip
  local wheel ok=0
  for wheel in .whl/*.whl; do
    [ -e "$wheel" ] || { echo "[gpu_check] no wheels in .whl/ (bash bench/fetch_gpu_wheels.sh, carry .whl)"; return 1; }
    # --no-deps: what they need beyond each other is on the machine; a dry run skips wheels for another Python
    "${pip[@]}" install -q --no-index --no-deps --no-build-isolation --no-cache-dir "$wheel" \
      || { [ "$DRY" = 1 ] && echo "[gpu_check] dry run: $wheel skipped (not for this Python)"; } || ok=1
  done
  "$py" -c "import torch, lightning, transformers, hydra, omegaconf, submitit, datasets, trl; print('[gpu_check] imports ok')" \
    || ok=1
  return $ok
}
export -f setup_env
export WORK DRY
step env 120 bash -c setup_env
PY=$WORK/venv/bin/python
[ -x "$PY" ] || PY=python3
"$PY" bench/gpu_check.py env --out "$WORK/env.json" || true

# 2. pytest -m gpu
if [ $DRY = 1 ]; then export ISDPO_GPU_DRY_RUN=1; fi
step pytest_gpu 130 "$PY" -m pytest tests/test_gpu.py -m gpu -q -p no:cacheprovider -x

# 3. the pipelines
step pipelines 170 "$PY" bench/gpu_check.py pipelines --work "$WORK/pipelines" --out "$WORK/pipelines.json" \
  --deadline-s 150 $([ $DRY = 1 ] && echo --cpu-dry-run)

# 4. isdpo vs TRL at TL;DR lengths (prompts 100-500, responses 20-100 tokens), bf16 on both sides
if [ $DRY = 1 ]; then
  SMALL135=(--layers 2 --vocab 4096 --scale 0.1 --batch 2 --steps 2 --warmup 1)
  SMALL1B=(--layers 1 --vocab 4096 --scale 0.1 --batch 2 --steps 1 --warmup 1 --no-prewarm)
else
  SMALL135=(); SMALL1B=()
fi
step bench_smollm2-arch 100 "$PY" bench/bench_dpo.py --model smollm2-arch --bf16 "${SMALL135[@]}" \
  --out "$WORK/bench_smollm2-arch.json"
step bench_llama-1b 140 "$PY" bench/bench_dpo.py --model llama-1b --bf16 "${SMALL1B[@]}" \
  --out "$WORK/bench_llama-1b.json"

# 5. the summary
"$PY" bench/gpu_check.py summary --work "$WORK" --out "$RESULTS/gpu_check.json"
echo "[gpu_check] done in $(( $(date +%s) - START ))s: $RESULTS/gpu_check.json"
python3 -c "import json,sys; s=json.load(open(sys.argv[1])); print('[gpu_check] ok' if s['ok'] else '[gpu_check] FAILED steps: ' + str([x for x in s['steps'] if x.get('rc') != 0])); sys.exit(0 if s['ok'] else 1)" "$RESULTS/gpu_check.json"
