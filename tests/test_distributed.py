"""Real multi-process runs: 2 processes on CPU over gloo, through torchrun, as a user launches them.

The tolerance: both runs see the same samples in the same optimizer steps (accelerate gives
rank r the r-th micro-batch of each global batch), so the only difference is the order of
floating-point sums (an all-reduce of two gradient halves against one batch). In fp32 that
moves the loss by about 1e-6 relative; 1e-4 over a few steps leaves room without hiding a
wrong batch, which moves the loss by 1e-2.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers import read_metrics, tiny_recipe_file

TOLERANCE = 1e-4


def launch(args: list[str], cwd: Path, nproc: int, own_launcher: bool = False) -> subprocess.CompletedProcess:
    """The command on `nproc` processes: through an external torchrun, or lmlab's own `--nproc`."""
    if own_launcher:
        command = [sys.executable, "-m", "lmlab.cli", *args, "--nproc", str(nproc)]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
            if nproc > 1 else [sys.executable]
        command = [*launcher, "-m", "lmlab.cli", *args]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def launch_together(jobs: list[tuple[list[str], Path, int]]) -> list[str]:
    """Several `lmlab ... --nproc N` commands at once (a 1-process run beside a 2-process one keeps the 2 cores
    busier than either alone); each must succeed; their standard outputs, in order."""
    started = [subprocess.Popen([sys.executable, "-m", "lmlab.cli", *args, "--nproc", str(nproc)], cwd=cwd,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for args, cwd, nproc in jobs]
    outputs = []
    for job in started:
        out, err = job.communicate(timeout=600)
        assert job.returncode == 0, out[-3000:] + err[-3000:]
        outputs.append(out)
    return outputs


def train_losses(run_dir: Path) -> dict[int, float]:
    """Step -> training loss (TRL adds `train_runtime` to its step records; the summary has `train_loss`)."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r and "train_loss" not in r}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The same recipe on 2 processes x micro-batch 2 and on 1 process x micro-batch 4."""
    root = tmp_path_factory.mktemp("ddp")
    recipe = tiny_recipe_file(root, "ddp", train={"max_steps": 6, "micro_batch_size": 2, "log_every": 1,
                                                  "save_every": 3, "keep_last": 3, "eval_every": 1000,
                                                  "eval_batches": 2})
    two = launch(["pretrain", str(recipe)], root, nproc=2, own_launcher=True)  # `lmlab pretrain --nproc 2`
    launch(["pretrain", str(recipe), "--set", "name=one", "--set", "train.micro_batch_size=4",
            "--set", f"tokenizer.path={root / 'runs' / 'ddp' / 'tokenizer'}"], root, nproc=1)
    return root, recipe, two


@pytest.mark.slow  # the launch path differs from torchrun's in the command only (tests/test_sharding.py checks it)
def test_accelerate_launch_with_a_config_file_trains_the_same_steps(two_runs):
    """`--accelerate-config configs/accelerate/ddp.yaml`: the same recipe through `accelerate launch`
    (gloo on CPU) gives the losses of lmlab's own torchrun launch."""
    root, recipe, _ = two_runs
    config = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "ddp.yaml"
    result = subprocess.run([sys.executable, "-m", "lmlab.cli", "pretrain", str(recipe), "--set", "name=acc",
                             "--set", f"tokenizer.path={root / 'runs' / 'ddp' / 'tokenizer'}", "--nproc", "2",
                             "--accelerate-config", str(config)], cwd=root, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    via_accelerate, via_torchrun = train_losses(root / "runs" / "acc"), train_losses(root / "runs" / "ddp")
    assert sorted(via_accelerate) == [1, 2, 3, 4, 5, 6]
    assert max(abs(via_accelerate[s] - via_torchrun[s]) / via_torchrun[s] for s in via_torchrun) < TOLERANCE
    assert (root / "runs" / "acc" / "final" / "model.safetensors").is_file()


def gpus() -> int:
    import torch

    return torch.cuda.device_count()


@pytest.mark.skipif(gpus() < 2, reason="FSDP2 through accelerate needs GPUs: with use_cpu the Trainer turns FSDP "
                                       "off (is_fsdp_enabled is False), so on CPU FSDP2 is checked with fully_shard "
                                       "in the bare loop of benchmarks/pretrain_throughput.py --fsdp2")
def test_fsdp2_trains_the_losses_of_ddp_and_its_checkpoint_resumes_on_one_process(two_runs, tmp_path):
    """train.distributed: zero3 (FSDP2 full shard) on 2 GPUs against DDP on the same global batch; its
    sharded checkpoint resumes on 1 process, and final/ is one plain HF checkpoint."""
    root, recipe, _ = two_runs
    tokenizer = ["--set", f"tokenizer.path={root / 'runs' / 'ddp' / 'tokenizer'}"]
    launch(["pretrain", str(recipe), "--set", "name=fsdp", "--set", "train.distributed=zero3", *tokenizer],
           root, nproc=2, own_launcher=True)
    launch(["pretrain", str(recipe), "--set", "name=gpu_ddp", "--set", "train.distributed=ddp", *tokenizer],
           root, nproc=2, own_launcher=True)
    fsdp, ddp = train_losses(root / "runs" / "fsdp"), train_losses(root / "runs" / "gpu_ddp")
    assert sorted(fsdp) == sorted(ddp) and max(abs(fsdp[s] - ddp[s]) / ddp[s] for s in ddp) < 1e-2  # bf16 sums
    run_dir = root / "runs" / "fsdp"
    shutil.rmtree(run_dir / "checkpoints" / "checkpoint-6")
    shutil.rmtree(run_dir / "final")
    result = launch(["pretrain", str(recipe), "--resume", "--set", "name=fsdp", "--set", "train.distributed=zero3",
                     "--set", "train.micro_batch_size=4", *tokenizer], root, nproc=1)
    assert "resuming from" in result.stdout and (run_dir / "final" / "model.safetensors").is_file()


def rank_pids(root: int) -> dict[int, int]:
    """RANK -> pid of the training processes below `root` in the process tree."""
    parents, envs = {}, {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            envs[int(proc.name)] = (proc / "environ").read_bytes().decode(errors="replace")
        except OSError:
            continue

    def below(pid: int) -> bool:
        while pid in parents and pid != root:
            pid = parents[pid]
        return pid == root

    ranks = {}
    for pid, raw in envs.items():
        env = dict(kv.split("=", 1) for kv in raw.split("\0") if "=" in kv)
        if "RANK" in env and "LOCAL_RANK" in env and below(pid):
            ranks[int(env["RANK"])] = pid
    return ranks


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except OSError:
        return False


def _start_until_checkpoint(recipe: Path, cwd: Path, run_dir: Path, step: int, *extra: str) -> subprocess.Popen:
    """`lmlab pretrain RECIPE --nproc 2` in a process group of its own, returned once checkpoint-`step` exists."""
    job = subprocess.Popen([sys.executable, "-m", "lmlab.cli", "pretrain", str(recipe), "--nproc", "2", *extra],
                           cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").is_file():
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[0][-3000:]
        time.sleep(0.02)
    return job


def test_a_killed_launcher_a_stuck_rank_or_a_killed_rank_stops_the_job_and_the_run_resumes(tmp_path):
    """kill -9 of the launcher's process group (what a user, a scheduler or the OOM killer does): no rank
    outlives it, though torchrun starts them in sessions of their own. Then, resumed, rank 1 hangs at the
    start of step 8 (the tests' switch) while rank 0 waits in that step's all-reduce: rank 0 gives up after
    train.collective_timeout, and the launcher's last line names rank 1, the stage and the step. Resumed
    again, rank 1 is killed with SIGKILL mid-stage: the job ends within seconds, its line says so, and no
    final/ is written. A last --resume continues from the last complete checkpoint, each step logged once, and
    the losses are those of an uninterrupted run."""
    timeout = 8  # the stuck launch's; the others wait up to 120 s (a run that timed out resumes with any wait)
    recipe = tiny_recipe_file(tmp_path, "killed", train={"max_steps": 15, "micro_batch_size": 2, "log_every": 1,
                                                         "save_every": 3, "keep_last": 2, "eval_every": 1000,
                                                         "eval_batches": 2, "collective_timeout": 120})
    run_dir = tmp_path / "runs" / "killed"
    job = _start_until_checkpoint(recipe, tmp_path, run_dir, 3)
    ranks = rank_pids(job.pid)
    assert sorted(ranks) == [0, 1]
    os.killpg(job.pid, signal.SIGKILL)
    job.communicate(timeout=60)
    deadline = time.monotonic() + 15
    while any(_alive(pid) for pid in ranks.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in ranks.values() if _alive(pid)], "ranks outlived their launcher"

    started = time.monotonic()
    stuck = subprocess.run([sys.executable, "-m", "lmlab.cli", "pretrain", str(recipe), "--resume", "--nproc", "2",
                            "--set", f"train.collective_timeout={timeout}"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=300, env={**os.environ, "LMLAB_TEST_STALL": "1:8"})
    took = time.monotonic() - started
    assert stuck.returncode != 0
    last = stuck.stderr.strip().splitlines()[-1]  # the launcher's one line, after everything else
    assert last.startswith("error: rank 1 in stage 'killed' at step 8 stopped responding"), stuck.stderr[-3000:]
    assert f"within train.collective_timeout ({timeout} s)" in last
    assert "[rank 0] stopped: another rank stopped answering" in stuck.stderr  # one line, no traceback
    assert "Traceback" not in stuck.stderr
    assert took < 40 + timeout, took  # start-up and four steps take ~15 s on 2 cores; the default waits 1800 s

    job = _start_until_checkpoint(recipe, tmp_path, run_dir, 9, "--resume")
    os.kill(rank_pids(job.pid)[1], signal.SIGKILL)
    killed = time.monotonic()
    output = job.communicate(timeout=300)[0]
    assert job.returncode != 0, output[-3000:]
    assert time.monotonic() - killed < 20  # torchrun's agent stops rank 0 as soon as rank 1 is gone
    last = output.strip().splitlines()[-1]
    assert last.startswith("error: rank 1 in stage 'killed' at step ") and "died without a word" in last, output[-3000:]
    assert not (run_dir / "final" / "model.safetensors").exists()

    result = launch(["pretrain", str(recipe), "--resume"], tmp_path, nproc=2, own_launcher=True)
    assert "resuming from" in result.stdout
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r and "train_loss" not in r]
    assert steps == list(range(1, 16))
    assert (run_dir / "final" / "model.safetensors").is_file()
    # and the run interrupted three times trained on the losses of an uninterrupted one (here: one process with
    # twice the micro-batch, the same global batch, trained in this process)
    from lmlab.loading import load_recipe
    from lmlab.stages import run_stage

    run_stage(load_recipe(recipe, ["name=uninterrupted", "train.micro_batch_size=4", "stage=pretrain",
                                   f"tokenizer.path={run_dir / 'tokenizer'}"]))
    uninterrupted, resumed = train_losses(tmp_path / "runs" / "uninterrupted"), train_losses(run_dir)
    assert sorted(uninterrupted) == sorted(resumed)
    assert max(abs(resumed[s] - uninterrupted[s]) / uninterrupted[s] for s in resumed) < TOLERANCE, resumed


STAGES = ("pt", "cpt", "sft", "distill", "dpo")  # the stages whose losses 1 and 2 processes share


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """The multi-process tests' one shared set-up: `lmlab run --nproc 2` with micro-batch 2 and one process with
    micro-batch 4 (the same global batch) over tokenizer, pretraining (6 steps, checkpoints at 4 and 6), CPT with
    replay, SFT, distillation of the SFT model on chat rows, DPO, GRPO and the evaluation."""
    import yaml

    from tests.test_pipeline import TINY_MODEL, tiny_pipeline
    from tests.test_preference_rl import write_pairs_file

    root = tmp_path_factory.mktemp("pipelines")
    runs, jobs = {}, []
    for nproc in (1, 2):
        here = root / f"n{nproc}"
        here.mkdir()
        path = tiny_pipeline(here, pt_steps=6, sft_steps=3)
        tree = yaml.safe_load(path.read_text())
        tree["defaults"]["train"]["micro_batch_size"] = 4 // nproc
        tree["stages"].insert(2, {"stage": "cpt", "name": "cpt", "train": {"max_steps": 4},
                                  "data": {"train": {"kind": "math", "num_examples": 200}, "seq_len": 64,
                                           "replay": {"kind": "general", "limit": 150}, "replay_ratio": 0.25,
                                           "validation_fraction": 0.05}})
        # the SFT model distilled into a fresh student on chat rows (labels vary per row) from a cached top-k
        tree["stages"].insert(4, {"stage": "distill", "name": "distill", "model": TINY_MODEL,
                                  "train": {"max_steps": 3},
                                  "data": {"train": {"kind": "math", "num_examples": 64}, "seq_len": 96},
                                  "distill": {"data_format": "chat", "top_k": 8, "cache_teacher": True}})
        # DPO on fixed pairs from the SFT model, then GRPO (sampled per rank: its losses are not compared)
        pairs = here / "pairs.jsonl"
        write_pairs_file(pairs, n=16)
        tree["stages"].insert(5, {"stage": "dpo", "name": "dpo", "from": "sft", "train": {"max_steps": 3},
                                  "data": {"train": {"kind": "jsonl", "path": str(pairs)}, "seq_len": 96}})
        tree["stages"].insert(6, {"stage": "rl", "name": "rl", "train": {"max_steps": 2},
                                  "data": {"train": {"kind": "math", "num_examples": 16}, "seq_len": 96},
                                  "rl": {"num_generations": 4, "rewards": ["math_format"],
                                         "max_completion_length": 12}})
        path.write_text(yaml.safe_dump(tree, sort_keys=False))
        jobs.append((["run", str(path)], here, nproc))
        runs[nproc] = here / "runs" / tree["name"]
    return runs, dict(zip((1, 2), launch_together(jobs)))


def test_a_pipeline_on_two_processes_ends_like_one_process(pipelines, tmp_path):
    """Every stage but GRPO (whose samples depend on each rank's seed) trains on the same losses on 2
    processes as on 1, CPT's forgetting baseline is measured at step 0 on the same held-out rows, the replay
    share is exact over the global batch, and there is one set of artifacts with the same table layout, each
    step logged once; the evaluation scores the same, and `lmlab eval --nproc 2` equals the pipeline's own."""
    runs, _ = pipelines
    results, losses, mixes, baselines = {}, {}, {}, {}
    for nproc, run_dir in runs.items():
        results[nproc] = json.loads((run_dir / "eval" / "results.json").read_text())
        for stage in (*STAGES, "rl"):
            assert (run_dir / stage / "final" / "model.safetensors").is_file()
            steps = [r["step"] for r in read_metrics(run_dir / stage) if "loss" in r and "train_loss" not in r]
            assert steps == sorted(set(steps)) and steps, stage
            losses[nproc, stage] = train_losses(run_dir / stage)
        manifest = json.loads((run_dir / "cpt" / "final" / "lmlab.json").read_text())
        mixes[nproc], baselines[nproc] = manifest["replay_mix"], manifest["metrics_before"]
        assert (run_dir / "report.md").is_file()
    for stage in STAGES:  # every stage on the same losses, step for step
        one, two = losses[1, stage], losses[2, stage]
        assert sorted(one) == sorted(two) and one, stage
        assert max(abs(two[s] - one[s]) / one[s] for s in one) < TOLERANCE, (stage, one, two)
    assert losses[2, "pt"][6] < losses[2, "pt"][1]  # and it trained
    assert abs(baselines[1]["eval_replay_loss"] - baselines[2]["eval_replay_loss"]) < TOLERANCE * 10
    assert mixes[1]["replay_tokens"] == mixes[2]["replay_tokens"] == round(0.25 * 4 * 4) * 64
    assert {k: sorted(v["metrics"]) for k, v in results[1].items()} == \
        {k: sorted(v["metrics"]) for k, v in results[2].items()}
    for stage in STAGES:  # the same models score the same: bits per byte to float noise, greedy answers exactly
        one, two = results[1][stage]["estimates"], results[2][stage]["estimates"]
        assert two["general_bpb"]["value"] == pytest.approx(one["general_bpb"]["value"], rel=1e-3), stage
        assert two["math_id/greedy_accuracy"]["num"] == one["math_id/greedy_accuracy"]["num"], stage
    # `lmlab eval --nproc 2` on the one-process run's SFT model: the pipeline's own scores of it, exactly
    shown = json.loads(launch(["eval", str(runs[1] / "sft" / "final"), "--tasks", "math_id", "--n", "4", "--samples",
                               "2", "--orm", "math_exact", "--json"], tmp_path, nproc=2, own_launcher=True).stdout)
    assert shown.pop("items_per_rank") == [2 + 2, 2 + 2]  # half the greedy and half the sampled prompts each
    assert {k: v["value"] for k, v in shown.items()} == \
        {k: v["value"] for k, v in results[1]["sft"]["estimates"].items() if k.startswith("math_id/")}


def test_two_processes_write_one_complete_artifact_and_log_each_step_once(pipelines):
    runs, outputs = pipelines
    run_dir = runs[2] / "pt"
    final = run_dir / "final"
    assert {"model.safetensors", "config.json", "tokenizer.json", "lmlab.json"} <= {p.name for p in final.iterdir()}
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r and "train_loss" not in r]
    assert steps == sorted(set(steps))  # each step once
    assert outputs[2].count("step 6/6 | loss") == 1  # the console speaks from rank 0 only (pt is the 6-step stage)
    for checkpoint in ("checkpoint-4", "checkpoint-6"):  # every rank's RNG state inside, nothing staged
        names = {p.name for p in (run_dir / "checkpoints" / checkpoint).iterdir()}
        assert {"model.safetensors", "rng_state_0.pth", "rng_state_1.pth", "trainer_state.json"} <= names
    assert not (run_dir / "checkpoints" / ".staging").exists()
    code = ("import sys; sys.modules['lmlab'] = None\n"
            "from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(final)!r})\n"
            "import torch; assert all(torch.isfinite(p).all() for p in m.parameters())\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_checkpoints_resume_across_world_sizes(pipelines, tmp_path):
    """The pipeline's 2-process pretraining checkpoint continues in 1 process, and its 1-process one in 2, on
    the losses of the uninterrupted 2-process run."""
    runs, _ = pipelines
    reference = train_losses(runs[2] / "pt")
    for source, nproc, micro in ((2, 1, 4), (1, 2, 2)):
        name = f"from{source}"
        run_dir = tmp_path / "runs" / name
        shutil.copytree(runs[source] / "pt", run_dir)
        shutil.rmtree(run_dir / "checkpoints" / "checkpoint-6")
        shutil.rmtree(run_dir / "final")
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records if r["step"] <= 4))
        result = launch(["pretrain", str(run_dir / "recipe.yaml"), "--resume", "--set", f"name={name}",
                         "--set", f"train.micro_batch_size={micro}", "--set", f"output.dir={tmp_path / 'runs'}"],
                        tmp_path, nproc=nproc)
        assert "resuming from" in result.stdout and "checkpoint-4" in result.stdout
        steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r and "train_loss" not in r]
        assert steps == [1, 2, 3, 4, 5, 6]  # steps 1-4 from before, 5-6 trained now: nothing redone
        resumed = train_losses(run_dir)
        assert (run_dir / "final" / "model.safetensors").is_file()
        assert max(abs(resumed[s] - reference[s]) / reference[s] for s in (5, 6)) < TOLERANCE, (source, resumed)


RANK_ROWS = r'''
import json, os, sys
import torch
from transformers import Trainer, TrainingArguments
from lmlab.data.pretrain_data import build_packed_data
from lmlab.data.tokenizer import load_tokenizer
from lmlab.recipe import DataConfig

corpus, tok_dir, out = sys.argv[1:4]
data = DataConfig(train={"kind": "jsonl", "path": corpus}, seq_len=32, unique_tokens=32 * 40)
packed = build_packed_data(data, load_tokenizer(tok_dir), 0, 4)  # rank 0 builds the store, rank 1 waits
args = TrainingArguments(output_dir=os.path.join(out, "t"), per_device_train_batch_size=4, use_cpu=True,
                         seed=0, data_seed=0, remove_unused_columns=False, report_to=[])
trainer = Trainer(model=torch.nn.Linear(1, 1), args=args, train_dataset=packed.train)
rows = [row for batch in trainer.get_train_dataloader() for row in batch["input_ids"].tolist()]
rank = int(os.environ["RANK"])
json.dump({"rows": rows, "all": packed.train.to_dict()["input_ids"]}, open(os.path.join(out, f"{rank}.json"), "w"))
'''


def test_two_ranks_read_disjoint_rows_that_cover_the_epoch(tmp_path, tok_dir):
    """40 rows, 2 ranks x micro-batch 4: each rank reads 20 rows from the one store, no row twice."""
    from lmlab.data.general import general_documents

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for _, t in general_documents(limit=60)))
    script = tmp_path / "rank_rows.py"
    script.write_text(RANK_ROWS)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), str(corpus), str(tok_dir), str(tmp_path)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    seen = [list(map(tuple, r["rows"])) for r in ranks]
    assert ranks[0]["all"] == ranks[1]["all"] and len(ranks[0]["all"]) == 40  # one validated dataset
    assert len(seen[0]) == len(seen[1]) == 20 and not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(map(tuple, ranks[0]["all"]))


