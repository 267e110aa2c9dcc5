"""Kotha et al. (2025) at laptop scale: with a fixed token budget, which recipe reaches the lowest loss?

One study file (`recipes/data_constrained_small.yaml`) names the model sizes, the
fixed unique-token budget and the grids; `lmlab study` then runs, in order:

1. the standard recipe (weight decay 0.1) at every size over an epoch grid;
2. the regularised recipe at every size, weight decay (up to 30x the usual), LR and epochs tuned jointly by
   coordinate descent, as the paper tunes them;
3. ensembles of K members (seeds differ) at each size, the members retuned for the ensemble: the single
   model's best configuration or the paper's shift for members (2x epochs, half the weight decay), whichever
   ensemble of K scores lower beyond the noise;
4. distillation of the largest ensemble into one student, and self-distillation: the student size's best
   single model distilled into a fresh model of its own size;
5. the standard recipe on smaller budgets, for a data-scaling fit.

Every model is scored by one function on the same held-out validation rows, so
single models, ensembles and students compare directly. It then fits L(N) per
recipe, the two-step ensemble asymptote, and the data the standard recipe would
need to match the joint recipe (data efficiency), and states for each of the
paper's claims whether it reproduced. Finished runs are reused, so an interrupted
study picks up where it stopped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from lmlab.errors import LmlabError
from lmlab.paths import NAME_PATTERN, write_json_atomic, write_text_atomic
from lmlab.recipe import OptimConfig, OutputConfig, Strict, merge_blocks
from lmlab.experiments.studies.common import StudyRunner, finding_line, judged, load_study
from lmlab.experiments.studies.paired import SCOPE, RowResamples, interval


class StandardGrid(Strict):
    weight_decay: float = Field(0.1, ge=0)
    epochs: list[float] = Field(default_factory=lambda: [1, 2, 4, 8, 16], min_length=1)


class RegularisedGrid(Strict):
    """The regularised recipe, tuned per size as Kotha et al. tune it: coordinate descent over these ladders
    (the LR as multiples of base.optim.lr) from `start`, one at a time with the others held, moving only to
    a configuration whose validation loss is lower beyond the noise of the held-out rows."""

    weight_decay: list[float] = Field(default_factory=lambda: [0.1, 0.2, 0.4, 0.8, 1.6, 3.2], min_length=1)
    lr: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0], min_length=1)
    epochs: list[float] = Field(default_factory=lambda: [1, 2, 4, 8, 16], min_length=1)
    start: dict[str, float] = Field(default_factory=lambda: {"weight_decay": 0.8, "lr": 1.0, "epochs": 8})
    rounds: int = Field(2, ge=1)
    extend: int = Field(2, ge=0)  # rungs a ladder may grow past an end where its best value sits

    @model_validator(mode="after")
    def _start_on_the_ladders(self) -> "RegularisedGrid":
        for key in ("weight_decay", "lr", "epochs"):
            if self.start.get(key) not in getattr(self, key):
                raise ValueError(f"start.{key} {self.start.get(key)} must be one of {key} {getattr(self, key)}")
        if set(self.start) - {"weight_decay", "lr", "epochs"}:
            raise ValueError("start names weight_decay, lr and epochs only")
        return self


class EnsembleSpec(Strict):
    members: int = Field(3, ge=3)  # three K values per size for the K-fit
    combine: Literal["logits", "logprobs"] = "logits"
    # members retuned for the ensemble: the paper finds they want about 2x the epochs and half the weight decay
    # of the best single model; the shifted configuration is kept when its K-member ensemble is better
    retune: bool = True


class DistillSpec(Strict):
    student: str  # a name from `models`; the teacher is the largest size's full ensemble
    alpha: float = Field(0.5, ge=0, le=1)
    temperature: float = Field(1.0, gt=0)
    top_k: int | None = Field(None, gt=0)


class DataScalingGrid(Strict):
    fractions: list[float] = Field(default_factory=lambda: [0.125, 0.25, 0.5], min_length=2)
    models: list[str] | None = None  # default: every size
    # default: the standard grid. Counted in passes over the FULL budget: a run on a fraction f of the data
    # makes e / f passes, so every data size gets the same steps (the paper's compute is not the limit)
    epochs: list[float] | None = None

    @model_validator(mode="after")
    def _fractions(self) -> "DataScalingGrid":
        if any(not 0 < f < 1 for f in self.fractions):
            raise ValueError("fractions are shares of the full budget: each in (0, 1)")
        return self


class DataConstrainedStudy(Strict):
    study: Literal["data_constrained"]
    name: str = Field(pattern=NAME_PATTERN)
    output: OutputConfig = Field(default_factory=OutputConfig)
    base: dict[str, Any]  # the pretrain recipe blocks every run shares; data.unique_tokens is the budget
    models: dict[str, dict[str, Any]] = Field(min_length=3)  # name -> model block, at least 3 sizes to fit
    standard: StandardGrid = Field(default_factory=StandardGrid)
    regularised: RegularisedGrid = Field(default_factory=RegularisedGrid)
    ensemble: EnsembleSpec = Field(default_factory=EnsembleSpec)
    distill: DistillSpec
    data_scaling: DataScalingGrid = Field(default_factory=DataScalingGrid)
    validation_rows: int = Field(200, gt=0)

    @model_validator(mode="after")
    def _names(self) -> "DataConstrainedStudy":
        if not (self.base.get("data") or {}).get("unique_tokens"):
            raise ValueError("base.data.unique_tokens is the fixed data budget the study is about: give it")
        for name in [self.distill.student, *(self.data_scaling.models or [])]:
            if name not in self.models:
                raise ValueError(f"'{name}' is not one of models: {', '.join(self.models)}")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir) / self.name


SCHEMA = DataConstrainedStudy  # what `lmlab.experiments.studies.load_study_file` validates a study file against


class Runner(StudyRunner):
    """Pretraining trees for this study: one model size, weight decay, epoch count, seed and data share."""

    def __init__(self, study: DataConstrainedStudy, file: str):
        given = (study.base.get("tokenizer") or {}).get("path")
        self.tokenizer_dir = Path(given) if given else study.run_dir / "tokenizer"  # trained once when not given
        super().__init__(study.run_dir, file, {str(self.tokenizer_dir)})
        self.study, self.budget = study, int(study.base["data"]["unique_tokens"])
        self.base_lr = float((study.base.get("optim") or {}).get("lr", OptimConfig().lr))

    def tree(self, name: str, model: str, wd: float, epochs: float, seed: int = 0, fraction: float = 1.0,
             extra: dict | None = None, lr: float = 1.0) -> dict:
        """One pretraining run; `lr` is a multiple of the base LR."""
        tree = merge_blocks(self.study.base, {
            "name": name, "seed": seed, "model": self.study.models[model],
            "optim": {"weight_decay": wd, "lr": self.base_lr * lr}, "train": {"epochs": epochs},
            "data": {"unique_tokens": max(1, int(self.budget * fraction))},
            "output": {"report_to": []}, "tokenizer": {"path": str(self.tokenizer_dir)}})
        return merge_blocks(tree, extra or {})


def _tag(x: float) -> str:
    return f"{x:g}".replace(".", "p")


def inverse_power_law(fit, loss: float) -> float:
    """The x at which A / x^alpha + E equals `loss` (inf when the loss is at or below the asymptote)."""
    return math.inf if loss <= fit.E else (fit.A / (loss - fit.E)) ** (1 / fit.alpha)


def run_name(recipe: str, model: str, wd: float, epochs: float, fraction: float = 1.0, lr: float = 1.0) -> str:
    return f"{recipe}-{model}-wd{_tag(wd)}-lr{_tag(lr)}-ep{_tag(epochs)}-d{_tag(fraction)}"


def plan_trees(study: DataConstrainedStudy, runner: Runner) -> dict[tuple, dict]:
    """The standard recipe's configurations (size, weight decay, epochs, data share), planned; and every
    configuration the regularised descent may visit, validated with them before any compute."""
    sizes, std, reg, scaling = list(study.models), study.standard, study.regularised, study.data_scaling
    plan = {("standard", m, std.weight_decay, e, 1.0) for m in sizes for e in std.epochs}
    plan |= {("standard", m, std.weight_decay, e, f) for f in scaling.fractions
             for m in (scaling.models or sizes) for e in (round(x / f, 6) for x in scaling.epochs or std.epochs)}
    trees = {key: runner.tree(run_name(*key), key[1], key[2], key[3], fraction=key[4]) for key in sorted(plan, key=str)}
    for tree in trees.values():
        runner.validate(tree)
    for m in sizes:
        for wd in reg.weight_decay:
            for lr in reg.lr:
                for e in reg.epochs:
                    runner.validate(runner.tree(run_name("regularised", m, wd, e, lr=lr), m, wd, e, lr=lr))
    return trees


class Scores:
    """Validation loss of a model directory on the study's held-out rows, computed once per name."""

    def __init__(self, rows):
        self.rows, self.losses, self.per_row = rows, {}, {}

    def __call__(self, directory: Path, key: str) -> float:
        from lmlab.console import console
        from lmlab.evaluate.likelihood import packed_rows_nll
        from lmlab.models.build import load_model

        if key not in self.losses:
            nll, tokens = packed_rows_nll(load_model(directory), self.rows)
            self.per_row[key] = (nll, tokens)  # each row's part: the findings' paired intervals resample them
            self.losses[key] = float(nll.sum() / tokens.sum())
            console().print(f"{key}: validation loss {self.losses[key]:.4f}")
        return self.losses[key]


