#!/usr/bin/env bash
# Muon against AdamW on the default CPU recipe (configs/gpt-cpu.yaml), each in a fresh process, alternating so the
# machine's drift falls on both: time from process start to val loss 1.88, and the final exact val loss. Then two Muon
# learning rates, and Muon cut to the steps that fit AdamW's wall time. About 5 minutes on 2 cores.
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

for repeat in 1 2; do
    run "AdamW (the default), 700 steps, repeat $repeat"
    run "Muon lr 0.02 on the blocks' matrices, AdamW on the rest, 700 steps, repeat $repeat" --model.optimizer muon
done
run "Muon lr 0.05, 700 steps" --model.optimizer muon --model.muon_lr 0.05
run "Muon lr 0.01, 700 steps" --model.optimizer muon --model.muon_lr 0.01
for repeat in 1 2; do  # Muon's steps cost more on a CPU: at AdamW's wall time it has about 480 of them
    run "AdamW, 700 steps, repeat $repeat"
    run "Muon, 480 steps, repeat $repeat" --model.optimizer muon --trainer.max_steps 480 --trainer.val_check_interval 240
done
