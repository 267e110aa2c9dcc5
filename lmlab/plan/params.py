"""Parameter counts of decoder-only transformers from their config alone (no torch).

The playbook's formula (docs/rules.md §3), made exact for the transformers classes:
embeddings V*h (twice if untied); per layer the attention projections
h*(heads + 2*kv_heads)*head_dim + heads*head_dim*h, optional biases and QK-norm,
the MLP 3*h*ffn (SwiGLU) or, for MoE layers, a router h*E plus E experts of
3*h*moe_ffn (and a shared expert where the config has one), two RMSNorms of h;
then a final norm of h. Active parameters count only top-k of the routed experts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError

REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
QK_NORM_TYPES = {"qwen3", "qwen3_moe"}
# the architectures whose layout the formula above counts exactly (tests/test_plan.py checks each against
# transformers on the meta device), with what their config leaves implicit: transformers' own defaults
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama": {}, "mistral": {}, "mixtral": {}, "qwen3": {}, "qwen3_moe": {},
    "smollm3": {"tie_word_embeddings": True},
    "qwen2": {"attention_bias": True}, "qwen2_moe": {"attention_bias": True},  # q, k and v carry biases
    "gemma": {"tie_word_embeddings": True},  # Gemma ties its embeddings unless the config says otherwise
}


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know about a model, read from any decoder config."""

    name: str
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tie_embeddings: bool
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    moe_layers: int = 0  # how many of num_layers are MoE layers
    attention_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int | None = None

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0


@dataclass(frozen=True)
class ParamCount:
    total: int
    active: int
    embedding: int  # input embedding plus an untied output head
    per_layer_attention: int
    per_layer_mlp_total: int  # averaged over layers for mixed dense/MoE stacks


def preset_names() -> list[str]:
    return sorted(p.name.removesuffix(".json") for p in resources.files("lmlab.plan").joinpath("presets").iterdir()
                  if p.name.endswith(".json"))


def load_preset(name: str) -> dict[str, Any]:
    key = name.lower().removeprefix("meta-llama/").removeprefix("qwen/").replace("_", "-")
    names = preset_names()
    if key not in names:
        import difflib

        close = difflib.get_close_matches(key, names, n=3, cutoff=0.3)
        raise LmlabError(f"unknown model preset '{name}'", field="--model",
                         hint=f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(names)}")
    return json.loads(resources.files("lmlab.plan").joinpath("presets").joinpath(f"{key}.json").read_text())


def shape_from_config(config: dict[str, Any], name: str = "model", where: str | None = None) -> ModelShape:
    """A ModelShape from a transformers config dict; missing essentials are an error naming the field."""
    config = config.get("text_config", config)
    model_type = config.get("model_type", "llama")
    if model_type not in ARCHITECTURES:
        raise LmlabError(f"unsupported architecture '{model_type}': lmlab counts the parameters and memory of "
                         f"{', '.join(sorted(ARCHITECTURES))} exactly, and would miscount this one",
                         file=where, field="model_type",
                         hint="plan with the closest supported config, and check its count against the model")
    config = {**ARCHITECTURES[model_type], **config}
    for key in REQUIRED:
        if key not in config:
            raise LmlabError(f"config is missing '{key}'", file=where, field=key)
    for key in (*REQUIRED, "num_key_value_heads", "intermediate_size", "head_dim"):
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise LmlabError(f"'{key}' must be a positive whole number, not {value!r}", file=where, field=key)
    if config["num_attention_heads"] % (config.get("num_key_value_heads") or config["num_attention_heads"]):
        raise LmlabError(f"num_attention_heads ({config['num_attention_heads']}) is not a multiple of "
                         f"num_key_value_heads ({config['num_key_value_heads']})", file=where,
                         field="num_key_value_heads")
    h, heads = config["hidden_size"], config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or h // heads
    experts = config.get("num_experts") or config.get("num_local_experts") or config.get("n_routed_experts") or 0
    layers = config["num_hidden_layers"]
    moe_layers = 0
    if experts:
        step = config.get("decoder_sparse_step", 1) or 1
        dense_only = set(config.get("mlp_only_layers") or [])
        first_dense = config.get("first_k_dense_replace", 0) or 0
        moe_layers = sum(1 for i in range(layers)
                         if i not in dense_only and (i + 1) % step == 0 and i >= first_dense)
    ffn = config.get("intermediate_size") or 4 * h
    return ModelShape(
        name=config.get("_name_or_path") or name, model_type=model_type, vocab_size=config["vocab_size"],
        hidden_size=h, num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
        intermediate_size=ffn, tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        num_experts=experts, experts_per_token=config.get("num_experts_per_tok", 0) if experts else 0,
        moe_intermediate_size=(config.get("moe_intermediate_size") or ffn) if experts else 0,
        shared_expert_intermediate_size=config.get("shared_expert_intermediate_size", 0) or 0,
        moe_layers=moe_layers, attention_bias=bool(config.get("attention_bias", False)),
        mlp_bias=bool(config.get("mlp_bias", False)), qk_norm=model_type in QK_NORM_TYPES,
        max_position_embeddings=config.get("max_position_embeddings"),
    )


