#!/usr/bin/env bash
# Every GPU benchmark of the README, in order, on one CUDA machine; each table is written as text and JSON.
#
#   bash benchmarks/gpu_all.sh [--out DIR] [--dry-run] [STEP ...]
#
# STEPs, in order (default: all of them, about 30 minutes on one H100). Estimates from measured H100 rates
# (stage 1 baseline 10.5 samples/s at batch 32, stage 2 LoRA 3.1 samples/s at batch 16, eval 3.1 questions/s
# batched), the baseline being the slowest path, plus ~15 s to build each path's model. The baseline is the
# plain way at the issue's settings (one forward pass per batch, activation checkpointing to fit it);
# medllava's paths run the micro-batch of its stage configs without checkpointing, accumulating to the batch:
#   align  stage 1, llava-7b shape, batch 32 (medllava: 4 x 8): baseline, sparse, cached, packed-flex
#          (packed under flex attention), packed-flex-compiled (and each decoder layer compiled), the
#          same at 2 x 16 (compiled layers may hold fewer activations; halved again if 16 do not fit);
#          6 steps x 32 / 10.5 = 18 s a path, + compilation                              (~6 min)
#   lora   stage 2 with LoRA (llava_med_lora.yaml), batch 16 (medllava: 4 x 4): baseline, sparse,
#          packed-flex, packed-flex at 2 x 8 (without checkpointing: does 8 fit now that the adapters keep
#          a mask instead of a copy of their input?), packed-flex-compiled, the same at 2 x 8;
#          6 steps x 16 / 3.1 = 31 s a path, + compilation                               (~6 min)
#   qlora  stage 2 QLoRA (llava_med_qlora.yaml: batch 8, activation checkpointing on every path) on a random
#          7B checkpoint loaded in 4-bit for each of baseline, sparse, grouped          (~3 min, + ~2 min
#          to write the checkpoint once)
#   eval   batched generation (batches of 64, 32 new tokens) on 451 questions against one question at a time,
#          timed on the first 32, random 7B checkpoint                                  (~3 min)
#   data   the stage-1 input pipeline on this machine's CPU cores (demo images), 0, 2, 4 and 8 dataloader
#          workers against the GPU's stage-1 appetite (benchmarks/bench_data.py)             (~1 min)
#   memory one 7B decoder layer with rank-128 adapters at 4096 tokens: activation memory kept for backward,
#          peak and time, PEFT's adapters against medllava's (benchmarks/bench_lora_memory.py)  (~1 min)
#   adapt  a real `medllava adapt` with llava_med_lora.yaml as shipped (compiled layers, packed under flex,
#          gradient_checkpointing auto) from the random 7B checkpoint, on the demo conversations (9 examples,
#          40 epochs of stage 1 and 30 of stage 2, vicuna_v1 in both: plain takes one round): the whole
#          command, its memory probe and its wait for data. Needs `datasets` on the machine (its wheels may be
#          carried in .wheels/). Run again after a timeout: a finished stage is not redone (~6-9 min)
# Full stage 2 of a 7B model does not fit one 80 GB card (bf16 weights and gradients and AdamW's float32
# states alone take ~84 GB): benchmarks/zero3_memory.py gives its per-GPU memory under ZeRO-3.
# Where one command may run 10 minutes at most, run one step per call: `align`, `lora`, `data memory`,
# `qlora eval`, then `adapt`.
#
# Tables go to --out DIR, else $OUT, else runs/bench-gpu (relative paths are from the repository root):
# STEP.txt (what was printed), STEP.json (the figures and their settings), STEP.log (warnings), summary.txt
# (each step's exit status and seconds) and environment.txt (GPU, driver, package versions). The random 7B
# checkpoint is written once to $CHECKPOINT (default runs/bench-7b-random, ~14 GB). Wheels carried in
# .wheels/ (bitsandbytes, for QLoRA) are installed first, each on its own, without a package index.
# --dry-run prints every command instead of running it.
# Each path trains --steps optimizer steps, the first 2 untimed; every command is bounded by `timeout`.

set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR="${OUT:-runs/bench-gpu}"
DRY_RUN=0
STEPS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) OUT_DIR="${2:?gpu_all.sh: --out needs a folder}"; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        align|lora|qlora|eval|data|memory|adapt) STEPS+=("$1"); shift ;;
        *) echo "gpu_all.sh: unknown argument '$1' (steps: align lora qlora eval data memory adapt;" \
                "options: --out DIR, --dry-run)" >&2
           exit 2 ;;
    esac
