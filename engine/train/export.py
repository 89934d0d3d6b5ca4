"""Stage 3, export: the trained head in the official EAGLE layout, with a card (README.md)."""

from pathlib import Path

import torch

from engine.checkpoint import save_head
from engine.head import DraftHead


def export(head: DraftHead, path: Path, card: dict) -> None:
    save_head(head.to(torch.bfloat16), path)
    lines = [
        f"# EAGLE draft head for {card['target']}",
        "",
        "Official EAGLE layout: `config.json` (Llama keys, 1 layer) + `model.safetensors` "
        "(fc, one decoder layer without input layernorm; embeddings and lm_head are the target's).",
        "",
        "| | |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in card.items() if k != "command"]
    lines += ["", "Reproduce:", "", "```", card["command"], "```", ""]
    (path / "README.md").write_text("\n".join(lines))