def better(score: Scores, candidate: str, incumbent: str) -> bool:
    """Whether one scored model's validation loss is lower than another's beyond the noise of the held-out rows
    (lmlab.experiments.sweep.lower_beyond_noise, paired row by row)."""
    from lmlab.experiments.sweep import lower_beyond_noise
    from lmlab.stats import Estimate

    if score.losses[candidate] >= score.losses[incumbent]:  # before any resampling: most candidates lose outright
        return False
    return lower_beyond_noise(score.losses[candidate], score.losses[incumbent],
                              *(Estimate(*score.per_row[key], binary=False) for key in (candidate, incumbent)))


def _record(tree: dict, recipe: str, model: str, wd: float, epochs: float, fraction: float, lr: float,
            loss: float) -> dict:
    return {"name": tree["name"], "recipe": recipe, "model": model, "weight_decay": wd, "lr": lr, "epochs": epochs,
            "fraction": fraction, "loss": loss}


def single_runs(trees: dict[tuple, dict], runner: Runner, score: Scores) -> tuple[dict, dict[str, int]]:
    """Every planned configuration trained and scored; the parameter count each size's run itself made."""
    from lmlab.artifacts import read_manifest

    runs, params = {}, {}
    for key, tree in trees.items():
        final = runner.run(tree)
        params.setdefault(key[1], read_manifest(final)["parameters"])
        runs[tree["name"]] = _record(tree, *key, 1.0, score(final, tree["name"]))
    return runs, params


