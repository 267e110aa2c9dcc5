"""`lmlab report RUN_DIR`: markdown plus PNG plots of what a run (or a directory of runs) logged.

It reads only files: each stage's `metrics.jsonl` and `final/lmlab.json`, so it works
on any machine after the fact. Plots are what people would rather look at than
read: losses, learning rate, grad norm, task metrics over steps, and the ORM score
against accuracy with its r^2 (EvoLM's monitoring claim).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError
from lmlab.paths import write_text_atomic


def read_jsonl_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def find_runs(root: Path) -> list[Path]:
    """The run directory itself, or every run directory below it (those with a metrics.jsonl): a pipeline's
    stages in pipeline order (pipeline.json lists them so), other runs by name."""
    if (root / "metrics.jsonl").is_file():
        return [root]
    runs = sorted(p.parent for p in root.glob("*/metrics.jsonl"))
    if not runs:
        raise LmlabError("no metrics.jsonl here or one level below", file=str(root))
    state = root / "pipeline.json"
    order = list(json.loads(state.read_text())) if state.is_file() else []
    return sorted(runs, key=lambda run: (order.index(run.name) if run.name in order else len(order), run.name))


def series(records: list[dict[str, Any]], key: str, x: str = "step") -> tuple[list[int], list[float]]:
    """(x, value) of every record that has both: x is the step, or `tokens_seen` for curves against data."""
    points = [(r[x], r[key]) for r in records if isinstance(r.get(key), (int, float)) and r.get(x) is not None]
    return [s for s, _ in points], [v for _, v in points]


def r_squared(xs: list[float], ys: list[float]) -> float | None:
    """Squared Pearson correlation; None when either side has no spread."""
    from lmlab.stats import pearson_r

    r = pearson_r(xs, ys)
    return None if r is None else r * r


def _plot(path: Path, title: str, curves: dict[str, tuple[list[int], list[float]]], ylabel: str,
          xlabel: str = "step") -> bool:
    curves = {k: v for k, v in curves.items() if v[0]}
    if not curves:
        return False
    from lmlab.plots import new_figure, save_figure

    plt, fig, ax = new_figure()
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, label=label, marker="o" if len(xs) < 20 else None, markersize=3)
    save_figure(plt, fig, ax, path, xlabel, ylabel, title)
    return True


def stage_figure(results: dict[str, Any], path: Path) -> bool:
    """One figure across a pipeline's stages: general bits per byte and ID / OOD greedy accuracy per stage,
    each with its 95% interval as an error bar (the closing evaluation's estimates)."""
    from lmlab.plots import new_figure, save_figure
    from lmlab.stats import estimate

    names = list(results)
    panels = [("general_bpb", "general bits per byte (lower: less forgetting)"),
              ("math_id/greedy_accuracy", "accuracy"), ("math_ood/greedy_accuracy", "accuracy")]
    found = [(key, label) for key, label in panels if any(key in results[n].get("estimates", {}) for n in names)]
    if not found:
        return False
    plt, fig, ax = new_figure((8, 3.6))
    axes = [ax] + ([ax.twinx()] if found[0][0] == "general_bpb" and len(found) > 1 else [])
    for index, (key, _) in enumerate(found):
        points = [(i, estimate(results[n]["estimates"][key])) for i, n in enumerate(names)
                  if key in results[n].get("estimates", {})]
        xs = [i + (index - 1) * 0.08 for i, _ in points]
        ys = [float(e) for _, e in points]
        err = [[y - e.low for y, (_, e) in zip(ys, points)], [e.high - y for y, (_, e) in zip(ys, points)]]
        target = axes[-1] if key != "general_bpb" and len(axes) > 1 else axes[0]
        target.errorbar(xs, ys, yerr=err, marker="os^"[index % 3], capsize=3, label=key,
                        color=f"C{index}")
    ax.set_xticks(range(len(names)), names)
    if len(axes) > 1:
        axes[1].set_ylabel("accuracy (ID, OOD)")
        handles = [h for a in axes for h in a.get_legend_handles_labels()[0]]
        labels = [lab for a in axes for lab in a.get_legend_handles_labels()[1]]
        ax.legend(handles, labels, fontsize=8, loc="best")
    save_figure(plt, fig, ax, path, "stage", found[0][1] if len(axes) > 1 or len(found) == 1 else "value",
                "every stage's model: general bits per byte and math accuracy, with 95% intervals",
                legend=len(axes) == 1)
    return True


def _scatter(path: Path, xs: list[float], ys: list[float], xlabel: str, ylabel: str, r2: float | None) -> None:
    from lmlab.plots import new_figure, save_figure

    plt, fig, ax = new_figure((5, 4))
    ax.scatter(xs, ys)
    save_figure(plt, fig, ax, path, xlabel, ylabel,
                f"{ylabel} vs {xlabel}" + (f" (r² = {r2:.2f})" if r2 is not None else ""), legend=False)


def run_report(run: Path, out: Path) -> list[str]:
    """Plots and a markdown section for one run directory."""
    records = read_jsonl_records(run / "metrics.jsonl")
    manifest_path = run / "final" / "lmlab.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    return [f"## {run.name}", "", *_manifest_lines(manifest), *_curve_lines(records, run.name, out),
            *_orm_lines(records, run.name, out)]


