"""`lmlab sweep`: coordinate descent over weight decay, LR and epochs at a fixed data budget and model.

Kotha et al. (2025): with fixed data, the best recipe needs weight decay far above
the usual 0.1 (up to 30x), tuned jointly with LR and epochs; they tune by
coordinate descent, one hyperparameter at a time with the others held, until no
change helps. Each configuration is one ordinary run (its own process, in
parallel where cores allow) judged by its final validation loss; every run is
recorded, and a configuration already run is never run again.

Every run is scored on the same held-out rows, so two configurations are compared row by
row (a paired bootstrap of the difference in loss): the descent moves only to a
configuration better beyond that noise, and the summary names every configuration tied
with the best within it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable


from lmlab.experiments.ablate import Variant, run_variants
from lmlab.experiments.processes import default_jobs
from lmlab.errors import LmlabError
from lmlab.paths import write_json_atomic, write_text_atomic
from lmlab.stats import Estimate, paired

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


def lower_beyond_noise(candidate: float, incumbent: float, candidate_rows: Estimate | None,
                       incumbent_rows: Estimate | None) -> bool:
    """Whether a validation loss is lower than another beyond the noise of their held-out rows: the paired 95%
    interval of the difference excludes zero (without rows, or against a failed run, the losses alone decide).
    The sweep's descent and the data-constrained study's both move only on this."""
    if candidate >= incumbent:
        return False
    if incumbent == float("inf") or candidate_rows is None or incumbent_rows is None:
        return True
    return paired(incumbent_rows, candidate_rows).distinguishable


def beats(candidate: dict[str, Any], incumbent: dict[str, Any]) -> bool:
    """lower_beyond_noise for two sweep runs (a failed run's loss is infinite)."""
    def loss(run: dict[str, Any]) -> float:
        return run[METRIC] if run.get(METRIC) is not None else float("inf")

    def rows(run: dict[str, Any]) -> Estimate | None:
        return Estimate.from_dict(run["rows"]) if run.get("rows") else None

    if loss(candidate) >= loss(incumbent):  # before the rows are read: most candidates lose outright
        return False
    return lower_beyond_noise(loss(candidate), loss(incumbent), rows(candidate), rows(incumbent))


def next_rung(ladder: list[Any], upward: bool) -> Any | None:
    """The rung one step beyond the top (or below the bottom) of a geometric ladder, at the ratio of its two
    rungs at that end; None for a ladder that is not increasing positive numbers, or when an integer ladder
    would leave the integers (epochs 1, 2, 4 do not extend to 0.5)."""
    if len(ladder) < 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in ladder):
        return None
    if any(b <= a for a, b in zip(ladder, ladder[1:])):
        return None
    rung = ladder[-1] * ladder[-1] / ladder[-2] if upward else ladder[0] * ladder[0] / ladder[1]
    if all(float(v).is_integer() for v in ladder):
        return int(round(rung)) if float(round(rung, 9)).is_integer() and rung >= 1 else None
    return round(rung, 12)


def coordinate_descent(current: dict[str, Any], grid: dict[str, list[Any]], rounds: int,
                       run: Callable[[list[dict[str, Any]]], None], loss: Callable[[dict[str, Any]], float],
                       better: Callable[[dict[str, Any], dict[str, Any]], bool], extend: int = 0) -> dict[str, Any]:
    """Kotha et al.'s tuning: one key at a time, every value of its ladder with the others held (`run` trains
    the configurations not trained yet, together), moving only to a configuration `better` than the current
    one beyond the noise; stops after `rounds` or a round that changes nothing. A ladder whose lowest loss
    sits at one of its ends, better beyond the noise than the rung next to it, grows one rung past that end
    (next_rung), at most `extend` rungs per end over the whole descent, so the optimum is not reported at an
    edge the ladder happened to stop at.
    `lmlab sweep` and the data-constrained study both tune this way."""
    from lmlab.console import console

    ladders = {name: list(values) for name, values in grid.items()}
    grown = {(name, upward): 0 for name in grid for upward in (True, False)}
    run([current])
    for round_no in range(1, rounds + 1):
        changed = False
        for name in ladders:
            while True:
                candidates = [{**current, name: v} for v in ladders[name]]
                run(candidates)
                best = min(candidates, key=loss)
                if best[name] not in (ladders[name][0], ladders[name][-1]) or len(ladders[name]) < 2:
                    break
                upward = best[name] == ladders[name][-1]
                inner = {**current, name: ladders[name][-2] if upward else ladders[name][1]}
                if not better(best, inner):  # the edge rung only ties its neighbour: no slope to follow
                    break
                rung = next_rung(ladders[name], upward) if grown[name, upward] < extend else None
                if rung is None:
                    break
                grown[name, upward] += 1
                ladders[name] = [*ladders[name], rung] if upward else [rung, *ladders[name]]
                console().print(f"{name}: best at the ladder's {'top' if upward else 'bottom'}, trying {rung}")
            if better(best, current):
                current, changed = best, True
        console().print(f"round {round_no}: best {_key(current)} (loss {loss(current):.4f})")
        if not changed:
            break
    return current


