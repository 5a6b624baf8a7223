#!/bin/bash
# GPU call 3 or 4 (~9.5 min): what is left after calls 1 and 2 (bench/results/README.md, "Next GPU session"):
#   1. MAE / FAMT ViT-B/16 mid-schedule with CUDA graphs, profiled, with a Chrome trace of each (4 profiled steps):
#      what keeps FAMT from 1.5x MAE once the launches are gone; the trace shows where the host waits;
#   2. the resident loader's host syncs and where they happen (bench/loader.py, `sync_sources`);
#   3. image folders, colour in 8 workers vs on the GPU (bench/folder_loader.py: `color_on_device`);
#   4. MFM / FOLK ViT-B/16 at batch 256, compiled with max-autotune-no-cudagraphs (the MFU targets: 50% / 45%).
# Usage (repository root): bash bench/gpu_session/call3_rest.sh     (SMOKE=1: dry run on the CPU)
source "$(dirname "$0")/common.sh"
TRACES=/tmp/gpu_traces
small() { [ "$SMOKE" = 1 ] && printf '%s\n' "$@"; }   # extra arguments on the CPU dry run only
export -f small
loader_bench() { local -a a; mapfile -t a < <(small --batch 8 --batches 1 --no-save); python bench/loader.py --device "$DEVICE" --recipes moco,folk "${a[@]}"; }
folder_bench() {
  local -a a=(--workers 8 --images 1024 --batch 128)
  [ "$SMOKE" = 1 ] && a=(--workers 0 --images 8 --batch 4 --size 32 --recipes moco --no-save)
  python bench/folder_loader.py --device "$DEVICE" "${a[@]}"
}
export -f loader_bench folder_bench
{
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
echo "$NOTE"
run 240 profile_step --models vit_b16_224 --methods mae,famt --at 0.5 --steps 4 --warmup 3 --compile reduce-overhead --trace "$TRACES"
run 60 loader_bench
run 120 folder_bench
run 200 train_step --models vit_b16_224 --methods mfm,folk --batch 256 --steps 10 --warmup 3 --compile max-autotune-no-cudagraphs
} 2>&1 | tee "$OUT/call3_rest.log"
[ -d "$TRACES" ] && tar czf "$OUT/call3_traces.tgz" -C /tmp gpu_traces && ls -l "$OUT/call3_traces.tgz"  # must stay under 16 MiB
pack call3_rest
