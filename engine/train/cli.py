"""`python -m engine.train`: every stage in one resumable command (see engine/train/__init__.py)."""

import argparse
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch

from engine.cli import add_engine_arguments, model_spec
from engine.train.data import DataConfig, generate_data, read_prompts
from engine.train.export import export
from engine.train.features import load_sequences
from engine.train.fit import FitConfig, fit
from engine.train.vocab import answer_token_counts, draft_vocabulary, vocabulary_coverage

FLAG_HELP = {
    "temperatures": "answer every prompt once per temperature, e.g. 0,1 (0: greedy; sampled answers widen the "
    "contexts the head sees to those of sampled decoding)",
    "data_minutes": "time budget of the data stage: no shard starts that would end past it (0: none)",
    "feature_batch_tokens": "tokens per target forward when storing features (raise it on a GPU)",
    "unroll": "draft steps trained per position; steps after the first read the head's own predicted features, "
    "as drafting does (HASS / EAGLE-3 style)",
    "fit_minutes": "stop training after this many minutes, keeping the best checkpoint (0: none); the learning-rate "
    "schedule still spans --steps, so size --steps to the time",
    "limit": "prompts to answer (0: answer none and train on the run's shards)",
    "recipe": "eagle1 (EAGLE-1/2 head: feature regression + cross-entropy) or eagle3 (EAGLE-3 head: three fused "
    "target layers, loss 0.8^step over --unroll draft steps; use --unroll 7 as the paper does, fewer on a CPU)",
}


def main(argv=None) -> None:
    from engine.checkpoint import load_head
    from engine.models import load_target

    p = argparse.ArgumentParser(
        prog="python -m engine.train", description="Train an EAGLE draft head for a target model (resumable)."
    )
    p.add_argument("--prompts", required=True, help="jsonl with a 'prompt' field per line (never benchmark questions)")
    p.add_argument("--run", required=True, type=Path, help="working folder for data shards and checkpoints")
    p.add_argument("--export", type=Path, help="write the trained head here (official EAGLE layout + card)")
    add_engine_arguments(p, head=False)  # the head is the one being trained (--init, --export)
    p.add_argument(
        "--max-source-share", type=float, default=1.0,
        help="cap each prompt source (the jsonl 'source' field) at this share of the prompts, e.g. 0.25; "
        "default 1 (no cap)",
    )
    p.add_argument(
        "--sources", default="",
        help="comma-separated prefixes of the jsonl 'source' field to keep, e.g. self-instruct (default: all)",
    )
    p.add_argument(
        "--draft-vocab", type=int, default=8192,
        help="draft only the N most frequent answer tokens (0: full vocabulary)",
    )
    p.add_argument(
        "--init", type=Path, default=None, metavar="HEAD",
        help="fine-tune this head (official EAGLE layout) instead of training a fresh one; keeps its draft vocabulary",
    )
    for name, cfg_cls in (("data", DataConfig), ("fit", FitConfig)):
        for k, v in asdict(cfg_cls()).items():
            flag = f"--{k.replace('_', '-')}"
            help_ = f"{name}: {FLAG_HELP[k] + '; ' if k in FLAG_HELP else ''}default {v}"
            if isinstance(v, bool):
                p.add_argument(flag, action=argparse.BooleanOptionalAction, default=v, help=help_)
            else:
                p.add_argument(flag, type=type(v), default=v, help=help_)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data_cfg = DataConfig(**{k: getattr(args, k) for k in asdict(DataConfig())})
    fit_cfg = FitConfig(**{k: getattr(args, k) for k in asdict(FitConfig())})
    args.run.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_target(model_spec(args))
    init = load_head(args.init, model, dtype=torch.float32) if args.init else None  # before hours of data
    started = time.time()
    sources = tuple(filter(None, args.sources.split(",")))
    prompts = read_prompts(args.prompts, args.max_source_share, sources=sources)
    generate_data(model, tokenizer, prompts, args.run, data_cfg)
    seqs = load_sequences(args.run)
    n_tokens = sum(len(s["ids"]) - s["answer_start"] for s in seqs)
    print(f"{len(seqs)} sequences, {n_tokens} answer tokens", file=sys.stderr)
    vocab, coverage = None, 1.0
    if init is not None and init.draft_vocab is not None:  # a fine-tune keeps the head's vocabulary
        vocab = init.draft_vocab.cpu()
        coverage = vocabulary_coverage(answer_token_counts(seqs, model.config.vocab_size), vocab)
        print(
            f"draft vocabulary of {args.init}: {len(vocab)} tokens cover {coverage:.1%} of answer tokens",
            file=sys.stderr,
        )
    elif init is None and args.draft_vocab:
        eos = model.generation_config.eos_token_id
        always = {eos} if isinstance(eos, int) else set(eos or [])
        vocab, coverage = draft_vocabulary(seqs, args.draft_vocab, model.config.vocab_size, always)
        print(f"draft vocabulary: {len(vocab)} tokens cover {coverage:.1%} of answer tokens", file=sys.stderr)
    head = fit(model, seqs, args.run, fit_cfg, log=lambda m: print(m, file=sys.stderr), vocab=vocab, init=init)
    head.draft_vocab = vocab
    if args.export:
        best = max(head.history, key=lambda h: h.get("heldout_score", 0.0)) if head.history else {}
        steps_acc = ", ".join(
            f"step {k.rsplit('_', 1)[1]} {v:.3f}" for k, v in best.items() if k.startswith("heldout_acc_")
        )
        by_temperature = sorted(Counter(s["temperature"] for s in seqs).items())
        card = {
            "target": Path(getattr(model.config, "_name_or_path", "") or model.config.model_type).name,
            "data": f"{len(seqs)} self-distilled answers ({n_tokens} tokens) to prompts from {Path(args.prompts).name}"
            + " (" + ", ".join(f"{n} at T={t:g}" for t, n in by_temperature) + ")",
            "steps": fit_cfg.steps if not head.history or head.history[-1]["step"] >= fit_cfg.steps
            else f"{head.history[-1]['step']} of {fit_cfg.steps} (stopped by --fit-minutes {fit_cfg.fit_minutes})",
            "batch tokens": fit_cfg.batch_tokens,
            "held-out next-token accuracy (best checkpoint)":
            f"{best.get('heldout_acc', float('nan')):.3f} at step {best.get('step')}"
            + (f" (draft steps fed the head's own features: {steps_acc})" if steps_acc else ""),
            "training draft steps (unroll)": fit_cfg.unroll,
            **({"fine-tuned from": str(args.init)} if args.init else {}),
            "draft vocabulary": f"{len(head.draft_vocab)} tokens ({coverage:.1%} of answer tokens)"
            if head.draft_vocab is not None else "full",
            "wall time (this run, all stages)": f"{(time.time() - started) / 60:.1f} min",
            "hardware": f"{torch.get_num_threads()} CPU threads" if model.device.type == "cpu" else str(model.device),
            "command": "python -m engine.train " + " ".join(argv if argv is not None else sys.argv[1:]),
        }
        export(head, args.export, card)
        print(f"exported head to {args.export}", file=sys.stderr)
