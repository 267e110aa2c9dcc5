"""The planner: exact parameter counts, the worked examples of docs/rules.md, strategies, rules and the CLI."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lmlab.errors import LmlabError
from lmlab.plan.hardware import lookup_gpu, parse_gpus
from lmlab.plan.memory import GB, TrainSetup, kv_cache_bytes, lora_matrix_params, training_memory
from lmlab.plan.params import count_params, load_preset, preset_names, resolve_shape, shape_from_config
from lmlab.plan.planner import make_plan


def _meta_model(config: dict):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "torch_dtype")}
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(**kwargs))


@pytest.mark.parametrize("name", preset_names())
def test_preset_counts_equal_transformers_on_the_meta_device(name):
    config = load_preset(name)
    counts = count_params(shape_from_config(config))
    model = _meta_model(config)
    assert counts.total == sum(p.numel() for p in model.parameters())
    experts = [p for n, p in model.named_parameters() if ".experts." in n]
    if experts:
        shape = shape_from_config(config)
        expert_params = sum(p.numel() for p in experts)
        active = counts.total - expert_params + expert_params * shape.experts_per_token // shape.num_experts
        assert counts.active == active < counts.total
    else:
        assert counts.active == counts.total


@pytest.mark.parametrize("name,total,active", [
    ("llama-3.1-8b", 8.03e9, None), ("llama-3.2-1b", 1.24e9, None), ("qwen3-30b-a3b", 30.5e9, 3.3e9),
    ("mixtral-8x7b", 46.7e9, 12.9e9), ("llama-3.1-70b", 70.6e9, None),
])
def test_presets_match_published_sizes(name, total, active):
    counts = count_params(shape_from_config(load_preset(name)))
    assert counts.total == pytest.approx(total, rel=0.01)
    if active:
        assert counts.active == pytest.approx(active, rel=0.02)


def test_tied_embeddings_are_counted_once():
    config = load_preset("qwen3-0.6b")
    untied = {**config, "tie_word_embeddings": False}
    diff = count_params(shape_from_config(untied)).total - count_params(shape_from_config(config)).total
    assert diff == config["vocab_size"] * config["hidden_size"]


def test_recipe_model_block_counts_like_the_built_model(tmp_path):
    import torch

    from lmlab.models.build import build_config
    from lmlab.loading import load_recipe

    (tmp_path / "r.yaml").write_text("name: r\nmodel:\n  arch: qwen3_moe\n  num_experts: 4\n"
                                     "  moe_intermediate_size: 64\ntokenizer:\n  vocab_size: 1000\n")
    shape = resolve_shape(str(tmp_path / "r.yaml"))

    class Tok:  # build_config reads only the vocabulary size and special ids
        bos_token_id = eos_token_id = pad_token_id = 0

        def __len__(self):
            return 1000

    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(build_config(load_recipe(tmp_path / "r.yaml").model, Tok()))
    assert count_params(shape).total == sum(p.numel() for p in model.parameters())


def test_config_missing_fields_names_the_field(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2}))
    with pytest.raises(LmlabError, match="vocab_size"):
        resolve_shape(str(path))


def test_unknown_preset_suggests_close_names():
    with pytest.raises(LmlabError, match="qwen3-1.7b"):
        resolve_shape("qwen3-1.8b")


def test_seven_billion_full_adamw_needs_112_gb_static():
    shape = shape_from_config({"vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32,
                               "num_attention_heads": 32, "intermediate_size": 11008})  # Llama-2-7B
    mem = training_memory(shape, TrainSetup(micro_batch=1, seq_len=512))
    static = mem.weights + mem.gradients + mem.optimizer
    assert static / count_params(shape).total == pytest.approx(16)
    assert static / GB == pytest.approx(108, rel=0.05)  # 6.74B params x 16 B; "7B -> 112 GB" at exactly 7B
    zero3 = training_memory(shape, TrainSetup(micro_batch=1, seq_len=512, sharding="zero3", num_gpus=8))
    assert zero3.optimizer == pytest.approx(mem.optimizer / 8) and zero3.gradients == pytest.approx(mem.gradients / 8)


def test_lora_on_a_4096_square_matrix_at_rank_16():
    assert lora_matrix_params(4096, 4096, 16) == 131_072


def test_65b_qlora_fits_in_48_gb():
    llama_65b = shape_from_config({"vocab_size": 32000, "hidden_size": 8192, "num_hidden_layers": 80,
                                   "num_attention_heads": 64, "intermediate_size": 22016})
    mem = training_memory(llama_65b, TrainSetup(method="qlora", micro_batch=1, seq_len=512,
                                                gradient_checkpointing=True, lora_rank=64))
    assert mem.total / GB < 48
    full = training_memory(llama_65b, TrainSetup(micro_batch=1, seq_len=512, gradient_checkpointing=True))
    assert full.total / GB > 1000


def test_kv_cache_formula():
    shape = shape_from_config(load_preset("llama-3.1-8b"))
    assert kv_cache_bytes(shape, seq_len=8192) == 2 * 2 * 8192 * 32 * 8 * 128


def test_gpu_catalogue_lookup_and_errors():
    assert lookup_gpu("NVIDIA GeForce RTX 4090").memory_gb == 24
    assert lookup_gpu("NVIDIA H100 80GB HBM3").bf16_tflops == 989
    assert parse_gpus("8x4090")[0] == 8
    with pytest.raises(LmlabError, match="unknown GPU"):
        lookup_gpu("voodoo5")


@pytest.mark.parametrize("device, name", [
    ("NVIDIA A100-SXM4-80GB", "A100 80GB"), ("NVIDIA A100-SXM4-40GB", "A100 40GB"), ("NVIDIA A10", "A10"),
    ("NVIDIA A10G", "A10G"), ("NVIDIA H100 PCIe", "H100 PCIe 80GB"), ("NVIDIA H200", "H200 141GB"),
    ("NVIDIA GeForce RTX 3090", "RTX 3090"), ("NVIDIA RTX A6000", "RTX A6000"), ("NVIDIA L4", "L4"),
    ("Tesla T4", "T4"), ("Tesla V100-SXM2-32GB", "V100 SXM2 32GB"), ("NVIDIA H20", "H20 96GB"),
    ("AMD Instinct MI300X", "AMD MI300X 192GB"),
])
def test_device_names_as_torch_reports_them_find_their_card_and_never_a_prefix(device, name):
    """A10 is not A100 (a substring match took one for the other); cards without bf16 say so."""
    gpu = lookup_gpu(device)
    assert gpu.name == name
    assert gpu.bf16 == (name not in ("T4", "V100 SXM2 32GB"))


def test_small_model_on_many_gpus_uses_plain_ddp():
    plan = make_plan(resolve_shape("qwen3-0.6b"), lookup_gpu("h100"), 8, tokens=60e9, seq_len=2048)
    assert plan.stages[0].strategy.name == "DDP"


def test_1_7b_full_training_on_4090s_needs_sharding():
    plan = make_plan(resolve_shape("qwen3-1.7b"), lookup_gpu("4090"), 8, goal="cpt", domain_tokens=20e9)
    choice = plan.stages[0].strategy
    assert choice.name.startswith("ZeRO") and choice.memory.total <= 24 * GB * 0.7
    assert choice.global_batch == choice.setup.micro_batch * choice.grad_accum * 8


def test_70b_sft_on_one_4090_offloads_only_to_a_host_that_holds_it():
    """ZeRO-Infinity's case: 70B full SFT on one 24 GB card fits the GPU with every shard on the CPU, which then
    needs over a terabyte. Without --host-ram the plan says so; with a 128 GB host it does not fit at all."""
    plan = make_plan(resolve_shape("llama-3.1-70b"), lookup_gpu("4090"), 1, goal="sft", sft_examples=5000)
    sft = plan.stages[0].strategy
    assert sft.setup.offload and sft.setup.sharding == "zero3" and sft.memory.cpu_offloaded > 1000 * GB
    assert any("GB of CPU memory across the nodes" in n for n in sft.memory.notes)
    small_host = make_plan(resolve_shape("llama-3.1-70b"), lookup_gpu("4090"), 1, goal="sft", sft_examples=5000,
                           host_ram_gb=128).stages[0]
    assert small_host.strategy is None and small_host.cannot_fit
    big_host = make_plan(resolve_shape("llama-3.1-70b"), lookup_gpu("4090"), 1, goal="sft", sft_examples=5000,
                         host_ram_gb=2048).stages[0]
    assert big_host.strategy.setup.offload


def test_zero3_offload_keeps_weight_and_gradient_shards_off_the_gpu():
    """FSDP2's CPU offload and DeepSpeed's offload_param hold the shards on the CPU: the GPU's model states are the
    gathered units (two decoder layers and the root) and their gradients, whatever the number of GPUs."""
    shape = resolve_shape("llama-3.1-8b")
    counts = count_params(shape)
    gathered = (2 * (counts.per_layer_attention + counts.per_layer_mlp_total) + counts.embedding + shape.hidden_size) * 2
    for gpus in (1, 8):
        m = training_memory(shape, TrainSetup(sharding="zero3", offload=True, num_gpus=gpus))
        assert m.weights == m.gradients == gathered and m.optimizer == 0
        assert m.cpu_offloaded == pytest.approx(16 * counts.total)  # bf16 weights and grads, fp32 master, moments


def test_pretraining_budget_rule_warns_below_80x():
    plan = make_plan(resolve_shape("qwen3-1.7b"), lookup_gpu("h100"), 8, tokens=20e9)
    budget = next(a for a in plan.advice if a.rule == "pt-budget")
    assert budget.level == "warn" and "below 80x" in budget.message


def test_data_constrained_detection_recommends_regularisation_and_ensembles():
    plan = make_plan(resolve_shape("qwen3-0.6b"), lookup_gpu("h100"), 8, tokens=60e9, unique_tokens=5e9)
    rules = {a.rule for a in plan.advice}
    assert {"data-constrained", "regularise", "ensemble"} <= rules
    assert any("5.17x" in a.reason for a in plan.advice)


def test_cpt_plan_accounts_for_replay_tokens():
    plan = make_plan(resolve_shape("qwen3-1.7b"), lookup_gpu("h100"), 8, goal="cpt", domain_tokens=20e9)
    cpt = plan.stages[0]
    assert cpt.settings["replay_tokens"] / cpt.tokens == pytest.approx(0.16)


def test_bad_budgets_are_errors():
    with pytest.raises(LmlabError, match="positive"):
        make_plan(resolve_shape("qwen3-0.6b"), lookup_gpu("h100"), 1, tokens=-5)
    with pytest.raises(LmlabError, match="goal"):
        make_plan(resolve_shape("qwen3-0.6b"), lookup_gpu("h100"), 1, goal="world-domination")
    for examples in (0, 10 ** 12):  # a trillion conversations planned 224,046 days of SFT
        with pytest.raises(LmlabError, match="sft-examples must be from 1 to 1e"):
            make_plan(resolve_shape("qwen3-0.6b"), lookup_gpu("h100"), 1, goal="sft", sft_examples=examples)


def test_emitted_pipeline_carries_the_plan_into_every_stage(tmp_path):
    from lmlab.pipeline import load_pipeline
    from lmlab.cli.plan import emit_pipeline

    plan = make_plan(resolve_shape("qwen3-0.6b"), lookup_gpu("h100"), 8, tokens=60e9)
    emit_pipeline(plan, tmp_path / "p.yaml")
    _, (planned_pretrain,) = load_pipeline(tmp_path / "p.yaml")
    pretrain = planned_pretrain.recipe
    assert pretrain.model.arch == "qwen3" and pretrain.train.tokens == int(plan.stages[0].tokens)
    assert pretrain.train.distributed == "ddp" and pretrain.optim.schedule == "wsd"
    assert "run it with `lmlab run p.yaml --nproc 8`" in (tmp_path / "p.yaml").read_text().splitlines()[0]
    nodes = make_plan(resolve_shape("qwen3-0.6b"), lookup_gpu("h100"), 16, tokens=60e9)
    emit_pipeline(nodes, tmp_path / "n.yaml")
    assert "lmlab run n.yaml --nproc 8 --nnodes 2 --node-rank R --master-addr NODE0" in \
        (tmp_path / "n.yaml").read_text().splitlines()[0]

    sharded = make_plan(resolve_shape("qwen3-1.7b"), lookup_gpu("4090"), 8, tokens=20e9)
    emit_pipeline(sharded, tmp_path / "s.yaml")
    assert load_pipeline(tmp_path / "s.yaml")[1][0].recipe.train.distributed in ("zero2", "zero3")

    checkpoint = tmp_path / "qwen"
    checkpoint.mkdir()
    expert = make_plan(resolve_shape("qwen3-1.7b"), lookup_gpu("4090"), 8, goal="domain-expert", domain_tokens=20e9)
    notes = emit_pipeline(expert, tmp_path / "e.yaml", data="math", checkpoint=str(checkpoint))
    _, stages = load_pipeline(tmp_path / "e.yaml")
    cpt, sft = stages[0].recipe, stages[1].recipe
    assert cpt.stage == "cpt" and cpt.model.from_pretrained == str(checkpoint)
    assert cpt.data.replay_ratio == pytest.approx(0.16) and cpt.train.tokens == int(expert.stages[0].tokens)
    assert sft.model.from_pretrained.endswith("/cpt/final") and sft.train.epochs == expert.stages[1].settings["epochs"]
    assert sft.optim.lr == expert.stages[1].settings["lr"]
    assert sft.lora.enabled == (expert.stages[1].strategy.setup.method != "full")
    assert any("sft:" in n for n in notes)


def test_emitting_without_a_checkpoint_names_the_placeholder(tmp_path):
    from lmlab.cli.plan import emit_pipeline

    expert = make_plan(resolve_shape("qwen3-1.7b"), lookup_gpu("4090"), 8, goal="domain-expert", domain_tokens=20e9)
    notes = emit_pipeline(expert, tmp_path / "e.yaml")
    import yaml

    text = (tmp_path / "e.yaml").read_text()
    first = yaml.safe_load(text)["stages"][0]
    assert first["stage"] == "cpt" and first["model"]["from_pretrained"] == "checkpoints/Qwen/Qwen3-1.7B"
    assert any("put a local HF copy" in n and "checkpoints/Qwen/Qwen3-1.7B" in n for n in notes), notes
    assert text.startswith("# lmlab plan:")
    # a --checkpoint that names no directory is said too, not only when `lmlab run` refuses it later
    missing = emit_pipeline(expert, tmp_path / "m.yaml", checkpoint=str(tmp_path / "qwen3-1.7b"))
    assert any(f"continues {tmp_path / 'qwen3-1.7b'}, which does not exist yet" in n for n in missing), missing
    (tmp_path / "qwen3-1.7b").mkdir()
    assert not any("does not exist yet" in n for n in emit_pipeline(expert, tmp_path / "m2.yaml",
                                                                      checkpoint=str(tmp_path / "qwen3-1.7b")))


def test_emit_never_swaps_the_architecture_and_warns_of_replay_passes(tmp_path):
    """A Mistral planned for pretraining is not emitted as a Llama; a replay budget of thousands of passes
    over the embedded corpus is said, with the number."""
    from lmlab.cli.plan import emit_pipeline

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "mistral", "vocab_size": 32000, "hidden_size": 1024,
                                  "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4,
                                  "intermediate_size": 2816, "max_position_embeddings": 4096}))
    mistral = make_plan(resolve_shape(str(config)), lookup_gpu("h100"), 1, tokens=1e9)
    with pytest.raises(LmlabError, match="not mistral, so this pretraining plan cannot be emitted"):
        emit_pipeline(mistral, tmp_path / "m.yaml")
    expert = make_plan(resolve_shape("qwen3-1.7b"), lookup_gpu("4090"), 8, goal="domain-expert", domain_tokens=20e9)
    notes = emit_pipeline(expert, tmp_path / "e.yaml")
    assert any("passes over the embedded general corpus" in n and "1,411" in n for n in notes), notes


def _cli():
    from lmlab.cli import app

    return CliRunner(), app


def test_cli_answers_the_headline_question(tmp_path):
    runner, app = _cli()
    out = tmp_path / "plan.yaml"
    result = runner.invoke(app, ["plan", "--gpus", "8x4090", "--model", "qwen3-1.7b", "--domain-tokens", "20B",
                                 "--goal", "domain-expert", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [s["stage"] for s in data["stages"]][:2] == ["cpt", "sft"]
    result = runner.invoke(app, ["plan", "--gpus", "8x4090", "--model", "qwen3-1.7b", "--tokens", "20B",
                                 "--emit", str(out)])
    assert result.exit_code == 0, result.output
    assert "logits in tiles" in result.output.replace("\n", " ")  # the loss step as the stages run it
    from lmlab.pipeline import load_pipeline

    pipeline, planned = load_pipeline(out)  # the emitted file is a pipeline lmlab itself accepts
    stage = pipeline.stages[0]
    assert stage["stage"] == "pretrain" and stage["train"]["tokens"] == 20_000_000_000
    assert stage["model"]["arch"] == "qwen3" and stage["model"]["num_layers"] == 28
    assert out.read_text().startswith("# lmlab plan: pretrain for Qwen/Qwen3-1.7B on 8 x RTX 4090; run it with "
                                      "`lmlab run plan.yaml --nproc 8`")


def test_cli_bad_input_exits_2_without_traceback():
    runner, app = _cli()
    result = runner.invoke(app, ["plan", "--gpus", "8xvoodoo", "--model", "qwen3-1.7b"])
    assert result.exit_code == 2 and "unknown GPU" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["plan", "--model", "qwen3-1.7b", "--tokens", "lots"])
    assert result.exit_code == 2 and "--tokens" in result.output


TINY_ARCHITECTURES = {
    "llama": {}, "mistral": {}, "qwen3": {}, "smollm3": {}, "qwen2": {}, "gemma": {},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 48},
}


@pytest.mark.parametrize("model_type", sorted(TINY_ARCHITECTURES))
def test_every_supported_architecture_counts_like_transformers_with_its_implicit_defaults(model_type):
    """A tiny config of each supported family, written as users' configs are (tie_word_embeddings and
    attention_bias left out): the count equals the model transformers builds from it."""
    from lmlab.plan.params import ARCHITECTURES

    assert set(TINY_ARCHITECTURES) == set(ARCHITECTURES)
    from transformers import AutoConfig

    config = {"model_type": model_type, "vocab_size": 500, "hidden_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96, "head_dim": 16,
              "pad_token_id": None, **TINY_ARCHITECTURES[model_type]}
    model = _meta_model(config)
    built = sum(p.numel() for p in model.parameters())
    saved = AutoConfig.for_model(**config).to_dict()  # a config.json as save_pretrained writes it
    assert count_params(shape_from_config(saved)).total == built
    partial = {k: v for k, v in saved.items() if k not in ("tie_word_embeddings", "attention_bias")}
    assert count_params(shape_from_config(partial)).total == built  # what the config leaves to its class


@pytest.mark.parametrize("config, match", [
    ({"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257},
     "unsupported architecture 'gpt2'"),
    ({"model_type": "mamba", "hidden_size": 768, "num_hidden_layers": 24, "vocab_size": 50280},
     "unsupported architecture 'mamba'"),
    ({"model_type": "phi", "hidden_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 32,
      "vocab_size": 51200}, "unsupported architecture 'phi'"),
    ({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 0, "vocab_size": 500},
     "'num_attention_heads' must be a positive whole number, not 0"),
    ({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": -5},
     "'vocab_size' must be a positive whole number, not -5"),
    ({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
      "num_key_value_heads": 3, "vocab_size": 500}, "not a multiple of num_key_value_heads"),
])
def test_configs_the_formula_cannot_count_are_refused_by_name(config, match):
    with pytest.raises(LmlabError, match=match):
        shape_from_config(config)


def test_the_loss_step_is_counted_at_its_measured_peak():
    """transformers' causal-LM loss peaks at about 12 bytes per token x vocabulary entry in fp32 (the returned
    logits, the saved log-softmax, its gradient), and the bf16 logits come on top under mixed precision;
    Llama-3.1-8B QLoRA was measured to grow 2.47 MB per token of context."""
    from lmlab.plan.memory import loss_bytes_per_token

    shape = resolve_shape("llama-3.1-8b")
    assert loss_bytes_per_token(shape, TrainSetup(precision_bytes=4)) == 12 * shape.vocab_size
    assert loss_bytes_per_token(shape, TrainSetup(precision_bytes=2)) == 14 * shape.vocab_size
    assert loss_bytes_per_token(shape, TrainSetup(), peak=False) == 4 * shape.vocab_size  # what backward keeps
    def growth(lengths=(2048, 4096), **setup) -> float:  # bytes per token of context
        grow = [training_memory(shape, TrainSetup(method="qlora", seq_len=n, gradient_checkpointing=True,
                                                  **setup)).activations for n in lengths]
        return (grow[1] - grow[0]) / (lengths[1] - lengths[0])

    assert 0.9 <= growth(loss_tiling="off") / 2.47e6 <= 1.1  # the measurement was transformers' own loss
    # tiled (lmlab's stages): past one tile (4096 tokens), context only adds activations and the hidden gradient
    tiled, whole = growth((4096, 8192)), growth((4096, 8192), loss_tiling="off")
    assert tiled == pytest.approx(whole - 14 * shape.vocab_size + 4 * shape.hidden_size)
    assert whole / tiled > 4


def test_the_plan_tiles_each_stages_loss_as_that_stage_runs_it(tmp_path):
    """Pretraining and CPT under train.tiled_loss: auto hold the whole logits while one micro-batch's fp32
    logits fit in one 128 MiB chunk and tile them past it; SFT, DPO and RL always tile (TRL's fused head).
    The planner decides each stage the way the stages do, counts that, and says it."""
    from lmlab.models.tiled import tiling_for
    from lmlab.plan.memory import TILE_LOGITS_BYTES, activation_bytes, resolved_tiling

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 2048,
                                  "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
                                  "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True,
                                  "max_position_embeddings": 512}))
    small = resolve_shape(str(config))
    fits = TILE_LOGITS_BYTES // (4 * small.vocab_size)  # tokens whose logits fill one chunk exactly
    for tokens, expected in ((fits, "off"), (fits + 1, "fused")):
        setup = TrainSetup(loss_tiling="auto", micro_batch=1, seq_len=tokens)
        assert resolved_tiling(setup, small.vocab_size) == expected
        assert (tiling_for("auto", tokens, small.vocab_size) == "off") == (expected == "off")  # the stages' rule
        assert activation_bytes(small, setup) == activation_bytes(small, TrainSetup(loss_tiling=expected,
                                                                                    micro_batch=1, seq_len=tokens))
    assert resolved_tiling(TrainSetup(loss_tiling="auto", seq_len=fits + 1, triton=False), 2048) == "chunks"

    plan = make_plan(resolve_shape(str(config)), lookup_gpu("h100"), 1, goal="domain-expert", domain_tokens=1e7,
                     seq_len=256)
    tiling = {s["stage"]: s["strategy"]["loss_tiling"] for s in plan.to_dict()["stages"]}
    micro = {s.stage: s.strategy.setup.micro_batch for s in plan.stages}
    assert micro["cpt"] * 256 * 2048 * 4 <= TILE_LOGITS_BYTES and tiling["cpt"] == "off"
    assert tiling["sft"] == "fused"
    result = CliRunner().invoke(__import__("lmlab.cli", fromlist=["app"]).app,
                                ["plan", "--model", str(config), "--gpus", "1xh100", "--goal", "domain-expert",
                                 "--domain-tokens", "1e7", "--seq-len", "256"])
    assert "cpt: the whole logits" in result.output and "sft: the logits in tiles (TRL's fused LM head)" in result.output


LLAMA_65B = {"_name_or_path": "huggyllama/llama-65b", "model_type": "llama", "vocab_size": 32000, "hidden_size": 8192,
             "intermediate_size": 22016, "num_hidden_layers": 80, "num_attention_heads": 64}


def test_a_setup_that_fits_only_without_the_headroom_is_planned_tight_not_refused(tmp_path):
    """The QLoRA paper's headline: 65B on one 48 GB card. The planner's own total is under 48 GB but over the 70%
    it recommends, so it plans it at its smallest footprint, says so, and keeps recommended plans unmarked."""
    plan = make_plan(shape_from_config(LLAMA_65B), lookup_gpu("a6000"), 1, goal="sft", sft_examples=10_000,
                     seq_len=512, method="qlora")
    choice = plan.stages[0].strategy
    assert choice is not None and choice.setup.method == "qlora" and not choice.within_headroom
    assert 0.7 * 48 * GB < choice.memory.total <= 48 * GB
    assert choice.setup.micro_batch == 1 and choice.setup.gradient_checkpointing  # the most room it can have
    assert plan.to_dict()["stages"][0]["strategy"]["within_headroom"] is False
    assert [a.rule for a in plan.advice].count("lr") == 1
    roomy = make_plan(resolve_shape("qwen3-1.7b"), lookup_gpu("h100"), 1, goal="sft", sft_examples=10_000)
    assert roomy.stages[0].strategy.within_headroom and roomy.to_dict()["stages"][0]["strategy"]["within_headroom"]
    (tmp_path / "llama-65b").mkdir()
    (tmp_path / "llama-65b" / "config.json").write_text(json.dumps(LLAMA_65B))
    runner, app = _cli()
    result = runner.invoke(app, ["plan", "--gpus", "1xa6000", "--model", str(tmp_path / "llama-65b"), "--goal", "sft",
                                 "--method", "qlora", "--seq-len", "512", "--sft-examples", "10000"])
    words = " ".join(result.output.split())
    assert result.exit_code == 0 and "QLoRA (tight)" in words and "not within the 70% lmlab recommends" in words
    from lmlab.cli.plan import emit_pipeline

    notes = emit_pipeline(plan, tmp_path / "tight.yaml")  # the emitted pipeline says so too
    assert any("not within the 70%" in n for n in notes) and "not within the 70%" in (tmp_path / "tight.yaml").read_text()
    too_big = make_plan(resolve_shape("llama-3.1-70b"), lookup_gpu("4090"), 1, goal="sft", sft_examples=5000,
                        host_ram_gb=128)
    assert too_big.stages[0].strategy is None and too_big.stages[0].cannot_fit  # past the whole card: refused


@pytest.mark.parametrize("tied", [False, True])
def test_flops_per_token_equal_torch_counting_one_training_step(tied):
    """The planner's FLOPs per token against torch's own count of one forward and backward of a tiny Llama
    (eager attention computes the full square, the convention the planner uses): the input embedding is a
    lookup and costs nothing, a tied matrix costs once, as the head."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmlab.plan.compute import flops_per_token

    config = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"},
                                         attn_implementation="eager", use_cache=False))
    ids = torch.randint(0, 512, (1, 128))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    shape = shape_from_config(config)
    predicted = flops_per_token(count_params(shape).active, shape, 128)
    assert predicted == pytest.approx(counter.get_total_flops() / 128, rel=0.01)


