"""`train.distributed`: the parallelism a stage trains with, as the Trainer arguments that give it.

Each mode is one accelerate config file in `lmlab/configs/accelerate/` (`configs/accelerate/` in a
clone), which works as is with `accelerate launch --config_file`. lmlab reads the same file and sets
the Trainer's FSDP2 or DeepSpeed arguments from it, so the recipe chooses the mode under any launcher
(`lmlab --nproc`, `torchrun`, a plain `accelerate launch`) and each stage of a pipeline may choose its
own. When the launch config itself already sets FSDP or DeepSpeed, that config is the mode, and a
recipe that also names one is refused instead of silently mixing the two.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path
from typing import Any

from lmlab.distributed import world_size
from lmlab.errors import LmlabError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


def config_file(mode: str) -> Path:
    """The accelerate config file of a mode (`auto` launches like `ddp`)."""
    return CONFIG_DIR / f"{'ddp' if mode == 'auto' else mode}.yaml"


def launch_config(mode: str) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(config_file(mode).read_text())


@functools.cache
def launcher_sharding() -> str | None:
    """FSDP or DEEPSPEED when the launcher (`accelerate launch --config_file`) configured it.

    Read once, at the first stage, because the Trainer's Accelerator writes the same variables
    when a stage shards, and a later stage of the pipeline must not take those for the launcher's."""
    for kind in ("FSDP", "DEEPSPEED"):
        if os.environ.get(f"ACCELERATE_USE_{kind}", "false").lower() == "true":
            return kind
    return None


def sharding_arguments(mode: str, layer_class: str | None, gpu: bool) -> dict[str, Any]:
    """TrainingArguments for `mode`: empty for DDP (accelerate's default on several processes)."""
    launched = launcher_sharding()
    if launched is not None:
        if mode != "auto":
            raise LmlabError(f"the launch config already sets {launched}, and the recipe sets train.distributed="
                             f"{mode}", field="train.distributed",
                             hint="give one: train.distributed: auto to use the launch config, or launch "
                                  "without one (lmlab --nproc, torchrun)")
        return {}
    if mode in ("auto", "ddp"):
        return {}
    if not gpu:
        raise LmlabError(f"train.distributed={mode} shards over GPUs, and none is visible", field="train.distributed",
                         hint="use ddp (or auto) on CPU; on GPUs launch with --nproc, torchrun or accelerate launch")
    config = launch_config(mode)
    if config["distributed_type"] == "FSDP":
        return _fsdp_arguments(config, layer_class)
    return _deepspeed_arguments(config, mode)


def _fsdp_arguments(config: dict[str, Any], layer_class: str | None) -> dict[str, Any]:
    """The config's `fsdp_config` in TrainingArguments' spelling; hybrid shard as a 2-D device mesh."""
    fsdp = {key.removeprefix("fsdp_"): value for key, value in config["fsdp_config"].items()}
    fsdp["cpu_offload"] = fsdp.pop("offload_params", False)
    if layer_class:
        fsdp["transformer_layer_cls_to_wrap"] = [layer_class]
    arguments: dict[str, Any] = {"fsdp": True, "fsdp_config": fsdp}
    if "parallelism_config" in config:  # replicas across nodes, shards within one: sizes of this launch
        from accelerate.parallelism_config import ParallelismConfig

        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        arguments["parallelism_config"] = ParallelismConfig(dp_replicate_size=world_size() // per_node,
                                                            dp_shard_size=per_node)
    return arguments


def _deepspeed_arguments(config: dict[str, Any], mode: str) -> dict[str, Any]:
    """The config's ZeRO settings as the DeepSpeed JSON the HF integration takes; `auto` entries are
    filled from the recipe's batch, accumulation, clipping and precision by transformers."""
    if importlib.util.find_spec("deepspeed") is None:
        raise LmlabError(f"train.distributed={mode} needs DeepSpeed, which is not installed", field="train.distributed",
                         hint="pip install deepspeed, or use the FSDP2 modes (zero2, zero3, zero3_offload)")
    ds = config["deepspeed_config"]
    zero: dict[str, Any] = {"stage": ds["zero_stage"], "overlap_comm": True, "contiguous_gradients": True,
                            "offload_optimizer": {"device": ds["offload_optimizer_device"]}}
    if ds["zero_stage"] == 3:
        zero.update(offload_param={"device": ds["offload_param_device"]},
                    stage3_gather_16bit_weights_on_model_save=ds["zero3_save_16bit_model"])
    return {"deepspeed": {"zero_optimization": zero, "train_micro_batch_size_per_gpu": "auto",
                          "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
                          "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}}
