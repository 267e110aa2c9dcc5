"""The fuzz corpus: malformed inputs on every surface, each with the error it must give.

Every case runs the real command line (in process, through typer's runner) and must end with
exit 2, one `error:` line that names the file (and line, where there is one) and the field,
no traceback, and no file left behind. Add a case with every new input.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lmlab.cli import app

MODEL = ("model: {hidden_size: 32, num_layers: 1, num_heads: 4, num_kv_heads: 2, intermediate_size: 64, "
         "max_position_embeddings: 512}\n")
TINY = "name: r\n" + MODEL + "train: {max_steps: 1}\n"


@dataclass
class Case:
    name: str
    args: list[str]  # {ckpt} is the tiny checkpoint fixture, {dir} the case's directory
    expect: list[str]  # substrings of the error line: file, line, field, message
    files: dict[str, str | bytes] = field(default_factory=dict)


def recipe(extra: str, base: str = TINY) -> dict[str, str]:
    return {"r.yaml": base + extra}


def post(stage: str, extra: str) -> dict[str, str]:
    return {"r.yaml": f"name: r\nstage: {stage}\nmodel: {{from_pretrained: '{{ckpt}}'}}\n" + extra}


def jsonl(*records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


CHAT_OK = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
PAIR_OK = {"prompt": "q", "chosen": "a", "rejected": "b"}
PROMPTS = "data: {train: {kind: math, format: prompt, num_examples: 8}}\n"
TASK_OK = "name: t\nkind: generative\npath: items.jsonl\n"

CASES = [
    # --- recipes ------------------------------------------------------------------------------------------
    Case("unknown top-level key", ["pretrain", "r.yaml"], ["r.yaml:4", "unknown key 'traing'"],
         recipe("traing: {}\n")),
    Case("unknown nested key", ["pretrain", "r.yaml"], ["r.yaml:1", "model.hiden", "unknown key"],
         {"r.yaml": "model: {hiden: 3}\n"}),
    Case("lr not a number", ["pretrain", "r.yaml"], ["r.yaml:4", "optim.lr"], recipe("optim: {lr: fast}\n")),
    Case("negative micro batch", ["pretrain", "r.yaml"], ["r.yaml:3", "train.micro_batch_size"],
         {"r.yaml": "name: r\ntrain:\n  micro_batch_size: -1\n"}),
    Case("two budgets", ["pretrain", "r.yaml"], ["r.yaml:2", "train", "only one training budget"],
         {"r.yaml": "name: r\ntrain: {tokens: 100, max_steps: 3}\n"}),
    Case("heads not a multiple of kv heads", ["pretrain", "r.yaml"], ["r.yaml", "model", "multiple of num_kv_heads"],
         {"r.yaml": "model: {num_heads: 4, num_kv_heads: 3}\n"}),
    Case("hidden not divisible by heads", ["pretrain", "r.yaml"], ["r.yaml", "model", "divisible"],
         {"r.yaml": "model: {hidden_size: 30, num_heads: 4, num_kv_heads: 2}\n"}),
    Case("seq_len above positions", ["pretrain", "r.yaml"], ["r.yaml", "max_position_embeddings"],
         recipe("data: {seq_len: 1024}\n")),
    Case("name dot dot", ["pretrain", "r.yaml"], ["r.yaml:1", "name"], {"r.yaml": "name: '..'\n"}),
    Case("name with a slash", ["pretrain", "r.yaml"], ["r.yaml:1", "name"], {"r.yaml": "name: a/b\n"}),
    Case("missing data file", ["pretrain", "r.yaml"], ["r.yaml:4", "data.train.0", "file not found: corpus.txt"],
         recipe("data: {train: corpus.txt}\n")),
    Case("unknown source kind", ["pretrain", "r.yaml"], ["r.yaml:4", "data.train.0.kind"],
         recipe("data: {train: {kind: web, path: x}}\n")),
    Case("invalid YAML", ["pretrain", "r.yaml"], ["r.yaml:2", "invalid YAML"], {"r.yaml": "a: [1\nb: 2\n"}),
    Case("recipe is a list", ["pretrain", "r.yaml"], ["r.yaml", "must be a mapping"], {"r.yaml": "- 1\n- 2\n"}),
    Case("study with invalid YAML", ["study", "s.yaml"], ["s.yaml:3", "invalid YAML"],
         {"s.yaml": "study: evolm\nname: [x\n"}),
    Case("study file is a list", ["study", "s.yaml"], ["s.yaml", "a study must be a mapping"], {"s.yaml": "- evolm\n"}),
    Case("study file not UTF-8", ["study", "s.yaml"], ["s.yaml", "UTF-8"], {"s.yaml": b"study: \xff\n"}),
    Case("pipeline with invalid YAML", ["run", "p.yaml"], ["p.yaml:3", "invalid YAML"],
         {"p.yaml": "stages:\n  - {stage: [pretrain\n"}),
    Case("recipe not UTF-8", ["pretrain", "r.yaml"], ["r.yaml", "UTF-8"], {"r.yaml": b"name: \xff\xfe\n"}),
    Case("recipe file missing", ["pretrain", "nope.yaml"], ["nope.yaml", "not found"]),
    Case("negative rope theta", ["pretrain", "r.yaml"], ["r.yaml:1", "model.rope_theta"],
         {"r.yaml": "model: {rope_theta: -5}\n"}),
    Case("head_dim zero", ["pretrain", "r.yaml"], ["r.yaml", "model.head_dim"],
         {"r.yaml": "model: {head_dim: 0}\n"}),
    Case("unknown attention kernel", ["pretrain", "r.yaml"], ["r.yaml", "model.attn_implementation"],
         {"r.yaml": "model: {attn_implementation: bogus}\n"}),
    Case("unknown optimizer", ["pretrain", "r.yaml"], ["optim.optimizer", "unknown optimizer 'nope'"],
         recipe("optim: {optimizer: nope}\n")),
    Case("MoE top-k above experts", ["pretrain", "r.yaml"], ["r.yaml", "model", "num_experts_per_tok"],
         {"r.yaml": "model: {arch: qwen3_moe, num_experts: 2, num_experts_per_tok: 4}\n"}),
    Case("guard patience zero", ["pretrain", "r.yaml"], ["r.yaml:3", "train.guard.patience"],
         recipe("", "name: r\n" + MODEL + "train: {guard: {patience: 0}}\n")),
    Case("replay ratio above 1", ["pretrain", "r.yaml"], ["r.yaml:4", "data.replay_ratio"],
         recipe("data: {replay_ratio: 1.5}\n")),
    Case("validation fraction too big", ["pretrain", "r.yaml"], ["r.yaml:4", "data.validation_fraction"],
         recipe("data: {validation_fraction: 0.9}\n")),
    Case("unknown stage", ["run", "p.yaml"], ["p.yaml:2", "stages[0].stage", "unknown stage 'bogus'"],
         {"p.yaml": "stages:\n  - {stage: bogus}\n"}),
    Case("sft without a model", ["sft", "r.yaml"], ["r.yaml", "from_pretrained"], {"r.yaml": "name: r\n"}),
    Case("lora on pretraining", ["pretrain", "r.yaml"], ["r.yaml", "LoRA is for post-training"],
         recipe("lora: {enabled: true}\n")),
    Case("distill without teacher", ["distill", "r.yaml"], ["r.yaml", "distill.teacher"], {"r.yaml": "name: r\n"}),
    Case("checkpoint dir missing", ["sft", "r.yaml"], ["r.yaml:1", "model.from_pretrained", "not found"],
         {"r.yaml": "model: {from_pretrained: nowhere}\n"}),
    Case("tokenizer dir missing", ["pretrain", "r.yaml"], ["r.yaml:4", "tokenizer.path", "not found"],
         recipe("tokenizer: {path: nowhere}\n")),
    Case("vocabulary too small", ["pretrain", "r.yaml"], ["r.yaml:4", "tokenizer.vocab_size"],
         recipe("tokenizer: {vocab_size: 10}\n")),
    Case("unique tokens with streaming", ["pretrain", "r.yaml"], ["r.yaml:4", "data", "streaming"],
         recipe("data: {unique_tokens: 100, streaming: true}\n")),
    Case("reward weights mismatch", ["rl", "r.yaml"], ["r.yaml", "rl", "reward_weights"],
         post("rl", "rl: {rewards: [math_exact], reward_weights: [1, 2]}\n" + PROMPTS)),
    Case("eval task file missing", ["pretrain", "r.yaml"], ["missing.yaml", "task file not found"],
         recipe("eval: {tasks: [missing.yaml]}\n")),
    Case("eval task unknown", ["pretrain", "r.yaml"], ["--tasks", "unknown task 'trivia'"],
         recipe("eval: {tasks: [trivia]}\n")),
    Case("override attribute unknown", ["pretrain", "r.yaml"], ["model.overrides.nonsense"],
         recipe("", "name: r\nmodel: {overrides: {nonsense: 1}}\ntrain: {max_steps: 1}\n")),
    Case("unknown schedule", ["pretrain", "r.yaml"], ["r.yaml:4", "optim.schedule"],
         recipe("optim: {schedule: exp}\n")),
    Case("unknown precision", ["pretrain", "r.yaml"], ["r.yaml:3", "train.precision"],
         recipe("", "name: r\n" + MODEL + "train: {precision: fp8}\n")),
    Case("keep_last zero", ["pretrain", "r.yaml"], ["r.yaml:3", "train.keep_last"],
         recipe("", "name: r\n" + MODEL + "train: {keep_last: 0}\n")),
    Case("tokens per param negative", ["pretrain", "r.yaml"], ["r.yaml:2", "train.tokens_per_param"],
         {"r.yaml": "name: r\ntrain: {tokens_per_param: -1}\n"}),
    # --- --set ---------------------------------------------------------------------------------------------
    Case("set without equals", ["pretrain", "r.yaml", "--set", "optim.lr"], ["--set", "key.path=value"],
         recipe("")),
    Case("set malformed value", ["pretrain", "r.yaml", "--set", "optim.lr=[1"], ["--set", "optim.lr", "YAML"],
         recipe("")),
    Case("set unknown key", ["pretrain", "r.yaml", "--set", "optim.lrr=1"], ["--set", "optim.lrr", "unknown key"],
         recipe("")),
    Case("set into a scalar", ["pretrain", "r.yaml", "--set", "optim.lr.x=1"], ["--set", "not a block"],
         recipe("optim: {lr: 0.1}\n")),
    Case("set name dot dot", ["pretrain", "r.yaml", "--set", "name=.."], ["--set", "name"], recipe("")),
    Case("set bad value type", ["pretrain", "r.yaml", "--set", "train.max_steps=many"],
         ["--set", "train.max_steps"], recipe("")),
    # --- pretraining data files ----------------------------------------------------------------------------
    Case("jsonl malformed line", ["pretrain", "r.yaml"], ["d.jsonl:2", "malformed JSON"],
         {**recipe("data: {train: d.jsonl}\n"), "d.jsonl": jsonl({"text": "a"}, "{oops")}),
    Case("jsonl line is a list", ["pretrain", "r.yaml"], ["d.jsonl:1", "JSON object"],
         {**recipe("data: {train: d.jsonl}\n"), "d.jsonl": jsonl("[1, 2]")}),
    Case("jsonl missing text field", ["pretrain", "r.yaml"], ["d.jsonl:2", "text", "missing field"],
         {**recipe("data: {train: d.jsonl}\n"), "d.jsonl": jsonl({"text": "a"}, {"body": "b"})}),
    Case("jsonl other field missing", ["pretrain", "r.yaml"], ["d.jsonl:1", "content"],
         {**recipe("data: {train: {kind: jsonl, path: d.jsonl, field: content}}\n"), "d.jsonl": jsonl({"t": 1})}),
    Case("jsonl not UTF-8", ["pretrain", "r.yaml"], ["d.jsonl:2", "UTF-8"],
         {**recipe("data: {train: d.jsonl}\n"), "d.jsonl": b'{"text": "a"}\n{"text": "\xff"}\n'}),
    Case("gz that is not gzip", ["pretrain", "r.yaml"], ["d.jsonl.gz", "gzip"],
         {**recipe("data: {train: d.jsonl.gz}\n"), "d.jsonl.gz": '{"text": "a"}\n'}),
    Case("truncated gzip", ["pretrain", "r.yaml"], ["d.jsonl.gz", "gzip"],
         {**recipe("data: {train: d.jsonl.gz}\n"), "d.jsonl.gz": gzip.compress(b'{"text": "abc"}\n' * 50)[:30]}),
    Case("empty jsonl", ["pretrain", "r.yaml"], ["d.jsonl", "no documents"],
         {**recipe("data: {train: d.jsonl}\n"), "d.jsonl": "\n\n"}),
    Case("empty text file", ["pretrain", "r.yaml"], ["d.txt", "no documents"],
         {**recipe("data: {train: d.txt}\n"), "d.txt": "   \n"}),
    Case("text not UTF-8", ["pretrain", "r.yaml"], ["d.txt", "UTF-8"],
         {**recipe("data: {train: d.txt}\n"), "d.txt": b"caf\xe9\n"}),
    Case("text file named parquet", ["pretrain", "r.yaml"], ["d.parquet", "not a parquet file"],
         {**recipe("data: {train: d.parquet}\n"), "d.parquet": "just text\n"}),
    Case("parquet without the column", ["pretrain", "r.yaml"], ["d.parquet", "missing column 'text'"],
         {**recipe("data: {train: d.parquet}\n"), "d.parquet": "PARQUET:body"}),
    Case("broken datasets directory", ["pretrain", "r.yaml"], ["ds", "datasets directory"],
         {**recipe("data: {train: {kind: disk, path: ds}}\n"), "ds/dataset_info.json": "{not json"}),
    Case("glob matching nothing", ["pretrain", "r.yaml"], ["r.yaml:4", "file not found"],
         recipe("data: {train: {kind: text, path: 'docs/*.txt'}}\n")),
    Case("directory without text", ["pretrain", "r.yaml"], ["docs", "no documents"],
         {**recipe("data: {train: docs}\n"), "docs/image.bin": b"\x00\x01"}),
    Case("validation file malformed", ["pretrain", "r.yaml"], ["v.jsonl:1", "malformed JSON"],
         {**recipe("data: {validation: v.jsonl}\n"), "v.jsonl": "{x\n"}),
    Case("replay file malformed", ["pretrain", "r.yaml"], ["g.jsonl:3", "malformed JSON"],
         {**recipe("data: {replay: g.jsonl}\n"), "g.jsonl": jsonl({"text": "a"}, {"text": "b"}, "nope")}),
    Case("tokenizer source malformed", ["pretrain", "r.yaml"], ["t.jsonl:1"],
         {**recipe("tokenizer: {train_sources: [t.jsonl]}\n"), "t.jsonl": "[]\n"}),
    # --- SFT data ------------------------------------------------------------------------------------------
    Case("messages is a string", ["sft", "r.yaml"], ["c.jsonl:1", "messages"],
         {**post("sft", "data: {train: c.jsonl}\n"), "c.jsonl": jsonl({"messages": "hello"})}),
    Case("message not an object", ["sft", "r.yaml"], ["c.jsonl:2", "messages"],
         {**post("sft", "data: {train: c.jsonl}\n"), "c.jsonl": jsonl(CHAT_OK, {"messages": ["hi", "there"]})}),
    Case("message without role", ["sft", "r.yaml"], ["c.jsonl:1", "role"],
         {**post("sft", "data: {train: c.jsonl}\n"), "c.jsonl": jsonl({"messages": [{"content": "hi"}]})}),
    Case("unknown role", ["sft", "r.yaml"], ["c.jsonl:1", "role"],
         {**post("sft", "data: {train: c.jsonl}\n"),
          "c.jsonl": jsonl({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]})}),
    Case("content not text", ["sft", "r.yaml"], ["c.jsonl:1", "content"],
         {**post("sft", "data: {train: c.jsonl}\n"),
          "c.jsonl": jsonl({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]})}),
    Case("no assistant turn", ["sft", "r.yaml"], ["c.jsonl:1", "assistant"],
         {**post("sft", "data: {train: c.jsonl}\n"), "c.jsonl": jsonl({"messages": [{"role": "user", "content": "x"}]})}),
    Case("alpaca without output", ["sft", "r.yaml"], ["c.jsonl:1", "output"],
         {**post("sft", "data: {train: c.jsonl}\nsft: {layout: alpaca}\n"), "c.jsonl": jsonl({"instruction": "x"})}),
    Case("sharegpt bad speaker", ["sft", "r.yaml"], ["c.jsonl:1"],
         {**post("sft", "data: {train: c.jsonl}\nsft: {layout: sharegpt}\n"),
          "c.jsonl": jsonl({"conversations": [{"from": "alien", "value": "x"}]})}),
    Case("empty SFT file", ["sft", "r.yaml"], ["c.jsonl", "no records"],
         {**post("sft", "data: {train: c.jsonl}\n"), "c.jsonl": ""}),
    Case("SFT malformed line", ["sft", "r.yaml"], ["c.jsonl:2", "malformed JSON"],
         {**post("sft", "data: {train: c.jsonl}\n"), "c.jsonl": jsonl(CHAT_OK, "{")}),
    Case("messages empty", ["sft", "r.yaml"], ["c.jsonl:1", "messages"],
         {**post("sft", "data: {train: c.jsonl}\n"), "c.jsonl": jsonl({"messages": []})}),
    Case("SFT text file", ["sft", "r.yaml"], ["c.txt"],
         {**post("sft", "data: {train: c.txt}\n"), "c.txt": "hello\n"}),
    # --- preference pairs and RL prompts -------------------------------------------------------------------
    Case("chosen equals rejected", ["dpo", "r.yaml"], ["p.jsonl:2", "chosen", "same response"],
         {**post("dpo", "data: {train: p.jsonl}\n"), "p.jsonl": jsonl(PAIR_OK, {**PAIR_OK, "rejected": "a"})}),
    Case("pair without rejected", ["dpo", "r.yaml"], ["p.jsonl:1", "rejected"],
         {**post("dpo", "data: {train: p.jsonl}\n"), "p.jsonl": jsonl({"prompt": "q", "chosen": "a"})}),
    Case("chosen a number", ["dpo", "r.yaml"], ["p.jsonl:1", "chosen", "must be text"],
         {**post("dpo", "data: {train: p.jsonl}\n"), "p.jsonl": jsonl({**PAIR_OK, "chosen": 3})}),
    Case("pairs mixed with prompts", ["dpo", "r.yaml"], ["data.train", "mixes pairs and prompt-only"],
         {**post("dpo", "data: {train: p.jsonl}\n"), "p.jsonl": jsonl(PAIR_OK, {"prompt": "x"})}),
    Case("record without prompt", ["dpo", "r.yaml"], ["p.jsonl:1", "prompt"],
         {**post("dpo", "data: {train: p.jsonl}\n"), "p.jsonl": jsonl({"question": "x"})}),
    Case("rounds on fixed pairs", ["dpo", "r.yaml"], ["preference.rounds"],
         {**post("dpo", "data: {train: p.jsonl}\npreference: {rounds: 2}\n"), "p.jsonl": jsonl(PAIR_OK)}),
    Case("RL prompts without answers", ["rl", "r.yaml"], ["data.train", "integer 'answer'"],
         {**post("rl", "data: {train: q.jsonl}\n"), "q.jsonl": jsonl({"prompt": "what?"})}),
    Case("RL prompt empty", ["rl", "r.yaml"], ["q.jsonl:1", "prompt"],
         {**post("rl", "data: {train: q.jsonl}\n"), "q.jsonl": jsonl({"prompt": "  "})}),
    Case("RL group does not divide the batch", ["rl", "r.yaml"], ["train.micro_batch_size", "multiple"],
         post("rl", "train: {micro_batch_size: 6}\nrl: {num_generations: 4}\n" + PROMPTS)),
    Case("unknown reward", ["rl", "r.yaml"], ["unknown scorer 'vibes'"], post("rl", "rl: {rewards: [vibes]}\n" + PROMPTS)),
    Case("RL prompts malformed", ["rl", "r.yaml"], ["q.jsonl:1", "malformed JSON"],
         {**post("rl", "data: {train: q.jsonl}\n"), "q.jsonl": "{\n"}),
    Case("preference beta zero", ["dpo", "r.yaml"], ["r.yaml:4", "preference.beta"],
         post("dpo", "preference: {beta: 0}\n")),
    # --- task files ----------------------------------------------------------------------------------------
    Case("task yaml missing", ["eval", "{ckpt}", "--tasks", "t.yaml"], ["t.yaml", "task file not found"]),
    Case("task yaml malformed", ["eval", "{ckpt}", "--tasks", "t.yaml"], ["t.yaml", "invalid YAML"],
         {"t.yaml": "name: [t\n"}),
    Case("task yaml is a list", ["eval", "{ckpt}", "--tasks", "t.yaml"], ["t.yaml", "mapping"], {"t.yaml": "- 1\n"}),
    Case("task unknown key", ["eval", "{ckpt}", "--tasks", "t.yaml"], ["t.yaml", "unknown key 'size'"],
         {"t.yaml": TASK_OK + "size: 3\n", "items.jsonl": jsonl({"prompt": "1+1", "answer": 2})}),
    Case("task kind invalid", ["eval", "{ckpt}", "--tasks", "t.yaml"], ["t.yaml", "kind"],
         {"t.yaml": "name: t\nkind: essay\npath: items.jsonl\n"}),
    Case("task items missing", ["eval", "{ckpt}", "--tasks", "t.yaml"], ["t.yaml", "path", "items file not found"],
         {"t.yaml": TASK_OK}),
    Case("cloze gold out of range", ["eval", "{ckpt}", "--tasks", "t.yaml"], ["items.jsonl:1", "gold"],
         {"t.yaml": "name: t\nkind: cloze\npath: items.jsonl\n",
          "items.jsonl": jsonl({"prompt": "p", "choices": ["a", "b"], "gold": 5})}),
    Case("cloze gold a boolean", ["eval", "{ckpt}", "--tasks", "t.yaml"], ["items.jsonl:1", "gold"],
         {"t.yaml": "name: t\nkind: cloze\npath: items.jsonl\n",
          "items.jsonl": jsonl({"prompt": "p", "choices": ["a", "b"], "gold": True})}),
    Case("generative item without answer", ["eval", "{ckpt}", "--tasks", "t.yaml"], ["items.jsonl:1", "answer"],
         {"t.yaml": TASK_OK, "items.jsonl": jsonl({"prompt": "1+1"})}),
    Case("task items malformed", ["eval", "{ckpt}", "--tasks", "t.yaml"], ["items.jsonl:1", "malformed JSON"],
         {"t.yaml": TASK_OK, "items.jsonl": "{\n"}),
    Case("task normalisation invalid", ["eval", "{ckpt}", "--tasks", "t.yaml"], ["t.yaml", "normalisation"],
         {"t.yaml": TASK_OK + "normalisation: bytes\n", "items.jsonl": jsonl({"prompt": "1+1", "answer": 2})}),
    Case("task items empty", ["eval", "{ckpt}", "--tasks", "t.yaml"], ["items.jsonl", "no items"],
         {"t.yaml": TASK_OK, "items.jsonl": ""}),
    # --- checkpoints ---------------------------------------------------------------------------------------
    Case("checkpoint without config", ["eval", "m", "--tasks", "math_id"], ["m", "config.json is missing"],
         {"m/model.safetensors": b"x"}),
    Case("config not JSON", ["eval", "m", "--tasks", "math_id"], ["config.json", "not valid JSON"],
         {"m/config.json": "{", "m/tokenizer.json": "{}"}),
    Case("only a pickle", ["eval", "m", "--tasks", "math_id"], ["m", "safetensors", "pickles"],
         {"m/config.json": "{}", "m/pytorch_model.bin": b"x", "m/tokenizer.json": "{}"}),
    Case("truncated safetensors", ["eval", "m", "--tasks", "math_id"], ["model.safetensors", "unreadable"],
         {"m/config.json": "{}", "m/model.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":", "m/tokenizer.json": "{}"}),
    Case("checkpoint without tokenizer", ["eval", "m", "--tasks", "math_id"], ["m", "tokenizer"],
         {"m/config.json": "{}", "m/model.safetensors": b""}),
    Case("ensemble member missing", ["eval", "e", "--tasks", "math_id"], ["nowhere", "not found"],
         {"e/ensemble.json": json.dumps({"members": ["nowhere", "nowhere2"]}), "e/tokenizer.json": "{}"}),
    Case("checkpoint is a file", ["eval", "m.txt", "--tasks", "math_id"], ["m.txt", "not found"], {"m.txt": "x"}),
    Case("sft from a broken checkpoint", ["sft", "r.yaml"], ["m", "config.json is missing"],
         {"r.yaml": "name: r\nmodel: {from_pretrained: m}\n", "m/tokenizer.json": "{}"}),
    Case("reward model only a pickle", ["rl", "r.yaml"], ["rm", "safetensors"],
         {**post("rl", "rl: {rewards: [rm]}\n" + PROMPTS), "rm/config.json": "{}", "rm/pytorch_model.bin": b"x",
          "rm/tokenizer.json": "{}"}),
    Case("teacher missing weights", ["distill", "r.yaml"], ["t", "safetensors"],
         {"r.yaml": "name: r\ndistill: {teacher: t}\n", "t/config.json": "{}", "t/tokenizer.json": "{}"}),
    Case("resume from a damaged trainer state", ["pretrain", "r.yaml", "--resume"],
         ["checkpoint-2", "trainer_state.json is damaged"],
         {**recipe(""), "runs/r/checkpoints/checkpoint-2/trainer_state.json": "{"}),
    Case("resume from truncated weights", ["pretrain", "r.yaml", "--resume"],
         ["checkpoint-2/model.safetensors", "--resume", "unreadable"],
         {**recipe(""), "runs/r/checkpoints/checkpoint-2/trainer_state.json": "{}",
          "runs/r/checkpoints/checkpoint-2/model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}"}),
    Case("resume with a changed LR", ["pretrain", "r.yaml", "--resume", "--set", "optim.lr=0.5"],
         ["runs/r/recipe.yaml", "optim.lr", "--force"],
         {**recipe(""), "runs/r/recipe.yaml": "name: r\n" + MODEL + "train: {max_steps: 1}\n"}),
    # --- command-line flags --------------------------------------------------------------------------------
    Case("eval samples zero", ["eval", "{ckpt}", "--samples", "0"], ["--samples"]),
    Case("eval n zero", ["eval", "{ckpt}", "--n", "0"], ["--n"]),
    Case("pairs n zero", ["pairs", "{ckpt}", "--n", "0", "--out", "o.jsonl"], ["--n"]),
    Case("pairs prompts missing", ["pairs", "{ckpt}", "--prompts", "nope.jsonl", "--out", "o.jsonl"],
         ["nope.jsonl", "not found"]),
    Case("plan negative gpus", ["plan", "--model", "qwen3-1.7b", "--gpus", "-1xh100"], ["--gpus"]),
    Case("plan fractional gpus", ["plan", "--model", "qwen3-1.7b", "--gpus", "1.5xh100"], ["--gpus"]),
    Case("plan global batch zero", ["plan", "--model", "qwen3-1.7b", "--global-batch", "0"], ["--global-batch"]),
    Case("plan tokens not a count", ["plan", "--model", "qwen3-1.7b", "--tokens", "abc"], ["--tokens"]),
    Case("plan unknown method", ["plan", "--model", "qwen3-1.7b", "--method", "foo"], ["--method", "unknown method"]),
    Case("plan unknown model", ["plan", "--model", "gpt-17"], ["gpt-17"]),
    Case("ablate grid without values", ["ablate", "r.yaml", "--grid", "optim.lr"], ["--grid"], recipe("")),
    Case("ablate grid unknown key", ["ablate", "r.yaml", "--grid", "optim.lrr=1,2"], ["optim.lrr"], recipe("")),
    Case("export without adapter", ["export", "nowhere", "--out", "o"], ["nowhere", "adapter_config.json"]),
    Case("run pipeline missing", ["run", "nope.yaml"], ["nope.yaml", "not found"]),
    # --- pipelines -----------------------------------------------------------------------------------------
    Case("pipeline without stages", ["run", "p.yaml"], ["p.yaml", "stages"], {"p.yaml": "name: p\n"}),
    Case("stage without stage key", ["run", "p.yaml"], ["p.yaml", "stages[0].stage"],
         {"p.yaml": "stages:\n  - {name: a}\n"}),
    Case("from names no stage", ["run", "p.yaml"], ["p.yaml:3", "stages[1].from"],
         {"p.yaml": "stages:\n  - {stage: pretrain, name: a}\n  - {stage: sft, from: zz}\n"}),
    Case("two stages one name", ["run", "p.yaml"], ["p.yaml:3", "stages[1].name", "two stages"],
         {"p.yaml": "stages:\n  - {stage: pretrain, name: a}\n  - {stage: cpt, name: a}\n"}),
    Case("eval before any model", ["run", "p.yaml"], ["p.yaml:2", "stages[0]"], {"p.yaml": "stages:\n  - {stage: eval}\n"}),
    Case("eval names no stage", ["run", "p.yaml"], ["p.yaml:3", "stages[1].models"],
         {"p.yaml": "stages:\n  - {stage: pretrain}\n  - {stage: eval, models: [zz]}\n"}),
    Case("sft first without a model", ["run", "p.yaml"], ["p.yaml:2", "stages[0].stage"],
         {"p.yaml": "stages:\n  - {stage: sft}\n"}),
    Case("bad data line in the last stage", ["run", "p.yaml"], ["c.jsonl:2", "malformed JSON"],
         {"p.yaml": "stages:\n  - {stage: pretrain, train: {max_steps: 1}}\n"
                    "  - {stage: sft, data: {train: c.jsonl}}\n", "c.jsonl": jsonl(CHAT_OK, "{")}),
    Case("missing task in the eval stage", ["run", "p.yaml"], ["gone.yaml", "task file not found"],
         {"p.yaml": "stages:\n  - {stage: pretrain, train: {max_steps: 1}}\n  - {stage: eval, tasks: [gone.yaml]}\n"}),
    Case("pipeline name dot dot", ["run", "p.yaml"], ["p.yaml:1", "name"],
         {"p.yaml": "name: '..'\nstages:\n  - {stage: pretrain}\n"}),
    Case("eval stage name dot dot", ["run", "p.yaml"], ["p.yaml", "name"],
         {"p.yaml": "stages:\n  - {stage: pretrain}\n  - {stage: eval, name: '..'}\n"}),
    Case("pipeline stage unknown key", ["run", "p.yaml"], ["p.yaml:2", "stages[0]", "unknown key 'epochz'"],
         {"p.yaml": "stages:\n  - {stage: pretrain, epochz: 3}\n"}),
    Case("pipeline set unknown stage", ["run", "p.yaml", "--set", "stages.zz.train.max_steps=1"], ["--set", "zz"],
         {"p.yaml": "stages:\n  - {stage: pretrain}\n"}),
    Case("pipeline stages not a list", ["run", "p.yaml"], ["p.yaml", "stages"], {"p.yaml": "stages: 3\n"}),
]


def test_the_corpus_has_at_least_100_cases_with_distinct_names():
    assert len(CASES) >= 100 and len({c.name for c in CASES}) == len(CASES)


def _write(root: Path, files: dict[str, str | bytes], ckpt: Path) -> None:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str) and content.startswith("PARQUET:"):
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({content.split(":", 1)[1]: ["x", "y"]}), path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content.replace("{ckpt}", str(ckpt)))


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_malformed_input_is_one_error_line_with_exit_2_and_leaves_nothing(case, tmp_path, base_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, case.files, base_model)
    before = _tree(tmp_path)
    args = [a.replace("{ckpt}", str(base_model)) for a in case.args]
    result = CliRunner().invoke(app, args)
    output = result.output
    assert result.exit_code == 2, f"exit {result.exit_code}: {output[-1500:]} {result.exception!r}"
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 or (not errors and "Usage:" in output), output[-1500:]  # typer's usage errors exit 2 too
    message = errors[0] if errors else output
    for expected in case.expect:
        assert expected in message, f"{expected!r} not in {message!r}"
    assert _tree(tmp_path) == before  # nothing written: no run directory, no lock, no partial file