def test_optimizer_only_offload_keeps_the_weight_shards_on_the_gpus_and_is_planned_before_full_offload():
    """DeepSpeed ZeRO-3 with offload_optimizer only: the GPUs hold their weight shards and the gathered units, the
    CPU the optimizer state and gradients; the planner tries it before offloading the weights as well, and emits
    it as train.distributed: deepspeed_zero3_offload_optimizer."""
    shape = resolve_shape("llama-3.1-8b")
    counts = count_params(shape)
    full = training_memory(shape, TrainSetup(sharding="zero3", offload=True, num_gpus=8))
    optimizer_only = training_memory(shape, TrainSetup(sharding="zero3", offload=True, offload_params=False,
                                                       num_gpus=8))
    assert optimizer_only.weights - full.weights == pytest.approx(2 * counts.total / 8)  # the bf16 weight shards
    assert optimizer_only.gradients == full.gradients and optimizer_only.optimizer == 0
    assert full.cpu_offloaded - optimizer_only.cpu_offloaded == pytest.approx(2 * counts.total)
    from lmlab.plan.strategy import CANDIDATES

    names = [name for name, _ in CANDIDATES]
    assert names.index("ZeRO-3 + optimizer offload") < names.index("ZeRO-3 + CPU offload")
    plan = make_plan(resolve_shape("llama-3.1-70b"), lookup_gpu("h100"), 8, goal="sft", sft_examples=5000,
                     method="full")  # ZeRO-3 alone needs 141 GB of model states per GPU
    assert plan.stages[0].strategy.name == "ZeRO-3 + optimizer offload"
    from lmlab.plan.planner import plan_to_pipeline

    pipeline, notes = plan_to_pipeline(plan)
    assert pipeline["stages"][0]["train"]["distributed"] == "deepspeed_zero3_offload_optimizer"
    assert any("pip install deepspeed" in n for n in notes)