def regularised_runs(study: DataConstrainedStudy, runner: Runner, score: Scores, runs: dict) -> dict[str, dict]:
    """Each size's regularised recipe tuned by coordinate descent (lmlab.experiments.sweep) over weight decay,
    LR and epochs; every visited configuration joins `runs`. Returns each size's best record."""
    from lmlab.experiments.sweep import coordinate_descent

    reg, best = study.regularised, {}
    grid = {"weight_decay": reg.weight_decay, "lr": reg.lr, "epochs": reg.epochs}
    for m in study.models:
        def name(c: dict) -> str:
            return run_name("regularised", m, c["weight_decay"], c["epochs"], lr=c["lr"])

        def train(configs: list[dict]) -> None:
            for c in configs:
                tree = runner.tree(name(c), m, c["weight_decay"], c["epochs"], lr=c["lr"])
                if tree["name"] not in runs:
                    runs[tree["name"]] = _record(tree, "regularised", m, c["weight_decay"], c["epochs"], 1.0,
                                                 c["lr"], score(runner.run(tree), tree["name"]))

        chosen = coordinate_descent(dict(reg.start), grid, reg.rounds, train, lambda c: runs[name(c)]["loss"],
                                    lambda a, b: better(score, name(a), name(b)), reg.extend)
        best[m] = runs[name(chosen)]
    return best


def ensemble_runs(study: DataConstrainedStudy, runner: Runner, score: Scores, runs: dict,
                  reg_best: dict) -> tuple[dict[str, dict[int, float]], dict[str, list[float]], dict[str, dict]]:
    """Ensembles of K = 1..members at each size (member 0 is the configuration's seed-0 run), and each member
    alone, to set every ensemble against its members. With ensemble.retune the members' configuration is the
    best single model's or the paper's shift for members (2x epochs, half the weight decay), whichever
    K-member ensemble is lower beyond the noise of the rows."""
    ensembles, member_losses, chosen = {}, {}, {}
    for m in study.models:
        cfg = reg_best[m]
        candidates = [cfg] + ([{**cfg, "weight_decay": cfg["weight_decay"] / 2, "epochs": cfg["epochs"] * 2}]
                              if study.ensemble.retune else [])
        built = [_ensemble_of(study, runner, score, m, c, shifted=i > 0) for i, c in enumerate(candidates)]
        pick = 1 if len(built) > 1 and better(score, built[1]["keys"][-1], built[0]["keys"][-1]) else 0
        ensembles[m], member_losses[m] = built[pick]["curve"], built[pick]["members"]
        chosen[m] = {"weight_decay": candidates[pick]["weight_decay"], "lr": candidates[pick]["lr"],
                     "epochs": candidates[pick]["epochs"], "retuned": pick == 1, "keys": built[pick]["keys"],
                     "ensemble": built[pick]["ensemble"],  # all K members: the distillation teacher at the largest
                     "candidates": [{"weight_decay": c["weight_decay"], "epochs": c["epochs"], "loss": b["curve"][
                         study.ensemble.members]} for c, b in zip(candidates, built)]}
    return ensembles, member_losses, chosen


