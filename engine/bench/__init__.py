"""The benchmark: decoding methods side by side on a question file, and the losslessness audit.

`python -m engine.bench --questions FILE --methods vanilla,eagle2,... --out RESULT.json [options]`

Methods: `vanilla`, `eagle1`, `eagle2` (this engine), `eagle2_lookup` (eagle2 plus a prompt-lookup
branch of `--prompt-lookup-tokens` tokens grafted into its tree, engine/lookup.py), `eagle2_adaptive`
(eagle2_lookup with the adaptive head, engine/gate.py; the app's `--adaptive`) and the baselines a
user would pick instead, `hf_generate` (transformers `generate`) and `hf_prompt_lookup` (`generate` with
`prompt_lookup_num_tokens`). All run on the same loaded model.

How the measurement stays fair:
  - Every method first answers one warm-up prompt (not recorded), so none pays one-time start-up costs.
  - Then the methods are interleaved question by question, in the order given (A B C, A B C, ...), so
    machine drift hits them alike. A method answers every turn of a question before the next method
    starts; multi-turn questions feed each turn's answer back as history, each method its own.
  - `wall_s` is wall time around each generate call, prefill included. `tokens_per_s` in the summary is
    total new tokens over total wall time (per method, overall and per category); `speedup_vs_vanilla`
    divides it by vanilla's over the same questions.
  - `cycles` counts target forwards after the prefill; `tau` = (new tokens - turns) / cycles, the mean
    tokens committed per forward (the engine's definition), for the transformers baselines too.
  - In bf16 or fp16 a near-tie can send two methods' replies apart (see the audit below), and from there
    on they time different text: one reply may end early, another run into a long repetition that prompt
    lookup copies at many tokens per step. So every method also records when each of its tokens reached
    the host, and `matched` times each of this engine's methods against vanilla and each baseline over
    the text both replies share: per turn, from the start of each call (prefill included) until the last
    token of their common prefix reached the host. Same output tokens from the same prompt; only the speed
    differs. Each pair is timed over its own shared text, so compare within a row, not across rows.
    Greedy runs only (sampled replies differ by design). Small leanings, all under a millisecond a step:
    the baselines' streamer copies each step's tokens to the host (their `wall_s` includes it), the
    engine's marks come after its event is built, and a chunk that runs past the shared text is paid for
    whole. On Apple's mps, transformers streams one step late, so the baselines' marks lag there.

Result JSON (field names are stable, scripts read them):
  config, hardware, memory, results: [{question_id, category, method, turns, new_tokens, wall_s, cycles,
  tau, output_ids (one list per turn), text (one string per turn), finish_reasons, and for this engine's
  methods phase_ms {prefill_ms, draft_ms, verify_ms}, its stopwatch's split of the time, and head_cycles,
  the cycles in which the draft head drafted; emit_marks, per turn a list of [tokens so far, seconds since
  the call began] after every target forward}],
  summary: {method: {overall: {...}, per_category: {category: {...}}, peak_memory_mb}} where each {...}
  holds tokens_per_s, speedup_vs_vanilla, tau, new_tokens, wall_s (engine methods also draft_ms_per_cycle,
  verify_ms_per_cycle, prefill_ms_per_turn, head_share);
  matched: [{method, against, overall: {...}, per_category: {category: {...}}}] where each {...} holds
  turns (compared: same prompt), shared_turns (of those, the ones whose replies share a first token),
  tokens (the shared tokens), method_s, against_s (seconds each call took to deliver them)
  and speedup (against_s / method_s); and `lossless` with --check-lossless.
A markdown table (RESULT.md) and a chart of speedup per category (RESULT.png) are written beside it.
Every answer is also saved as it finishes in RESULT.partial.jsonl (removed at the end): after a crash
or a kill, the same command with `--resume` reuses those answers and runs only the rest.

The losslessness audit compares each method's tokens with vanilla's, turn by turn. At the first
differing position it recomputes the target's logits on the shared prefix (one plain forward) and
reports the top-2 margin there and the gap between the two diverging tokens. A divergence whose gap is
above the dtype's bound is not a near-tie: it is flagged as a bug and the command exits with status 1.
In fp32 the bound is float rounding, so outputs must be identical.

Files: questions.py (question file, turn prompts, settings), methods.py (the methods behind one `run`),
runner.py (warm-up and interleaved answering), checkpoint.py (`--resume`), stats.py (summary and matched
timing: where a speedup is computed), lossless.py (the audit), report.py (JSON, markdown, chart),
cli.py (the command).
"""
