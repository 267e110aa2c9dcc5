"""`lmlab sweep`: coordinate descent over weight decay, LR and epochs at a fixed data budget and model.

Kotha et al. (2025): with fixed data, the best recipe needs weight decay far above
the usual 0.1 (up to 30x), tuned jointly with LR and epochs; they tune by
coordinate descent, one hyperparameter at a time with the others held, until no
change helps. Each configuration is one ordinary run (its own process, in
parallel where cores allow) judged by its final validation loss; every run is
recorded, and a configuration already run is never run again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from lmlab.experiments.ablate import Variant, run_variants
from lmlab.errors import LmlabError
from lmlab.paths import write_json_atomic

# Kotha et al.'s ranges, relative to a base LR: weight decay 0.1 .. 3.2 (30x the usual), epochs 1 .. 16
DEFAULT_GRID = {"optim.weight_decay": [0.1, 0.4, 0.8, 1.6, 3.2], "optim.lr": ["x0.5", "x1", "x2"],
                "train.epochs": [1, 2, 4, 8, 16]}
METRIC = "eval_loss"


def _resolve(value: Any, base: float) -> Any:
    """`x2` means twice the recipe's own value (LR grids are relative to the base LR)."""
    return round(base * float(value[1:]), 12) if isinstance(value, str) and value.startswith("x") else value


def _key(config: dict[str, Any]) -> str:
    """A configuration's identity; 1 and 1.0 epochs are the same run."""
    def norm(v: Any) -> Any:
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
    return ",".join(f"{k}={norm(config[k])}" for k in sorted(config))


def run_sweep(recipe: str | os.PathLike, grid: dict[str, list[Any]] | None = None, rounds: int = 2,
              jobs: int | None = None, extra: list[str] | None = None) -> dict[str, Any]:
    """Coordinate descent from the recipe's own values; returns {"best": ..., "runs": [...]}, also written as
    sweep.json and sweep.md in `<output.dir>/<name>-sweep/`."""
    from lmlab.console import console as shared_console

    from lmlab.recipe import load_recipe

    console = shared_console()
    path = Path(recipe)
    base_recipe = load_recipe(path, extra)
    if base_recipe.data.validation_fraction == 0 and not base_recipe.data.validation:
        raise LmlabError("a sweep judges runs by validation loss: give data.validation or a validation_fraction",
                         file=str(path), field="data.validation_fraction")
    tree = yaml.safe_load(path.read_text()) or {}
    grid = {k: [_resolve(v, base_recipe.optim.lr) if k == "optim.lr" else v for v in values]
            for k, values in (grid or DEFAULT_GRID).items()}
    current = {"optim.weight_decay": base_recipe.optim.weight_decay, "optim.lr": base_recipe.optim.lr,
               "train.epochs": base_recipe.train.epochs or 1}
    current = {k: current.get(k, grid[k][0]) for k in grid}
    out_dir = Path(base_recipe.output.dir) / f"{tree.get('name', path.stem)}-sweep"
    results: dict[str, dict[str, Any]] = {}
    jobs = jobs or max(1, (os.cpu_count() or 1) // 4)

    def evaluate(configs: list[dict[str, Any]]) -> None:
        todo = []
        for config in configs:
            key = _key(config)
            if key in results or any(_key(c) == key for c, _ in todo):
                continue
            name = f"run{len(results) + len(todo):03d}"
            overrides = [f"{k}={json.dumps(v)}" for k, v in config.items()] + [f"name={name}"]
            load_recipe(path, [*(extra or []), *overrides, f"output.dir={out_dir}"])  # bad values fail first
            todo.append((config, Variant(name, config, base_recipe.seed, overrides)))
        failed = run_variants(path, [base_recipe.stage], [v for _, v in todo], out_dir, jobs, extra)
        for config, variant in todo:
            manifest = out_dir / variant.name / "final" / "lmlab.json"
            metrics = json.loads(manifest.read_text()).get("metrics", {}) if manifest.is_file() else {}
            loss = metrics.get(METRIC) if variant.name not in failed else None
            results[_key(config)] = {"name": variant.name, "config": config, METRIC: loss}
            console.print(f"{variant.name} {_key(config)}: {METRIC} = {loss}")

    def loss_of(config: dict[str, Any]) -> float:
        value = results[_key(config)][METRIC]
        return value if value is not None else float("inf")

    evaluate([current])
    for round_no in range(1, rounds + 1):
        changed = False
        for name, values in grid.items():
            candidates = [{**current, name: v} for v in values]
            evaluate(candidates)
            best = min(candidates, key=loss_of)
            if loss_of(best) < loss_of(current):
                current, changed = best, True
        console.print(f"round {round_no}: best {_key(current)} ({METRIC} {loss_of(current):.4f})")
        if not changed:
            break
    summary = {"best": {"config": current, METRIC: loss_of(current), "name": results[_key(current)]["name"]},
               "grid": grid, "runs": list(results.values())}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "sweep.json", summary)
    lines = [f"# Sweep of {path.name} (coordinate descent, {len(results)} runs)", "",
             f"Best: {_key(current)} with {METRIC} {loss_of(current):.4f}", "",
             "| run | " + " | ".join(grid) + f" | {METRIC} |", "|---" * (len(grid) + 2) + "|"]
    for run in results.values():
        loss = f"{run[METRIC]:.4f}" if run[METRIC] is not None else "failed"
        lines.append(f"| {run['name']} | " + " | ".join(str(run["config"][k]) for k in grid) + f" | {loss} |")
    (out_dir / "sweep.md").write_text("\n".join(lines) + "\n")
    return summary
