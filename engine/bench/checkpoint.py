"""The benchmark's checkpoint: answers saved as they finish, so `--resume` goes on after a crash."""

import json
from pathlib import Path


class Checkpoint:
    """Answers saved as they finish, so an interrupted run can go on with `--resume`.

    A jsonl file beside the result (RESULT.partial.jsonl): its first line holds the run's settings, then
    one line per answer. Resuming reuses the answers only when the settings match, and the file is
    removed once the full report is written. Reused answers were timed in the earlier process; the
    question-by-question interleaving still holds within each process."""

    def __init__(self, out: Path, settings: dict):
        self.path = out.with_name(out.stem + ".partial.jsonl")
        self.settings = settings

    def load(self) -> dict[tuple, dict]:
        """Answers of an earlier run with the same settings, by (question_id, method)."""
        if not self.path.is_file():
            return {}
        lines = self.path.read_text(encoding="utf-8").splitlines()
        try:
            saved = json.loads(lines[0])["settings"]
        except (IndexError, json.JSONDecodeError, KeyError, TypeError):  # killed before its first line was written
            return {}
        if saved != self.settings:
            changed = sorted(k for k in saved.keys() | self.settings.keys() if saved.get(k) != self.settings.get(k))
            raise SystemExit(
                f"cannot resume from {self.path}: it was run with other settings ({', '.join(changed)}); "
                f"run the same command again, or drop --resume to start over"
            )
        rows = {}
        for line in lines[1:]:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short when the run was killed
                continue
            rows[(row["question_id"], row["method"])] = row
        return rows

    def start(self, rows: dict[tuple, dict]) -> None:
        """Begin the file afresh with the settings and the answers being kept."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"settings": self.settings})] + [json.dumps(r) for r in rows.values()]
        self.path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")

    def record(self, row: dict) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def finish(self) -> None:
        self.path.unlink(missing_ok=True)
