#!/usr/bin/env bash
# Issue 16's GPU checks in one device call (about 6 minutes on an H100/H200; results in $OUT, 8 files):
#   mkdir -p data/fmnist && cp /usr/share/datasets/fashion-mnist/*.gz data/fmnist/   # here, once (data/ is ignored)
#   device run: command "bash results/gpu/run.sh", carry ["data/fmnist"], timeout_s 540
# 1. bench.py --compile --json on CUDA; 2. the test suite on CUDA; 3. one timed epoch of the 4 x 128
# noise-padded Fashion-MNIST model per layer (batch 64, --amp auto = bf16); 4. a bf16 run stopped by
# --max-steps and resumed. Each step has its own time limit, so one that hangs cannot starve the rest.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
data=(--dataset fashion-mnist --data-dir data/fmnist)
{ git log -1 --oneline 2>/dev/null || echo "no git metadata"; nvidia-smi -L; python -c "import torch; print(torch.__version__)"; } > "$OUT/pytest_cuda.txt" 2>&1
timeout 240 python bench.py --compile --json "$OUT/bench_cuda.json" > "$OUT/bench_cuda.txt" 2>&1
timeout 120 python -m pytest -q -rs >> "$OUT/pytest_cuda.txt" 2>&1
for model in hope s4d; do
    rm -rf "/tmp/epoch-$model"
    timeout 120 python train_scifar.py --model "$model" "${data[@]}" --epochs 1 --out "/tmp/epoch-$model" > "$OUT/epoch_$model.txt" 2>&1
    cp "/tmp/epoch-$model/metrics.jsonl" "$OUT/epoch_${model}_metrics.jsonl"
done
rm -rf /tmp/resume
{ timeout 60 python train_scifar.py --model hope "${data[@]}" --amp bf16 --epochs 2 --max-steps 100 --out /tmp/resume &&
  timeout 60 python train_scifar.py --model hope "${data[@]}" --amp bf16 --epochs 2 --max-steps 200 --out /tmp/resume --resume &&
  python -c "import json; print(json.load(open('/tmp/resume/config.json'))['resumes'])"; } > "$OUT/resume.txt" 2>&1
echo "done: $(ls "$OUT" | tr '\n' ' ')"