def _ensemble_of(study: DataConstrainedStudy, runner: Runner, score: Scores, m: str, cfg: dict,
                 shifted: bool) -> dict:
    """One configuration's members (seeds 0..K-1) and its ensembles of K = 2..members, scored."""
    from lmlab.models.ensemble import save_ensemble

    tag = "shifted-" if shifted else ""
    members, keys = [], []
    for seed in range(study.ensemble.members):
        key = cfg["name"] if seed == 0 and not shifted else f"member-{tag}{m}-s{seed}"
        members.append(runner.run(runner.tree(key, m, cfg["weight_decay"], cfg["epochs"], seed=seed, lr=cfg["lr"])))
        keys.append(key)
    losses = [score(d, k) for d, k in zip(members, keys)]
    curve, names = {1: losses[0]}, [keys[0]]
    for k in range(2, study.ensemble.members + 1):
        out = save_ensemble(members[:k], study.run_dir / "ensembles" / f"{tag}{m}-k{k}", study.ensemble.combine)
        names.append(f"ensemble-{tag}{m}-k{k}")
        curve[k] = score(out, names[-1])
    return {"curve": curve, "members": losses, "keys": names, "ensemble": str(out)}


def distill_run(study: DataConstrainedStudy, runner: Runner, score: Scores, reg_best: dict,
                self_distill: bool = False, teacher_ensemble: str | None = None) -> dict[str, Any]:
    """The largest size's full ensemble distilled into one student (its best regularised configuration); with
    `self_distill`, the student size's best regularised model is the teacher instead (the same size)."""
    d, cfg = study.distill, reg_best[study.distill.student]
    teacher = runner.final(cfg["name"]) if self_distill else teacher_ensemble
    name = f"{'self-distill' if self_distill else 'distill'}-{d.student}"
    student = runner.run(runner.tree(name, d.student, cfg["weight_decay"], cfg["epochs"], lr=cfg["lr"], extra={
        "stage": "distill", "tokenizer": {"path": None},
        "distill": {"teacher": str(teacher), "alpha": d.alpha, "temperature": d.temperature, "top_k": d.top_k}}))
    return {"student": d.student, "teacher": str(teacher), "loss": score(student, name)}


def run_data_constrained(path: str | Path, overrides: list[str] | None = None) -> Path:
    """Run the whole study (reusing finished runs); writes study.json, study.md and plots; returns the md."""
    from lmlab.console import console
    from lmlab.data.pretrain_data import build_packed_data
    from lmlab.data.tokenizer import resolve_tokenizer
    from lmlab.recipe import DataConfig
    from lmlab.loading import validate_recipe

    study = load_study(path, DataConstrainedStudy, overrides)
    runner, sizes = Runner(study, str(path)), list(study.models)
    trees = plan_trees(study, runner)
    console().print(f"[bold]{study.name}[/]: {len(trees)} standard runs + the regularised descent per size + "
                    "ensembles + two distilled students, "
                    f"{runner.budget:,} unique tokens -> {study.run_dir}")
    first = validate_recipe(next(iter(trees.values())) | {"tokenizer": study.base.get("tokenizer", {})},
                            file=str(path))
    tokenizer = resolve_tokenizer(first, study.run_dir)  # trained once, shared by every run
    rows = build_packed_data(DataConfig(**study.base["data"]), tokenizer, 0, study.validation_rows).validation
    if rows is None:
        raise LmlabError("the study needs a validation split", file=str(path), field="base.data.validation_fraction")
    score = Scores(rows)
    by_name, params = single_runs(trees, runner, score)
    reg_best = regularised_runs(study, runner, score, by_name)
    runs = list(by_name.values())
    std_best = {m: min((r for r in runs if r["recipe"] == "standard" and r["model"] == m and r["fraction"] == 1.0),
                       key=lambda r: r["loss"]) for m in sizes}
    ensembles, member_losses, members_cfg = ensemble_runs(study, runner, score, by_name, reg_best)
    results: dict[str, Any] = {
        "budget_tokens": runner.budget, "runs": by_name, "parameters": params, "standard_best": std_best,
        "regularised_best": reg_best, "ensembles": {m: {str(k): v for k, v in e.items()} for m, e in ensembles.items()},
        "ensemble_members": member_losses, "ensemble_config": members_cfg,
        "distilled": distill_run(study, runner, score, reg_best, teacher_ensemble=members_cfg[sizes[-1]]["ensemble"]),
        "self_distilled": distill_run(study, runner, score, reg_best, self_distill=True)}
    fits = fit_study(study, results, ensembles, runs)
    results |= fits.as_dict()
    results["findings"] = findings(study, results, ensembles, runs, fits, RowResamples(score.per_row))
    return write_report(study, results, ensembles, runs)


