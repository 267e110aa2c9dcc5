"""EvoLM's five findings at laptop scale, over several seeds, with every number behind each verdict.

EvoLM trains the whole lifecycle (pretraining, continued pretraining, SFT, RL) in
the open and measures what each stage buys. This study repeats its findings with
models of 20k-300k parameters on the embedded data:

1. pretraining tokens per parameter: downstream gains flatten past roughly 80-160x
   (one constant-LR run per seed, its checkpoints scored at each budget);
2. CPT replay 0% / 16% / 50%: forgetting of general text against domain gain;
3. SFT epochs: in-domain accuracy rises while out-of-domain peaks early then falls;
4. RL after SFT lifts out-of-domain accuracy;
5. across post-training checkpoints, the ORM score of sampled answers tracks maj@k
   accuracy (r^2) and validation loss does not.

A shared base model is pretrained once; everything after it is repeated per seed.
Finished runs and evaluations are reused, so an interrupted study resumes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from lmlab.console import console
from lmlab.experiments.studies.common import StudyRunner, finding_line, judged, load_study, margin, mean_std_text
from lmlab.paths import NAME_PATTERN, write_json_atomic, write_text_atomic
from lmlab.recipe import OutputConfig, Strict, merge_blocks
from lmlab.stats import mean_std


class PretrainScaling(Strict):
    model: dict[str, Any]
    tokens_per_param: list[float] = Field(default_factory=lambda: [5, 10, 20, 40, 80, 160, 320], min_length=3)
    optim: dict[str, Any] = Field(default_factory=dict)  # a constant LR, so every checkpoint is comparable
    data: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    cloze_items: int = Field(200, gt=0)


class EvolmStudy(Strict):
    study: Literal["evolm"]
    name: str = Field(pattern=NAME_PATTERN)
    output: OutputConfig = Field(default_factory=OutputConfig)
    seeds: int = Field(2, ge=1)
    tokenizer: dict[str, Any] = Field(default_factory=dict)  # trained once, shared by every run
    defaults: dict[str, Any] = Field(default_factory=dict)  # blocks every run starts from
    pretrain_scaling: PretrainScaling
    base: dict[str, Any]  # the shared pretraining run the lifecycle chain starts from
    cpt: dict[str, Any]
    replay_ratios: list[float] = Field(default_factory=lambda: [0.0, 0.16, 0.5], min_length=2)
    sft_from_replay: float = 0.16
    sft: dict[str, Any]
    sft_epochs: list[float] = Field(default_factory=lambda: [1, 2, 4, 8], min_length=3)
    rl: dict[str, Any]
    rl_from_epochs: float = 2
    eval_n: int = Field(200, gt=0)
    samples: int = Field(4, ge=2)

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir) / self.name


SCHEMA = EvolmStudy  # what `lmlab.experiments.studies.load_study_file` validates a study file against


class Evaluator:
    """One cached row of numbers per model directory (general and math bits per byte, tasks, ORM), from the
    pipeline's closing comparison."""

    def __init__(self, study: EvolmStudy, cache: Path):
        self.study, self.cache_file = study, cache
        self.cache: dict[str, dict[str, float]] = json.loads(cache.read_text()) if cache.is_file() else {}

    def __call__(self, name: str, path: Path, generative: bool = True, cloze: int = 0) -> dict[str, float]:
        if name in self.cache:
            return self.cache[name]
        from lmlab.evaluate.evaluator import evaluate_checkpoint
        from lmlab.evaluate.tasks import load_task

        tasks = [load_task("general_cloze", cloze)] if cloze else []
        if generative:
            tasks += [load_task(task, self.study.eval_n) for task in ("math_id", "math_ood")]
        row = evaluate_checkpoint(path, tasks, self.study.samples, "math_exact" if generative else None,
                                  general_bpb=True, math_bpb=True)
        self.cache[name] = row
        write_json_atomic(self.cache_file, self.cache)
        console().print(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()))
        return row


