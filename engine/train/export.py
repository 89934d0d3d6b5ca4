"""Stage 3, export: the trained head in the official EAGLE layout, with a card (README.md)."""

from pathlib import Path

import torch

from engine.checkpoint import save_head
from engine.head import DraftHead, Eagle3Head

# The official EAGLE-1/2 code and serving engines load `d2t` without error but ignore it for these heads.
VOCAB_NOTE = (
    "The weights also hold `d2t`, a reduced draft vocabulary (target id = draft id + d2t[draft id]). This "
    "app drafts only from those tokens; the official EAGLE-1/2 code and serving engines ignore `d2t` for "
    "EAGLE-1/2 heads and draft from the whole vocabulary, which changes which tokens are proposed (never "
    "what is accepted: verification is the target's).",
    "",
)


LAYOUTS = {
    "eagle1": "Official EAGLE-1/2 layout: `config.json` (Llama keys, 1 layer, `rope_theta` and `rope_scaling` as "
    "the official EAGLE code reads them) + `model.safetensors` (fc, one decoder layer without input layernorm; "
    "embeddings and lm_head are the target's).",
    "eagle3": "Official EAGLE-3 layout (`LlamaForCausalLMEagle3`, as the official EAGLE code, SGLang and vLLM read "
    "it): `config.json` (Llama keys, 1 layer, `draft_vocab_size`, `rope_theta`) + `model.safetensors` (`fc` over "
    "the inputs of target layers {layers}, `midlayer.*`, `norm`, `lm_head` over the draft vocabulary, `d2t`, "
    "`t2d`; embeddings are the target's).",
}


def export(head: DraftHead | Eagle3Head, path: Path, card: dict) -> None:
    save_head(head.to(torch.bfloat16), path)
    layers = ", ".join(map(str, head.target_layers or ()))
    lines = [
        f"# {'EAGLE-3' if head.kind == 'eagle3' else 'EAGLE'} draft head for {card['target']}",
        "",
        LAYOUTS[head.kind].format(layers=layers),
        "",
        *(VOCAB_NOTE if head.draft_vocab is not None and head.kind == "eagle1" else ()),
        "| | |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in card.items() if k != "command"]
    lines += ["", "Reproduce:", "", "```", card["command"], "```", ""]
    (path / "README.md").write_text("\n".join(lines))
