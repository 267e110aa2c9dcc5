"""The pipeline's closing comparison: every stage's model on the same tasks, in one table.

EvoLM's questions need the stages side by side: general ability (bits per byte on
held-out general text, which rises with forgetting), in-domain and out-of-domain
accuracy (greedy and maj@k), and the ORM score of sampled answers. Results are
cached per model (keyed by its manifest and the eval settings), so re-running a
finished pipeline does not evaluate again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

def _cache_key(stage, path: str) -> str:
    manifest = Path(path) / "lmlab.json"
    text = stage.model_dump_json() + (manifest.read_text() if manifest.is_file() else path)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_comparison(stage, models: list[tuple[str, str]], out_dir: Path) -> dict[str, dict[str, float]]:
    """Evaluate each (name, artifact) pair; writes results.json and comparison.md, prints the table."""
    from rich.table import Table

    from lmlab.console import console as shared_console
    from lmlab.evaluate.evaluator import evaluate_checkpoint
    from lmlab.evaluate.tasks import load_task
    from lmlab.paths import write_json_atomic, write_text_atomic

    tasks = [load_task(spec, stage.n) for spec in stage.tasks]  # bad tasks fail before any model loads
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_file = out_dir / "results.json"
    cache: dict[str, Any] = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    console = shared_console()
    results: dict[str, dict[str, float]] = {}
    for name, path in models:
        key = _cache_key(stage, path)
        if cache.get(name, {}).get("key") == key:
            results[name] = cache[name]["metrics"]
            continue
        with console.status(f"evaluating {name}"):
            results[name] = evaluate_checkpoint(path, tasks, stage.samples, stage.orm, stage.general_bpb,
                                                stage.math_bpb)
        cache[name] = {"key": key, "artifact": path, "metrics": results[name]}
        write_json_atomic(cache_file, cache)
    columns = sorted({k for row in results.values() for k in row}, key=lambda k: (k != "general_bpb", k))
    # on screen one row per metric and one column per stage, so it fits a terminal; markdown the other way
    table = Table(title="every stage's model on the same evaluation")
    table.add_column("metric")
    for name in results:
        table.add_column(name, justify="right")
    for column in columns:
        table.add_row(column, *(f"{row[column]:.3f}" if column in row else "-" for row in results.values()))
    lines = ["| stage | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.3f}" if c in row else "-" for c in columns) + " |")
    console.print(table)
    write_text_atomic(out_dir / "comparison.md", "\n".join(lines) + "\n")
    return results
