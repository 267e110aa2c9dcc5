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


def run_comparison(stage, models: list[tuple[str, str]], out_dir: Path) -> dict[str, dict[str, Any]]:
    """Evaluate each (name, artifact) pair; writes results.json and comparison.md, prints the table.

    Every score carries its 95% interval and n, and each stage is compared with the one before it on the
    same items (a paired interval of the change, and McNemar's test for accuracies), so the table says which
    stage moved which metric beyond the noise. Under a launcher every rank calls it and scores its share of
    each model's items; rank 0 writes the files.
    """
    from lmlab.console import console as shared_console
    from lmlab.distributed import is_main
    from lmlab.evaluate.evaluator import evaluate_checkpoint
    from lmlab.evaluate.tasks import load_task
    from lmlab.paths import write_json_atomic, write_text_atomic
    from lmlab.stats import Estimate

    tasks = [load_task(spec, stage.n) for spec in stage.tasks]  # bad tasks fail before any model loads
    main = is_main()
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    cache_file = out_dir / "results.json"
    cache: dict[str, Any] = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    console = shared_console()
    results: dict[str, dict[str, Any]] = {}
    for name, path in models:
        key = _cache_key(stage, path)
        cached = cache.get(name, {})
        if cached.get("key") == key and "estimates" in cached:
            results[name] = {k: _revived(v) for k, v in cached["estimates"].items()}
            continue
        with console.status(f"evaluating {name}"):
            results[name] = evaluate_checkpoint(path, tasks, stage.samples, stage.orm, stage.general_bpb,
                                                stage.math_bpb, temperature=stage.temperature)
        cache[name] = {"key": key, "artifact": path, "metrics": {k: float(v) for k, v in results[name].items()},
                       "estimates": {k: v.as_dict() if isinstance(v, Estimate) else v
                                     for k, v in results[name].items()}}
        write_json_atomic(cache_file, cache)
    changes = stage_changes(results)
    for name, by_metric in changes.items():
        cache[name]["change"] = {k: d.as_dict() for k, d in by_metric.items()}
    cache = {name: cache[name] for name in results}  # stages no longer in the pipeline drop out
    if main and (not cache_file.is_file() or json.loads(cache_file.read_text()) != json.loads(json.dumps(cache))):
        write_json_atomic(cache_file, cache)  # a rerun that evaluated nothing leaves the file as it was
    columns = sorted({k for row in results.values() for k in row}, key=lambda k: (k != "general_bpb", k))
    console.print(comparison_table(results, changes, columns))
    markdown = comparison_markdown(results, changes, columns)
    if main and (not (out_dir / "comparison.md").is_file() or (out_dir / "comparison.md").read_text() != markdown):
        write_text_atomic(out_dir / "comparison.md", markdown)
    return results


def _revived(record):
    """A cached metric as its Estimate (never `estimate(v) or v`: a 0.0 accuracy is a falsy float)."""
    from lmlab.stats import estimate

    found = estimate(record)
    return record if found is None else found


def stage_changes(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each stage against the one before it: the paired difference of every metric both were scored on."""
    from lmlab.stats import Estimate, paired

    names, changes = list(results), {}
    for before, after in zip(names, names[1:]):
        changes[after] = {k: paired(results[before][k], v) for k, v in results[after].items()
                          if isinstance(v, Estimate) and isinstance(results[before].get(k), Estimate)
                          and results[before][k].n == v.n}
    return changes


def _cell(value, digits: int = 3) -> str:
    from lmlab.stats import Estimate

    if isinstance(value, Estimate):
        return f"{float(value):.{digits}f} [{value.low:.{digits}f}, {value.high:.{digits}f}]"
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def _change(diff) -> str:
    if diff is None:
        return "-"
    mark = "" if diff.distinguishable else " (noise)"
    return f"{diff.delta:+.3f} [{diff.low:+.3f}, {diff.high:+.3f}]{mark}"


def comparison_table(results, changes, columns):
    """On screen: one row per metric (value [95% interval]) and, after the first stage, its change."""
    from rich.table import Table

    table = Table(title="every stage's model on the same items: value [95% interval], change from the stage before")
    table.add_column("metric")
    table.add_column("n", justify="right")
    names = list(results)
    for i, name in enumerate(names):
        table.add_column(name, justify="right")
        if i:
            table.add_column(f"{name} - {names[i - 1]}", justify="right")
    for column in columns:
        n = next((getattr(row[column], "n", None) for row in results.values() if column in row), None)
        cells = []
        for i, name in enumerate(names):
            cells.append(_cell(results[name].get(column)))
            if i:
                cells.append(_change(changes.get(name, {}).get(column)))
        table.add_row(column, str(n or "-"), *cells)
    return table


def comparison_markdown(results, changes, columns) -> str:
    """Stages in pipeline order: every metric with its interval and n; then each stage's paired change."""
    def n_of(column):
        return next((getattr(row[column], "n", None) for row in results.values() if column in row), None)

    header = [f"{c} (n={n_of(c)})" if n_of(c) else c for c in columns]
    lines = ["Each value with its 95% interval (Wilson for accuracies, bootstrap over items or documents "
             "otherwise).", "", "| stage | " + " | ".join(header) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    if changes:
        lines += ["", "Change from the stage before, paired over the same items (95% interval; "
                  "\"(noise)\": the interval includes zero).", "",
                  "| change | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        names = list(results)
        for before, after in zip(names, names[1:]):
            lines.append(f"| {after} - {before} | "
                         + " | ".join(_change(changes[after].get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"