class Sweep:
    """The runs of one sweep, keyed by configuration: each configuration runs once, as its own process."""

    def __init__(self, path: Path, base_recipe, out_dir: Path, jobs: int, extra: list[str] | None):
        self.path, self.base, self.out_dir, self.jobs, self.extra = path, base_recipe, out_dir, jobs, extra
        self.results: dict[str, dict[str, Any]] = {}

    def run(self, configs: list[dict[str, Any]]) -> None:
        """Run the configurations not run yet (in parallel) and record each one's validation loss and rows."""
        from lmlab.console import console
        from lmlab.loading import load_recipe

        todo = []
        for config in configs:
            key = _key(config)
            if key in self.results or any(_key(c) == key for c, _ in todo):
                continue
            name = f"run{len(self.results) + len(todo):03d}"
            overrides = [f"{k}={json.dumps(v)}" for k, v in config.items()] + [f"name={name}"]
            load_recipe(self.path, [*(self.extra or []), *overrides, f"output.dir={self.out_dir}"])  # fail first
            todo.append((config, Variant(name, config, self.base.seed, overrides)))
        failed = run_variants(self.path, [self.base.stage], [v for _, v in todo], self.out_dir, self.jobs, self.extra)
        for config, variant in todo:
            manifest = self.out_dir / variant.name / "final" / "lmlab.json"
            record = json.loads(manifest.read_text()) if manifest.is_file() and variant.name not in failed else {}
            loss = record.get("metrics", {}).get(METRIC)
            self.results[_key(config)] = {"name": variant.name, "config": config, METRIC: loss,
                                          "rows": record.get("validation_rows")}
            console().print(f"{variant.name} {_key(config)}: {METRIC} = {loss}")

    def loss(self, config: dict[str, Any]) -> float:
        value = self.results[_key(config)][METRIC]
        return value if value is not None else float("inf")

    def better(self, candidate: dict[str, Any], than: dict[str, Any]) -> bool:
        return beats(self.results[_key(candidate)], self.results[_key(than)])

    def descend(self, current: dict[str, Any], grid: dict[str, list[Any]], rounds: int,
                extend: int = 0) -> dict[str, Any]:
        return coordinate_descent(current, grid, rounds, self.run, self.loss, self.better, extend)

    def summary(self, best: dict[str, Any], grid: dict[str, list[Any]]) -> dict[str, Any]:
        winner = self.results[_key(best)]["name"]
        tied = [run["name"] for run in self.results.values() if run["name"] != winner and run[METRIC] is not None
                and not self.better(best, run["config"]) and not self.better(run["config"], best)]
        return {"best": {"config": best, METRIC: self.loss(best), "name": winner}, "tied_with_best": tied,
                "grid": grid, "runs": [{k: v for k, v in run.items() if k != "rows"} for run in self.results.values()]}

    def write(self, summary: dict[str, Any], grid: dict[str, list[Any]]) -> None:
        """sweep.json and sweep.md: every run with its loss and interval, the best and the ties marked."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.out_dir / "sweep.json", summary)
        best, tied = summary["best"], summary["tied_with_best"]
        lines = [f"# Sweep of {self.path.name} (coordinate descent, {len(self.results)} runs)", "",
                 f"Best: {_key(best['config'])} with {METRIC} {best[METRIC]:.4f}",
                 f"Tied with it within the noise of the held-out rows (paired 95% interval of the difference "
                 f"includes zero): {', '.join(tied) or 'none'}", "",
                 "| run | " + " | ".join(grid) + f" | {METRIC} [95% interval] |", "|---" * (len(grid) + 2) + "|"]
        for run in self.results.values():
            rows = Estimate.from_dict(run["rows"]) if run.get("rows") else None
            loss = "failed" if run[METRIC] is None else f"{run[METRIC]:.4f}" + (
                f" [{rows.low:.4f}, {rows.high:.4f}]" if rows is not None else "")
            mark = " (best)" if run["name"] == best["name"] else " (tied)" if run["name"] in tied else ""
            lines.append(f"| {run['name']}{mark} | " + " | ".join(str(run["config"][k]) for k in grid) + f" | {loss} |")
        write_text_atomic(self.out_dir / "sweep.md", "\n".join(lines) + "\n")


def run_sweep(recipe: str | os.PathLike, grid: dict[str, list[Any]] | None = None, rounds: int = 2,
              jobs: int | None = None, extra: list[str] | None = None, extend: int = 0) -> dict[str, Any]:
    """Coordinate descent from the recipe's own values; returns {"best": ..., "runs": [...]}, also written as
    sweep.json and sweep.md in `<output.dir>/<name>-sweep/`."""
    from lmlab.loading import load_recipe, read_yaml

    path = Path(recipe)
    base = load_recipe(path, extra)
    if base.data.validation_fraction == 0 and not base.data.validation:
        raise LmlabError("a sweep judges runs by validation loss: give data.validation or a validation_fraction",
                         file=str(path), field="data.validation_fraction")
    tree, _ = read_yaml(path)
    grid = {k: [_resolve(v, base.optim.lr) if k == "optim.lr" else v for v in values]
            for k, values in (grid or DEFAULT_GRID).items()}
    start = {"optim.weight_decay": base.optim.weight_decay, "optim.lr": base.optim.lr,
             "train.epochs": base.train.epochs or 1}
    sweep = Sweep(path, base, Path(base.output.dir) / f"{tree.get('name', path.stem)}-sweep",
                  jobs or default_jobs(), extra)
    best = sweep.descend({k: start.get(k, grid[k][0]) for k in grid}, grid, rounds, extend)
    summary = sweep.summary(best, grid)
    sweep.write(summary, grid)
    return summary
