#!/bin/bash
# GPU call 1 (~9.5 min): the GPU-only tests, then where CUDA graphs and compiled steps stand on the host-bound steps.
#   MoCo ResNet-18 at 32 px: eager and with CUDA graphs; split BN (bn_splits 8) with CUDA graphs;
#   SaliencyMoCo 'warped_key' (hard negatives off, paired with plain MoCo), eager with the masking fused, and with
#   CUDA graphs: the "< 10%" target;
#   MAE / FAMT ViT-B/16 mid-schedule with CUDA graphs: the "FAMT >= 1.5x MAE" target.
# Usage (repository root): bash bench/gpu_session/call1_steps.sh     (SMOKE=1: dry run on the CPU)
source "$(dirname "$0")/common.sh"
export TORCH_LOGS=${TORCH_LOGS-cudagraphs}   # a graph that runs without CUDA graphs says why (rows: cuda_graph_skips)
{
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"; echo "$NOTE"
[ "$DEVICE" = cuda ] && run 90 python -m pytest tests/test_data.py tests/test_frequency.py \
  tests/test_saliency.py -k "stream_sync or cuda_masks_follow or cuda_matches_cpu"   # the tests CI (no GPU) skips
R18=(--models resnet18_32 --steps 20 --warmup 5)
run 45 train_step "${R18[@]}" --methods moco
run 90 train_step "${R18[@]}" --methods moco --compile reduce-overhead
run 90 train_step "${R18[@]}" --methods moco --compile reduce-overhead --method-kwargs '{"bn_splits": 8}'
SAL=(--models resnet18_32 --steps 10 --warmup 5 --methods saliency_moco --method-kwargs '{"hard_negative": false, "saliency": "warped_key"}')
run 90 train_step "${SAL[@]}"                                 # eager step, the masking fused (its default on CUDA)
run 150 train_step "${SAL[@]}" --compile reduce-overhead
run 240 train_step --models vit_b16_224 --methods mae,famt --at 0.5 --steps 10 --warmup 3 --compile reduce-overhead
} 2>&1 | tee "$OUT/call1_steps.log"
pack call1_steps