def _manifest_lines(manifest: dict[str, Any]) -> list[str]:
    """What the stage was, its own final metrics, and the general loss before and after when it replayed."""
    if not manifest:
        return []
    metrics, source = manifest.get("metrics", {}), manifest.get("input_artifact")
    lines = [f"stage `{manifest.get('stage')}`, " + (f"from `{source}`" if source else "from scratch")
             + f", {manifest.get('steps', '?')} steps", ""]
    shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and (k.endswith("loss") or "accuracy" in k)}
    if shown:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v:.4f} |" for k, v in shown.items()] + [""]
    before, after = manifest.get("metrics_before", {}).get("eval_replay_loss"), metrics.get("eval_replay_loss")
    if "replay_mix" in manifest and before is not None and after is not None:
        lines += [f"general (replay) validation loss: {before:.4f} before, {after:.4f} after", ""]
    return lines


def _task_keys(records: list[dict[str, Any]]) -> list[str]:
    """The in-training task metrics, without their interval and count fields."""
    return sorted({k for r in records for k in r if k.startswith("task/") and not k.endswith(("/ci_low", "/ci_high",
                                                                                               "/n"))})


def _curve_lines(records: list[dict[str, Any]], name: str, out: Path) -> list[str]:
    """Loss (against steps and tokens), LR, gradient norm, and RL, preference and task curves where logged."""
    eval_keys = sorted({k for r in records for k in r if k.startswith("eval_") and k.endswith("loss")})
    plots = [
        (f"{name}_loss.png", "training and validation loss against steps",
         {"train": series(records, "loss"), **{k: series(records, k) for k in eval_keys}}, "loss", "step"),
        (f"{name}_loss_tokens.png", "training and validation loss against tokens seen",
         {"train": series(records, "loss", "tokens_seen"), **{k: series(records, k, "tokens_seen") for k in eval_keys}},
         "loss", "tokens seen"),
        (f"{name}_lr.png", "learning rate schedule", {"lr": series(records, "learning_rate")}, "learning rate", "step"),
        (f"{name}_grad_norm.png", "gradient norm before clipping", {"grad norm": series(records, "grad_norm")},
         "grad norm", "step"),
    ]
    rl_keys = [k for k in ("reward", "kl", "entropy") if any(k in r for r in records)]
    if rl_keys:  # RL: what the policy earns, how far it drifts, how sure it is
        plots.append((f"{name}_rl.png", "reward, KL, entropy", {k: series(records, k) for k in rl_keys}, "value",
                      "step"))
        plots.append((f"{name}_length.png", "completion length",
                      {"mean length": series(records, "completions/mean_length")}, "tokens", "step"))
    preference_keys = [k for k in ("rewards/margins", "rewards/accuracies") if any(k in r for r in records)]
    if preference_keys:  # DPO-style implicit rewards
        plots.append((f"{name}_preference.png", "implicit reward margin and accuracy",
                      {k: series(records, k) for k in preference_keys}, "value", "step"))
    if _task_keys(records):
        plots.append((f"{name}_tasks.png", "task metrics during training",
                      {k[5:]: series(records, k) for k in _task_keys(records)}, "value", "step"))
    lines = []
    for filename, title, curves, ylabel, xlabel in plots:
        if _plot(out / filename, f"{name}: {title}", curves, ylabel, xlabel):
            lines += [f"![{title}]({filename})", ""]
    return lines


def _orm_lines(records: list[dict[str, Any]], name: str, out: Path) -> list[str]:
    """EvoLM's monitoring claim, per task: the ORM score against accuracy over checkpoints, with its r^2."""
    lines, task_keys = [], _task_keys(records)
    for orm_key in [k for k in task_keys if k.endswith("/orm_score")]:
        task = orm_key[len("task/"):-len("/orm_score")]
        for acc_key in [k for k in task_keys if k.startswith(f"task/{task}/maj@")] or \
                       [f"task/{task}/greedy_accuracy"]:
            points = [(r[orm_key], r[acc_key]) for r in records if orm_key in r and acc_key in r]
            if len(points) < 2:
                continue
            xs, ys = [x for x, _ in points], [y for _, y in points]
            r2 = r_squared(xs, ys)
            filename = f"{name}_{task}_orm_vs_{acc_key.rsplit('/', 1)[1].replace('@', 'at')}.png"
            _scatter(out / filename, xs, ys, "ORM score", acc_key.rsplit("/", 1)[1], r2)
            lines += [f"ORM score vs {acc_key[5:]} over {len(points)} checkpoints: "
                      f"r² = {r2:.3f}" if r2 is not None else
                      f"ORM score vs {acc_key[5:]}: no spread, r² undefined", "", f"![orm]({filename})", ""]
    return lines


def write_report(root: str | Path, out: str | Path | None = None) -> Path:
    """`report.md` and its PNGs in `out` (default: the run directory)."""
    root = Path(root)
    if not root.is_dir():
        raise LmlabError("run directory not found", file=str(root))
    out = Path(out) if out else root
    out.mkdir(parents=True, exist_ok=True)
    runs = find_runs(root)
    lines = [f"# lmlab report: {root}", ""]
    for comparison in sorted(root.glob("*/comparison.md")):  # a pipeline's closing eval stage
        lines += [f"## Every stage's model on the same evaluation ({comparison.parent.name})", ""]
        results = comparison.parent / "results.json"
        figure = out / f"{comparison.parent.name}_stages.png"
        if results.is_file() and stage_figure(json.loads(results.read_text()), figure):
            lines += [f"![every stage]({figure.name})", ""]
        lines += [comparison.read_text(), ""]
    for run in runs:
        lines += run_report(run, out)
    report = out / "report.md"
    write_text_atomic(report, "\n".join(lines) + "\n")
    return report
