"""`lmlab run`: stages wired in order, validated before compute, skipped when unchanged, resumed after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lmlab.errors import LmlabError
from lmlab.pipeline import load_pipeline, run_lock

TINY_MODEL = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 64,
              "max_position_embeddings": 256}


def tiny_pipeline(tmp_path: Path, pt_steps: int = 12, sft_steps: int = 6, **extra) -> Path:
    tree = {
        "name": "tiny_life", "seed": 0, "output": {"dir": str(tmp_path / "runs")},
        "defaults": {"optim": {"lr": 1e-2, "warmup_ratio": 0.1},
                     "train": {"micro_batch_size": 4, "log_every": 1, "eval_every": 100, "eval_batches": 2,
                               "save_every": 2, "keep_last": 2},
                     "sft": {"eval_math": 0, "validation_fraction": 0.0, "early_stopping_patience": None}},
        "stages": [
            {"stage": "tokenizer", "tokenizer": {"vocab_size": 400, "max_train_bytes": 200_000},
             "data": {"train": {"kind": "general", "limit": 150}}},
            {"stage": "pretrain", "name": "pt", "model": TINY_MODEL,
             "data": {"train": {"kind": "general", "limit": 150}, "seq_len": 64, "validation_fraction": 0.05},
             "train": {"max_steps": pt_steps}},
            {"stage": "sft", "data": {"train": {"kind": "math", "num_examples": 64}, "seq_len": 96},
             "train": {"max_steps": sft_steps}},
            {"stage": "eval", "tasks": ["math_id"], "n": 4, "samples": 2},
        ],
    }
    tree.update(extra)
    path = tmp_path / "life.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def test_stages_are_wired_to_the_previous_artifact_and_the_tokenizer(tmp_path):
    pipeline, planned = load_pipeline(tiny_pipeline(tmp_path))
    kind = planned[0].kind
    pt, sft = planned[1].recipe, planned[2].recipe
    run = tmp_path / "runs" / "tiny_life"
    assert kind == "tokenizer" and pt.tokenizer.path == str(run / "tokenizer" / "tokenizer")
    assert sft.stage == "sft" and sft.model.from_pretrained == str(run / "pt" / "final")
    assert pt.train.log_every == 1 and sft.optim.lr == 1e-2  # defaults reach every stage


def _bad(tmp_path, stages, match, **extra):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", "output": {"dir": str(tmp_path / "runs")}, "stages": stages,
                                    **extra}, sort_keys=False))
    with pytest.raises(LmlabError, match=match):
        load_pipeline(path)


def test_impossible_orders_and_missing_artifacts_fail_before_compute(tmp_path):
    _bad(tmp_path, [{"stage": "sft"}], r"bad\.yaml:\d+: stages\[0\]\.stage: the sft stage continues a model, and no "
                                       r"earlier stage makes one")
    _bad(tmp_path, [{"stage": "pretrain"}, {"stage": "sft", "from": "nope"}], r"'from: nope' names no earlier stage")
    _bad(tmp_path, [{"stage": "pretrain"}, {"stage": "eval", "models": ["sft"]}], r"eval names 'sft'")
    _bad(tmp_path, [{"stage": "eval"}], "needs an earlier stage that makes a model")
    _bad(tmp_path, [{"stage": "pretrain"}, {"stage": "eval", "temperature": 0}],
         r"bad\.yaml:\d+: stages\[1\]\.temperature: Input should be greater than 0")
    _bad(tmp_path, [{"stage": "pretrain"}, {"stage": "pretrain"}], "two stages are named 'pretrain'")
    _bad(tmp_path, [{"stage": "pretrian"}], r"unknown stage 'pretrian'")
    _bad(tmp_path, [{"stage": "pretrain", "optim": {"lrr": 1}}], r"bad\.yaml:\d+: stages\[0\]\.optim\.lrr: unknown key 'lrr'")
    _bad(tmp_path, [{"stage": "pretrain"}, {"stage": "sft", "model": {"from_pretrained": "/missing/model"}}],
         "checkpoint directory not found: /missing/model")


def test_a_second_process_on_the_same_run_directory_is_refused(tmp_path):
    import os

    with run_lock(tmp_path / "run"):
        with pytest.raises(LmlabError, match=rf"another lmlab process \(PID {os.getpid()}\) is running in this directory"):
            with run_lock(tmp_path / "run"):
                pass
        assert (tmp_path / "run" / ".lock").read_text() == str(os.getpid())  # the refusal erased nothing
    with run_lock(tmp_path / "run"):  # released afterwards
        pass


def test_the_pipeline_runs_end_to_end_and_skips_finished_stages(tmp_path):
    from lmlab.pipeline import run_pipeline

    path = tiny_pipeline(tmp_path)
    run_dir = run_pipeline(path)
    state = json.loads((run_dir / "pipeline.json").read_text())
    assert all(state[name]["done"] for name in ("tokenizer", "pt", "sft"))
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert set(results) == {"pt", "sft"} and "general_bpb" in results["sft"]["metrics"]
    assert (run_dir / "report.md").is_file() or any(run_dir.glob("**/report.md"))
    def stamps():  # every stage's artifact and log, the tokenizer and the evaluation's results
        files = [run_dir / stage / name for stage in ("pt", "sft") for name in ("final/lmlab.json", "metrics.jsonl")]
        files += [run_dir / "tokenizer" / "tokenizer" / "tokenizer.json", run_dir / "eval" / "results.json"]
        return {str(f): (f.stat().st_mtime_ns, f.read_bytes()) for f in files}

    before = stamps()
    run_pipeline(path)  # unchanged: nothing retrains, nothing is evaluated again
    assert stamps() == before


def test_a_changed_stage_reruns_that_stage_and_later_ones_only(tmp_path):
    from lmlab.pipeline import run_pipeline

    run_dir = run_pipeline(tiny_pipeline(tmp_path))
    pt_stamp = (run_dir / "pt" / "final" / "lmlab.json").stat().st_mtime_ns
    sft_stamp = (run_dir / "sft" / "final" / "lmlab.json").stat().st_mtime_ns
    run_pipeline(tiny_pipeline(tmp_path, sft_steps=4))
    assert (run_dir / "pt" / "final" / "lmlab.json").stat().st_mtime_ns == pt_stamp
    assert (run_dir / "sft" / "final" / "lmlab.json").stat().st_mtime_ns != sft_stamp
    assert json.loads((run_dir / "sft" / "final" / "lmlab.json").read_text())["steps"] == 4


def test_an_edited_data_file_reruns_its_stage_and_a_moved_run_reruns_nothing(tmp_path):
    import shutil

    from lmlab.pipeline import run_pipeline

    chats = tmp_path / "chats.jsonl"
    chat = {"messages": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]}
    chats.write_text((json.dumps(chat) + "\n") * 16)
    path = tiny_pipeline(tmp_path, pt_steps=4, sft_steps=2)
    tree = yaml.safe_load(path.read_text())
    tree["stages"][2]["data"]["train"] = str(chats)
    path.write_text(yaml.safe_dump(tree))
    run_dir = run_pipeline(path)
    stamp = lambda stage: (run_dir / stage / "final" / "lmlab.json").stat().st_mtime_ns  # noqa: E731
    pt, sft = stamp("pt"), stamp("sft")
    chats.write_text((json.dumps(chat).replace("5", "five") + "\n") * 16)  # same name, new content
    run_pipeline(path)
    assert stamp("pt") == pt and stamp("sft") != sft
    moved = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "runs", moved)
    shutil.rmtree(tmp_path / "runs")
    tree["output"]["dir"] = str(moved)
    path.write_text(yaml.safe_dump(tree))
    before = {p: p.stat().st_mtime_ns for p in moved.rglob("lmlab.json")}
    run_pipeline(path)  # fingerprints do not hold absolute paths: nothing retrains
    assert {p: p.stat().st_mtime_ns for p in moved.rglob("lmlab.json")} == before


def test_a_bad_line_in_the_last_stage_fails_before_the_first_stage_computes(tmp_path):
    from lmlab.errors import LmlabError
    from lmlab.pipeline import run_pipeline

    chats = tmp_path / "chats.jsonl"
    chats.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n{\n')
    path = tiny_pipeline(tmp_path)
    tree = yaml.safe_load(path.read_text())
    tree["stages"][2]["data"]["train"] = str(chats)
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(LmlabError, match=r"chats\.jsonl:2: malformed JSON"):
        run_pipeline(path)
    assert not (tmp_path / "runs").exists()  # no stage ran, nothing was written


@pytest.mark.slow  # over 25 s on 2 cores: make test-slow
def test_killing_the_pipeline_mid_stage_and_rerunning_does_not_redo_finished_stages(tmp_path):
    path = tiny_pipeline(tmp_path, pt_steps=12, sft_steps=400)
    run_dir = tmp_path / "runs" / "tiny_life"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lmlab.cli", "run", str(path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and not list((run_dir / "sft" / "checkpoints").glob("checkpoint-*")):
            time.sleep(0.5)
        assert list((run_dir / "sft" / "checkpoints").glob("checkpoint-*")), "SFT never checkpointed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    state = json.loads((run_dir / "pipeline.json").read_text())
    assert state["pt"]["done"] and not state["sft"]["done"]
    pt_stamp = (run_dir / "pt" / "final" / "lmlab.json").stat().st_mtime_ns
    done = subprocess.run([sys.executable, "-m", "lmlab.cli", "run", str(path)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pt: done, inputs unchanged - skipped" in done.stdout
    assert "resuming from" in done.stdout
    assert (run_dir / "pt" / "final" / "lmlab.json").stat().st_mtime_ns == pt_stamp
    assert json.loads((run_dir / "pipeline.json").read_text())["sft"]["done"]


def test_each_stage_reads_its_data_once_and_hands_the_check_on(tmp_path, monkeypatch):
    """The pipeline's preflight reads every stage's data; the stage itself, when it runs, gets that check as a
    value (stages.preflight.Checked) and does not read the data again, nor remember checks in globals."""
    import lmlab.stages.preflight as preflight
    from lmlab.pipeline import run_pipeline

    reads: list[str] = []
    original = preflight.check_data

    def counting(recipe):
        reads.append(recipe.name)
        return original(recipe)

    monkeypatch.setattr(preflight, "check_data", counting)
    run_pipeline(tiny_pipeline(tmp_path))
    assert sorted(reads) == sorted(set(reads)) == ["pt", "sft", "tokenizer"]
    assert not hasattr(preflight, "_CHECKED") and not hasattr(preflight, "_DATA_CHECKED")
