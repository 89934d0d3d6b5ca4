"""Auto-tuning the draft tree for this machine: the (total_tokens, depth, top_k) with the most tokens/s.

Expected tokens/s of a tree = 1000 * tau(tree) / (draft_ms(depth, top_k) + verify_ms(total_tokens + 1)):
  - verify_ms(n): the target's forward over an n-node tree (mask, forward, lm_head, draws, acceptance,
    one host sync), measured for a few n on a realistic context and interpolated linearly.
  - draft_ms(depth, top_k): feeding the head the last cycle's accepted tokens, then growing an EAGLE-2
    tree of that depth and branching; measured for every (depth, top_k) of the grid, then fitted per
    top_k as a fixed cost plus a cost per depth step.
  - tau(tree): mean tokens committed per cycle (accepted drafts + the bonus token), from calibration.

Calibration (greedy): the target's answers to a few prompts are generated once. At every `stride`-th
position of an answer the head drafts its whole EAGLE-2 candidate pool for each top_k (depth D:
k + (D-1)k^2 candidates). The pool of a shallower tree is a prefix of the deeper one's, and EAGLE-2 keeps the
`total_tokens` best-scoring candidates, so the tree of every (total_tokens, depth) is known without
drafting it again; its accepted length is how far one of its paths follows the known continuation,
which is exactly what greedy verification would accept there. One draft per top_k and position scores
the whole grid; no verification is run.

Calibration (sampling, T > 0): the answers are sampled with the same settings, and one target forward
over each whole pool gives every node's probability of being accepted (the product of the target's
processed probabilities along its path, engine/verify.py), so each tree's *expected* accepted length is
a sum over the nodes it keeps: exact for these contexts, with no sampling noise. Sampling accepts less,
so it is tuned on a grid of smaller trees (`SAMPLED_GRID`) and cached under its own key.

`choose_tree` is the pure part: any cost and acceptance model in, the best grid point out. Results are
cached as JSON per (model, head weights, dtype, device and its CPU/GPU model and threads, on a CPU its
ISA flags, and sampling settings when T > 0) under `cache_dir()/autotune/`; `load_or_tune` reads the
cache or tunes (a minute or two on a 2-core CPU for the default model) and is what `launch.py` calls.

Files: choice.py (the grid and the pure choice), costs.py (timing draft and verify), calibration.py
(acceptance along known answers), cache.py (`tune`, its result and cache), cli.py (the command).
"""
