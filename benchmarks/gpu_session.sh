#!/usr/bin/env bash
# The checks and benchmark rows that need an NVIDIA GPU, in one device call (about 9 minutes of
# commands on an H100; the lent machine's image has jax, flax, optax, orbax, torch, transformers,
# peft and pytest). From a session that is lent a GPU:
#   run(command="bash benchmarks/gpu_session.sh", timeout_s=600)
# Each step has its own time limit, so one that hangs or fails leaves the others their time;
# tables and logs go to $OUT (they come back with the reply) and a summary is printed last.
#   1. the cuDNN attention path against the xla path (tests/models/test_attention.py, GPU-only)
#   2. python benchmarks/train_step.py --size 1b   (TinyLlama-1.1B shape, bf16, MFU column)
#   3. python benchmarks/train_step.py --size 8b   (Llama-3-8B shape, LoRA cases)
#   4. python benchmarks/longlora.py --size smollm2 (16,384 tokens: full attention vs S2-Attn)
set -u
OUT=${OUT:-/tmp/peftjax_gpu}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

step() {  # step NAME SECONDS COMMAND...: runs it with a limit, logs to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/summary.txt"
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/summary.txt"
step attention_tests 120 "$PY" -m pytest -q -p no:cacheprovider tests/models/test_attention.py \
  -k gpu
step train_step_1b 200 "$PY" benchmarks/train_step.py --size 1b --steps 10 \
  --out "$OUT/train_step_1b.md"
step train_step_8b 180 "$PY" benchmarks/train_step.py --size 8b --steps 5 \
  --out "$OUT/train_step_8b.md"
step longlora_smollm2 90 "$PY" benchmarks/longlora.py --size smollm2 --steps 3 \
  --out "$OUT/longlora_smollm2.md"
echo
tail -n 3 "$OUT/attention_tests.log"
for f in train_step_1b train_step_8b longlora_smollm2; do
  echo "== $f"
  if [ -f "$OUT/$f.md" ]; then cat "$OUT/$f.md"; else tail -n 5 "$OUT/$f.log"; fi
done
cat "$OUT/summary.txt"
