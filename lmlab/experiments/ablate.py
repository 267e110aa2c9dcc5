"""`lmlab ablate RECIPE --grid key=v1,v2 --seeds N`: variants x seeds, a mean ± std table, and plots.

Each variant is the recipe with `--set` overrides (and `seed=s`), run as its own
`lmlab` process (forked from a warm one: experiments.processes), so variants run in parallel when there are cores (or GPUs) to
spare and one crash does not take the others down. A stage recipe's variant
reports its artifact's manifest metrics; a pipeline's reports its eval stage's
table, one metric per `<stage>/<metric>`. Short keys are accepted: `epochs`, `lr`,
`tokens` and `replay` stand for `train.epochs`, `optim.lr`, `train.tokens` and
`data.replay_ratio`; in a pipeline, `sft.epochs` means the `sft` stage's epochs.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lmlab.errors import LmlabError
from lmlab.experiments.processes import default_jobs
from lmlab.loading import is_pipeline, read_yaml
from lmlab.paths import write_json_atomic, write_text_atomic
from lmlab.stats import mean_std

ALIASES = {"epochs": "train.epochs", "lr": "optim.lr", "tokens": "train.tokens", "replay": "data.replay_ratio",
           "weight_decay": "optim.weight_decay"}


@dataclass
class Variant:
    name: str
    values: dict[str, Any]  # grid key -> value
    seed: int
    overrides: list[str]


def _value(text: str) -> Any:
    """YAML scalar, with `1e-3` read as a number (YAML 1.1 wants `1.0e-3`)."""
    parsed = yaml.safe_load(text)
    if isinstance(parsed, str):
        try:
            return float(parsed)
        except ValueError:
            return parsed
    return parsed


def parse_grid(specs: list[str]) -> dict[str, list[Any]]:
    """`key=v1,v2,...` (values parsed as YAML) per spec."""
    grid: dict[str, list[Any]] = {}
    for spec in specs:
        if "=" not in spec:
            raise LmlabError(f"grid '{spec}' must look like key=v1,v2", field="--grid")
        key, values = spec.split("=", 1)
        parsed = [_value(v) for v in values.split(",") if v.strip()]
        if not parsed:
            raise LmlabError(f"grid '{spec}' has no values", field="--grid")
        grid[key.strip()] = parsed
    if not grid:
        raise LmlabError("give at least one --grid key=v1,v2", field="--grid")
    return grid


def resolve_key(key: str, tree: dict) -> str:
    """The full override path of a grid key, for a stage recipe or a pipeline."""
    parts = key.split(".")
    if is_pipeline(tree):
        names = {s.get("name", s.get("stage")) for s in tree["stages"] if isinstance(s, dict)}
        if parts[0] in names:
            rest = ".".join(parts[1:])
            return f"stages.{parts[0]}.{ALIASES.get(rest, rest)}"
        return ALIASES.get(key, key)
    if len(parts) == 2 and parts[0] == tree.get("stage") and parts[1] in ALIASES:
        return ALIASES[parts[1]]  # `sft.epochs` on an SFT recipe
    return ALIASES.get(key, key)


def _tag(value: Any) -> str:
    from lmlab.paths import safe_name

    return safe_name(str(value).replace(" ", ""))


def variants(tree: dict, grid: dict[str, list[Any]], seeds: int, base_name: str) -> list[Variant]:
    keys = list(grid)
    out = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        for seed in range(seeds):
            values = dict(zip(keys, combo))
            name = base_name + "-" + "-".join(f"{k.split('.')[-1]}{_tag(v)}" for k, v in values.items()) + f"-s{seed}"
            overrides = [f"{resolve_key(k, tree)}={json.dumps(v)}" for k, v in values.items()]
            overrides += [f"seed={seed}", f"name={name}"]
            out.append(Variant(name, values, seed, overrides))
    return out


def variant_metrics(run_dir: Path, pipeline: bool) -> dict[str, float]:
    """Numbers a finished variant reports: its manifest's metrics, or its pipeline's eval table."""
    if pipeline:
        found: dict[str, float] = {}
        for results in run_dir.glob("*/results.json"):
            for stage, entry in json.loads(results.read_text()).items():
                found.update({f"{stage}/{k}": v for k, v in entry["metrics"].items()})
        return found
    manifest = run_dir / "final" / "lmlab.json"
    metrics = json.loads(manifest.read_text()).get("metrics", {}) if manifest.is_file() else {}
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and not k.endswith(("_runtime", "_per_second", "epoch"))}


def grouped(rows: list[tuple[Variant, dict[str, float]]]) -> dict[str, dict[str, list[float]]]:
    """Per grid point (`k=v,...`) and metric: the value of each seed's run."""
    out: dict[str, dict[str, list[float]]] = {}
    for variant, metrics in rows:
        point = ",".join(f"{k}={v}" for k, v in variant.values.items())
        for metric, value in metrics.items():
            out.setdefault(point, {}).setdefault(metric, []).append(value)
    return out


