"""The one artifact format every stage writes: an HF checkpoint directory plus `lmlab.json`.

The directory loads in vanilla transformers, vLLM and lm-eval (safetensors
weights, config, generation config, tokenizer with its chat template); the
manifest says which stage made it, from what, with which resolved recipe and
what it measured. It is written to a temporary sibling and renamed, so a
reader never sees half an artifact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import lmlab

MANIFEST = "lmlab.json"


def save_artifact(model, tokenizer, out_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Write model + tokenizer + manifest atomically; returns the artifact directory."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.config.use_cache = True  # training turns the KV cache off; generation wants it on
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    record = {"lmlab_version": lmlab.__version__, **manifest}
    (tmp / MANIFEST).write_text(json.dumps(record, indent=2, default=str))
    for file in tmp.rglob("*"):
        if file.is_file():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def read_manifest(artifact_dir: str | Path) -> dict[str, Any]:
    path = Path(artifact_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}
