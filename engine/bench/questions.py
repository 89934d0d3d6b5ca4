"""What the benchmark asks: Spec-Bench questions, each turn's chat prompt, and the settings every method
answers with."""

import json
from dataclasses import dataclass, field
from pathlib import Path

from engine.config import DEFAULT_LOOKUP, SamplingConfig, TreeConfig
from engine.decode import Engine


@dataclass(frozen=True)
class BenchSettings:
    max_new_tokens: int = 256
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    tree: TreeConfig = field(default_factory=TreeConfig)
    seed: int = 0
    warmup_tokens: int = 32  # tokens of the one warm-up answer per method
    prompt_lookup_num_tokens: int = DEFAULT_LOOKUP  # the app's lookup branch



def load_questions(path: str | Path, limit: int | None = None, per_category: int | None = None) -> list[dict]:
    """Spec-Bench jsonl (`question_id`, `category`, `turns`). `per_category` keeps that many questions of
    each category, evenly spaced through it; `limit` then keeps the first `limit`. File order is kept."""
    questions = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            q = json.loads(line)
            turns = q.get("turns")
            if "question_id" not in q or "category" not in q or not turns or not all(isinstance(t, str) for t in turns):
                raise ValueError(
                    f"{path}:{line_no}: expected a Spec-Bench question with question_id, category and a "
                    f"non-empty list of string turns; got keys {sorted(q)}"
                )
            questions.append(q)
    if per_category is not None:
        by_category: dict[str, list[int]] = {}
        for i, q in enumerate(questions):
            by_category.setdefault(q["category"], []).append(i)
        kept = set()
        for indices in by_category.values():
            n = min(per_category, len(indices))
            kept.update(indices[(j * len(indices)) // n] for j in range(n))
        questions = [q for i, q in enumerate(questions) if i in kept]
    return questions[:limit] if limit is not None else questions


def turn_messages(question: dict, answers: list[str]) -> list[dict]:
    """Chat messages for turn len(answers): earlier turns with this method's own answers, then the next."""
    messages = []
    for user, answer in zip(question["turns"], answers):
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return messages + [{"role": "user", "content": question["turns"][len(answers)]}]


def turn_prompt(engine: Engine, question: dict, answers: list[str], max_new_tokens: int) -> list[int]:
    messages, _ = engine.trim_messages(turn_messages(question, answers), max_new_tokens)
    return engine.chat_ids(messages)