def summarise(rows: list[tuple[Variant, dict[str, float]]]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """Per grid point (`k=v,...`) and metric: (mean, std, runs)."""
    return {point: {m: (*mean_std(v), len(v)) for m, v in by_metric.items()}
            for point, by_metric in grouped(rows).items()}


def lower_is_better(metric: str) -> bool:
    return any(word in metric for word in ("loss", "bpb", "perplexity"))


def best_and_ties(rows: list[tuple[Variant, dict[str, float]]], metric: str) -> tuple[str, list[str]] | None:
    """The best grid point by its mean over seeds, and every point within the noise of it: Welch's 95%
    interval of the difference of the two means includes zero (with one seed, nothing can be told apart)."""
    from lmlab.stats import welch_tied

    runs = {point: by_metric[metric] for point, by_metric in grouped(rows).items() if metric in by_metric}
    if not runs:
        return None
    sign = 1 if lower_is_better(metric) else -1
    best = min(runs, key=lambda point: sign * mean_std(runs[point])[0])
    return best, [p for p in runs if p != best and welch_tied(runs[best], runs[p])]


def plot_ablation(rows, key: str, out_dir: Path, metrics: list[str]) -> list[Path]:
    """One PNG per metric: mean ± std against the swept value (numeric axes when the values are numbers)."""
    from lmlab.plots import new_figure, save_figure

    written = []
    points = sorted({v.values[key] for v, _ in rows}, key=lambda x: (isinstance(x, str), x))
    for metric in metrics:
        stats = [mean_std([m[metric] for v, m in rows if v.values[key] == p and metric in m] or [math.nan])
                 for p in points]
        plt, fig, ax = new_figure((5, 3.6))
        xs = points if all(isinstance(p, (int, float)) for p in points) else list(range(len(points)))
        ax.errorbar(xs, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3)
        if xs is not points:
            ax.set_xticks(xs, [str(p) for p in points])
        path = out_dir / f"ablate_{metric.replace('/', '_')}.png"
        written.append(save_figure(plt, fig, ax, path, key, metric, f"{metric} vs {key} (mean ± std over seeds)",
                                   legend=False))
    return written


def _mean_cell(summary: tuple[float, float, int], values: list[float]) -> str:
    from lmlab.stats import mean_interval

    mean, std, n = summary
    low, high = mean_interval(values)
    interval = f" [{low:.4f}, {high:.4f}]" if n > 1 else ""
    return f"{mean:.4f} ± {std:.4f}{interval} (n={n})"


def run_variants(path: Path, command: list[str], todo: list[Variant], out_dir: Path, jobs: int,
                 extra: list[str] | None = None, overwrite: bool = True) -> list[str]:
    """Run each variant as its own `lmlab` process, `jobs` at a time (threads split between them; with GPUs,
    each variant on the least busy one through CUDA_VISIBLE_DEVICES, so they never all land on GPU 0);
    returns the names of the variants that failed (their logs are in `out_dir/logs`)."""
    import time

    from lmlab.console import console as shared_console
    from lmlab.experiments.processes import start_lmlab, visible_gpus

    console = shared_console()
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}
    busy = {gpu: 0 for gpu in visible_gpus()}  # variants running on each GPU
    running: list[tuple[Variant, Any, str | None]] = []
    failed: list[str] = []
    queue = list(todo)
    while queue or running:
        while queue and len(running) < jobs:
            variant = queue.pop(0)
            args = [*command, str(path)]
            for item in [*(extra or []), *variant.overrides, f"output.dir={out_dir}"]:
                args += ["--set", item]
            if overwrite:
                args.append("--overwrite")
            gpu = min(busy, key=busy.get) if busy else None
            if gpu is not None:
                busy[gpu] += 1
            variant_env = env if gpu is None else {**env, "CUDA_VISIBLE_DEVICES": gpu}
            running.append((variant, start_lmlab(args, logs / f"{variant.name}.log", variant_env), gpu))
        for variant, proc, gpu in list(running):
            if proc.exitcode is not None:
                proc.join()
                running.remove((variant, proc, gpu))
                if gpu is not None:
                    busy[gpu] -= 1
                if proc.exitcode:
                    failed.append(variant.name)
                console.print(f"{variant.name}: " + (f"failed (exit {proc.exitcode})" if proc.exitcode else "done"))
        if running:
            time.sleep(0.2)
    return failed


