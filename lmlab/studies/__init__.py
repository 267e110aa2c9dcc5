"""Reproductions of published findings as one study file each, run by `lmlab study FILE`."""

from __future__ import annotations

from pathlib import Path

import yaml

from lmlab.errors import LmlabError

STUDIES = {"data_constrained": ("lmlab.studies.data_constrained", "run_data_constrained"),
           "evolm": ("lmlab.studies.evolm", "run_evolm")}


def run_study(path: str | Path) -> Path:
    """Dispatch on the file's `study:` key; returns the study's markdown report."""
    import importlib

    if not Path(path).is_file():
        raise LmlabError("study file not found", file=str(path))
    kind = (yaml.safe_load(Path(path).read_text()) or {}).get("study")
    if kind not in STUDIES:
        raise LmlabError(f"unknown study '{kind}'; known: {', '.join(STUDIES)}", file=str(path), field="study")
    module, function = STUDIES[kind]
    return getattr(importlib.import_module(module), function)(path)