def test_optimizer_precision_and_lora_options_change_exactly_the_memory_they_name():
    shape = resolve_shape("qwen3-1.7b")
    n = count_params(shape).total

    def optimizer_bytes(**fields):
        return training_memory(shape, TrainSetup(**fields)).optimizer

    assert optimizer_bytes() == pytest.approx(12 * n)  # fp32 master + two fp32 moments
    assert optimizer_bytes(optimizer="adamw_8bit") == pytest.approx(6 * n)
    assert optimizer_bytes(optimizer="adafactor") == pytest.approx(4 * n)
    assert optimizer_bytes(master_weights=False) == pytest.approx(4 * n)  # pure bf16: two bf16 moments
    assert optimizer_bytes(precision_bytes=4) == pytest.approx(8 * n)  # fp32 weights are their own master
    assert optimizer_bytes(sharding="zero1", num_gpus=8) == pytest.approx(12 * n / 8)
    zero1 = training_memory(shape, TrainSetup(sharding="zero1", num_gpus=8))
    assert zero1.gradients == training_memory(shape, TrainSetup()).gradients  # ZeRO-1 keeps gradients whole
    lora = {rank: training_memory(shape, TrainSetup(method="lora", lora_rank=rank)).trainable_params
            for rank in (8, 16, 64)}
    assert lora[16] == 2 * lora[8] and lora[64] == 8 * lora[8]
    qv = training_memory(shape, TrainSetup(method="lora", lora_targets="qv")).trainable_params
    assert 0 < qv < lora[16]
    assert training_memory(shape, TrainSetup(method="lora", optimizer="adamw_8bit")).optimizer == pytest.approx(
        2 * lora[16])