def shape_from_model_block(model, vocab_size: int) -> ModelShape:
    """A ModelShape from a recipe's `model` block (lmlab.recipe.ModelConfig)."""
    config = {
        "model_type": model.arch, "vocab_size": vocab_size, "hidden_size": model.hidden_size,
        "num_hidden_layers": model.num_layers, "num_attention_heads": model.num_heads,
        "num_key_value_heads": model.num_kv_heads, "head_dim": model.head_dim,
        "intermediate_size": model.intermediate_size, "tie_word_embeddings": model.tie_embeddings,
        "max_position_embeddings": model.max_position_embeddings,
    }
    if model.arch in ("qwen3_moe", "mixtral"):
        config.update(num_experts=model.num_experts, num_experts_per_tok=model.num_experts_per_tok,
                      moe_intermediate_size=model.moe_intermediate_size or model.intermediate_size)
    return shape_from_config(config, name=f"recipe {model.arch}")


def resolve_shape(model: str) -> ModelShape:
    """A preset name, a config.json path (or its directory), or a recipe YAML."""
    path = Path(model)
    if path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if path.suffix in (".yaml", ".yml") and path.is_file():
        from lmlab.loading import load_recipe

        recipe = load_recipe(path)
        if recipe.model.from_pretrained:
            return resolve_shape(recipe.model.from_pretrained)
        return shape_from_model_block(recipe.model, recipe.tokenizer.vocab_size)
    if path.suffix == ".json" and path.is_file():
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise LmlabError(f"invalid JSON: {exc.msg}", file=str(path), line=exc.lineno) from None
        return shape_from_config(config, name=path.parent.name, where=str(path))
    return shape_from_config(load_preset(model), name=model)


def count_params(shape: ModelShape) -> ParamCount:
    h, hd = shape.hidden_size, shape.head_dim
    q_out, kv_out = shape.num_heads * hd, shape.num_kv_heads * hd
    attention = h * q_out + 2 * h * kv_out + q_out * h
    if shape.attention_bias:
        attention += q_out + 2 * kv_out
    if shape.qk_norm:
        attention += 2 * hd
    dense_mlp = 3 * h * shape.intermediate_size + (2 * shape.intermediate_size + h if shape.mlp_bias else 0)
    norms = 2 * h
    embedding = shape.vocab_size * h * (1 if shape.tie_embeddings else 2)
    dense_layers = shape.num_layers - shape.moe_layers
    total = embedding + h + shape.num_layers * (attention + norms) + dense_layers * dense_mlp
    active = total
    if shape.is_moe:
        expert = 3 * h * shape.moe_intermediate_size
        router = h * shape.num_experts
        shared = 0
        if shape.shared_expert_intermediate_size:
            shared = 3 * h * shape.shared_expert_intermediate_size + h  # plus its sigmoid gate
        total += shape.moe_layers * (router + shared + shape.num_experts * expert)
        active += shape.moe_layers * (router + shared + shape.experts_per_token * expert)
    mlp_avg = (total - embedding - h - shape.num_layers * (attention + norms)) // max(1, shape.num_layers)
    return ParamCount(total=total, active=active, embedding=embedding, per_layer_attention=attention,
                      per_layer_mlp_total=mlp_avg)
