"""Draws one cycle's draft tree as a self-contained SVG (the side panel of the chat tab).

Input is a `cycle` event from `engine.events` plus the readable text of each node's token; output is an
HTML string: a one-line caption and an `<svg>`. Pure functions: no Gradio, no engine calls.

Drawing rules:
  - depth runs left to right: the root (the last committed token) is the left column, drafted tokens of
    depth d are column d;
  - one node per drafted token, labelled with its text made visible ('␣', '↵') and HTML-escaped;
  - an edge joins each node to its parent; within a column nodes are ordered by their parent's row, so
    edges never cross;
  - node shade is the draft's confidence exp(score) (score = cumulative log-probability of the path);
    nodes copied from the context by prompt lookup (`lookup_from` on) are teal instead;
  - the accepted path (root first) has a thick green outline and green edges, rejected nodes are faded;
  - a cycle in which the draft head did not draft (`head` False: a copy stretch, or the adaptive head
    resting) says so in the caption;
  - the bonus token (the target's own token after the accepted path) is an extra dashed orange node
    marked '★', drawn as a child of the last accepted node. It is drawn only when it was committed (a
    stop condition can end the cycle before it).

CSS classes (`node accepted`, `node rejected`, `node root`, `node bonus`, `edge accepted`, ...) and
`data-node` attributes let tests and style sheets find things; colours are inline attributes so the SVG
also renders on its own.
"""

import html
import math
from collections.abc import Callable

from app.labels import display_width, shorten, visible

ROW_H = 23  # px between node centres in a column
NODE_H = 18
CHAR_W = 7.4  # px per monospace cell at font-size 12
COL_GAP = 34  # px between the widest node of a column and the next column
PAD = 8
MAX_LABEL = 10  # characters shown in a node; the tooltip has the full text

ACCEPT = "#15803d"
BONUS = "#ea580c"
ROOT = "#374151"
FADED = 0.38
COPIED = "#99f6e4"  # nodes copied from the context by prompt lookup (no draft probability)


def _fill(confidence: float) -> tuple[str, str]:
    """Node fill (light to dark blue with confidence) and a readable text colour."""
    c = min(max(confidence, 0.0), 1.0)
    lo, hi = (239, 246, 255), (29, 78, 216)
    rgb = tuple(round(a + (b - a) * c) for a, b in zip(lo, hi))
    return "#{:02x}{:02x}{:02x}".format(*rgb), ("#ffffff" if c > 0.5 else "#0f172a")


def layout_rows(parents: list[int], depths: list[int], scores: list[float]) -> list[float]:
    """Row (vertical position in units of ROW_H) of every node, depth by depth.

    Children are ordered by their parent's row, then by score, so edges never cross. Each child wants to
    sit next to its parent (siblings spread around the parent's row); a top-to-bottom sweep keeps one row
    between neighbours, then the whole column moves back by its mean displacement so it stays centred on
    its parents.
    """
    n = len(parents)
    rows = [0.0] * n
    by_depth: dict[int, list[int]] = {}
    for i in range(1, n):
        by_depth.setdefault(depths[i], []).append(i)
    for depth in sorted(by_depth):
        column = sorted(by_depth[depth], key=lambda i: (rows[parents[i]], -scores[i], i))
        siblings: dict[int, list[int]] = {}
        for i in column:
            siblings.setdefault(parents[i], []).append(i)
        want = {}
        for parent, kids in siblings.items():
            for j, i in enumerate(kids):
                want[i] = rows[parent] + j - (len(kids) - 1) / 2
        placed: list[float] = []
        for i in column:
            placed.append(want[i] if not placed else max(want[i], placed[-1] + 1.0))
        shift = sum(p - want[i] for p, i in zip(placed, column)) / len(column)
        for p, i in zip(placed, column):
            rows[i] = p - shift
    top = min(rows)
    return [r - top for r in rows]