def test_forced_sharding_micro_batch_and_checkpointing_are_planned_as_asked():
    from lmlab.plan.strategy import Forced

    shape, gpu = resolve_shape("qwen3-1.7b"), lookup_gpu("4090")
    chosen = make_plan(shape, gpu, 8, goal="sft", forced=Forced(sharding="zero1")).stages[0].strategy
    assert (chosen.name, chosen.setup.sharding) == ("ZeRO-1", "zero1")
    fixed = make_plan(shape, gpu, 8, goal="sft", forced=Forced(sharding="zero3", micro_batch=2, checkpointing=True))
    setup = fixed.stages[0].strategy.setup
    assert (setup.sharding, setup.micro_batch, setup.gradient_checkpointing) == ("zero3", 2, True)
    lora = make_plan(shape, gpu, 8, goal="sft", method="lora", forced=Forced(sharding="zero3"))
    assert lora.stages[0].strategy.name == "LoRA + ZeRO-3" and lora.stages[0].strategy.setup.sharding == "zero3"
    # a micro-batch that cannot fit is not halved behind the user's back: nothing fits
    huge = make_plan(shape, gpu, 1, goal="sft", forced=Forced(sharding="ddp", micro_batch=4096, checkpointing=False),
                     method="full")
    assert huge.stages[0].strategy is None and huge.stages[0].cannot_fit


