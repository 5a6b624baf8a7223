# Sourced by the call scripts of a GPU session (bench/results/README.md, "Next GPU session").
# One device call runs one script: at most ~10 minutes, and what it writes under $OUT comes back.
#   DEVICE  (cuda)   the device of every command
#   LIMIT   (565)    seconds this call may take; a command that would overrun is cut to what is left, or skipped
#   SMOKE   (0)      1: a dry run on the CPU (tiny models, batches and budgets, torch.compile off) to test the script
#   ARCHIVE          CIFAR-10 archive (.gpu/cifar10-jpg.tar.gz, else ../shared/data/cifar10-jpg.tar.gz)
#   COMMIT           the code's commit, stored in the records (default: git rev-parse --short HEAD)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_session_out}; mkdir -p "$OUT"
SMOKE=${SMOKE:-0}; LIMIT=${LIMIT:-565}; DEVICE=${DEVICE:-cuda}
if [ "$SMOKE" = 1 ]; then DEVICE=cpu; export TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}; fi
ARCHIVE=${ARCHIVE:-.gpu/cifar10-jpg.tar.gz}; [ -f "$ARCHIVE" ] || ARCHIVE=../shared/data/cifar10-jpg.tar.gz
COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
NOTE="code: commit $COMMIT; GPU session of $(date -u +%Y-%m-%d)"
export DEVICE SMOKE ARCHIVE NOTE METHOD METHOD_ARGS
T0=$(date +%s)

left() { echo $(( LIMIT - ($(date +%s) - T0) )); }

# run SECONDS CMD...: CMD under `timeout`, cut to the time left (skipped under 20 s), with its start, rc and duration
run() {
  local t=$1; shift; local l; l=$(left)
  if [ "$l" -lt 20 ]; then echo "=== SKIPPED (time): $*"; return; fi
  [ "$t" -gt "$l" ] && t=$l
  echo "=== [$(( $(date +%s) - T0 )) s] $*"
  timeout "$t" bash -c '"$@"' _ "$@"; echo "=== rc $? after $(( $(date +%s) - T0 )) s"   # the helpers below are exported
}

# tiny stand-ins on the CPU dry run: ViT-B at 224 px -> the micro ViT at 32 px, 1 timed step of 8 images
step_args() {
  if [ "$SMOKE" = 1 ]; then
    local a; for a in "$@"; do [ "$a" = vit_b16_224 ] && a=vit_micro_p4_32; printf '%s\n' "$a"; done
    printf '%s\n' --steps 1 --warmup 1 --batch 8 --no-save
  else printf '%s\n' "$@"; fi
}
train_step() {
  local -a a; mapfile -t a < <(step_args "$@"; [ "$SMOKE" = 1 ] && printf '%s\n' --paired-rounds 1)
  python bench/train_step.py --device "$DEVICE" "${a[@]}"
}
profile_step() { local -a a; mapfile -t a < <(step_args "$@"); python bench/profile_step.py --device "$DEVICE" "${a[@]}"; }

# cifar10_table BUDGET LABEL [folk_nb_pretrain args...]: one run of $METHOD (moco) at a training-minute budget, then
# kNN and linear probe; LABEL goes into the records' `ablation` field (`target_run` when it starts with 'target:');
# METHOD_ARGS (JSON) is merged over the recipe's method arguments
cifar10_table() {
  local budget=$1 label=$2 method=${METHOD:-moco}; shift 2
  local field=ablation; case $label in target:*) field=target_run; label=${label#target:};; esac
  local dir; dir=$(printf '%s' "$label" | tr -c 'A-Za-z0-9.' '_' | cut -c1-48)
  local -a extra=(); [ "$SMOKE" = 1 ] && extra=(--smoke --batch-size 32); [ -n "$METHOD_ARGS" ] && extra+=(--method-args "$METHOD_ARGS")
  python bench/cifar10_table.py --device "$DEVICE" --methods "$method" --budget "$budget" "${extra[@]}" \
    --pretrain-args "$*" --archive "$ARCHIVE" --data-root /tmp/gpu_data --runs "/tmp/gpu_runs/$dir" \
    --results /tmp/gpu_res --logs /tmp/gpu_logs --record-field "$field=$label" --record-field "note=$NOTE"
}

export -f step_args train_step profile_step cifar10_table

# pack what the call appended or wrote, for the way back through $OUT
pack() {
  tar czf "$OUT/$1.tgz" bench/results/*.jsonl $( [ -d /tmp/gpu_res ] && echo -C /tmp gpu_res gpu_logs ) 2>/dev/null
  echo "=== $1 done after $(( $(date +%s) - T0 )) s; packed $OUT/$1.tgz"
}
