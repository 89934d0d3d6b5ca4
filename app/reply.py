"""Where each piece of a reply came from, and the tinted HTML that shows it.

Each `cycle` event commits `new_token_ids`: first the drafted tokens the target accepted
(`len(accepted) - 1` of them), then the target's own bonus token. Vanilla cycles commit one target token.
`pieces_from_cycle` splits the cycle's text delta into pieces tagged "draft" (came from an accepted draft)
or "target" (the target's own token); `render_tinted` turns pieces into one line of escaped HTML with a
class per kind and alternating classes per cycle, so cycle boundaries stay visible.

When the per-token texts do not add up to the cycle's text delta (a multi-byte character split across
tokens or cycles, stop-string trimming) the cycle becomes a single piece rather than a wrong split.
"""

import html
from collections.abc import Callable
from dataclasses import dataclass

KINDS = ("draft", "target", "mixed")


@dataclass(frozen=True)
class Piece:
    text: str
    kind: str  # one of KINDS
    cycle: int


def drafted_count(event: dict) -> int:
    """How many of the cycle's new tokens were accepted drafts (the rest are the target's own)."""
    if event.get("tree") is None:
        return 0
    return min(max(len(event.get("accepted") or []) - 1, 0), len(event.get("new_token_ids") or []))


def pieces_from_cycle(event: dict, token_texts: Callable[[list[int]], list[str]]) -> list[Piece]:
    """Split the cycle's text delta by token origin.

    Tokens whose text does not appear at the current position (an end-of-turn token, which the reply
    text leaves out) are skipped; if the tokens still do not account for the whole delta, the delta
    becomes one piece of the cycle's overall kind.
    """
    text, ids, cycle = event.get("text", ""), list(event.get("new_token_ids") or []), event.get("cycle", 0)
    if not text:
        return []
    n_draft = drafted_count(event)
    pieces, pos = [], 0
    for k, t in enumerate(token_texts(ids) if ids else []):
        if t and text.startswith(t, pos):
            pieces.append(Piece(t, "draft" if k < n_draft else "target", cycle))
            pos += len(t)
    if pos == len(text):
        return pieces
    if n_draft == 0:
        kind = "target"
    elif n_draft == len(ids):
        kind = "draft"
    else:
        kind = "mixed"
    return [Piece(text, kind, cycle)]


def render_tinted(pieces: list[Piece]) -> str:
    """One line of HTML (no raw newlines, so Markdown renderers keep it as a single HTML block)."""
    spans = []
    for p in pieces:
        body = html.escape(p.text).replace("\n", "<br>")
        parity = "odd" if p.cycle % 2 else "even"
        spans.append(f'<span class="tok tok-{p.kind} cyc-{parity}" title="cycle {p.cycle}">{body}</span>')
    return f'<div class="tinted">{"".join(spans)}</div>'