def test_plan_options_reach_the_json_and_the_emitted_recipe_and_bad_values_are_one_line(tmp_path):
    from lmlab.cli import app
    from lmlab.pipeline import load_pipeline

    runner = CliRunner()
    base = ["plan", "--model", "qwen3-1.7b", "--gpus", "8x4090", "--goal", "sft"]
    result = runner.invoke(app, [*base, "--json", "--optimizer", "adamw_8bit", "--sharding", "zero1"])
    strategy = json.loads(result.output)["stages"][0]["strategy"]
    assert {"name", "micro_batch", "grad_accum", "global_batch", "gradient_checkpointing", "method", "loss_tiling",
            "memory_gb", "within_headroom"} <= set(strategy)  # the keys before these options, kept
    assert (strategy["optimizer"], strategy["sharding"], strategy["distributed"], strategy["precision"]) == \
        ("adamw_8bit", "zero1", "deepspeed_zero1", "bf16-mixed")
    checkpoint = tmp_path / "qwen"
    checkpoint.mkdir()
    emitted = runner.invoke(app, [*base, "--optimizer", "adamw_8bit", "--sharding", "zero1", "--checkpoint",
                                  str(checkpoint), "--emit", str(tmp_path / "z1.yaml")])
    assert emitted.exit_code == 0, emitted.output
    sft = load_pipeline(tmp_path / "z1.yaml")[1][0].recipe
    assert (sft.optim.optimizer, sft.train.distributed) == ("adamw_bnb_8bit", "deepspeed_zero1")
    assert "runs through DeepSpeed" in emitted.output and "bitsandbytes" in emitted.output
    adapters = runner.invoke(app, [*base, "--method", "lora", "--lora-rank", "64", "--lora-targets", "qv",
                                   "--optimizer", "adafactor", "--checkpoint", str(checkpoint),
                                   "--emit", str(tmp_path / "lora.yaml")])
    assert adapters.exit_code == 0, adapters.output
    lora = load_pipeline(tmp_path / "lora.yaml")[1][0].recipe
    assert (lora.lora.r, lora.lora.alpha, lora.lora.target_modules) == (64, 128, ["q_proj", "v_proj"])
    assert lora.optim.optimizer == "adafactor" and "LoRA rank 64 on qv" in adapters.output
    for flag, value in (("--optimizer", "sgd"), ("--sharding", "zero4"), ("--precision", "fp8"),
                        ("--lora-targets", "mlp"), ("--attention", "xformers"), ("--checkpointing", "maybe")):
        bad = runner.invoke(app, [*base, flag, value])
        assert bad.exit_code == 2 and f"{flag}: unknown value '{value}'" in bad.output
        assert "Traceback" not in bad.output and len(bad.output.strip().splitlines()) == 1


