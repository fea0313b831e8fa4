#!/usr/bin/env bash
# The README's GPU figures, on one GPU: stage-1 and stage-2 training throughput and greedy captioning, the last
# two beside transformers' PyTorch BLIP-2 at the same configuration (random weights, bf16 frozen ViT-g and
# OPT-2.7B, 32 query + 32 text tokens). Run from the repository root:
#   bash launch/gpu_benchmark.sh [OUT_DIR]
# JAX and PyTorch share the GPU, so JAX must not preallocate it.
set -u
out=${1:-/tmp/blip2_bench}
mkdir -p "$out"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
b=(python3 -m blip2_jax.benchmark)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
timeout 240 "${b[@]}" --config=configs/stage2_opt.py --mode=generate --config.global_batch_size=32 --new_tokens=30 \
    --steps=3 --compare=transformers 2>&1 | tail -40 | tee "$out/generate.txt"
timeout 220 "${b[@]}" --config=configs/stage2_opt.py --mode=train --config.global_batch_size=64 \
    --config.data.max_text_len=32 --steps=10 --compare=transformers 2>&1 | tail -40 | tee "$out/stage2_train.txt"
# Stage 1 has no transformers counterpart (HF has no BLIP-2 stage-1 training); the demo tokenizer avoids a download.
timeout 120 "${b[@]}" --config=configs/stage1.py --config.global_batch_size=128 --config.tokenizer=demo \
    --steps=10 2>&1 | tail -30 | tee "$out/stage1_train.txt"