STREAM_ROWS = r'''
import json, os, sys
import torch
from transformers import Trainer, TrainingArguments
from lmlab.data.pretrain_data import build_packed_data
from lmlab.data.tokenizer import load_tokenizer
from lmlab.recipe import DataConfig

corpus, tok_dir, out = sys.argv[1:4]
data = DataConfig(train={"kind": "jsonl", "path": corpus}, seq_len=32, streaming=True, validation_fraction=0.0)
packed = build_packed_data(data, load_tokenizer(tok_dir), 0, 4)
args = TrainingArguments(output_dir=os.path.join(out, "t"), per_device_train_batch_size=4, use_cpu=True, seed=0,
                         remove_unused_columns=False, report_to=[], max_steps=1000,
                         accelerator_config={"dispatch_batches": False})
trainer = Trainer(model=torch.nn.Linear(1, 1), args=args, train_dataset=packed.train)
rows = [row for batch in trainer.get_train_dataloader() for row in batch["input_ids"].tolist()]
json.dump(rows, open(os.path.join(out, f"{os.environ.get('RANK', 'single')}.json"), "w"))
'''


def test_two_ranks_stream_their_own_files(tmp_path, tok_dir):
    """Streaming a directory of two jsonl files on 2 ranks: each rank tokenises one file (one shard per
    file), no row is read twice, and together they are the rows one process streams."""
    from lmlab.data.general import general_documents

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = [t for _, t in general_documents(limit=40)]
    for i in range(2):
        (corpus / f"part-{i}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[i::2]))
    script = tmp_path / "stream_rows.py"
    script.write_text(STREAM_ROWS)
    base = [str(script), str(corpus), str(tok_dir), str(tmp_path)]
    single = subprocess.run([sys.executable, *base], capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             *base], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r: Counter(map(tuple, json.loads((tmp_path / f"{r}.json").read_text()))) for r in ("0", "1", "single")}
    # the corpus repeats a few windows, so rows are compared as multisets: a row read by both ranks
    # would be counted once more than one process reads it
    assert rows["0"] and rows["1"] and rows["0"] + rows["1"] == rows["single"]