def test_communication_time_follows_each_sharding_and_the_interconnect():
    from lmlab.plan.compute import communication_seconds

    def seconds(sharding, accum=4, checkpointing=False, gpus=8):
        setup = TrainSetup(sharding=sharding, num_gpus=gpus, gradient_checkpointing=checkpointing)
        return communication_seconds(setup, trainable_params=10**9, total_params=10**9, optimizer_steps=100,
                                     grad_accum=accum, busbw_gbps=10)

    assert seconds("ddp") == pytest.approx(100 * 2 / 10)  # one 2 GB all-reduce a step, accumulation aside
    assert seconds("zero1") == seconds("ddp")  # reduce-scatter + all-gather
    assert seconds("zero2") == pytest.approx(100 * (0.5 * 2 * 4 + 0.5 * 2) / 10)  # each micro-batch's gradients
    assert seconds("zero3") == pytest.approx(100 * 4 * (0.5 * 2 * 2 + 0.5 * 2) / 10)  # two gathers per micro-batch
    assert seconds("zero3", checkpointing=True) == pytest.approx(100 * 4 * (0.5 * 3 * 2 + 0.5 * 2) / 10)
    assert seconds("ddp", gpus=1) == 0

    shape = resolve_shape("qwen3-1.7b")
    pcie = make_plan(shape, lookup_gpu("4090"), 8, goal="cpt", domain_tokens=1e9, forced=_forced("zero3"))
    stage = pcie.stages[0]
    assert stage.communication_seconds > stage.compute_seconds and stage.seconds == stage.communication_seconds
    assert pcie.allreduce_gbps == 13 and "tinygrad/open-gpu-kernel-modules#6" in pcie.allreduce_source
    nvlink = make_plan(shape, lookup_gpu("h100"), 8, goal="cpt", domain_tokens=1e9).stages[0]
    assert 0 < nvlink.communication_seconds < nvlink.compute_seconds == nvlink.seconds
    nodes = make_plan(shape, lookup_gpu("h100"), 16, goal="cpt", domain_tokens=1e9)
    assert nodes.allreduce_gbps == 40 and "InfiniBand" in nodes.allreduce_source
    unknown = make_plan(shape, lookup_gpu("a100"), 8, goal="cpt", domain_tokens=1e9)
    assert unknown.stages[0].communication_seconds is None and "--allreduce-gbps" in unknown.allreduce_source
    given = make_plan(shape, lookup_gpu("a100"), 8, goal="cpt", domain_tokens=1e9, allreduce_gbps=200)
    assert given.stages[0].communication_seconds > 0 and given.to_dict()["allreduce_gbps"] == 200
    assert make_plan(shape, lookup_gpu("h100"), 1, goal="cpt", domain_tokens=1e9).stages[0].communication_seconds == 0

    text = CliRunner().invoke(__import__("lmlab.cli", fromlist=["app"]).app,
                              ["plan", "--model", "qwen3-1.7b", "--gpus", "8x4090", "--goal", "cpt",
                               "--domain-tokens", "1B", "--sharding", "zero3"]).output
    assert "(communication-bound)" in text and "13 GB/s all-reduce bus bandwidth" in text


def _forced(sharding):
    from lmlab.plan.strategy import Forced

    return Forced(sharding=sharding)


def test_qlora_in_8_bits_holds_the_base_in_about_a_byte_a_weight_and_is_emitted_as_int8(tmp_path):
    from lmlab.cli import app
    from lmlab.pipeline import load_pipeline
    from lmlab.plan.memory import NF4_BYTES

    shape = resolve_shape("llama-3.1-8b")
    four, eight = (training_memory(shape, TrainSetup(method="qlora", quant_bits=bits)).weights for bits in (4, 8))
    counts = count_params(shape)
    linear = counts.total - counts.embedding - shape.hidden_size * (2 * shape.num_layers + 1)
    assert eight - four == pytest.approx(linear * (1 + 4 / shape.hidden_size - NF4_BYTES))
    checkpoint = tmp_path / "llama"
    checkpoint.mkdir()
    result = CliRunner().invoke(app, ["plan", "--model", "llama-3.1-8b", "--gpus", "1x4090", "--goal", "sft",
                                      "--method", "qlora", "--qlora-bits", "8", "--checkpoint", str(checkpoint),
                                      "--emit", str(tmp_path / "q8.yaml")])
    assert result.exit_code == 0, result.output
    assert "base in LLM.int8" in result.output
    assert load_pipeline(tmp_path / "q8.yaml")[1][0].recipe.lora.quantize == "int8"
    bad = CliRunner().invoke(app, ["plan", "--model", "llama-3.1-8b", "--qlora-bits", "2"])
    assert bad.exit_code == 2 and "--qlora-bits: unknown value '2'" in bad.output