def _fit_or_none(xs, ys):
    from lmlab.scaling.fit import fit_power_law

    try:
        return fit_power_law(xs, ys, bootstrap=200)
    except LmlabError:
        return None


@dataclass
class Fits:
    """The study's fitted laws: best loss against parameters (standard, regularised), the ensembles' joint
    asymptote, the standard recipe's loss against data, and the data efficiency that follows."""

    standard: Any
    regularised: Any
    joint: Any
    data: Any
    data_tokens: list[float]
    data_losses: list[float]
    efficiency: dict[str, float] | None
    data_runs: list[str]  # the run behind each data-scaling point

    def as_dict(self) -> dict[str, Any]:
        """What study.json and the report read (fits as dicts)."""
        out = {"fits": {"standard": self.standard.to_dict() if self.standard else None,
                        "regularised": self.regularised.to_dict() if self.regularised else None},
               "joint": {"E": self.joint.E, "over_n": self.joint.over_n.to_dict(),
                         "per_n": {str(n): f.to_dict() for n, f in self.joint.per_n.items()}},
               "data_scaling": {"tokens": self.data_tokens, "standard_best": self.data_losses, "runs": self.data_runs,
                                "fit": self.data.to_dict() if self.data else None}}
        if self.efficiency is not None:
            out["data_efficiency"] = self.efficiency
        return out


def fit_study(study: DataConstrainedStudy, results: dict, ensembles: dict[str, dict[int, float]],
              runs: list[dict]) -> Fits:
    from lmlab.scaling.fit import joint_asymptote

    sizes, params, budget = list(study.models), results["parameters"], results["budget_tokens"]
    xs = [params[m] for m in sizes]
    std_fit = _fit_or_none(xs, [results["standard_best"][m]["loss"] for m in sizes])
    reg_fit = _fit_or_none(xs, [results["regularised_best"][m]["loss"] for m in sizes])
    joint = joint_asymptote({params[m]: ensembles[m] for m in sizes}, bootstrap=200)
    fractions = sorted({*study.data_scaling.fractions, 1.0})
    pool = study.data_scaling.models or sizes
    best_d = [min((r for r in runs if r["recipe"] == "standard" and r["fraction"] == f and r["model"] in pool),
                  key=lambda r: r["loss"]) for f in fractions]
    by_d = [r["loss"] for r in best_d]
    tokens = [f * budget for f in fractions]
    d_fit = _fit_or_none(tokens, by_d)
    efficiency = None
    if d_fit:
        best_joint = min(min(e.values()) for e in ensembles.values())
        efficiency = {"joint_asymptote": inverse_power_law(d_fit, joint.E) / budget,
                      "best_joint_model": inverse_power_law(d_fit, best_joint) / budget,
                      "regularised_asymptote": inverse_power_law(d_fit, reg_fit.E) / budget if reg_fit else math.nan}
    return Fits(std_fit, reg_fit, joint, d_fit, tokens, by_d, efficiency, [r["name"] for r in best_d])


def findings(study: DataConstrainedStudy, results: dict, ensembles: dict[str, dict[int, float]],
             runs: list[dict], fits: Fits, boot: RowResamples) -> list[dict]:
    """Each of the paper's claims at this scale, judged by a margin fixed before the run (positive when the
    claim holds) and its paired interval over resampled validation rows (studies.paired)."""
    refit, refit_draws = boot.refitted(lambda loss: asymptotes(study, results, fits, loss))
    return [_overfit_finding(study, runs, boot), _monotone_finding(study, results, boot),
            _ensemble_finding(study, results, ensembles, fits, refit, refit_draws),
            _distill_finding(study, results, ensembles, boot),
            _efficiency_finding(study, results, ensembles, fits, refit, refit_draws),
            _self_distill_finding(study, results, boot)]


def ensemble_keys(study: DataConstrainedStudy, results: dict, size: str) -> dict[int, str]:
    """The scored model behind each K of one size's ensemble curve (K = 1 is its members' seed-0 run)."""
    return dict(enumerate(results["ensemble_config"][size]["keys"], start=1))


