#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md, on one GPU, at the paper's sizes with random weights (bf16 frozen ViT-g
# and OPT-2.7B, 32 query + 32 text tokens):
#   stage1        stage 1 (ViT-g, Q-Former; ITC + ITM + ITG) at batch 128 (HF has no stage-1 training to compare)
#   stage2        stage-2 training at batch 64, beside transformers' Blip2ForConditionalGeneration
#   greedy, beam  captioning of 30 new tokens at batch 32, greedy and beam search with 5 beams, beside transformers
#   cudnn         stage 1 and stage 2 again with model.{vit,llm}.attention=cudnn (the fused kernels' gain)
# Each part also writes its profile (python -m blip2_jax.benchmark --profile): the top operations by device time
# and the shares of attention, matmuls, layer norms, collectives and copies, in OUT_DIR/<part>/profile.txt.
# Run from the repository root, with the package's dependencies importable (a GPU machine without a package index:
# fetch ml-collections, grain and tensorflow-datasets wheels with ../shared/tools/gpu-wheels.sh and install them as
# its header says, into PYTHONPATH):
#   bash launch/gpu_benchmark.sh [OUT_DIR] [PART ...]      # default: every part, in the order above
# Each part has its own timeout (all parts: at most 11 minutes, warm caches excluded; where one command may run
# 10 minutes, run two: `... OUT stage2 greedy beam`, then `... OUT stage1 cudnn`); a part that fails or times
# out is reported and the others still run. JAX and PyTorch share the GPU, so JAX must not preallocate it.
set -u
out=${1:-/tmp/blip2_bench}
shift || true
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(stage1 stage2 greedy beam cudnn)
mkdir -p "$out"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee "$out/commit.txt"

bench() {  # bench NAME TIMEOUT_S ARGS... : one benchmark run, its output in OUT_DIR/NAME.txt
  local name=$1 limit=$2
  shift 2
  mkdir -p "$out/$name"
  echo "=== $name: python -m blip2_jax.benchmark $*" | tee "$out/$name.txt"
  timeout "$limit" python3 -m blip2_jax.benchmark --profile="$out/$name" "$@" >>"$out/$name.txt" 2>&1
  local rc=$?
  [ $rc -ne 0 ] && echo "=== $name: exit status $rc (124 = timed out after $limit s)" | tee -a "$out/$name.txt"
  tail -45 "$out/$name.txt"
}

# The demo tokenizer: stage 1 needs a tokenizer, and nothing may be downloaded.
stage1=(--config=configs/stage1.py --config.global_batch_size=128 --config.tokenizer=demo --steps=10)
stage2=(--config=configs/stage2_opt.py --mode=train --config.global_batch_size=64 --config.data.max_text_len=32
  --steps=10)
captions=(--config=configs/stage2_opt.py --mode=generate --config.global_batch_size=32 --new_tokens=30 --steps=3)
cudnn=(--config.model.vit.attention=cudnn)
for part in "${parts[@]}"; do
  case $part in
    stage1) bench stage1 100 "${stage1[@]}" ;;
    stage2) bench stage2 150 "${stage2[@]}" --compare=transformers ;;
    greedy) bench greedy 110 "${captions[@]}" --compare=transformers ;;
    beam) bench beam 130 "${captions[@]}" --num_beams=5 --compare=transformers ;;
    cudnn)
      bench stage1_cudnn 90 "${stage1[@]}" "${cudnn[@]}"
      bench stage2_cudnn 90 "${stage2[@]}" "${cudnn[@]}" --config.model.llm.attention=cudnn
      ;;
    *) echo "unknown part $part: choose stage1 stage2 greedy beam cudnn" >&2 ;;
  esac
done