def run_ablation(recipe: str | os.PathLike, grid_specs: list[str], seeds: int = 1, jobs: int | None = None,
                 extra: list[str] | None = None) -> Path:
    """Run every variant (in `jobs` parallel processes), then write ablation.md / .json and plots."""
    from lmlab.console import console as shared_console

    console = shared_console()
    path = Path(recipe)
    tree, _ = read_yaml(path)
    pipeline = is_pipeline(tree)
    base = tree.get("name", path.stem)
    out_dir = Path((tree.get("output") or {}).get("dir", "runs")) / f"{base}-ablate"
    grid = parse_grid(grid_specs)
    todo = variants(tree, grid, seeds, base)
    command = ["run"] if pipeline else [tree.get("stage", "pretrain")]
    # validate every variant before any compute: one bad key fails the whole ablation now
    from lmlab.pipeline import load_pipeline
    from lmlab.loading import load_recipe

    for variant in todo:
        overrides = [*(extra or []), *variant.overrides, f"output.dir={out_dir}"]
        load_pipeline(path, overrides) if pipeline else load_recipe(path, overrides)
    jobs = jobs or default_jobs()
    console.print(f"ablation: {len(todo)} runs ({len(todo) // seeds} grid points x {seeds} seeds), {jobs} at a time "
                  f"-> {out_dir}")
    logs = out_dir / "logs"
    failed = run_variants(path, command, todo, out_dir, jobs, extra, overwrite=not pipeline)
    rows = [(v, variant_metrics(out_dir / v.name, pipeline)) for v in todo if v.name not in failed]
    table = summarise(rows)
    metrics = sorted({m for by_metric in table.values() for m in by_metric})
    lines = [f"# Ablation of {path.name}: {', '.join(grid_specs)}; {seeds} seed(s)", ""]
    if failed:
        lines += [f"Failed runs (see logs/): {', '.join(failed)}", ""]
    seeds_of = grouped(rows)
    lines += ["Mean ± std over seeds, then the 95% t interval of the mean.", "",
              "| grid point | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for point, by_metric in table.items():
        cells = [_mean_cell(by_metric[m], seeds_of[point][m]) if m in by_metric else "-" for m in metrics]
        lines.append(f"| {point} | " + " | ".join(cells) + " |")
    lines += ["", f"Best per metric (mean over {seeds} seed(s)) and the grid points tied with it within the noise "
              "(Welch's 95% interval of the difference of means includes zero):", ""]
    for metric in metrics:
        found = best_and_ties(rows, metric)
        if found:
            lines.append(f"- {metric} ({'lower' if lower_is_better(metric) else 'higher'} is better): best {found[0]}; "
                         f"tied: {', '.join(found[1]) or 'none'}" + (" (one seed: no run can be told apart)"
                                                                     if seeds < 2 else ""))
    pngs = plot_ablation(rows, next(iter(grid)), out_dir, metrics) if rows and metrics else []
    lines += [""] + [f"![{p.stem}]({p.name})" for p in pngs]
    write_text_atomic(out_dir / "ablation.md", "\n".join(lines) + "\n")
    write_json_atomic(out_dir / "ablation.json",
                      {"grid": {k: list(v) for k, v in grid.items()}, "seeds": seeds, "failed": failed,
                       "runs": [{"name": v.name, "values": v.values, "seed": v.seed, "metrics": m} for v, m in rows],
                       "summary": {p: {m: list(s) for m, s in bm.items()} for p, bm in table.items()}})
    console.print("\n".join(lines[:len(table) + 6]))
    if failed and len(failed) == len(todo):
        raise LmlabError(f"every ablation run failed; see {logs}")
    return out_dir