def _steps(study: EvolmStudy, tokenizer, tokens_per_step: int) -> tuple[int, list[int]]:
    """Steps per budget: every budget a whole multiple of the smallest, so one checkpoint lands on each."""
    from lmlab.models.build import build_model, count_parameters
    from lmlab.recipe import ModelConfig

    n_params = count_parameters(build_model(ModelConfig(**study.pretrain_scaling.model), tokenizer))
    budgets = sorted(study.pretrain_scaling.tokens_per_param)
    unit = max(1, round(budgets[0] * n_params / tokens_per_step))
    return n_params, [round(unit * b / budgets[0]) for b in budgets]


@dataclass
class EvolmRuns:
    """Every run of the study as a validated recipe tree, before any compute (later models are future
    artifacts), and the helpers that run and evaluate them."""

    study: EvolmStudy
    runner: StudyRunner
    evaluate: Evaluator
    scale: list[dict]
    base: dict
    cpt: dict
    sft: dict
    rl: dict

    def final(self, name: str) -> Path:
        return self.runner.final(name)


def plan_runs(study: EvolmStudy, path: str | Path) -> EvolmRuns:
    tok_dir = study.run_dir / "tokenizer"
    runner = StudyRunner(study.run_dir, str(path), {str(tok_dir)})
    seeds = list(range(study.seeds))

    def tree(name: str, stage: str, block: dict, seed: int = 0, **extra) -> dict:
        t = merge_blocks(merge_blocks(study.defaults, block), {"name": name, "stage": stage, "seed": seed,
                                                               "output": {"report_to": []}})
        if stage == "pretrain":
            t = merge_blocks(t, {"tokenizer": {"path": str(tok_dir)}})
        return merge_blocks(t, extra)

    final = lambda name: str(runner.final(name))  # noqa: E731
    scale = study.pretrain_scaling
    runs = EvolmRuns(
        study, runner, Evaluator(study, study.run_dir / "evaluations.json"),
        scale=[tree(f"pt-scaling-s{s}", "pretrain", {"model": scale.model, "optim": scale.optim, "data": scale.data,
                                                      "train": scale.train}, s) for s in seeds],
        base=tree("base", "pretrain", study.base),
        cpt={(s, r): tree(f"cpt-r{r:g}-s{s}", "cpt", study.cpt, s, model={"from_pretrained": final("base")},
                          data={"replay_ratio": r}) for s in seeds for r in study.replay_ratios},
        sft={(s, e): tree(f"sft-ep{e:g}-s{s}", "sft", study.sft, s, train={"epochs": e},
                          model={"from_pretrained": final(f"cpt-r{study.sft_from_replay:g}-s{s}")})
             for s in seeds for e in study.sft_epochs},
        rl={s: tree(f"rl-s{s}", "rl", study.rl, s, model={"from_pretrained": final(f"sft-ep{study.rl_from_epochs:g}-s{s}")})
            for s in seeds})
    every = [*runs.scale, runs.base, *runs.cpt.values(), *runs.sft.values(), *runs.rl.values()]
    runner.future |= {final(t["name"]) for t in every}
    for t in every:
        runner.validate(t)
    if study.sft_from_replay not in study.replay_ratios or study.rl_from_epochs not in study.sft_epochs:
        from lmlab.errors import LmlabError

        raise LmlabError("sft_from_replay must be one of replay_ratios and rl_from_epochs one of sft_epochs",
                         file=str(path))
    return runs