done
[[ ${#STEPS[@]} -eq 0 ]] && STEPS=(align lora qlora eval data memory adapt)
PY="${PYTHON:-$(command -v python || command -v python3)}"
CHECKPOINT="${CHECKPOINT:-runs/bench-7b-random}"
TRAIN=("$PY" benchmarks/bench_train.py --model llava-7b --device cuda --dtype bfloat16)
FAILED=0

# run_step NAME SECONDS COMMAND...: run COMMAND for at most SECONDS; its output to NAME.txt, warnings to NAME.log.
run_step() {
    local name=$1 limit=$2
    shift 2
    if [[ $DRY_RUN == 1 ]]; then
        echo "$name: timeout $limit $(printf '%q ' "$@")"
        return 0
    fi
    local start=$SECONDS
    echo "== $name (at most $limit s): $*"
    timeout "$limit" "$@" 2>"$OUT_DIR/$name.log" | tee "$OUT_DIR/$name.txt"
    local rc=${PIPESTATUS[0]}
    [[ $rc == 124 ]] && echo "$name: stopped after $limit s" | tee -a "$OUT_DIR/$name.txt"
    [[ $rc != 0 ]] && FAILED=$((FAILED + 1)) && tail -n 3 "$OUT_DIR/$name.log"
    echo "$(date -u +%FT%TZ) $name exit $rc after $((SECONDS - start)) s" >>"$OUT_DIR/summary.txt"
}

install_wheels() {
    local wheel
    for wheel in .wheels/*.whl; do
        [[ -e $wheel ]] || continue  # the glob matched nothing: no wheels carried
        run_step "install-$(basename "$wheel" .whl)" 300 "$PY" -m pip install --no-index --no-deps "$wheel"
    done
}

record_environment() {
    if [[ $DRY_RUN == 1 ]]; then
        echo "environment: nvidia-smi and package versions to $OUT_DIR/environment.txt"
        return 0
    fi
    { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
      "$PY" -c 'import importlib.metadata as m, platform
print("python", platform.python_version())
for p in ("torch", "transformers", "peft", "accelerate", "bitsandbytes"):
    try: print(p, m.version(p))
    except m.PackageNotFoundError: print(p, "not installed")'
    } >"$OUT_DIR/environment.txt" 2>&1
}

ensure_checkpoint() {
    if [[ $DRY_RUN == 1 || ! -f $CHECKPOINT/config.json ]]; then
        run_step write-random-7b 300 "$PY" benchmarks/bench_eval.py --write-random-7b "$CHECKPOINT" --device cuda
    fi
}

[[ $DRY_RUN == 1 ]] || mkdir -p "$OUT_DIR"
install_wheels
record_environment
for step in "${STEPS[@]}"; do
    case "$step" in
        align) run_step align 480 "${TRAIN[@]}" --stage align --batch 32 --micro-batch 8 --steps 6 --compile \
                   --baseline-checkpointing \
                   --paths baseline,sparse,cached,packed-flex,packed-flex-compiled,packed-flex-compiled@16 \
                   --json "$OUT_DIR/align.json" ;;
        lora) run_step lora 500 "${TRAIN[@]}" --stage instruct-lora --batch 16 --micro-batch 4 --steps 6 --compile \
                  --baseline-checkpointing \
                  --paths baseline,sparse,packed-flex,packed-flex@8,packed-flex-compiled,packed-flex-compiled@8 \
                  --json "$OUT_DIR/lora.json" ;;
        qlora) ensure_checkpoint
               run_step qlora 280 "$PY" benchmarks/bench_train.py --model "$CHECKPOINT" --device cuda --dtype bfloat16 \
                   --stage instruct-qlora --batch 8 --steps 6 --gradient-checkpointing \
                   --paths baseline,sparse,grouped --json "$OUT_DIR/qlora.json" ;;
        eval) ensure_checkpoint
              run_step eval 240 "$PY" benchmarks/bench_eval.py --model "$CHECKPOINT" --device cuda --dtype bfloat16 \
                  --questions 451 --batch-size 64 --max-new-tokens 32 --single-questions 32 --json "$OUT_DIR/eval.json" ;;
        data) run_step data 120 "$PY" benchmarks/bench_data.py --examples 512 --workers 0,2,4,8 \
                  --json "$OUT_DIR/data.json" ;;
        memory) run_step memory 180 "$PY" benchmarks/bench_lora_memory.py --device cuda --tokens 4096 --repeats 20 \
                    --json "$OUT_DIR/memory.json" ;;
        adapt) ensure_checkpoint
               demo=medllava/assets/demo
               run_step adapt 560 "$PY" -m medllava.cli adapt --config finetune/configs/llava_med_lora.yaml \
                   run_dir=runs/bench-adapt model.name_or_path="$CHECKPOINT" "report_to=[none]" \
                   align.data.path=$demo/conversations.jsonl align.data.image_root=$demo/images \
                   align.data.template=vicuna_v1 align.epochs=40 align.global_batch_size=32 \
                   instruct.data.path=$demo/conversations.jsonl instruct.data.image_root=$demo/images \
                   instruct.epochs=30 instruct.global_batch_size=16
               for stage in align instruct; do  # each stage's record: steps, probe, wait for data
                   [[ -f runs/bench-adapt/$stage/stage_complete.json ]] &&
                       cp runs/bench-adapt/$stage/stage_complete.json "$OUT_DIR/adapt_$stage.json"
               done ;;
    esac
done
[[ $DRY_RUN == 1 ]] || { echo "== summary ($OUT_DIR)"; cat "$OUT_DIR/summary.txt"; }
exit "$FAILED"
