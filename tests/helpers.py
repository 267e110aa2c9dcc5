"""Builders the test modules share: a tiny recipe and the metrics a run wrote."""

from __future__ import annotations

import json
from pathlib import Path

from lmlab.loading import validate_recipe


def tiny_recipe(tmp_path, tokenizer_dir=None, **blocks):
    tree = {
        "name": "tiny", "seed": 0,
        "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                  "intermediate_size": 64, "max_position_embeddings": 256},
        "tokenizer": {"path": str(tokenizer_dir)} if tokenizer_dir else {"vocab_size": 400, "max_train_bytes": 300_000},
        "data": {"train": {"kind": "general", "limit": 150}, "seq_len": 64, "validation_fraction": 0.05},
        "optim": {"lr": 1e-2, "warmup_ratio": 0.1},
        "train": {"max_steps": 12, "micro_batch_size": 4, "log_every": 1, "eval_every": 6, "eval_batches": 2,
                  "save_every": 4, "keep_last": 2},
        "output": {"dir": str(tmp_path / "runs")},
    }
    for block, values in blocks.items():
        if isinstance(values, dict):
            tree.setdefault(block, {}).update(values)
        else:
            tree[block] = values
    return validate_recipe(tree)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tiny_recipe_file(tmp_path, name: str, **blocks) -> Path:
    """A YAML stage recipe for a 1-layer model on 40 general documents, for tests that run `lmlab` processes."""
    import yaml

    tree = {"name": name,
            "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 64,
                      "max_position_embeddings": 128},
            "tokenizer": {"vocab_size": 300, "max_train_bytes": 60_000, "min_frequency": 1},
            "data": {"train": {"kind": "general", "limit": 40}, "seq_len": 32, "validation_fraction": 0.1},
            "train": {"max_steps": 3, "micro_batch_size": 2, "eval_every": 1000, "eval_batches": 2,
                      "save_every": 1000},
            "output": {"dir": str(tmp_path / "runs"), "report_to": []}}
    for block, values in blocks.items():
        if isinstance(values, dict) and isinstance(tree.get(block), dict):
            tree[block] = {**tree[block], **values}
        else:
            tree[block] = values
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path