def test_rl_time_includes_sampling_its_completions():
    """RL's stage time adds decoding its completions (half its tokens) to the training FLOPs: memory-bound at
    small generation batches, so a QLoRA policy (NF4 linear weights) decodes about 2.4 times faster than bf16, and a
    card with more bandwidth faster still; only the RL stage samples."""
    from lmlab.plan.compute import GENERATION_BANDWIDTH_SHARE, generation_seconds

    # 1e6 completion tokens, 8 sequences a step on one GPU: 125,000 steps, each reading 16 GB at 20% of 2 TB/s
    assert generation_seconds(1e6, 16e9, 8e9, 8, 1, 2000, 312, 0.4) == pytest.approx(
        125_000 * 16e9 / (2000e9 * GENERATION_BANDWIDTH_SHARE))
    # at 4,096 sequences a step the 2 FLOPs per parameter per sequence take longer than reading the weights
    assert generation_seconds(1e6, 16e9, 8e9, 4096, 1, 2000, 312, 0.4) == pytest.approx(
        1e6 / 4096 * 2 * 8e9 * 4096 / (312e12 * 0.4))

    shape = resolve_shape("qwen3-1.7b")
    plans = {gpu: make_plan(shape, lookup_gpu(gpu), 1, goal="general-reasoning", sft_examples=100_000)
             for gpu in ("a100-80gb", "h200")}
    for plan in plans.values():
        rl = next(s for s in plan.stages if s.stage == "rl")
        assert rl.generation_seconds > 0 and rl.seconds == pytest.approx(rl.compute_seconds + rl.generation_seconds)
        assert all(s.generation_seconds is None for s in plan.stages if s.stage != "rl")
        assert plan.to_dict()["stages"][-1]["generation_seconds"] == rl.generation_seconds
    a100, h200 = (next(s for s in p.stages if s.stage == "rl") for p in plans.values())
    assert h200.generation_seconds < a100.generation_seconds  # 4.8 against 2.0 TB/s, where memory-bound
    qlora = make_plan(shape, lookup_gpu("a100-80gb"), 1, goal="general-reasoning", sft_examples=100_000,
                      method="qlora")
    rl_q = next(s for s in qlora.stages if s.stage == "rl")
    per_sequence = lambda s: s.generation_seconds * s.strategy.setup.micro_batch * s.strategy.grad_accum  # noqa: E731
    # bf16 weights against the QLoRA policy as stored: NF4 linear layers, bf16 embedding and norms, fp32 adapters
    from lmlab.plan.memory import NF4_BYTES, lora_params

    counts, h = count_params(shape), shape.hidden_size
    unquantised = counts.embedding + h * (2 * shape.num_layers + 1)
    stored = NF4_BYTES * (counts.total - unquantised) + 2 * unquantised + 4 * lora_params(shape, 16)
    assert per_sequence(a100) / per_sequence(rl_q) == pytest.approx(2 * counts.total / stored, rel=0.01)
    assert 2.3 < 2 * counts.total / stored < 2.5  # not 3.9: the tied 311M-entry embedding stays in bf16
    text = CliRunner().invoke(__import__("lmlab.cli", fromlist=["app"]).app,
                              ["plan", "--model", "qwen3-1.7b", "--gpus", "h200", "--goal", "general-reasoning"]).output
    assert "then sampling" in text and "HF generate at 20% of 4,800 GB/s" in text


def test_mfu_comes_from_the_card_class_measured_anchor_and_says_so():
    """Time assumes the MFU a published run measured on that card class (torchtitan's Llama-3.1-8B on H100,
    recomputed with lmlab's own FLOPs count), compiled for the stages lmlab compiles and eager for the rest; a
    card without a measured run gets 40% and says it is assumed; --mfu overrides both."""
    from lmlab.plan.compute import MFU_ANCHORS, flops_per_token

    llama = resolve_shape("llama-3.1-8b")
    per_token = flops_per_token(count_params(llama).active, llama, 8192)
    anchor = MFU_ANCHORS["H100 SXM 80GB"]
    assert anchor.eager == pytest.approx(5762 * per_token / 989e12, abs=1e-3)  # torchtitan's tokens/s per GPU
    assert anchor.compiled == pytest.approx(6667 * per_token / 989e12, abs=1e-3)

    shape = resolve_shape("qwen3-1.7b")
    h100 = make_plan(shape, lookup_gpu("h100"), 8, goal="domain-expert", domain_tokens=1e9, sft_examples=10_000)
    by_stage = {s.stage: s for s in h100.stages}
    assert by_stage["cpt"].mfu == anchor.compiled and by_stage["sft"].mfu == anchor.eager
    assert "torchtitan" in by_stage["sft"].mfu_source and by_stage["cpt"].mfu_source.startswith("compiled")
    assert h100.to_dict()["stages"][0]["mfu"] == anchor.compiled and h100.mfu == anchor.compiled
    slower = make_plan(shape, lookup_gpu("h100"), 8, goal="cpt", domain_tokens=1e9, mfu=anchor.compiled / 2)
    assert slower.stages[0].compute_seconds == pytest.approx(2 * by_stage["cpt"].compute_seconds)
    assert slower.stages[0].mfu_source == "given with --mfu"
    consumer = make_plan(shape, lookup_gpu("4090"), 8, goal="cpt", domain_tokens=1e9).stages[0]
    assert consumer.mfu == 0.40 and "no measured run on RTX 4090" in consumer.mfu_source
    text = CliRunner().invoke(__import__("lmlab.cli", fromlist=["app"]).app,
                              ["plan", "--model", "qwen3-1.7b", "--gpus", "8xh100", "--goal", "cpt",
                               "--domain-tokens", "1B"]).output
    assert "MFU 39.0% for cpt: compiled: torchtitan" in text


def test_tensor_pipeline_and_context_parallelism_split_what_megatron_splits():
    from dataclasses import replace

    from lmlab.plan.memory import activation_bytes

    shape = load_preset_shape("llama-3.1-70b")
    counts = count_params(shape)
    base = TrainSetup(num_gpus=64, seq_len=8192, micro_batch=1, gradient_checkpointing=True, loss_tiling="off")
    plain = training_memory(shape, base)
    # tensor parallel 8: every parameter (the vocabulary too) and every activation split 8 ways
    tp = training_memory(shape, replace(base, tensor_parallel=8))
    assert tp.weights == pytest.approx(plain.weights / 8) and tp.optimizer == pytest.approx(plain.optimizer / 8)
    assert tp.activations == pytest.approx(plain.activations / 8)
    # pipeline of 4: a stage's 20 layers plus the larger end (the embedding or the untied head)
    pp = training_memory(shape, replace(base, pipeline_parallel=4))
    h = shape.hidden_size
    per_layer = (counts.total - counts.embedding - h) / shape.num_layers
    assert pp.weights == pytest.approx((20 * per_layer + shape.vocab_size * h + h) * 2)
    # ... its first stage holds 4 micro-batches of 20 layers: every layer's kept input, as without the pipeline,
    # while the loss sits on the last stage, which keeps only its own 20 layers
    no_loss = activation_bytes(shape, replace(base, pipeline_parallel=4, loss_tiling="chunks"), include_recompute=False)
    assert pp.activations < plain.activations and pp.activations >= no_loss
    # context parallel 4: each GPU holds a quarter of every sequence
    cp = training_memory(shape, replace(base, context_parallel=4))
    assert cp.activations == pytest.approx(plain.activations / 4) and cp.weights == plain.weights
    # ZeRO shards over the replicas and the context-parallel GPUs only: 64 / (tp 8) = 8
    sharded = training_memory(shape, replace(base, tensor_parallel=8, sharding="zero1"))
    assert sharded.optimizer == pytest.approx(tp.optimizer / 8)
    assert replace(base, tensor_parallel=8, context_parallel=2).data_parallel == 4


