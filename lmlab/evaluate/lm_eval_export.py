"""lmlab tasks as lm-evaluation-harness tasks, so the same items score the same under `lm_eval --model hf`.

lmlab checkpoints are plain HF directories, so lm-eval loads them unchanged; what it lacks is lmlab's task
items. `export_lm_eval_tasks` writes, per task, the items as jsonl and a task YAML over them
(`dataset_path: json`, no hub access), and one plain command scores every exported task, no task-specific
flags (no `--apply_chat_template`):

- cloze -> `output_type: multiple_choice` with `acc` and `acc_norm`; lmlab tokenises context and option the
  way lm-eval does (together, split at the context), and lm-eval's `acc_norm` divides by the option's length
  in characters, lmlab's default `chars` normalisation; `target_delimiter` is empty because lmlab options
  carry their own leading text.
- generative -> `generate_until` on lmlab's exact prompt, already rendered with the checkpoint's chat
  template (system prompt and generation prompt included), greedy, stopping at the checkpoint's stop tokens,
  with two filters as lm-eval's own tasks have them: `strict-match` (the integer after the last
  "The answer is", lmlab's `greedy_accuracy`) and `flexible-extract` (the last integer anywhere,
  `greedy_accuracy_flexible`).

    lmlab export-tasks general_cloze,math_id --checkpoint runs/math_sft/final --out lm_eval_tasks
    lm_eval --model hf --model_args pretrained=runs/math_sft/final,dtype=float32 \\
        --include_path lm_eval_tasks --tasks lmlab_general_cloze,lmlab_math_id --device cpu
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from lmlab.evaluate.tasks import Task

from lmlab.errors import LmlabError
from lmlab.evaluate.generation import FLEXIBLE, STRICT

MAX_NEW_TOKENS = 48  # lmlab's generation budget for an answer (evaluate.generation.generate)


def _task_config(task: Task, data_file: Path, stops: list[str]) -> dict:
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
        return config
    config.update({
        "doc_to_text": "{{rendered}}",  # lmlab's prompt in the checkpoint's chat template
        "output_type": "generate_until",
        "doc_to_target": "{{answer}}",
        "target_delimiter": "",
        "generation_kwargs": {"until": stops, "do_sample": False, "max_gen_toks": MAX_NEW_TOKENS},
        "filter_list": [{"name": "strict-match", "filter": [
                             {"function": "regex", "regex_pattern": STRICT.pattern, "group_select": -1},
                             {"function": "take_first"}]},
                        {"name": "flexible-extract", "filter": [
                             {"function": "regex", "regex_pattern": FLEXIBLE.pattern, "group_select": -1},
                             {"function": "take_first"}]}],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                         "ignore_case": False, "ignore_punctuation": False}],
    })
    return config


def export_lm_eval_tasks(tasks: list[Task], out_dir: str | Path, checkpoint: str | Path | None = None) -> list[Path]:
    """Write `<task>.jsonl` and `lmlab_<task>.yaml` per task into `out_dir`; returns the YAML paths. Generative
    tasks need the checkpoint they will score: its chat template renders the prompts, its stop tokens end them."""
    from lmlab.data.mathgen import DEFAULT_SYSTEM
    from lmlab.evaluate.generation import render_prompts

    generative = [t.name for t in tasks if t.kind == "generative"]
    if generative and checkpoint is None:
        raise LmlabError(f"exporting {', '.join(generative)} needs --checkpoint: the prompts are rendered in its "
                         "chat template and end at its stop tokens, as lmlab eval renders them", field="--checkpoint")
    tokenizer, stops = (_renderer(checkpoint) if generative else (None, []))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for task in tasks:
        data_file = out_dir / f"{task.name}.jsonl"
        records = [{k: v for k, v in item.items() if not k.startswith("_")} for item in task.items]
        if task.kind == "generative":
            rendered = render_prompts(tokenizer, [r["prompt"] for r in records], system=DEFAULT_SYSTEM)
            for record, text in zip(records, rendered):
                record.update(rendered=text, answer=str(record["answer"]))  # compared as text after the filter
        with data_file.open("w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(record) + "\n" for record in records)
        config_file = out_dir / f"lmlab_{task.name}.yaml"
        config_file.write_text(yaml.safe_dump(_task_config(task, data_file, stops), sort_keys=False))
        written.append(config_file)
    return written


def _renderer(checkpoint: str | Path):
    """The checkpoint's tokenizer and the text of the tokens its generation stops at."""
    from lmlab.data.tokenizer import load_tokenizer
    from lmlab.evaluate.generation import stop_ids
    from lmlab.models.build import check_checkpoint

    from transformers import GenerationConfig

    check_checkpoint(Path(checkpoint), "--checkpoint")
    tokenizer = load_tokenizer(checkpoint)
    config = GenerationConfig.from_pretrained(checkpoint) if (Path(checkpoint) / "generation_config.json").is_file() \
        else None
    return tokenizer, [tokenizer.convert_ids_to_tokens(i) for i in stop_ids(config, tokenizer)]
