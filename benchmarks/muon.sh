#!/usr/bin/env bash
# Muon (the default recipe, configs/gpt-cpu.yaml: 450 steps) against AdamW (the previous default: 700 steps), each in
# a fresh process, alternating so the machine's drift falls on both: time from process start to val loss 1.88, and
# the final exact val loss. Then each at the other's step count, and AdamW at Muon's wall time. About 4 minutes on
# 2 cores.
#
#     bash benchmarks/muon.sh PATH/TO/tinyshakespeare/input.txt
set -u
data=$1

run() {
    echo "== $1"
    shift
    python "$(dirname "$0")/time_to_loss.py" --config "$(dirname "$0")/../configs/gpt-cpu.yaml" --target 1.88 \
        --data.path "$data" "$@" 2>/dev/null | grep -E "^(reached|did not|final|total)"
}

adamw=(--model.optimizer adamw)
for repeat in 1 2 3; do
    run "Muon (the default), 450 steps, repeat $repeat"
    run "AdamW, 700 steps (the previous default), repeat $repeat" "${adamw[@]}" --trainer.max_steps 700 \
        --trainer.val_check_interval 350
done
run "Muon, 700 steps" --trainer.max_steps 700 --trainer.val_check_interval 350
run "AdamW, 450 steps" "${adamw[@]}"
run "AdamW, 490 steps (Muon's wall time: a Muon step costs about 1.08 AdamW steps)" "${adamw[@]}" \
    --trainer.max_steps 490 --trainer.val_check_interval 245