def load_preset_shape(name):
    return shape_from_config(load_preset(name))


def test_model_parallel_plans_size_a_405b_run_count_the_bubble_and_refuse_to_emit(tmp_path):
    from lmlab.cli import app

    config = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 16384, "intermediate_size": 53248,
              "num_hidden_layers": 126, "num_attention_heads": 128, "num_key_value_heads": 8,
              "max_position_embeddings": 131072, "tie_word_embeddings": False}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    shape = shape_from_config(config)
    gpu = lookup_gpu("h100")
    # on 512 GPUs ZeRO-3 holds the model states (16 bytes a parameter over 512) but not one 8k sequence's
    # activations and a gathered layer beside them; the planner names the layout that fits
    alone = make_plan(shape, gpu, 512, tokens=1e12, seq_len=8192)
    assert alone.stages[0].strategy is None
    assert any("tensor parallel 2 with ZeRO-3" in s and "(--tp 2;" in s for s in alone.stages[0].cannot_fit)
    layout = {"tensor_parallel": 8, "pipeline_parallel": 4}
    planned = make_plan(shape, gpu, 512, tokens=1e12, seq_len=8192, setup=layout, global_batch=512)
    choice = planned.stages[0].strategy
    assert choice is not None and choice.setup.data_parallel == 16 and choice.setup.micro_batch == 1
    assert choice.grad_accum == 32 and choice.global_batch == 512  # 32 micro-batches of one sequence per replica
    # the 1F1B bubble, (p - 1) / m, stretches the compute: 3 / 32 of it here, 3 / 256 at 8 x the batch
    from lmlab.plan.compute import flops_per_token, training_seconds

    bare = training_seconds(1e12, flops_per_token(count_params(shape).active, shape, 8192), 512, gpu.bf16_tflops,
                            planned.stages[0].mfu)
    bigger = make_plan(shape, gpu, 512, tokens=1e12, seq_len=8192, setup=layout, global_batch=4096).stages[0]
    assert planned.stages[0].compute_seconds - bigger.compute_seconds == pytest.approx(bare * (3 / 32 - 3 / 256))
    # tensor parallelism's collectives stall the compute: more than the bare compute and the bubble
    assert bigger.compute_seconds > bare * (1 + 3 / 256)
    runner = CliRunner()
    out = runner.invoke(app, ["plan", "-m", str(path), "--gpus", "512xh100", "--seq-len", "8192", "--tokens", "1T",
                              "--tp", "8", "--pp", "4", "--json"])
    strategy = json.loads(out.output)["stages"][0]["strategy"]
    assert (strategy["tensor_parallel"], strategy["pipeline_parallel"], strategy["data_parallel"]) == (8, 4, 16)
    emitted = runner.invoke(app, ["plan", "-m", str(path), "--gpus", "512xh100", "--seq-len", "8192", "--tokens", "1T",
                                  "--tp", "8", "--pp", "4", "--emit", str(tmp_path / "p.yaml")])
    assert emitted.exit_code == 2 and "for sizing only" in emitted.output and not (tmp_path / "p.yaml").exists()
    for flags, message in ((["--tp", "16"], "spans nodes"), (["--tp", "3", "--gpus", "6xh100"], "does not split 128 attention heads"),
                           (["--tp", "8", "--pp", "16", "--gpus", "64xh100"], "does not divide the 64 GPUs"),
                           (["--pp", "127", "--gpus", "127xh100"], "more stages than the model's 126 layers"),
                           (["--cp", "3", "--gpus", "3xh100"], "divisible by 6"),
                           (["--tp", "0"], "at least 1")):
        bad = runner.invoke(app, ["plan", "-m", str(path), "--gpus", "64xh100", "--seq-len", "8192", *flags])
        assert bad.exit_code == 2 and message in bad.output, (flags, bad.output)
        assert "Traceback" not in bad.output and len(bad.output.strip().splitlines()) == 1


def test_the_loss_option_sets_how_pretraining_holds_the_logits_and_reaches_the_recipe(tmp_path):
    from lmlab.cli import app
    from lmlab.pipeline import load_pipeline

    shape = resolve_shape("qwen3-1.7b")
    plans = {loss: make_plan(shape, lookup_gpu("h100"), 1, tokens=1e9, seq_len=4096, loss=loss)
             for loss in ("auto", "full", "chunks")}
    memory = {loss: p.stages[0].strategy.setup for loss, p in plans.items()}
    assert (memory["full"].loss_tiling, memory["chunks"].loss_tiling, memory["auto"].loss_tiling) == \
        ("off", "chunks", "auto")
    full = training_memory(shape, replace_setup(memory["auto"], loss_tiling="off")).activations
    tiled = training_memory(shape, replace_setup(memory["auto"], loss_tiling="chunks")).activations
    assert full > tiled  # 151,936-entry logits of 4,096 tokens: gigabytes, against one chunk
    sft = make_plan(shape, lookup_gpu("h100"), 1, goal="sft", sft_examples=10_000, loss="full")
    assert sft.stages[0].strategy.setup.loss_tiling == "fused"  # TRL's trainers always use their fused head
    runner = CliRunner()
    emitted = runner.invoke(app, ["plan", "--model", "qwen3-1.7b", "--gpus", "h100", "--tokens", "1B", "--loss",
                                  "full", "--emit", str(tmp_path / "p.yaml")])
    assert emitted.exit_code == 0, emitted.output
    assert "the whole logits (--loss full" in emitted.output
    assert load_pipeline(tmp_path / "p.yaml")[1][0].recipe.train.tiled_loss is False
    bad = runner.invoke(app, ["plan", "--model", "qwen3-1.7b", "--loss", "liger"])
    assert bad.exit_code == 2 and "--loss: unknown value 'liger'" in bad.output


def replace_setup(setup, **changes):
    from dataclasses import replace

    return replace(setup, **changes)
