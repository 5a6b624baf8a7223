#!/bin/bash
# GPU call 2 or 3 (~9.5 min): one MoCo run on CIFAR-10 at a training-minute budget, then kNN and linear probe.
#   bash bench/gpu_session/call2_moco.sh BUDGET LABEL [folk_nb_pretrain args...]
# LABEL is stored in every record (`ablation`; `target_run` when it starts with 'target:'). The reference recipe of
# the official MoCo CIFAR-10 demo (kNN 0.826 at 200 epochs, asymmetric loss) differs from ours in six written-down
# settings, all options of folk_nb_pretrain:
#   --crop-scale 0.08 --lr 0.06 --clip-grad 0 --warmup-steps 0 --weight-decay-on all --method-args '{..., "bn_splits": 8}'
# e.g. the target run with that recipe, CUDA graphs on (call 1 says whether they pay):
#   METHOD_ARGS='{"bn_splits": 8}' bash bench/gpu_session/call2_moco.sh 8 \
#        'target:MoCo v2 ResNet-18 kNN >= 0.80 within 10 H100-minutes (issue #6), demo recipe' \
#        --crop-scale 0.08 --lr 0.06 --clip-grad 0 --warmup-steps 0 --weight-decay-on all --compile reduce-overhead
# (METHOD_ARGS is merged over bench/cifar10_table.py's MOCO method arguments.)
LIMIT=${LIMIT:-585}
source "$(dirname "$0")/common.sh"
budget=$1 label=$2; shift 2
[ -n "$label" ] || { echo "usage: $0 BUDGET LABEL [folk_nb_pretrain args...]" >&2; exit 2; }
name=$(printf '%s' "${label#target:}" | tr -c 'A-Za-z0-9.' '_' | cut -c1-48)
{
echo "$NOTE"
run "$LIMIT" cifar10_table "$budget" "$label" "$@"
} 2>&1 | tee "$OUT/moco_$name.log"
pack "moco_$name"
