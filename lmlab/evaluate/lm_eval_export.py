"""lmlab tasks as lm-evaluation-harness tasks, so the same items run under `lm_eval --model hf`.

lmlab checkpoints are plain HF directories, so lm-eval loads them unchanged; what
it lacks is lmlab's task items. `export_lm_eval_tasks` writes, per task, the items
as jsonl and a task YAML over them (`dataset_path: json`, no hub access):

- cloze -> `output_type: multiple_choice`; lm-eval's `acc_norm` divides by the
  option's length in characters, which is lmlab's default `chars` normalisation;
  `target_delimiter` is empty because lmlab options carry their own leading text.
- generative -> `generate_until` `<|im_end|>`, with `exact_match` on the integer
  after "The answer is" (run with `--apply_chat_template`, as lmlab renders chats).

    lmlab export-tasks general_cloze,math_id --out lm_eval_tasks
    lm_eval --model hf --model_args pretrained=runs/math_sft/final,dtype=float32 \\
        --include_path lm_eval_tasks --tasks lmlab_general_cloze --device cpu
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from lmlab.evaluate.tasks import Task

ANSWER_REGEX = r"The answer is (-?[0-9][0-9,]*)"


def _task_config(task: Task, data_file: Path) -> dict:
    config = {
        "task": f"lmlab_{task.name}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}},
        "test_split": "test",
        "doc_to_text": "{{prompt}}",
    }
    if task.kind == "cloze":
        config.update({
            "output_type": "multiple_choice",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{gold}}",
            "target_delimiter": "",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        })
    else:
        config.update({
            "output_type": "generate_until",
            "doc_to_target": "{{answer}}",
            "generation_kwargs": {"until": ["<|im_end|>"], "do_sample": False, "max_gen_toks": 48},
            "filter_list": [{"name": "answer", "filter": [
                {"function": "regex", "regex_pattern": ANSWER_REGEX}, {"function": "take_first"}]}],
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                             "ignore_case": True, "ignore_punctuation": False}],
        })
    return config


def export_lm_eval_tasks(tasks: list[Task], out_dir: str | Path) -> list[Path]:
    """Write `<task>.jsonl` and `lmlab_<task>.yaml` per task into `out_dir`; returns the YAML paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for task in tasks:
        data_file = out_dir / f"{task.name}.jsonl"
        with data_file.open("w", encoding="utf-8") as fh:
            for item in task.items:
                record = {k: v for k, v in item.items() if not k.startswith("_")}
                if task.kind == "generative":
                    record["answer"] = str(record["answer"])  # compared as text after the regex filter
                fh.write(json.dumps(record) + "\n")
        config_file = out_dir / f"lmlab_{task.name}.yaml"
        config_file.write_text(yaml.safe_dump(_task_config(task, data_file), sort_keys=False))
        written.append(config_file)
    return written