def asymptotes(study: DataConstrainedStudy, results: dict, fits: Fits, loss) -> dict[str, float]:
    """The numbers behind findings 3 and 5 from the losses `loss(key)` gives (all rows, or one resample): the
    regularised L(N) asymptote, the joint asymptote, and log10 of the data the standard recipe needs to
    reach the joint asymptote over the budget. NaN where a fit fails or leaves its asymptote unidentified: E at
    its lower bound 0 means the points fit a pure power law, whose asymptote they do not measure."""
    from lmlab.scaling.fit import fit_power_law, joint_asymptote

    sizes, params = list(study.models), results["parameters"]
    out = {"E_reg": math.nan, "E_joint": math.nan, "log10_efficiency": math.nan}
    try:
        out["E_reg"] = identified(fit_power_law([params[m] for m in sizes],
                                                [loss(results["regularised_best"][m]["name"]) for m in sizes],
                                                bootstrap=0).E)
        out["E_joint"] = identified(joint_asymptote({params[m]: {k: loss(key) for k, key in
                                                                 ensemble_keys(study, results, m).items()}
                                                     for m in sizes}).E)
        if not math.isnan(out["E_joint"]):
            d_fit = fit_power_law(fits.data_tokens, [loss(name) for name in fits.data_runs], bootstrap=0)
            if not math.isnan(identified(d_fit.E)):
                out["log10_efficiency"] = math.log10(inverse_power_law(d_fit, out["E_joint"]) /
                                                     results["budget_tokens"])
    except LmlabError:
        pass
    return out


def identified(E: float) -> float:
    """A fitted asymptote, or NaN when the fit put it at its lower bound 0 (not measured by the points)."""
    return E if E > 0 else math.nan


def _pinned(*named: tuple[str, float]) -> str:
    pinned = [name for name, E in named if math.isnan(identified(E))]
    return f" ({', '.join(pinned)} at the bound 0: not identified by these points)" if pinned else ""


