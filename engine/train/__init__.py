"""Draft-head training: self-distillation data, target features, the EAGLE loss, export.

One command runs every stage and resumes where it stopped:

    python -m engine.train --prompts ../shared/data/train_prompts/prompts.jsonl --run runs/smollm2 \
        --export assets/heads/smollm2-135m-instruct

Stages (each writes small files under --run, so a killed job loses at most one shard or one
checkpoint interval):
  1. data:     prompts -> the target's own answers through its chat template (batched; greedy, and
               sampled at each extra --temperatures value), and the target's final-norm hidden states
               for every token, in safetensors shards.
  2. fit:      the EAGLE loss: SmoothL1(predicted next feature, true next feature)
               + ce_weight * cross-entropy against the target's next-token distribution, with uniform
               noise on input features; AdamW, warm-up + cosine schedule, a held-out split. With
               --unroll S, S draft steps per position, later ones fed the head's own predictions.
               --init fine-tunes an existing head instead of a fresh one.
  3. export:   the official EAGLE layout (config.json + model.safetensors) plus a card (README.md).
Benchmark questions must never be used here; `--prompts` refuses files from a benchmarks folder.

Files: data.py (prompts and answers), features.py (the target's features and the shard files),
vocab.py (the draft vocabulary), fit.py (the loss and the training loop), export.py (layout and card),
clock.py (the time budgets' clock), cli.py (the command).
"""