def pretrain_scaling(runs: EvolmRuns, tokenizer) -> dict[str, Any]:
    """1. tokens per parameter: one constant-LR run per seed, a checkpoint evaluated at every budget."""
    study, scale = runs.study, runs.study.pretrain_scaling
    probe = runs.runner.validate(runs.scale[0])
    n_params, steps = _steps(study, tokenizer, probe.train.micro_batch_size * probe.train.grad_accum
                             * probe.data.seq_len)
    scaling: dict[str, dict[str, list[float]]] = {}
    for t in runs.scale:
        t = merge_blocks(t, {"train": {"max_steps": steps[-1], "save_every": steps[0],
                                       "keep_last": steps[-1] // steps[0], "eval_every": steps[-1]}})
        runs.runner.run(t)
        for budget, step in zip(sorted(scale.tokens_per_param), steps):
            ckpt = study.run_dir / "runs" / t["name"] / "checkpoints" / f"checkpoint-{step}"
            row = runs.evaluate(f"{t['name']}@{budget:g}x", ckpt, generative=False, cloze=scale.cloze_items)
            for k, v in row.items():
                scaling.setdefault(f"{budget:g}", {}).setdefault(k, []).append(v)
    return {"parameters": n_params, "steps": steps, "by_budget": scaling}


def replay_runs(runs: EvolmRuns) -> dict[str, Any]:
    """2. CPT replay: forgetting of general text against domain gain, from one shared base."""
    base = runs.evaluate("base", runs.runner.run(runs.base), generative=False)
    replay: dict[str, dict[str, list[float]]] = {}
    for (_, r), t in runs.cpt.items():
        row = runs.evaluate(t["name"], runs.runner.run(t), generative=False)
        replay.setdefault(f"{r:g}", {}).setdefault("forgetting", []).append(row["general_bpb"] - base["general_bpb"])
        replay[f"{r:g}"].setdefault("domain_gain", []).append(base["math_bpb"] - row["math_bpb"])
    return {"base": base, "by_ratio": replay}


def post_training_runs(runs: EvolmRuns) -> dict[str, Any]:
    """3. SFT epochs, 4. RL after SFT, and the checkpoints 5. (ORM against loss) is measured over."""
    study = runs.study
    sft: dict[str, dict[str, list[float]]] = {}
    points = []
    for (_, e), t in runs.sft.items():
        row = runs.evaluate(t["name"], runs.runner.run(t))
        points.append({"model": t["name"], **row})
        for k, v in row.items():
            sft.setdefault(f"{e:g}", {}).setdefault(k, []).append(v)
    rl: dict[str, list[float]] = {}
    for s, t in runs.rl.items():
        row = runs.evaluate(t["name"], runs.runner.run(t))
        points.append({"model": t["name"], **row})
        start_name = f"sft-ep{study.rl_from_epochs:g}-s{s}"
        start = runs.evaluate(start_name, runs.final(start_name))
        for k in row:
            rl.setdefault(k, []).append(row[k] - start[k])
    return {"sft_epochs": sft, "rl_minus_sft": rl, "checkpoints": points}


def orm_fits(points: list[dict], k: int) -> dict[str, float | None]:
    """Pearson r and r^2 of the ORM score and of the math validation loss against ID maj@k over checkpoints."""
    from lmlab.stats import pearson_r

    y = [p[f"math_id/maj@{k}"] for p in points]
    r_orm = pearson_r([p["math_id/orm_score"] for p in points], y)
    r_loss = pearson_r([p["math_bpb"] for p in points], y)
    return {"orm": None if r_orm is None else r_orm * r_orm, "math_bpb": None if r_loss is None else r_loss * r_loss,
            "r_orm": r_orm, "r_math_bpb": r_loss}


def run_evolm(path: str | Path, overrides: list[str] | None = None) -> Path:
    """Run the study (reusing finished runs); writes evolm.json, evolm.md and plots; returns the md."""
    from lmlab.data.tokenizer import resolve_tokenizer
    from lmlab.loading import validate_recipe

    study = load_study(path, EvolmStudy, overrides)
    runs = plan_runs(study, path)
    tokenizer = resolve_tokenizer(validate_recipe(merge_blocks(study.defaults, {
        "name": "tokenizer", "tokenizer": study.tokenizer, "data": study.base.get("data", {})}), file=str(path)),
        study.run_dir)  # trained once into <study>/tokenizer
    results: dict[str, Any] = {"seeds": study.seeds, "pretrain_scaling": pretrain_scaling(runs, tokenizer),
                               "replay": replay_runs(runs), **post_training_runs(runs)}
    results["r2"] = orm_fits(results["checkpoints"], study.samples)
    results["findings"] = findings(study, results)
    return write_report(study, results)


def findings(study: EvolmStudy, results: dict) -> list[dict]:
    """Each of EvoLM's five claims, with whether these runs reproduce it and the numbers that say so."""
    return [finding(study, results) for finding in (_scaling_finding, _replay_finding, _sft_finding, _rl_finding,
                                                    _orm_finding)]


def _scaling_finding(study: EvolmStudy, results: dict) -> dict:
    """1. diminishing returns of pretraining tokens per parameter; per seed, the margin is a third of the
    gain per doubling before ~80x minus the gain per doubling at the largest budgets."""
    scaling = results["pretrain_scaling"]["by_budget"]
    budgets = sorted(scaling, key=float)
    lo, mid = budgets[0], min(budgets[1:], key=lambda b: abs(float(b) - 80))
    hi_a, hi_b = budgets[-2], budgets[-1]
    bpb = {b: scaling[b]["general_bpb"] for b in budgets}
    early = [(a - b) / math.log2(float(mid) / float(lo)) for a, b in zip(bpb[lo], bpb[mid])]
    late = [(a - b) / math.log2(float(hi_b) / float(hi_a)) for a, b in zip(bpb[hi_a], bpb[hi_b])]
    return judged(
        "pretraining gains flatten past roughly 80-160 tokens per parameter",
        f"margin = (general bits/byte gained per doubling from {lo}x to {mid}x) / 3 - (gained per doubling from "
        f"{hi_a}x to {hi_b}x), per seed",
        {"flattening": margin([e / 3 - lt for e, lt in zip(early, late)])},
        f"gain per doubling {mean_std_text(early, 4)} from {lo}x to {mid}x vs {mean_std_text(late, 4)} from "
        f"{hi_a}x to {hi_b}x ({results['pretrain_scaling']['parameters']:,} params); bpb: "
        + ", ".join(f"{b}x {mean_std_text(scaling[b]['general_bpb'])}" for b in budgets)
        + "; cloze accuracy: " + ", ".join(f"{b}x {mean_std_text(scaling[b]['general_cloze/accuracy'])}"
                                           for b in budgets))


def _replay_finding(study: EvolmStudy, results: dict) -> dict:
    """2. replay: less forgetting than none, and most of the domain gain kept at ~16%."""
    rep = results["replay"]["by_ratio"]
    ratios = sorted(rep, key=float)
    none, r16 = ratios[0], min(ratios[1:], key=lambda r: abs(float(r) - 0.16))
    less = [a - b for a, b in zip(rep[none]["forgetting"], rep[r16]["forgetting"])]
    kept = [b - 0.8 * a for a, b in zip(rep[none]["domain_gain"], rep[r16]["domain_gain"])]
    return judged(
        "CPT replay trades forgetting for domain gain; ~16% keeps most of the gain",
        f"two margins per seed: forgetting (general bpb rise) at replay {none} minus at {r16}, and the domain gain "
        f"(math bpb fall) at {r16} minus 0.8 x the gain at {none}",
        {"less forgetting": margin(less), "gain kept": margin(kept)},
        "; ".join(f"replay {r}: forgetting {mean_std_text(rep[r]['forgetting'])}, domain gain "
                  f"{mean_std_text(rep[r]['domain_gain'])}" for r in ratios))


def _sft_finding(study: EvolmStudy, results: dict) -> dict:
    """3. SFT epochs: ID rises; OOD is higher in EvoLM's 2-4 epoch window than at the longest SFT. The window
    is the paper's, fixed in advance, so the peak is not chosen from these runs."""
    k, sft = study.samples, results["sft_epochs"]
    epochs = sorted(sft, key=float)
    first, last = epochs[0], epochs[-1]
    window = [e for e in epochs if 2 <= float(e) <= 4 and e != last]
    rises = [b - a for a, b in zip(sft[first]["math_id/greedy_accuracy"], sft[last]["math_id/greedy_accuracy"])]
    margins = {"ID rises": margin(rises)}
    if window:
        ood = {e: sft[e]["math_ood/greedy_accuracy"] for e in epochs}
        in_window = [sum(ood[e][i] for e in window) / len(window) for i in range(len(ood[last]))]
        margins["OOD falls after 2-4 epochs"] = margin([w - z for w, z in zip(in_window, ood[last])])
    else:
        margins["OOD falls after 2-4 epochs"] = {"value": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    return judged(
        "more SFT epochs raise in-domain accuracy while out-of-domain peaks early, then falls",
        f"two margins per seed: ID greedy accuracy at {last} epochs minus at {first}, and OOD greedy accuracy "
        f"averaged over the sweep's epochs in EvoLM's 2-4 window ({', '.join(window) or 'none'}) minus at {last}",
        margins,
        "; ".join(f"{e} ep: ID greedy {mean_std_text(sft[e]['math_id/greedy_accuracy'])}, "
                  f"OOD greedy {mean_std_text(sft[e]['math_ood/greedy_accuracy'])}, "
                  f"OOD maj@{k} {mean_std_text(sft[e][f'math_ood/maj@{k}'])}" for e in epochs))


def _rl_finding(study: EvolmStudy, results: dict) -> dict:
    """4. RL lifts OOD: the margin is RL's OOD greedy accuracy minus its SFT model's, per seed."""
    k, rl = study.samples, results["rl_minus_sft"]
    return judged(
        f"RL after SFT ({study.rl_from_epochs:g} epochs) lifts out-of-domain accuracy",
        "margin = OOD greedy accuracy of the RL model minus its SFT model's, per seed",
        {"OOD lift": margin(rl["math_ood/greedy_accuracy"])},
        f"RL minus SFT, OOD greedy {_pct(rl['math_ood/greedy_accuracy'])}, OOD maj@{k} "
        f"{_pct(rl[f'math_ood/maj@{k}'])}, ID greedy {_pct(rl['math_id/greedy_accuracy'])} points (n={study.eval_n} "
        "per split)")


def _orm_signal(points: list[dict], k: int) -> float:
    """r^2 of the ORM score against maj@k where it points the right way (r > 0), minus the same for validation
    loss (a loss predicts accuracy only when lower loss goes with higher accuracy, r < 0)."""
    fit = orm_fits(points, k)
    orm = fit["orm"] if (fit["r_orm"] or 0) > 0 else 0.0
    loss = fit["math_bpb"] if (fit["r_math_bpb"] or 0) < 0 else 0.0
    return orm - loss


def _orm_finding(study: EvolmStudy, results: dict) -> dict:
    """5. ORM score tracks maj@k; validation loss does not: bootstrapped over checkpoints (1,000 resamples)."""
    import random

    from lmlab.stats import quantile

    k, fit, points = study.samples, results["r2"], results["checkpoints"]
    draw = random.Random(0)
    resampled = [_orm_signal([draw.choice(points) for _ in points], k) for _ in range(1000)]
    interval = (quantile(resampled, 0.025), quantile(resampled, 0.975)) if len(points) > 2 else (math.nan, math.nan)
    r_loss = fit["r_math_bpb"]
    return judged(
        f"across post-training checkpoints the ORM score tracks maj@{k} (r^2) and validation loss does not",
        f"margin = r^2(ORM score, ID maj@{k}) counted only when r > 0, minus r^2(math validation bpb, ID maj@{k}) "
        "counted only when r < 0; interval: 1,000 bootstrap resamples of the checkpoints",
        {"ORM over loss": margin([_orm_signal(points, k)], interval)},
        f"{len(points)} checkpoints (SFT epochs x seeds, RL x seeds): r^2(ORM score, ID maj@{k}) = "
        f"{_r2(fit['orm'])} (r = {_r2(fit['r_orm'])}); r^2(math validation bits/byte, ID maj@{k}) = "
        f"{_r2(fit['math_bpb'])} (r = {_r2(r_loss)}: "
        + ("lower loss, higher accuracy" if (r_loss or 0) < 0 else "higher loss goes with HIGHER accuracy, so loss "
           "misleads")
        + "); the ORM here is the exact-match verifier scoring the same samples, so its r^2 is high by construction")


def _pct(values: list[float]) -> str:
    return mean_std_text([100 * v for v in values], 1)


def _r2(value: float | None) -> str:
    return "undefined (no spread)" if value is None else f"{value:.3f}"


def write_report(study: EvolmStudy, results: dict) -> Path:
    from lmlab.plots import new_figure, save_figure

    out, k, pngs = study.run_dir, study.samples, []
    write_json_atomic(out / "evolm.json", results)

    def errorbar(ax, xs, series, label):
        stats = [mean_std(v) for v in series]
        ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3, label=label)

    scaling = results["pretrain_scaling"]["by_budget"]
    budgets = sorted(scaling, key=float)
    plt, fig, ax = new_figure()
    errorbar(ax, [float(b) for b in budgets], [scaling[b]["general_bpb"] for b in budgets], "general bits/byte")
    ax.set_xscale("log", base=2)
    ax.axvspan(80, 160, alpha=0.15, label="EvoLM's 80-160x")
    pngs.append(save_figure(plt, fig, ax, out / "f1_tokens_per_param.png", "pretraining tokens per parameter",
                            "bits per byte (held-out general text)", "1. pretraining budget (mean ± std over seeds)"))
    rep = results["replay"]["by_ratio"]
    ratios = sorted(rep, key=float)
    plt, fig, ax = new_figure()
    errorbar(ax, [float(r) for r in ratios], [rep[r]["forgetting"] for r in ratios], "forgetting: general bpb rise")
    errorbar(ax, [float(r) for r in ratios], [rep[r]["domain_gain"] for r in ratios], "domain gain: math bpb fall")
    pngs.append(save_figure(plt, fig, ax, out / "f2_replay.png", "replay ratio", "bits per byte",
                            "2. CPT replay (mean ± std over seeds)"))
    sft = results["sft_epochs"]
    epochs = sorted(sft, key=float)
    plt, fig, ax = new_figure()
    for key in ("math_id/greedy_accuracy", "math_ood/greedy_accuracy", f"math_ood/maj@{k}"):
        errorbar(ax, [float(e) for e in epochs], [sft[e][key] for e in epochs], key)
    ax.set_xscale("log", base=2)
    pngs.append(save_figure(plt, fig, ax, out / "f3_sft_epochs.png", "SFT epochs", "accuracy",
                            "3. SFT epochs (mean ± std over seeds)"))
    points = results["checkpoints"]
    y = [p[f"math_id/maj@{k}"] for p in points]
    for key, label, r2 in (("math_id/orm_score", "ORM score", results["r2"]["orm"]),
                           ("math_bpb", "math validation bits/byte", results["r2"]["math_bpb"])):
        plt, fig, ax = new_figure((5, 3.6))
        ax.scatter([p[key] for p in points], y)
        pngs.append(save_figure(plt, fig, ax, out / f"f5_{key.split('/')[-1]}_vs_maj.png", label, f"ID maj@{k}",
                                f"5. {label} vs maj@{k} (r² = {_r2(r2)})", legend=False))
    lines = [f"# {study.name}: EvoLM's findings at laptop scale ({study.seeds} seeds)", "",
             "Numbers are mean ± std over seeds. Accuracies are on held-out prompts (n = "
             f"{study.eval_n} per split), maj@{k} and the ORM score from the same {k} samples per prompt. Each "
             "finding's verdict comes from a margin and a rule written in the code before any run: reproduced, "
             "not reproduced, or inconclusive when its 95% interval does not separate from zero.", "",
             "## Findings", ""]
    lines += [finding_line(i, f) for i, f in enumerate(results["findings"], 1)]
    lines += ["", "## Post-training checkpoints", "",
              f"| model | ID greedy | ID maj@{k} | ID ORM | OOD greedy | OOD maj@{k} | math bpb | general bpb |",
              "|---|---|---|---|---|---|---|---|"]
    for p in points:
        lines.append(f"| {p['model']} | {p['math_id/greedy_accuracy']:.3f} | {p[f'math_id/maj@{k}']:.3f} | "
                     f"{p['math_id/orm_score']:.3f} | {p['math_ood/greedy_accuracy']:.3f} | "
                     f"{p[f'math_ood/maj@{k}']:.3f} | {p['math_bpb']:.3f} | {p['general_bpb']:.3f} |")
    lines += [""] + [f"![{p.stem}]({p.name})" for p in pngs]
    report = out / "evolm.md"
    write_text_atomic(report, "\n".join(lines) + "\n")
    return report
