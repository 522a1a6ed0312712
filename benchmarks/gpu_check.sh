#!/usr/bin/env bash
# The GPU check: every CUDA path of the project in one command, for a machine with a CUDA GPU
# (meant to take under 8 minutes on one). It prints a table and exits non-zero if any check failed.
#
#   bash benchmarks/gpu_check.sh [DATA]      # DATA: a folder of class folders (../shared/flower_photos)
#   bash benchmarks/gpu_check.sh --dry-run   # no GPU: lists every command, and runs the checks that need
#                                            # none on a tiny generated folder (--device cpu), table included
#
# The checks, in order (each one's output goes to a log file, kept when a check fails):
#   cuda tests     python -m pytest -m cuda: the suite's tests marked @pytest.mark.cuda
#   train auto     python train.py --data-path DATA --epochs 2: the defaults (--amp auto: bf16 where the GPU
#                  has it natively, else fp16; channels-last)
#   train fp16, train off, train compile, train nchw
#                  the same with --amp fp16 (loss scaling), --amp off (fp32), --compile, --no-channels-last
#   resume         a run stopped by SIGTERM in the middle of an epoch (after its first --save-every save)
#                  and continued with --resume: it must start mid-epoch and finish
#   torchrun       torchrun --nproc-per-node 1 train.py: NCCL's collectives, the default EMA, an epoch's end
#   predict pth    predict.py on a photo of each class with the auto run's best.pth
#   predict onnx   export.py, then predict.py --device cuda on the .onnx file (with onnxruntime-gpu only)
#   eval-only      train.py --eval-only on DATA
#   app            app.py answering one request (with gradio only)
# Each training row also shows its last epoch's images/s (loading included), the images/s of the same
# step on a batch already on the GPU (gpu_check.py compute: "compute img/s"), and the most GPU memory
# the run allocated (torch.cuda.max_memory_allocated; for the compute-only step where the run has none).
set -u

usage() {
  echo "usage: bash benchmarks/gpu_check.sh [--dry-run] [DATA]   (DATA defaults to ../shared/flower_photos)"
}