ON_POLICY = r'''
import json, os, sys
from lmlab.data.tokenizer import load_tokenizer
from lmlab.evaluate.onpolicy import sample_pairs
from lmlab.models.build import load_model
from lmlab.stages.rl import prepare_rl
from tests.helpers import tiny_recipe

base, out = sys.argv[1:3]
rank = int(os.environ.get("RANK", "0"))
scored = []
def by_length(prompts, responses, items):
    scored.extend(responses)
    return [float(len(r)) for r in responses]

records = [{"prompt": "What is 2 + 3?", "answer": 5}] * 6  # one prompt: only the seed tells samples apart
pairs, stats = sample_pairs(load_model(base), load_tokenizer(base), records, by_length, samples=3,
                            max_new_tokens=12, seed=1)

# the evaluator: each rank scores its share of every task's items (in whole batches), all get every score
from lmlab.distributed import items_per_rank
from lmlab.evaluate.evaluator import evaluate
from lmlab.evaluate.orm import load_scorer
from lmlab.evaluate.tasks import load_task
from lmlab.evaluate.tasks import run_task
tasks = [load_task("math_id", 10), load_task("general_cloze", 6)]
model, tokenizer = load_model(base), load_tokenizer(base)
shared_before = items_per_rank()
scores = evaluate(model, tokenizer, tasks, samples=2, scorer=load_scorer("math_exact"), general_bpb=True)
scores.update({"small_batches/" + k: v for k, v in
               run_task(model, tokenizer, tasks[0], samples=2, batch_size=4, seed=3).items()})
evaluated = {k: v.as_dict() for k, v in scores.items()}
shares = [n - before for n, before in zip(items_per_rank(), shared_before)]

# GRPO: each step one group of 4 completions of one prompt, spanning both ranks (micro-batch 2 each)
from transformers import TrainerCallback
prompts = os.path.join(out, "prompts.jsonl")  # written by the test: three prompts
recipe = tiny_recipe(__import__("pathlib").Path(out), None, name="grpo" + os.environ.get("WORLD_SIZE", "1"), stage="rl",
                     tokenizer={}, model={"from_pretrained": base}, data={"train": {"kind": "jsonl", "path": prompts},
                                                            "seq_len": 96},
                     train={"max_steps": 3, "micro_batch_size": 2 if "WORLD_SIZE" in os.environ else 4,
                            "save_every": 1000},
                     rl={"num_generations": 4, "rewards": ["math_format"], "max_completion_length": 12})
trainer = prepare_rl(recipe)[0]
steps = []
class Groups(TrainerCallback):  # TRL keeps the last step's prompts and completions, gathered from every rank
    def on_step_end(self, args, state, control, **kwargs):
        steps.append({"prompts": [p[-1]["content"] for p in trainer._logs["prompt"]],
                      "completions": [c[-1]["content"] for c in trainer._logs["completion"]]})
trainer.add_callback(Groups())
trainer.train()
completions = steps[0]["completions"]
group_prompts = [step["prompts"] for step in steps]
json.dump({"pairs": pairs, "scored": scored, "grpo": completions, "group_prompts": group_prompts,
           "evaluated": evaluated, "shares": shares},
          open(os.path.join(out, f"{os.environ.get('RANK', 'single')}.json"), "w"))
from lmlab.distributed import shutdown
shutdown()  # as lmlab's CLI does on exit
'''


