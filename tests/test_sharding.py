"""train.distributed modes: one accelerate config file each, read by accelerate's own launcher and by
lmlab's Trainer arguments to the same settings; a launch config that shards wins over `auto`."""

from __future__ import annotations

import typing

import pytest

from lmlab.errors import LmlabError
from lmlab.recipe import TrainConfig
from lmlab.stages import sharding

MODES = typing.get_args(TrainConfig.model_fields["distributed"].annotation)
FSDP_MODES = [m for m in MODES if m.startswith("zero")]


@pytest.fixture(autouse=True)
def no_launcher(monkeypatch):
    for kind in ("FSDP", "DEEPSPEED"):
        monkeypatch.delenv(f"ACCELERATE_USE_{kind}", raising=False)
    sharding.launcher_sharding.cache_clear()
    yield
    sharding.launcher_sharding.cache_clear()


def accelerate_launch_env(mode: str) -> dict[str, str]:
    """The environment `accelerate launch --config_file <mode's file>` gives its processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(sharding.config_file(mode)), "train.py"])
    args, *_ = _validate_launch_command(args)
    return prepare_multi_gpu_env(args)


def test_every_mode_has_a_config_file_accelerate_reads():
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {"ddp": "MULTI_GPU", "zero": "FSDP", "deepspeed": "DEEPSPEED"}
    for mode in MODES:
        config = load_config_from_file(str(sharding.config_file(mode)))
        kind = expected["ddp" if mode == "auto" else mode.split("_")[0].rstrip("23")]
        assert config.distributed_type.value == kind, mode


@pytest.mark.parametrize("mode", FSDP_MODES)
def test_fsdp_modes_give_the_trainer_what_accelerate_launch_gives(mode, tmp_path):
    """The same file, two routes: accelerate's launcher (environment) and lmlab's TrainingArguments."""
    from transformers import TrainingArguments

    env = accelerate_launch_env(mode)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[],
                             **sharding.sharding_arguments(mode, "LlamaDecoderLayer", gpu=True))
    plugin = args.fsdp_plugin_args
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2" == str(plugin["fsdp_version"])
    assert env["FSDP_RESHARD_AFTER_FORWARD"] == str(plugin["reshard_after_forward"]).lower()
    assert env["FSDP_OFFLOAD_PARAMS"] == str(plugin.get("cpu_offload", False)).lower()
    assert env["FSDP_AUTO_WRAP_POLICY"] == plugin["auto_wrap_policy"]
    assert env["FSDP_STATE_DICT_TYPE"] == plugin["state_dict_type"]
    assert plugin["transformer_cls_names_to_wrap"] == "LlamaDecoderLayer"
    assert (mode == "zero2") == (plugin["reshard_after_forward"] is False)
    assert (mode == "zero3_offload") == bool(plugin.get("cpu_offload"))


def test_hybrid_shard_replicates_across_nodes_and_shards_within_one(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    mesh = sharding.sharding_arguments("zero3_hybrid", None, gpu=True)["parallelism_config"]
    assert (mesh.dp_replicate_size, mesh.dp_shard_size) == (2, 8)


def test_deepspeed_modes_are_zero_stages_or_a_clear_error():
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        with pytest.raises(LmlabError, match="needs DeepSpeed"):
            sharding.sharding_arguments("deepspeed_zero3", None, gpu=True)
        return
    for mode, stage, offload in (("deepspeed_zero1", 1, "none"), ("deepspeed_zero2", 2, "none"), ("deepspeed_zero2_offload", 2, "cpu"),
                                 ("deepspeed_zero3", 3, "none"), ("deepspeed_zero3_offload", 3, "cpu"),
                                 ("deepspeed_zero3_offload_optimizer", 3, "cpu")):
        zero = sharding.sharding_arguments(mode, None, gpu=True)["deepspeed"]["zero_optimization"]
        assert (zero["stage"], zero["offload_optimizer"]["device"]) == (stage, offload)


def test_sharding_without_gpus_is_a_clear_error():
    with pytest.raises(LmlabError, match="none is visible"):
        sharding.sharding_arguments("zero3", "LlamaDecoderLayer", gpu=False)
    assert sharding.sharding_arguments("ddp", None, gpu=False) == sharding.sharding_arguments("auto", None, False) == {}


def test_a_launch_config_that_shards_is_the_mode(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert sharding.sharding_arguments("auto", "LlamaDecoderLayer", gpu=True) == {}
    with pytest.raises(LmlabError, match="already sets FSDP"):
        sharding.sharding_arguments("zero2", "LlamaDecoderLayer", gpu=True)
    # read once: a stage's own Accelerator sets the same variable, which a later stage must not take
    # for the launcher's
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    with pytest.raises(LmlabError, match="already sets FSDP"):
        sharding.sharding_arguments("ddp", None, gpu=True)


def test_lmlab_launches_a_users_accelerate_config(tmp_path, monkeypatch):
    """`--accelerate-config FILE` goes through `accelerate launch`; a sharding config on CPU is refused
    (accelerate would drop the sharding silently); a file that is not a config names itself."""
    from lmlab.cli.launch import accelerate_command

    argv = ["pretrain", "r.yaml", "--nproc", "2", "--accelerate-config", "c.yaml"]
    cmd = accelerate_command(argv, sharding.config_file("ddp"), 2, 1, 0, None, 29500)
    assert cmd[1:4] == ["-m", "accelerate.commands.launch", "--config_file"]
    assert cmd[cmd.index("--num_processes") + 1] == "2" and cmd[-4:] == ["lmlab.cli", "--", "pretrain", "r.yaml"]
    import torch

    assert "--cpu" not in cmd  # accelerate's --cpu starts one process; its multi-GPU launcher runs gloo on CPU
    if not torch.cuda.is_available():
        with pytest.raises(LmlabError, match="shards over GPUs") as err:
            accelerate_command(argv, sharding.config_file("zero3"), 2, 1, 0, None, 29500)
        assert err.value.field == "distributed_type"
    two_nodes = accelerate_command(argv, sharding.config_file("ddp"), 8, 2, 1, "node0", 29500)
    assert two_nodes[two_nodes.index("--num_processes") + 1] == "16"
    assert two_nodes[two_nodes.index("--main_process_ip") + 1] == "node0"
    from lmlab.cli.launch import relaunch

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for config in (None, sharding.config_file("ddp")):  # either launcher: refused before it starts
        with pytest.raises(LmlabError, match="address of node 0"):
            relaunch(8, 2, 1, None, 29500, config)
    bad = tmp_path / "c.yaml"
    bad.write_text("just: text\n")
    with pytest.raises(LmlabError, match="no distributed_type"):
        accelerate_command(argv, bad, 2, 1, 0, None, 29500)


@pytest.mark.parametrize("mode,sharded", [("zero3", True), ("zero2", True), ("deepspeed_zero3", True),
                                          ("deepspeed_zero1", False), ("deepspeed_zero2", False), ("ddp", False)])
def test_evaluation_during_training_under_sharded_weights_is_refused_before_compute(tmp_path, mode, sharded):
    """In-training evaluation generates with whole weights on every rank: refused where ranks hold shards."""
    from lmlab.stages.preflight import check_data
    from tests.helpers import tiny_recipe

    recipe = tiny_recipe(tmp_path, None, train={"distributed": mode}, eval={"tasks": ["math_id"], "n": 4})
    if sharded:
        with pytest.raises(LmlabError, match=f"train.distributed: {mode} shards them") as caught:
            check_data(recipe)
        assert caught.value.field == "eval.tasks"
    else:
        check_data(recipe)
