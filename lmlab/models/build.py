"""Build a transformers causal LM from a recipe's model block, or load a local checkpoint.

lmlab never defines its own architecture: every model is a stock transformers class,
so a checkpoint it saves loads unchanged in transformers, vLLM and lm-eval.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmlab.errors import LmlabError
from lmlab.recipe import ModelConfig

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase


def _config_kwargs(cfg: ModelConfig, tokenizer: "PreTrainedTokenizerBase") -> dict[str, Any]:
    """Keys every decoder config shares; names follow transformers."""
    head_dim = cfg.head_dim or cfg.hidden_size // cfg.num_heads
    return dict(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=head_dim, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_embeddings, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        hidden_act="silu",  # SwiGLU MLP (playbook default)
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )


def build_config(cfg: ModelConfig, tokenizer: "PreTrainedTokenizerBase") -> "PretrainedConfig":
    """A transformers config for `cfg.arch`, with the vocabulary taken from the tokenizer."""
    from transformers import LlamaConfig, MixtralConfig, Qwen3Config, Qwen3MoeConfig

    kwargs = _config_kwargs(cfg, tokenizer)
    moe_ffn = cfg.moe_intermediate_size or cfg.intermediate_size
    if cfg.arch == "llama":
        config = LlamaConfig(**kwargs)
    elif cfg.arch == "qwen3":  # Qwen3 adds QK-norm
        config = Qwen3Config(**kwargs)
    elif cfg.arch == "qwen3_moe":
        config = Qwen3MoeConfig(**kwargs, num_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                                moe_intermediate_size=moe_ffn, norm_topk_prob=True, output_router_logits=True)
    else:  # mixtral
        config = MixtralConfig(**kwargs, num_local_experts=cfg.num_experts,
                               num_experts_per_tok=cfg.num_experts_per_tok, output_router_logits=True)
        config.intermediate_size = moe_ffn
    for key, value in cfg.overrides.items():
        if not hasattr(config, key):
            raise LmlabError(f"{type(config).__name__} has no attribute '{key}'", field=f"model.overrides.{key}")
        setattr(config, key, value)
    return config


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def attention_kernel(requested: str) -> str:
    """`auto`: FlashAttention-2 (variable-length for packed rows) on CUDA with flash_attn, else SDPA."""
    if requested != "auto":
        if requested.startswith("flash_attention") and not cuda():
            raise LmlabError(f"{requested} needs a CUDA GPU", field="model.attn_implementation",
                             hint="use auto or sdpa on this machine")
        if requested == "flash_attention_2" and not installed("flash_attn"):
            raise LmlabError("flash_attention_2 needs the flash-attn package", field="model.attn_implementation",
                             hint="pip install flash-attn --no-build-isolation, or use auto / sdpa")
        return requested
    return "flash_attention_2" if cuda() and installed("flash_attn") else "sdpa"


def build_model(cfg: ModelConfig, tokenizer: "PreTrainedTokenizerBase", seed: int = 0) -> "PreTrainedModel":
    """A freshly initialised model (seeded), or the local checkpoint `cfg.from_pretrained`."""
    if cfg.from_pretrained:
        model = load_model(cfg.from_pretrained, trust_remote_code=cfg.trust_remote_code,
                           attn_implementation=attention_kernel(cfg.attn_implementation))
        check_vocab(model, tokenizer, cfg.from_pretrained)
        return model
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = build_config(cfg, tokenizer)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attention_kernel(cfg.attn_implementation))


def load_model(path: str | Path, trust_remote_code: bool = False, attn_implementation: str = "sdpa",
               dtype: Any = None) -> "PreTrainedModel":
    """Load a local HF checkpoint (or an lmlab ensemble of them); only safetensors weights (no pickles)."""
    from transformers import AutoModelForCausalLM

    from lmlab.models.ensemble import is_ensemble, load_ensemble

    path = Path(path)
    if is_ensemble(path):
        return load_ensemble(path, lambda member: load_model(member, trust_remote_code, attn_implementation, dtype))
    if is_adapter(path):
        return load_adapter(path, trust_remote_code, attn_implementation, dtype)
    if not (path / "config.json").is_file():
        raise LmlabError("not a HF checkpoint: config.json is missing", file=str(path))
    if not any(path.glob("*.safetensors")):
        raise LmlabError("no *.safetensors weights (lmlab loads only safetensors, never pickled .bin files)",
                         file=str(path), hint="convert the checkpoint with `save_pretrained(safe_serialization=True)`")
    return AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, trust_remote_code=trust_remote_code,
                                                attn_implementation=attn_implementation, dtype=dtype)


def to_own_device(model):
    """The model on this process's GPU (`cuda:LOCAL_RANK`) when there is one and it is still on the CPU;
    unchanged otherwise (a quantised or device-mapped model is where its loader put it). Generation
    outside a trainer (evaluation, RL's difficulty filter) runs there."""
    from lmlab.distributed import local_rank

    on_cpu = next(model.parameters()).device.type == "cpu"
    if cuda() and on_cpu and not getattr(model, "is_quantized", False) and not getattr(model, "hf_device_map", None):
        model.to(f"cuda:{local_rank()}")
    return model


def is_adapter(path: str | Path) -> bool:
    """A LoRA adapter directory (adapter weights, no model config of its own), which loads merged into its base."""
    return (Path(path) / "adapter_config.json").is_file() and not (Path(path) / "config.json").is_file()


def adapter_base(adapter_dir: Path) -> Path:
    """The base checkpoint a LoRA adapter was trained on (lmlab writes it as an absolute path)."""
    config = adapter_dir / "adapter_config.json"
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise LmlabError(f"the adapter's base model '{base}' is not a local directory", file=str(config),
                         field="base_model_name_or_path",
                         hint="point base_model_name_or_path at the base checkpoint's directory")
    return Path(base)


def load_adapter(adapter_dir: Path, trust_remote_code: bool = False, attn_implementation: str = "sdpa",
                 dtype: Any = None) -> "PreTrainedModel":
    """A LoRA adapter merged into its base: a plain model every command can use as a checkpoint."""
    from peft import PeftModel

    base = load_model(adapter_base(adapter_dir), trust_remote_code, attn_implementation, dtype)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    return merged.requires_grad_(True)  # peft froze the base; as a checkpoint, all of it is trainable again


def check_vocab(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", where: str = "model") -> None:
    """A tokenizer with ids the embedding table lacks would index out of range mid-training."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise LmlabError(f"tokenizer has {len(tokenizer)} tokens but the model's embedding has only {rows} rows",
                         file=where, hint="use the tokenizer saved with the checkpoint, or resize the model")


def count_parameters(model: "PreTrainedModel", trainable_only: bool = False) -> int:
    """Unique parameters (tied embeddings counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def active_parameters(model: "PreTrainedModel") -> int:
    """Parameters a token passes through: for MoE only top-k of the routed experts count."""
    config = model.config
    total = count_parameters(model)
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    if not experts or not top_k:
        return total
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n or n.endswith(".experts"))
    return total - expert_params + expert_params * top_k // experts


def check_custom_code(config_path: Path, field: str, trust_remote_code: bool = False) -> None:
    """A checkpoint whose architecture lives in its own Python files (`auto_map`, or a model type transformers
    does not know) runs that code when loaded: never without the user's consent (model.trust_remote_code)."""
    from transformers import CONFIG_MAPPING

    config = json.loads(config_path.read_text())
    model_type = config.get("model_type")
    custom = config.get("auto_map") or (model_type is not None and model_type not in CONFIG_MAPPING)
    if custom and not trust_remote_code:
        what = "its own code (auto_map)" if config.get("auto_map") else \
            f"model type '{config.get('model_type')}', which transformers does not know"
        raise LmlabError(f"this checkpoint needs {what}, which would run Python from its directory",
                         file=str(config_path), field=field,
                         hint="read that code first; then set model.trust_remote_code: true to allow it")


def check_checkpoint(path: Path, field: str, tokenizer_only: bool = False, needs_tokenizer: bool = True,
                     trust_remote_code: bool = False) -> None:
    """A checkpoint (or tokenizer, reward model, ensemble) directory that loads: config, weights, tokenizer,
    and no custom code unless the user allowed it."""
    if not path.is_dir():
        raise LmlabError("directory not found", file=str(path), field=field)
    if (path / "ensemble.json").is_file():
        members = json.loads((path / "ensemble.json").read_text()).get("members", [])
        for member in members:
            check_checkpoint(Path(member), field, trust_remote_code=trust_remote_code)
        return
    adapter = is_adapter(path)
    if not tokenizer_only and adapter:
        adapter_base(path)  # the base it merges into exists
    if not tokenizer_only and not adapter:
        config = path / "config.json"
        if not config.is_file():
            raise LmlabError("not a HF checkpoint: config.json is missing", file=str(path), field=field)
        try:
            json.loads(config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LmlabError(f"config.json is not valid JSON ({exc})", file=str(config), field=field) from None
        check_custom_code(config, field, trust_remote_code)
    if needs_tokenizer and not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise LmlabError("no tokenizer (tokenizer.json) in this directory", file=str(path), field=field)
    if not tokenizer_only and not adapter:
        check_weights(path, field)


def check_weights(path: Path, field: str) -> None:
    """Safetensors only, each file's header readable (a truncated download fails here, not mid-load)."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        raise LmlabError("no *.safetensors weights" + (f" (only {pickled[0]}: lmlab never loads pickles)"
                                                        if pickled else ""), file=str(path), field=field,
                         hint="save it with `save_pretrained(safe_serialization=True)`")
    for file in files:
        try:
            with safe_open(str(file), "pt") as handle:
                names = list(handle.keys())
                if names:
                    handle.get_slice(names[-1])  # the last tensor's offsets lie inside the file
            size = file.stat().st_size
            if size < 8:
                raise ValueError("too short")
        except Exception as exc:  # safetensors raises its own types for every kind of damage
            raise LmlabError(f"unreadable safetensors file ({exc})", file=str(file), field=field) from None
