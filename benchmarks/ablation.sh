#!/usr/bin/env bash
# From nanoGPT's CPU recipe to charlm's default, one change at a time: time to val/loss 1.88 for each step of the
# way, measured back to back by time_to_loss.py (each in a fresh process). Takes about 8 minutes on 2 cores.
#
#     bash benchmarks/ablation.sh PATH/TO/tinyshakespeare/input.txt
set -u
data=$1
nanogpt=(--model.net.init_args.n_layer 4 --model.net.init_args.n_embd 128 --model.net.init_args.pos_emb learned
         --data.batch_size 12 --model.lr 1e-3 --model.min_lr 1e-4 --model.beta2 0.99 --trainer.max_steps 2000
         --trainer.val_check_interval 250)
small=(--model.net.init_args.n_layer 2 --model.net.init_args.n_embd 64)

run() {
    echo "== $1"
    shift
    python "$(dirname "$0")/time_to_loss.py" --config "$(dirname "$0")/../configs/gpt-cpu.yaml" --target 1.88 \
        --data.path "$data" "$@" 2>/dev/null | grep -E "^(reached|did not|final|total)"
}

run "nanoGPT's CPU recipe: 4 layers, 128 wide, learned positions, batch 12, lr 1e-3, 2000 steps" "${nanogpt[@]}"
run "+ 2 layers, 64 wide" "${nanogpt[@]}" "${small[@]}"
run "+ batch 32, 700 steps, validation every 350" "${nanogpt[@]}" "${small[@]}" --data.batch_size 32 \
    --trainer.max_steps 700 --trainer.val_check_interval 350
run "+ lr 1e-2 (min 1e-3)" "${nanogpt[@]}" "${small[@]}" --data.batch_size 32 --trainer.max_steps 700 \
    --trainer.val_check_interval 350 --model.lr 1e-2 --model.min_lr 1e-3
run "+ beta2 0.95" "${nanogpt[@]}" "${small[@]}" --data.batch_size 32 --trainer.max_steps 700 \
    --trainer.val_check_interval 350 --model.lr 1e-2 --model.min_lr 1e-3 --model.beta2 0.95
run "+ rotary positions: charlm's default recipe (configs/gpt-cpu.yaml)"
run "default, but learned positions" --model.net.init_args.pos_emb learned
run "default, but beta2 0.99" --model.beta2 0.99
run "default, but logging every step" --trainer.log_every_n_steps 1
run "default, but validating every 100 steps" --trainer.val_check_interval 100
run "default, run longer: 3000 steps" --trainer.max_steps 3000 --trainer.val_check_interval 500
