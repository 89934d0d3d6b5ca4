"""Readable labels for single tokens.

A token may be a space, a newline, a tab, a control character or an empty string (a byte that only makes
sense with its neighbours). `visible` makes every such character visible so a tree node or a tooltip
never looks blank. These functions return plain text; callers escape it for HTML (`html.escape`) at the
point where they build markup.
"""

import unicodedata

_VISIBLE = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"}
EMPTY = "∅"


def visible(text: str) -> str:
    """Spaces, newlines and control characters replaced by visible symbols; '' becomes '∅'."""
    if not text:
        return EMPTY
    out = []
    for ch in text:
        if ch in _VISIBLE:
            out.append(_VISIBLE[ch])
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def shorten(label: str, max_chars: int = 10) -> str:
    """Cut a label to max_chars characters, marking the cut with '…'."""
    if len(label) <= max_chars:
        return label
    return label[: max_chars - 1] + "…"


def display_width(label: str) -> int:
    """Width in monospace cells: wide East Asian characters take two."""
    return sum(2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1 for ch in label)
