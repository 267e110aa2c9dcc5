"""Reproductions of published findings as one study file each, run by `lmlab study FILE`."""

from __future__ import annotations

from pathlib import Path


from lmlab.errors import LmlabError

STUDIES = {"data_constrained": ("lmlab.experiments.studies.data_constrained", "run_data_constrained"),
           "evolm": ("lmlab.experiments.studies.evolm", "run_evolm")}


def _kind(path: str | Path) -> tuple[str, str]:
    from lmlab.loading import read_yaml

    kind = read_yaml(path, "study")[0].get("study")
    if kind not in STUDIES:
        raise LmlabError(f"unknown study '{kind}'; known: {', '.join(STUDIES)}", file=str(path), field="study")
    return STUDIES[kind]


def load_study_file(path: str | Path, overrides: list[str] | None = None):
    """The study file (with --set overrides) validated against its study's schema (no compute)."""
    import importlib

    from lmlab.experiments.studies.common import load_study

    module = importlib.import_module(_kind(path)[0])
    return load_study(path, module.SCHEMA, overrides)


def run_study(path: str | Path, overrides: list[str] | None = None) -> Path:
    """Dispatch on the file's `study:` key; returns the study's markdown report."""
    import importlib

    module, function = _kind(path)
    return getattr(importlib.import_module(module), function)(path, overrides)