def render_tree(event: dict, labels: list[str], bonus_label: str | None = None) -> str:
    """Caption + SVG for one `cycle` event.

    labels[i] is the text of tree node i (node 0 is the root). bonus_label is the text of the bonus
    token; pass None to leave it out.
    """
    tree = event.get("tree")
    cycle = event.get("cycle", 0)
    if tree is None:
        text = html.escape(visible(labels[0] if labels else ""))
        how = (
            "the first token, from the prompt's forward pass (drafting starts with the next cycle)"
            if cycle == 0
            else "vanilla decoding, one token per forward pass, no draft tree"
        )
        return f'<div class="tree-caption">Cycle {cycle}: {how}; token <code>{text}</code>.</div>'
    tokens, parents = tree["tokens"], tree["parents"]
    depths, scores = tree["depths"], tree["scores"]
    copied_from = tree.get("lookup_from") or len(tokens)  # nodes from here on came from prompt lookup
    if len(labels) != len(tokens):
        raise ValueError(f"got {len(labels)} labels for a tree of {len(tokens)} nodes")
    accepted = list(event.get("accepted") or [0])
    n_new = len(event.get("new_token_ids") or [])
    show_bonus = bonus_label is not None and n_new >= len(accepted)

    # The bonus node, when drawn, is node n: a child of the last accepted node with the best score.
    parents_all, depths_all = list(parents), list(depths)
    scores_all = [float(s) for s in scores]
    texts = list(labels)
    n = len(tokens)
    if show_bonus:
        parents_all.append(accepted[-1])
        depths_all.append(depths[accepted[-1]] + 1)
        scores_all.append(math.inf)
        texts.append(bonus_label)
    rows = layout_rows(parents_all, depths_all, scores_all)

    shown = [shorten(visible(t), MAX_LABEL) for t in texts]
    if show_bonus:
        shown[n] = "★" + shorten(visible(bonus_label), MAX_LABEL - 1)
    widths = [10 + CHAR_W * max(display_width(s), 1) for s in shown]
    n_cols = max(depths_all) + 1
    col_w = [0.0] * n_cols
    for i, d in enumerate(depths_all):
        col_w[d] = max(col_w[d], widths[i])
    col_x = [PAD]
    for d in range(1, n_cols):
        col_x.append(col_x[-1] + col_w[d - 1] + COL_GAP)
    width = col_x[-1] + col_w[-1] + PAD
    height = max(rows) * ROW_H + NODE_H + 2 * PAD

    def centre(i: int) -> tuple[float, float]:
        return col_x[depths_all[i]], PAD + rows[i] * ROW_H + NODE_H / 2

    on_path = set(accepted)
    edges, nodes = [], []
    for i in range(1, len(parents_all)):
        p = parents_all[i]
        x1, y1 = centre(p)
        x1 += widths[p]
        x2, y2 = centre(i)
        mid = (x1 + x2) / 2
        if i == n:
            kind, colour, stroke, extra = "bonus", BONUS, 2.5, ' stroke-dasharray="4 3"'
        elif i in on_path:
            kind, colour, stroke, extra = "accepted", ACCEPT, 3, ""
        else:
            kind, colour, stroke, extra = "rejected", "#94a3b8", 1.2, f' opacity="{FADED}"'
        edges.append(
            f'<path class="edge {kind}" d="M{x1:.1f},{y1:.1f} C{mid:.1f},{y1:.1f} {mid:.1f},{y2:.1f} '
            f'{x2:.1f},{y2:.1f}" fill="none" stroke="{colour}" stroke-width="{stroke}"{extra}/>'
        )

    for i in range(len(parents_all)):
        x, yc = centre(i)
        y = yc - NODE_H / 2
        full = html.escape(visible(texts[i]))
        if i == 0:
            kind, fill, ink, outline, sw, extra = "root accepted", ROOT, "#ffffff", ACCEPT, 3, ""
            tip = f"root: last committed token {full}"
        elif i == n:
            kind, fill, ink, outline, sw = "bonus", "#fff7ed", "#9a3412", BONUS, 2.5
            extra = ' stroke-dasharray="4 3"'
            tip = f"bonus token {full}: the target's own next token after the accepted path"
        else:
            conf = math.exp(min(scores_all[i], 0.0))
            step = math.exp(min(scores_all[i] - scores_all[parents_all[i]], 0.0))
            fill, ink = _fill(conf)
            verdict = "accepted" if i in on_path else "rejected"
            tip = (
                f"node {i} {full}: depth {depths_all[i]}, path confidence {conf:.1%}, "
                f"step probability {step:.1%}, {verdict}"
            )
            if i >= copied_from:
                fill, ink = COPIED, "#134e4a"
                tip = f"node {i} {full}: depth {depths_all[i]}, copied from the context by prompt lookup, {verdict}"
            if i in on_path:
                kind, outline, sw, extra = "accepted", ACCEPT, 3, ""
            else:
                kind, outline, sw, extra = "rejected", "#64748b", 0.8, ""
        fade = f' opacity="{FADED}"' if kind == "rejected" else ""
        nodes.append(
            f'<g class="node {kind}" data-node="{i}" data-depth="{depths_all[i]}"{fade}>'
            f"<title>{tip}</title>"
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{widths[i]:.1f}" height="{NODE_H}" rx="4" '
            f'fill="{fill}" stroke="{outline}" stroke-width="{sw}"{extra}/>'
            f'<text x="{x + widths[i] / 2:.1f}" y="{yc + 4:.1f}" text-anchor="middle" fill="{ink}" '
            f'font-family="ui-monospace, SFMono-Regular, Menlo, Consolas, monospace" font-size="12">'
            f"{html.escape(shown[i])}</text></g>"
        )

    n_accepted = len(accepted) - 1
    bonus_note = " + bonus token ★" if show_bonus else " (no bonus token: a stop condition ended the cycle)"
    copied = f" ({n - copied_from} copied by prompt lookup)" if copied_from < n else ""
    rested = ""
    if not event.get("head", True):  # a copy stretch, or the adaptive head resting (engine/gate.py)
        rested = " · the draft head sat this cycle out: " + (
            "the copied branch alone was verified" if copied_from < n else "a plain decoding step"
        )
    caption = (
        f'<div class="tree-caption">Cycle {cycle}: {n - 1} drafted tokens{copied}, depth {max(depths)}, '
        f"{n_accepted} accepted{bonus_note} · draft {event.get('draft_ms', 0.0):.1f} ms · "
        f"verify {event.get('verify_ms', 0.0):.1f} ms{rested}</div>"
    )
    svg = (
        f'<svg class="draft-tree" xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" '
        f'height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" role="img" '
        f'aria-label="Draft tree of cycle {cycle}">{"".join(edges)}{"".join(nodes)}</svg>'
    )
    return f'{caption}<div class="tree-scroll">{svg}</div>'


def render_cycle(event: dict, token_texts: Callable[[list[int]], list[str]]) -> str:
    """render_tree with the labels looked up through `token_texts` (e.g. `engine.token_texts`)."""
    tree = event.get("tree")
    ids = tree["tokens"] if tree is not None else list(event.get("new_token_ids") or [])[:1]
    texts = token_texts(list(ids) + [event["bonus_token"]])
    return render_tree(event, texts[:-1], texts[-1])


LEGEND = (
    '<div class="tree-legend"><span class="lg lg-acc">accepted path</span>'
    '<span class="lg lg-bonus">★ bonus token (target)</span><span class="lg lg-rej">rejected (faded)</span>'
    '<span class="lg lg-shade">darker = more confident draft</span></div>'
)


def empty_panel(message: str = "The draft tree of each cycle appears here while a reply streams.") -> str:
    return f'<div class="tree-caption tree-empty">{html.escape(message)}</div>'
