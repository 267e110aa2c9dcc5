"""The speed switches: `auto` picks what this machine can use; an explicit GPU-only switch on CPU is
one error line, before anything runs. (Whether they speed a GPU up is benchmarks/gpu_pretrain.py's job.)"""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from lmlab.cli import app
from lmlab.errors import LmlabError
from lmlab.stages.speed import check_speed_options, speed_arguments
from tests.helpers import tiny_recipe, tiny_recipe_file

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what auto means without a GPU")


def test_auto_on_cpu_is_plain_adamw_sdpa_eager_mode_and_no_liger(tmp_path):
    from lmlab.stages.arguments import training_arguments

    recipe = tiny_recipe(tmp_path, stage="pretrain")
    assert speed_arguments(recipe) == {"optim": "adamw_torch", "torch_compile": False, "use_liger_kernel": False}
    args = training_arguments(recipe, tmp_path / "out", 10, False)
    assert (args.optim.value, args.torch_compile, args.use_liger_kernel) == ("adamw_torch", False, False)
    from lmlab.models.build import attention_kernel

    assert attention_kernel("auto") == "sdpa"


def test_explicit_switches_are_passed_through(tmp_path):
    recipe = tiny_recipe(tmp_path, stage="pretrain", optim={"optimizer": "adamw_torch_fused"}, train={"compile": True})
    assert speed_arguments(recipe)["optim"] == "adamw_torch_fused"  # fused AdamW runs on CPU too
    assert speed_arguments(recipe)["torch_compile"] is True


@pytest.mark.parametrize("block, match", [
    ({"train": {"liger": True}}, "Liger kernels need a CUDA GPU"),
    ({"model": {"attn_implementation": "flash_attention_2"}}, "flash_attention_2 needs a CUDA GPU"),
])
def test_a_gpu_only_switch_on_cpu_is_refused_before_compute(tmp_path, block, match):
    with pytest.raises(LmlabError, match=match):
        check_speed_options(tiny_recipe(tmp_path, **block))
    recipe = tiny_recipe_file(tmp_path, "gpu_only", **block)
    result = CliRunner().invoke(app, ["pretrain", str(recipe)])
    assert result.exit_code == 2 and match in result.output and "Traceback" not in result.output
    assert not (tmp_path / "runs" / "gpu_only").exists()  # nothing written