def test_on_policy_sampling_splits_prompts_and_gives_the_pairs_of_one_process(tmp_path, base_model):
    """On-policy pairs: each rank samples and scores its half of the prompts, each prompt with a seed of its
    own, and every rank ends with the same pairs as one process does. GRPO (TRL seeds each rank apart;
    lmlab's evaluations fork the RNG): the group's completions drawn on rank 1 are not rank 0's again."""
    script = tmp_path / "on_policy.py"
    script.write_text(ON_POLICY)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": text, "answer": 5}) + "\n" for text in
                                                    ("What is 2 + 3?", "What is 3 + 2?", "What is 4 + 1?")))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    jobs = [subprocess.Popen([*launcher, str(script), str(base_model), str(tmp_path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)  # side by side: 2 cores
            for launcher in ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
                             [sys.executable])]
    for job in jobs:
        _, err = job.communicate(timeout=300)
        assert job.returncode == 0, err[-3000:]
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["pairs"] == ranks[1]["pairs"]  # gathered: the same pairs everywhere
    single = json.loads((tmp_path / "single.json").read_text())
    assert single["pairs"] == ranks[0]["pairs"] and len(single["pairs"]) >= 1  # and the same as on one process
    assert sorted(single["scored"]) == sorted(ranks[0]["scored"] + ranks[1]["scored"])
    assert len(ranks[0]["scored"]) == len(ranks[1]["scored"]) == 3 * 3  # 3 of the 6 prompts each, 3 samples
    assert not set(ranks[0]["scored"]) & set(ranks[1]["scored"])  # different seeds, different samples
    # the evaluation: every score (and each item's) the same on every rank and as on one process
    assert ranks[0]["evaluated"] == ranks[1]["evaluated"] == single["evaluated"]
    assert "math_id/orm_score" in single["evaluated"] and "general_bpb" in single["evaluated"]
    assert ranks[0]["shares"] == ranks[1]["shares"]
    # whole batches alternate between the ranks: bpb's 40 texts in 4s; batches of at most half a task: the 6
    # cloze items in 3s, the 10 prompts in 5s (greedy and sampled); then the second call's batches of 4 and 2
    assert ranks[0]["shares"] == [20 + 3 + 5 + 5 + (4 + 2) + (2 + 2 + 2), 20 + 3 + 5 + 5 + 4 + (2 + 2)]
    grpo = ranks[0]["grpo"]
    assert len(grpo) == 4 and ranks[1]["grpo"] == grpo
    assert grpo[:2] != grpo[2:]  # rank 0 drew the first two, rank 1 the last two
    # what GRPO does make equal: which prompt each step's group practises, in the same order as one process
    order = single["group_prompts"]
    assert ranks[0]["group_prompts"] == ranks[1]["group_prompts"] == order
    assert len(order) == 3 and all(len(set(group)) == 1 and len(group) == 4 for group in order)
    assert len({group[0] for group in order}) == 3  # each prompt once per epoch


LEADER_FAILS = r'''
import json, sys
from lmlab.distributed import main_first, rank, shutdown
from lmlab.errors import LmlabError

out = sys.argv[1]
caught = None
try:
    with main_first() as leader:
        if leader:
            raise LmlabError("the disk is full", file="final/", hint="free some space")
        caught = "the block ran on a follower"
except LmlabError as exc:
    caught = str(exc)
with main_first() as leader:  # the group still works afterwards
    pass
json.dump({"caught": caught}, open(f"{out}/{rank()}.json", "w"))
shutdown()
'''


def test_a_failure_of_rank_0_inside_main_first_is_raised_on_every_rank(tmp_path):
    """"Rank 0 does it, everyone waits": rank 0's error reaches the other rank as the same error, instead of
    leaving it at a barrier forever (or carrying on alone); save_final, the run lock and the token store use it."""
    script = tmp_path / "leader_fails.py"
    script.write_text(LEADER_FAILS)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    for r in (0, 1):
        assert json.loads((tmp_path / f"{r}.json").read_text())["caught"] == "final/: the disk is full (free some space)"