DATA=../shared/flower_photos  # from the repository's folder
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    -h|--help) usage; exit 0 ;;
    -*) usage >&2; echo "error: unknown option $1" >&2; exit 2 ;;
    /*) DATA=$1 ;;
    *) DATA=$PWD/$1 ;;
  esac
  shift
done

cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX") || exit 2
ROWS=$WORK/rows.tsv
: > "$ROWS"
FAILED=0
LISTING=0
STARTED=$(date +%s)

GPU_DATA=$DATA
on_the_gpu() {  # the options of the checks on a GPU
  DATA=$GPU_DATA
  EPOCHS=2
  TRAIN=()
  DEVICE=(--device cuda)
  EVAL=(--device cuda)
  COMPUTE=(--device cuda)
}
on_the_cpu() {  # --dry-run's stand-ins: a tiny generated folder, the CPU in fp32, small crops, no loader workers
  DATA=$WORK/tiny
  EPOCHS=1
  TRAIN=(--image-size 32 --batch-size 4 --workers 0 --device cpu --amp off)
  DEVICE=(--device cpu)
  EVAL=(--device cpu --workers 0)
  COMPUTE=(--device cpu --amp off --image-size 32 --batch-size 4 --warmup 1 --steps 2)
}
if [ "$DRY" = 1 ]; then
  on_the_cpu
elif [ -d "$DATA" ]; then
  on_the_gpu
else
  echo "error: data folder $DATA does not exist: pass a folder of class folders (the flower photos)" >&2
  exit 2
fi

run() {  # a check's command: written down for the table, and run unless the check is only listed
  echo "$*" >> "$COMMANDS"
  if [ "$LISTING" = 0 ]; then
    "$@"
  fi
}

field() {  # field PATTERN FILE: the last match in FILE of the sed pattern's group, or "-"
  local found
  found=$(sed -n -E "s/$1/\1/p" "$2" | tail -n 1)
  echo "${found:--}"
}

# check NAME GPU_ONLY COMPUTE_ARGS -- FUNCTION ARGS...: run the function (whose commands go through
# run) with its output in $WORK/NAME.log, and add the check's row. GPU_ONLY=1: --dry-run lists its
# commands only. COMPUTE_ARGS, for a training row: the gpu_check.py compute options of its step ("-": none).
check() {
  local name=$1 gpu_only=$2 compute=$3
  shift 4
  local log="$WORK/${name// /-}.log" started code result speed="-" compute_speed="-" memory="-"
  COMMANDS="$log.commands"
  : > "$COMMANDS"
  if [ "$DRY" = 1 ] && [ "$gpu_only" = 1 ]; then  # its commands as a GPU run would run them
    on_the_gpu
    LISTING=1
    "$@" > /dev/null 2>&1
    LISTING=0
    on_the_cpu
    result=listed
    seconds=-
  else
    echo "running: $name"
    started=$(date +%s)
    "$@" > "$log" 2>&1
    code=$?
    seconds=$(( $(date +%s) - started ))
    if [ $code = 0 ]; then result=ok; else result="FAILED (exit $code)"; FAILED=1; fi
    if grep -q "^skipped:" "$log"; then result=skipped; fi
    if [ "$compute" != "-" ]; then
      speed=$(field '.*\[epoch [0-9]+\].* ([0-9.]+) img\/s.*' "$log")
      memory=$(field '.*GPU ([0-9.]+) GiB.*' "$log")
      # shellcheck disable=SC2086  # the compute options are separate words
      if "$PY" benchmarks/gpu_check.py compute "${COMPUTE[@]}" $compute > "$log.compute" 2>&1; then
        compute_speed=$(field '.*"images_per_s": ([0-9.]+).*' "$log.compute")
      else
        compute_speed=FAILED
        FAILED=1
      fi
    fi
    if [ $code != 0 ]; then
      tail -n 5 "$log" | sed "s/^/  $name: /"
    fi
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$result" "$seconds" "$speed" "$compute_speed" "$memory" \
    "$(paste -s -d ';' "$COMMANDS" | sed 's/;/; /g')" >> "$ROWS"
}

train() {  # train OUT ARGS...: train.py on DATA, its files in $WORK/OUT
  local out=$1
  shift
  run "$PY" train.py --data-path "$DATA" --output-dir "$WORK/$out" --class-indices "$WORK/$out/ci.json" \
    --epochs "$EPOCHS" "${TRAIN[@]}" "$@"
}

resume_mid_epoch() {  # stopped by SIGTERM in the middle of an epoch, after its first save; then resumed
  local out=$WORK/resume pid waited=0 code
  local first=("$PY" train.py --data-path "$DATA" --output-dir "$out" --class-indices "$out/ci.json"
               --epochs "$EPOCHS" "${TRAIN[@]}" --save-every 10)
  echo "${first[*]} & then kill -TERM it once it has saved $out/last.pth" >> "$COMMANDS"
  if [ "$LISTING" = 0 ]; then
    "${first[@]}" &
    pid=$!
    while [ ! -f "$out/last.pth" ] && kill -0 $pid 2>/dev/null && [ $waited -lt 1500 ]; do
      sleep 0.2
      waited=$((waited + 1))
    done
    kill -TERM $pid 2>/dev/null
    wait $pid
    code=$?
    if [ $code != 143 ]; then  # 128 + SIGTERM: stopped at the end of a step, last.pth saved
      echo "error: the run to stop ended with exit code $code, not 143 (stopped by SIGTERM)"
      return 1
    fi
  fi
  run "$PY" train.py --resume "$out/last.pth" || return 1
  # this function's output is the check's log: the resumed run's first line says where it starts
  if [ "$LISTING" = 0 ] && ! grep -Eq "^resuming .*step [1-9]" "$WORK/resume.log"; then
    echo "error: the run did not resume in the middle of an epoch"
    return 1
  fi
}

torchrun_one() {
  run "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 train.py --data-path "$DATA" \
    --output-dir "$WORK/torchrun" --class-indices "$WORK/torchrun/ci.json" --epochs 1 "${TRAIN[@]}"
}

some_photos() {  # a photo of each class of DATA (listed as a pattern where DATA is not here)
  if [ "$LISTING" = 1 ] && [ ! -d "$DATA" ]; then
    echo "$DATA/CLASS/PHOTO"
    return
  fi
  find "$DATA" -mindepth 2 -maxdepth 3 -type f \( -iname '*.jpg' -o -iname '*.jpeg' -o -iname '*.png' \) \
    | sort | awk -F/ '!seen[$(NF-1)]++'
}

predict_pth() {
  # shellcheck disable=SC2046  # one argument per photo
  run "$PY" predict.py $(some_photos) --weights "$WORK/auto/best.pth" "${DEVICE[@]}"
}

predict_onnx() {
  if [ "$LISTING" = 0 ] && ! "$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())"
  then
    echo "skipped: this onnxruntime has no CUDA provider (pip install onnxruntime-gpu)"
    return 0
  fi
  run "$PY" export.py --weights "$WORK/auto/best.pth" --output "$WORK/auto/model.onnx" || return 1
  # shellcheck disable=SC2046
  run "$PY" predict.py $(some_photos) --weights "$WORK/auto/model.onnx" --device cuda
}

eval_only() {
  run "$PY" train.py --eval-only --weights "$WORK/auto/best.pth" --data-path "$DATA" --output-dir "$WORK/eval" \
    "${EVAL[@]}"
}

app_request() {
  if [ "$LISTING" = 0 ] && ! "$PY" -c "import gradio, gradio_client" 2>/dev/null; then
    echo "skipped: app.py needs gradio and gradio_client (requirements-dev.txt)"
    return 0
  fi
  run "$PY" benchmarks/gpu_check.py app --weights "$WORK/auto/best.pth" --image "$(some_photos | head -n 1)" \
    "${DEVICE[@]}"
}

if [ "$DRY" = 1 ]; then
  check "tiny data" 0 - -- run "$PY" benchmarks/gpu_check.py tiny-data "$DATA"
fi
check "cuda tests" 1 - -- run "$PY" -m pytest -m cuda -q -p no:cacheprovider
check "train auto" 0 "" -- train auto
check "train fp16" 1 "--amp fp16" -- train fp16 --amp fp16
check "train off" 1 "--amp off" -- train off --amp off
check "train compile" 1 "--compile" -- train compile --compile
check "train nchw" 1 "--no-channels-last" -- train nchw --no-channels-last
check "resume" 1 - -- resume_mid_epoch
check "torchrun" 1 - -- torchrun_one
check "predict pth" 0 - -- predict_pth
check "predict onnx" 1 - -- predict_onnx
check "eval-only" 0 - -- eval_only
check "app" 1 - -- app_request

if [ "$DRY" = 1 ]; then
  where="dry run: the CPU, a tiny generated folder"
else
  where=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
fi
echo
echo "GPU check of $DATA (${where:-no GPU name}), $(( $(date +%s) - STARTED )) s:"
"$PY" benchmarks/gpu_check.py table "$ROWS" || FAILED=1
if [ $FAILED = 0 ]; then
  rm -rf "$WORK"
  echo "all checks passed"
else
  echo "some checks FAILED: their logs are in $WORK"
fi
exit $FAILED