def _overfit_finding(study, runs, boot) -> dict:
    """1. the standard recipe overfits: the largest size's epoch curve on the full budget rises over its
    last doubling (the size and the step fixed in advance: where the paper sees overfitting first)."""
    largest = list(study.models)[-1]
    curve = sorted((r["epochs"], r["name"]) for r in runs
                   if r["recipe"] == "standard" and r["model"] == largest and r["fraction"] == 1.0)
    numbers = "; ".join(f"{e:g} ep {boot.full(name):.4f}" for e, name in curve)
    margins = {}
    if len(curve) >= 2:
        (e0, before), (e1, after) = curve[-2], curve[-1]
        margins[f"{largest}: loss at {e1:g} minus at {e0:g} epochs"] = boot.paired(lambda L: L(after) - L(before))
    else:
        margins["last doubling"] = {"value": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    return judged("the standard recipe overfits: more epochs raise the loss at the largest size",
                  "margin: the largest size's standard validation loss at the most epochs minus at the next fewer",
                  margins, f"standard recipe, {largest}, full budget: {numbers}")


def _monotone_finding(study, results, boot) -> dict:
    """2. the regularised recipe is monotone in N: the smallest of the size-to-size drops is positive."""
    sizes, params, best = list(study.models), results["parameters"], results["regularised_best"]
    names = [best[m]["name"] for m in sizes]
    margin = boot.paired(lambda L: np.min([L(a) - L(b) for a, b in zip(names, names[1:])], axis=0))
    return judged("the regularised recipe is monotone in N (loss falls at every size step)",
                  "margin: the smallest drop in the best regularised loss from one size to the next "
                  "(each size's configuration chosen on all rows)", {"smallest drop": margin},
                  ", ".join(f"{m} ({params[m]:,} params, wd {best[m]['weight_decay']:g}, lr x{best[m]['lr']:g}, "
                            f"{best[m]['epochs']:g} ep): "
                            f"{best[m]['loss']:.4f}" for m in sizes))


def _ensemble_finding(study, results, ensembles, fits, refit, draws) -> dict:
    """3. ensembles: the two-step joint asymptote is below the regularised single-model asymptote."""
    sizes, k = list(study.models), study.ensemble.members
    margin = interval(refit["E_reg"] - refit["E_joint"], draws["E_reg"] - draws["E_joint"])
    fit_ci = fits.joint.over_n.E_ci
    return judged("the ensemble asymptote is below the regularised single-model asymptote",
                  "margin: E_reg - E_joint, both refitted on each resample", {"E_reg - E_joint": margin},
                  f"joint E (K->inf then N->inf) = {fits.joint.E:.4f} (fit's own 95% CI over points "
                  f"{fit_ci[0]:.4f}-{fit_ci[1]:.4f}) vs E_reg = "
                  + (f"{fits.regularised.E:.4f}" if fits.regularised else "no fit")
                  + _pinned(("E_joint", fits.joint.E), ("E_reg", fits.regularised.E if fits.regularised else 0.0))
                  + f"; K=1 -> K={k}: "
                  + ", ".join(f"{m} {ensembles[m][1]:.4f} -> {ensembles[m][k]:.4f}" for m in sizes)
                  + "; members retuned to 2x epochs and half the weight decay (a lower K-member ensemble beyond the "
                  "noise) at: " + (", ".join(m for m in sizes if results["ensemble_config"][m]["retuned"]) or "none"))


def _distill_finding(study, results, ensembles, boot) -> dict:
    """4. a distilled student beats the standard recipe's best model."""
    sizes, params, k = list(study.models), results["parameters"], study.ensemble.members
    std_best, reg_best = results["standard_best"], results["regularised_best"]
    overall = min((std_best[m] for m in sizes), key=lambda r: r["loss"])
    student = results["distilled"]["student"]
    key = f"distill-{student}"
    margin = boot.paired(lambda L: L(overall["name"]) - L(key))
    return judged("a distilled student beats the standard recipe's best model",
                  "margin: the standard recipe's best loss (any size, chosen on all rows) minus the student's",
                  {"standard best - student": margin},
                  f"student ({student}, {params[student]:,} params) {results['distilled']['loss']:.4f} vs standard "
                  f"best {overall['loss']:.4f} ({overall['model']}); the student's own size: standard "
                  f"{std_best[student]['loss']:.4f}, regularised {reg_best[student]['loss']:.4f}; teacher ensemble "
                  f"{ensembles[sizes[-1]][k]:.4f}")


def _self_distill_finding(study, results, boot) -> dict:
    """6. self-distillation: a model of the student's size trained on its own size's best model beats it."""
    student, teacher = results["self_distilled"]["student"], results["regularised_best"][study.distill.student]
    key = f"self-distill-{student}"
    margin = boot.paired(lambda L: L(teacher["name"]) - L(key))
    return judged("self-distillation beats its teacher (the same size, the same data)",
                  "margin: the teacher's loss (the student size's best regularised model) minus its self-distilled "
                  "student's", {"teacher - self-distilled": margin},
                  f"{student}: teacher {teacher['loss']:.4f} (wd {teacher['weight_decay']:g}, lr x{teacher['lr']:g}, "
                  f"{teacher['epochs']:g} ep), self-distilled {results['self_distilled']['loss']:.4f}")


def _efficiency_finding(study, results, ensembles, fits, refit, draws) -> dict:
    """5. data efficiency of the joint recipe over the standard one, from the standard recipe's data fit."""
    claim = "the joint recipe is more data-efficient than the standard one (paper: 5.17x)"
    rule = "margin: log10 of the data the standard recipe's L(D) fit needs to reach the joint asymptote, over " \
           "the budget (positive: more than the budget), refitted on each resample"
    margin = interval(refit["log10_efficiency"], draws["log10_efficiency"])
    if fits.data is None:
        return judged(claim, rule, {"log10 efficiency": margin}, "the data-scaling fit of the standard recipe failed")
    d_fit, eff = fits.data, fits.efficiency
    best_joint = min(min(e.values()) for e in ensembles.values())
    text = (f"standard L(D) = {d_fit.A:.3g}/D^{d_fit.alpha:.3f} + {d_fit.E:.4f} over "
            f"{', '.join(f'{int(t):,}' for t in fits.data_tokens)} tokens; joint recipe (asymptote "
            f"{fits.joint.E:.4f}){_pinned(('standard E(D)', d_fit.E), ('E_joint', fits.joint.E))}: "
            f"{_times(eff['joint_asymptote'])} ({_times_interval(margin)}); best joint model measured "
            f"({best_joint:.4f}): {_times(eff['best_joint_model'])}; regularised asymptote: "
            f"{_times(eff['regularised_asymptote'])} (paper: 5.17x for the joint recipe)")
    return judged(claim, rule, {"log10 efficiency": margin}, text)


def _times_interval(margin: dict[str, float]) -> str:
    if math.isnan(margin["ci_low"]):
        return "no interval: the fits failed on too many resamples"
    return f"95% interval {_times(10 ** margin['ci_low'])} to {_times(10 ** margin['ci_high'])}"


def _times(x: float) -> str:
    return "beyond the standard recipe's asymptote (no amount of data)" if math.isinf(x) else f"{x:.3g}x the data"


def write_report(study: DataConstrainedStudy, results: dict, ensembles: dict[str, dict[int, float]],
                 runs: list[dict]) -> Path:
    from lmlab.plots import new_figure, save_figure
    from lmlab.scaling.fit import PowerLawFit, plot_fits

    out_dir, sizes, params = study.run_dir, list(study.models), results["parameters"]
    write_json_atomic(out_dir / "study.json", results)
    pngs = []
    plt, fig, ax = new_figure()
    for m in sizes:
        curve = sorted((r["epochs"], r["loss"]) for r in runs if r["recipe"] == "standard" and r["model"] == m
                       and r["fraction"] == 1.0)
        ax.plot(*zip(*curve), marker="o", label=f"{m} ({params[m]:,} params)")
    ax.set_xscale("log", base=2)
    pngs.append(save_figure(plt, fig, ax, out_dir / "standard_epochs.png", "epochs over the fixed data",
                            "validation loss", "standard recipe (weight decay 0.1): loss vs epochs"))
    xs = [params[m] for m in sizes]
    series = {}
    for label, key in (("standard", "standard_best"), ("regularised", "regularised_best")):
        fit = results["fits"][label]
        if fit:
            series[label] = (xs, [results[key][m]["loss"] for m in sizes],
                             PowerLawFit(fit["A"], fit["alpha"], fit["E"], fit["rmse"], fit["n_points"]))
    over_n = results["joint"]["over_n"]
    series["ensemble, K->inf"] = (xs, [results["joint"]["per_n"][str(x)]["E"] for x in xs],
                                  PowerLawFit(over_n["A"], over_n["alpha"], over_n["E"], over_n["rmse"],
                                              over_n["n_points"]))
    pngs.append(plot_fits(series, out_dir / "loss_vs_params.png", xlabel="parameters N",
                          title=f"fixed {results['budget_tokens']:,} tokens: fits L(N) = A/N^alpha + E"))
    ds = results["data_scaling"]
    if ds["fit"]:
        f = ds["fit"]
        pngs.append(plot_fits({"standard, best per budget": (ds["tokens"], ds["standard_best"], PowerLawFit(
            f["A"], f["alpha"], f["E"], f["rmse"], f["n_points"]))}, out_dir / "standard_data_scaling.png",
            xlabel="unique training tokens D", title="standard recipe: loss vs data (joint asymptote "
                                                    f"{results['joint']['E']:.3f})"))
    lines = [f"# {study.name}: data-constrained recipes at {results['budget_tokens']:,} unique tokens", "",
             "Every model is scored by the same function on the same held-out validation rows "
             f"({study.validation_rows} rows).", "", "## Findings", ""]
    lines += [f"Verdicts ({SCOPE}):", ""]
    lines += [finding_line(i, f) for i, f in enumerate(results["findings"], 1)]
    lines += _tables(study, results, ensembles)
    lines += [""] + [f"![{p.stem}]({p.name})" for p in pngs]
    report = out_dir / "study.md"
    write_text_atomic(report, "\n".join(lines) + "\n")
    return report


def _tables(study: DataConstrainedStudy, results: dict, ensembles: dict[str, dict[int, float]]) -> list[str]:
    """The report's tables: every run, then each size's ensembles with their members' configuration."""
    sizes, params, lines = list(study.models), results["parameters"], []
    lines += ["", "## Runs", "", "Regularised runs are the configurations the coordinate descent visited (weight "
              f"decay {study.regularised.weight_decay}, LR x {study.regularised.lr}, epochs "
              f"{study.regularised.epochs}, from {study.regularised.start}).", "",
              "| run | recipe | model | weight decay | LR x | epochs | data share | validation loss |",
              "|---|---|---|---|---|---|---|---|"]
    for name, r in sorted(results["runs"].items(), key=lambda kv: (kv[1]["fraction"], kv[1]["recipe"], kv[0])):
        lines.append(f"| {name} | {r['recipe']} | {r['model']} | {r['weight_decay']:g} | {r.get('lr', 1.0):g} | "
                     f"{r['epochs']:g} | {r['fraction']:g} | {r['loss']:.4f} |")
    lines += ["", "| model | parameters | members (wd, epochs) | K=1 | "
              + " | ".join(f"K={k}" for k in range(2, study.ensemble.members + 1)) + " |",
              "|---" * (study.ensemble.members + 3) + "|"]
    for m in sizes:
        cfg = results["ensemble_config"][m]
        members = f"{cfg['weight_decay']:g}, {cfg['epochs']:g}" + (" (retuned: 2x epochs, wd / 2)" if cfg["retuned"]
                                                                  else "")
        lines.append(f"| {m} | {params[m]:,} | {members} | " + " | ".join(
            f"{ensembles[m][k]:.4f}" for k in range(1, study.ensemble.members + 1)) + " |")
    return lines
