"""Combine counts, memory, compute and rules into a plan for a goal, and render or emit it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError
from lmlab.plan import rules
from lmlab.plan.compute import (GENERATION_BANDWIDTH_SHARE, RL_COMPLETION_SHARE, communication_seconds,
                                flops_per_token, generation_seconds, human_duration, model_parallel_seconds,
                                pipeline_bubble, stage_mfu, training_seconds)
from lmlab.plan.hardware import GPUS_PER_NODE, Accelerator, bus_bandwidth, nodes_for
from lmlab.plan.memory import (GB, HF_OPTIMIZER, LORA_TARGETS, TrainSetup, kv_cache_bytes, model_states,
                               parameter_share, resolved_tiling)
from lmlab.plan.params import ModelShape, ParamCount, count_params
from lmlab.plan.strategy import Choice, Forced, choose_strategy, tight_words, what_would_fit

GOALS = ("pretrain", "cpt", "sft", "domain-expert", "general-reasoning")
SFT_TOKENS_PER_EXAMPLE = 512  # assumed mean length of an SFT example when only a count is given
MAX_TOKENS = 1e15
MAX_SFT_EXAMPLES = 1e9
# the architectures lmlab's recipes build from scratch (model.arch), by transformers model_type
BUILDABLE = {"llama": "llama", "qwen3": "qwen3", "qwen3_moe": "qwen3_moe", "mixtral": "mixtral"}
GENERAL_CORPUS_TOKENS = 2.7e6  # the embedded general corpus under a ~150k-entry tokenizer (3.3M at 4k entries)
MAX_REPLAY_PASSES = 4  # data-constrained scaling: repeats up to ~4 epochs are nearly as good as fresh data


def distributed_mode(setup: TrainSetup) -> str:
    """The recipe's train.distributed for a planned setup: FSDP2 where it has the mode, DeepSpeed where only it
    does (ZeRO-1; ZeRO-3 offloading the optimizer but not the weights)."""
    if setup.sharding == "zero3" and setup.offload:
        return "zero3_offload" if setup.offload_params else "deepspeed_zero3_offload_optimizer"
    return {"ddp": "ddp", "zero1": "deepspeed_zero1", "zero2": "zero2", "zero3": "zero3"}[setup.sharding]


# how each stage's loss step holds the logits, as lmlab runs it (lmlab.stages.packed.loss_tiling): pretraining
# and CPT under train.tiled_loss: auto, TRL's trainers (SFT, DPO, RL) always in their fused LM head
STAGE_LOSS_TILING = {"pretrain": "auto", "cpt": "auto"}
# `lmlab plan --loss`: how pretraining and CPT hold the logits (train.tiled_loss), by the planner's name for it
LOSS_CHOICES = {"auto": "auto", "full": "off", "chunks": "chunks", "fused": "fused"}


def loss_step_words(s: "StagePlan", vocab_size: int) -> str:
    """How a planned stage's loss step holds the logits, in words."""
    tiling = resolved_tiling(s.strategy.setup, vocab_size)
    if s.strategy.setup.loss_tiling == "off":
        return f"{s.stage}: the whole logits (--loss full: the model's own loss)"
    if tiling == "off":
        return f"{s.stage}: the whole logits (one micro-batch's fit in one 128 MiB chunk, so tiles would save nothing)"
    how = "TRL's fused LM head" if tiling == "fused" else "lmlab's checkpointed chunks"
    return f"{s.stage}: the logits in tiles ({how})"


@dataclass
class StagePlan:
    stage: str
    tokens: float
    strategy: Choice | None
    seconds: float | None  # the larger of compute and communication (they overlap)
    settings: dict[str, Any] = field(default_factory=dict)
    cannot_fit: list[str] = field(default_factory=list)
    compute_seconds: float | None = None  # FLOPs at the assumed MFU (x3 for CPU optimizer steps)
    communication_seconds: float | None = None  # None: not modelled (no bandwidth figure)
    generation_seconds: float | None = None  # RL: sampling the completions, before the training steps on them
    mfu: float | None = None  # what the compute time assumes, and where it comes from (stage_mfu)
    mfu_source: str = ""


@dataclass
class Plan:
    model: ModelShape
    params: ParamCount
    gpu: Accelerator
    num_gpus: int
    seq_len: int
    mfu: float
    goal: str
    stages: list[StagePlan]
    advice: list[rules.Advice]
    kv_cache_gb_per_sequence: float
    allreduce_gbps: float | None = None  # the collectives' bus bandwidth, and its source
    allreduce_source: str = ""

    def to_dict(self) -> dict[str, Any]:
        def stage(s: StagePlan) -> dict[str, Any]:
            out = {"stage": s.stage, "tokens": s.tokens, "seconds": s.seconds, "settings": s.settings,
                   "cannot_fit": s.cannot_fit, "compute_seconds": s.compute_seconds,
                   "communication_seconds": s.communication_seconds, "generation_seconds": s.generation_seconds,
                   "mfu": s.mfu, "mfu_source": s.mfu_source}
            if s.strategy:
                out["strategy"] = {"name": s.strategy.name, "micro_batch": s.strategy.setup.micro_batch,
                                   "grad_accum": s.strategy.grad_accum, "global_batch": s.strategy.global_batch,
                                   "gradient_checkpointing": s.strategy.setup.gradient_checkpointing,
                                   "method": s.strategy.setup.method,
                                   "sharding": s.strategy.setup.sharding, "offload": s.strategy.setup.offload,
                                   "distributed": distributed_mode(s.strategy.setup),
                                   "optimizer": s.strategy.setup.optimizer,
                                   "precision": precision_name(s.strategy.setup),
                                   "attention": s.strategy.setup.attention,
                                   **({"lora_rank": s.strategy.setup.lora_rank,
                                       "lora_targets": s.strategy.setup.lora_targets}
                                      if s.strategy.setup.method != "full" else {}),
                                   "loss_tiling": resolved_tiling(s.strategy.setup, self.model.vocab_size),
                                   "tensor_parallel": s.strategy.setup.tensor_parallel,
                                   "pipeline_parallel": s.strategy.setup.pipeline_parallel,
                                   "context_parallel": s.strategy.setup.context_parallel,
                                   "data_parallel": s.strategy.setup.data_parallel,
                                   "memory_gb": s.strategy.memory.as_gb(),
                                   "within_headroom": s.strategy.within_headroom}
            return out

        return {"model": asdict(self.model), "params": {"total": self.params.total, "active": self.params.active,
                                                        "embedding": self.params.embedding},
                "gpu": asdict(self.gpu), "num_gpus": self.num_gpus, "seq_len": self.seq_len, "mfu": self.mfu,
                "goal": self.goal, "stages": [stage(s) for s in self.stages],
                "advice": [asdict(a) for a in self.advice],
                "kv_cache_gb_per_sequence": self.kv_cache_gb_per_sequence,
                "allreduce_gbps": self.allreduce_gbps, "allreduce_source": self.allreduce_source}


def _check_budget(name: str, value: float | None) -> None:
    if value is not None and not (0 < value < MAX_TOKENS):
        raise LmlabError(f"{name} must be positive and below {MAX_TOKENS:.0e}, not {value:g}", field=f"--{name}")


def _check_request(goal: str, budgets: dict[str, float | None], sft_examples: int | None, mfu: float | None,
                   seq_len: int, shape: ModelShape) -> None:
    """Every planning input within its range, each error naming its flag."""
    if goal not in GOALS:
        raise LmlabError(f"unknown goal '{goal}'", field="--goal", hint=f"one of {', '.join(GOALS)}")
    for name, value in budgets.items():
        _check_budget(name, value)
    if sft_examples is not None and not 0 < sft_examples <= MAX_SFT_EXAMPLES:
        raise LmlabError(f"sft-examples must be from 1 to {MAX_SFT_EXAMPLES:.0e}, not {sft_examples:g} (the largest "
                         "public SFT sets hold tens of millions of conversations)", field="--sft-examples")
    if mfu is not None and not 0 < mfu <= 1:
        raise LmlabError(f"MFU must be in (0, 1], not {mfu}", field="--mfu")
    if seq_len < 16 or (shape.max_position_embeddings and seq_len > shape.max_position_embeddings):
        raise LmlabError(f"sequence length {seq_len} is outside 16..{shape.max_position_embeddings}", field="--seq-len")


def _check_parallel(setup: dict[str, Any], shape: ModelShape, num_gpus: int, seq_len: int) -> None:
    """Tensor, pipeline and context degrees that a Megatron-style layout can take, each error naming its flag."""
    t, p, c = (setup.get(k, 1) for k in ("tensor_parallel", "pipeline_parallel", "context_parallel"))
    for flag, degree in (("--tp", t), ("--pp", p), ("--cp", c)):
        if not isinstance(degree, int) or degree < 1:
            raise LmlabError(f"{flag} must be a whole number of GPUs, at least 1, not {degree}", field=flag)
    if num_gpus % (t * p * c):
        raise LmlabError(f"tp x pp x cp = {t * p * c} does not divide the {num_gpus} GPUs", field="--gpus",
                         hint="the GPUs are data-parallel replicas of one tp x pp x cp layout")
    if t > GPUS_PER_NODE:
        raise LmlabError(f"tensor parallel {t} spans nodes: its per-layer collectives need NVLink, so it stays within "
                         f"one node of {GPUS_PER_NODE} GPUs", field="--tp")
    if shape.num_heads % t or (shape.num_kv_heads % t and t % shape.num_kv_heads):
        raise LmlabError(f"tensor parallel {t} does not split {shape.num_heads} attention heads ({shape.num_kv_heads} "
                         "key/value heads) evenly", field="--tp")
    if p > shape.num_layers:
        raise LmlabError(f"pipeline parallel {p} is more stages than the model's {shape.num_layers} layers", field="--pp")
    if seq_len % (2 * c):
        raise LmlabError(f"context parallel {c} needs a sequence length divisible by {2 * c} (each GPU takes two "
                         "balanced chunks of every sequence)", field="--cp")


def _post_training(goal: str, params, sft_examples: int | None, method: str | None, add_stage, stages,
                   num_gpus: int) -> list[rules.Advice]:
    """SFT (and RL where the goal or the budget calls for it), with their advice (docs/rules.md §1, §4-5)."""
    advice = [rules.sft_epochs(sft_examples)]
    epochs = 1 if goal == "general-reasoning" else 3
    examples = sft_examples or 50_000
    sft_method = method or "full"
    advice.append(rules.learning_rate(params.total, sft_method))
    plan = add_stage("sft", examples * epochs * SFT_TOKENS_PER_EXAMPLE, True, 128,
                     {"epochs": epochs, "examples": examples, "lr": 2e-5 if sft_method == "full" else 2e-4,
                      "validation_fraction": 0.1, "early_stopping_patience": 3})
    if plan.strategy and plan.strategy.setup.method != "full":
        plan.settings["lr"] = 2e-4
        if plan.strategy.setup.method != sft_method:  # the stage fell back to adapters: their LR rule instead
            advice[-1] = rules.learning_rate(params.total, plan.strategy.setup.method)
    advice.append(rules.preference_optimisation(plan.settings["lr"]))
    gpu_hours = sum((s.seconds or 0) for s in stages) * num_gpus / 3600
    advice += rules.post_training_split(goal, gpu_hours)
    if goal == "general-reasoning" or gpu_hours >= 100:
        add_stage("rl", 0.1 * plan.tokens, True, 64, {"algorithm": "grpo", "group_size": 8, "beta": 0.0,
                                                       "lr": plan.settings["lr"] / 10})
    return advice


def stage_times(choice: Choice | None, tokens: float, fpt: float, gpu: Accelerator, num_gpus: int, seq_len: int,
                mfu: float, shape: ModelShape, params: ParamCount,
                busbw: float | None) -> tuple[float | None, float | None, float | None]:
    """(seconds, compute seconds, communication seconds) of a stage: compute at the assumed MFU (three times
    longer when the optimizer steps on the CPU; plus a pipeline's bubble and tensor parallelism's collectives,
    which stall it), communication from the data-parallel collectives at `busbw`; the two overlap (DDP's
    gradient buckets, FSDP's prefetch), so the stage takes the larger."""
    if choice is None:
        return None, None, None
    setup = choice.setup
    compute = training_seconds(tokens, fpt, num_gpus, gpu.bf16_tflops, mfu) * (3 if setup.offload else 1)
    compute *= 1 + pipeline_bubble(setup, choice.grad_accum)
    tp_busbw = bus_bandwidth(gpu, setup.tensor_parallel)[0] if setup.tensor_parallel > 1 else None
    stalls, overlapped = model_parallel_seconds(setup, shape, tokens, tp_busbw, busbw)
    compute += stalls
    if num_gpus == 1 or busbw is None:
        return compute, compute, (0.0 if num_gpus == 1 else None)
    steps = tokens / (choice.global_batch * seq_len)
    comm = overlapped + communication_seconds(setup, choice.memory.trainable_params,
                                              params.total * parameter_share(shape, setup, params), steps,
                                              choice.grad_accum, busbw)
    return max(compute, comm), compute, comm


def rl_generation_seconds(choice: Choice | None, tokens: float, shape: ModelShape, params: ParamCount,
                          gpu: Accelerator, num_gpus: int, mfu: float) -> float | None:
    """Sampling an RL stage's completions (RL_COMPLETION_SHARE of its tokens) with HF generate: each decoding
    step extends the GPU's generation batch (micro-batch x accumulation, as TRL generates it) and reads the
    policy's weights as they are stored (memory.model_states: under QLoRA the linear layers in NF4 or
    LLM.int8, the embeddings and norms in bf16, the adapters in fp32), its model-parallel share of them."""
    if choice is None or gpu.memory_bandwidth_gbs is None:
        return None
    setup = choice.setup
    weight_bytes = model_states(shape, setup, params, [])[1] * parameter_share(shape, setup, params)
    return generation_seconds(tokens * RL_COMPLETION_SHARE, weight_bytes, params.active,
                              setup.micro_batch * choice.grad_accum, num_gpus, gpu.memory_bandwidth_gbs,
                              gpu.bf16_tflops, mfu)


def make_plan(shape: ModelShape, gpu: Accelerator, num_gpus: int, goal: str = "pretrain",
              tokens: float | None = None, domain_tokens: float | None = None, unique_tokens: float | None = None,
              sft_examples: int | None = None, seq_len: int = 2048, global_batch: int | None = None,
              mfu: float | None = None, method: str | None = None, host_ram_gb: float | None = None,
              setup: dict[str, Any] | None = None, forced: Forced = Forced(),
              allreduce_gbps: float | None = None, loss: str = "auto") -> Plan:
    """The plan for a goal. `setup`: TrainSetup fields the user fixed (optimizer, LoRA rank and targets,
    precision, attention); `forced`: the sharding, micro-batch and checkpointing the user fixed; `loss`:
    how pretraining and CPT hold the logits (LOSS_CHOICES; TRL's stages always use its fused head)."""
    if loss not in LOSS_CHOICES:
        raise LmlabError(f"unknown value '{loss}'", field="--loss", hint=", ".join(LOSS_CHOICES))
    _check_request(goal, {"tokens": tokens, "domain-tokens": domain_tokens, "unique-tokens": unique_tokens},
                   sft_examples, mfu, seq_len, shape)
    _check_parallel(setup or {}, shape, num_gpus, seq_len)
    params = count_params(shape)
    fpt = flops_per_token(params.active, shape, seq_len)
    busbw, busbw_source = bus_bandwidth(gpu, num_gpus, allreduce_gbps)
    advice: list[rules.Advice] = []
    stages: list[StagePlan] = []

    def add_stage(stage: str, stage_tokens: float, allow_adapters: bool, batch_sequences: float,
                  settings: dict[str, Any]) -> StagePlan:
        """A stage at its cheapest strategy that fits; `batch_sequences` of seq_len unless --global-batch."""
        batch = global_batch or max(1, int(batch_sequences))
        tiling = LOSS_CHOICES[loss] if stage in STAGE_LOSS_TILING and loss != "auto" else None
        base = TrainSetup(loss_tiling=tiling or STAGE_LOSS_TILING.get(stage, "fused"), **(setup or {}))
        choice = choose_strategy(shape, gpu, num_gpus, seq_len, batch, allow_adapters, base=base, method=method,
                                 host_ram=host_ram_gb * GB if host_ram_gb else None, forced=forced)
        at, source = stage_mfu(gpu.name, stage, mfu)
        times = stage_times(choice, stage_tokens, fpt, gpu, num_gpus, seq_len, at, shape, params, busbw)
        generation = rl_generation_seconds(choice, stage_tokens, shape, params, gpu, num_gpus, at) if stage == "rl" else None
        plan = StagePlan(stage, stage_tokens, choice, times[0] + (generation or 0) if times[0] is not None else None,
                         settings, [] if choice else what_would_fit(shape, gpu, num_gpus, seq_len, base), *times[1:],
                         generation, at, source)
        stages.append(plan)
        return plan

    if goal == "pretrain":
        pt_tokens = tokens or 100 * params.total
        advice += [rules.pretraining_tokens(params.total, tokens), *rules.data_constrained(unique_tokens, pt_tokens)]
        add_stage("pretrain", pt_tokens, False, 1e6 // seq_len, {"lr": 3e-4 if params.total > 1e9 else 1e-3,
                                                                  "schedule": "wsd", "weight_decay": 0.1})
    if goal in ("cpt", "domain-expert") and (domain_tokens or tokens):
        domain = domain_tokens or tokens
        replay = domain * rules.CPT_REPLAY / (1 - rules.CPT_REPLAY)
        advice += [*rules.cpt_replay(domain, params.total), *rules.data_constrained(unique_tokens, domain)]
        add_stage("cpt", domain + replay, False, 1e6 // seq_len, {
            "domain_tokens": domain, "replay_tokens": replay, "replay_ratio": rules.CPT_REPLAY,
            "lr": 1e-4 if params.total > 1e9 else 3e-4, "schedule": "cosine (re-warm, decay fully)"})
    elif goal == "cpt":
        raise LmlabError("the cpt goal needs --domain-tokens (or --tokens)", field="--domain-tokens")
    if goal in ("sft", "domain-expert", "general-reasoning"):
        advice += _post_training(goal, params, sft_examples, method, add_stage, stages, num_gpus)
    advice.append(rules.stability())
    return Plan(shape, params, gpu, num_gpus, seq_len, stages[0].mfu if stages else stage_mfu(gpu.name, goal, mfu)[0],
                goal, stages, advice,
                kv_cache_bytes(shape, seq_len) / GB, busbw, busbw_source)


def _train_block(choice: Choice) -> dict[str, Any]:
    return {"micro_batch_size": choice.setup.micro_batch, "grad_accum": choice.grad_accum,
            "gradient_checkpointing": choice.setup.gradient_checkpointing,
            "precision": "fp32" if choice.setup.precision_bytes == 4 else "auto",
            "distributed": distributed_mode(choice.setup)}


def _adapters(choice: Choice) -> dict[str, Any]:
    method = choice.setup.method
    if method == "full":
        return {}
    rank, targets = choice.setup.lora_rank, choice.setup.lora_targets
    quantize = ("nf4" if choice.setup.quant_bits == 4 else "int8") if method == "qlora" else "none"
    return {"lora": {"enabled": True, "r": rank, "alpha": 2 * rank, "quantize": quantize,
                     "target_modules": "all-linear" if targets == "all-linear" else
                     [f"{name}_proj" for name in LORA_TARGETS[targets]]}}


def layout_words(setup: TrainSetup) -> str:
    """' (tp 8 x pp 16)': the model-parallel layout of each replica, empty without one."""
    degrees = [f"{name} {d}" for name, d in (("tp", setup.tensor_parallel), ("pp", setup.pipeline_parallel),
                                             ("cp", setup.context_parallel)) if d > 1]
    return f" ({' x '.join(degrees)})" if degrees else ""


def time_words(plan: Plan, s: StagePlan) -> str:
    """A stage's time, split into compute and communication, the larger being the stage's, plus RL's sampling."""
    words = f"compute {human_duration(s.compute_seconds)} at MFU {s.mfu:.0%}"
    bubble = pipeline_bubble(s.strategy.setup, s.strategy.grad_accum) if s.strategy else 0.0
    if bubble:
        words += (f" (including the 1F1B pipeline's bubble, {bubble:.0%} of the compute with {s.strategy.grad_accum}"
                  " micro-batches a step: a larger --global-batch or fewer stages shrink it)")
    if s.generation_seconds is not None:
        words += (f", then sampling {human_duration(s.generation_seconds)} (completions {RL_COMPLETION_SHARE:.0%} "
                  f"of the tokens, decoded by HF generate at {GENERATION_BANDWIDTH_SHARE:.0%} of "
                  f"{plan.gpu.memory_bandwidth_gbs:,.0f} GB/s)")
    if s.communication_seconds is None:
        return words + ", communication not modelled"
    if plan.num_gpus == 1:
        return words
    bound = " (communication-bound)" if s.communication_seconds > s.compute_seconds else ""
    return words + f", communication {human_duration(s.communication_seconds)}{bound}"


def setup_words(setup: TrainSetup) -> str:
    """What the memory of a stage was computed for, beyond the table's columns."""
    words = [f"optimizer {setup.optimizer}", f"precision {precision_name(setup)}", f"{setup.attention} attention",
             f"sharding {setup.sharding}" + (" + CPU offload" if setup.offload else "")]
    if setup.method != "full":
        words.append(f"LoRA rank {setup.lora_rank} on {setup.lora_targets}")
    if setup.method == "qlora":
        words.append("base in NF4" if setup.quant_bits == 4 else "base in LLM.int8")
    return ", ".join(words)


def precision_name(setup: TrainSetup) -> str:
    if setup.precision_bytes == 4:
        return "fp32"
    return "bf16-mixed" if setup.master_weights else "bf16"


def _optimizer_and_precision(s: StagePlan, block: dict, notes: list[str]) -> None:
    """The optimizer the plan was made for, in the recipe; what the recipe cannot express, said."""
    setup = s.strategy.setup
    if setup.optimizer in HF_OPTIMIZER:
        block.setdefault("optim", {})["optimizer"] = HF_OPTIMIZER[setup.optimizer]
        if setup.optimizer == "adamw_8bit":
            notes.append(f"{s.stage}: optim.optimizer: adamw_bnb_8bit needs bitsandbytes and CUDA")
    if precision_name(setup) == "bf16":
        notes.append(f"{s.stage}: planned in pure bf16 (no fp32 master copy), which the HF Trainer does not do: "
                     "the recipe trains bf16 with an fp32 master, which needs the memory of --precision bf16-mixed")


def _pretrain_block(plan: Plan, s: StagePlan, block: dict, lr: float, data: str | None, notes: list[str]) -> None:
    shape = plan.model
    arch = BUILDABLE.get(shape.model_type)
    if arch is None:  # never emit another architecture in its place
        raise LmlabError(f"lmlab builds {', '.join(sorted(set(BUILDABLE.values())))} models from scratch, "
                         f"not {shape.model_type}, so this pretraining plan cannot be emitted",
                         field="--emit", hint="plan one of those, or continue a checkpoint (--goal cpt or sft with "
                                              "--checkpoint)")
    block["model"] = {
        "arch": arch, "hidden_size": shape.hidden_size, "num_layers": shape.num_layers, "num_heads": shape.num_heads,
        "num_kv_heads": shape.num_kv_heads, "head_dim": shape.head_dim, "intermediate_size": shape.intermediate_size,
        "tie_embeddings": shape.tie_embeddings,
        "max_position_embeddings": max(plan.seq_len, shape.max_position_embeddings or plan.seq_len)}
    if shape.is_moe:
        block["model"].update(num_experts=shape.num_experts, num_experts_per_tok=shape.experts_per_token,
                              moe_intermediate_size=shape.moe_intermediate_size)
    block["tokenizer"] = {"vocab_size": shape.vocab_size}
    block["data"]["train"] = data or "general"
    block["optim"] = {"lr": lr, "schedule": "wsd", "weight_decay": s.settings.get("weight_decay", 0.1)}
    block["train"]["tokens"] = int(s.tokens)


def _cpt_block(plan: Plan, s: StagePlan, block: dict, lr: float, data: str | None, notes: list[str]) -> None:
    """EvoLM: an exact 16% of general replay, re-warmed then fully decayed."""
    block["data"].update(train=data or "general", replay="general", replay_ratio=s.settings["replay_ratio"])
    block["optim"] = {"lr": lr, "schedule": "cosine"}
    block["train"]["tokens"] = int(s.tokens)
    if not data:
        notes.append("cpt: data.train is the embedded general corpus; point it at your domain data")
    passes = s.tokens * s.settings["replay_ratio"] / GENERAL_CORPUS_TOKENS
    if passes > MAX_REPLAY_PASSES:
        notes.append(f"cpt: the replay budget ({s.tokens * s.settings['replay_ratio']:.3g} tokens) is about "
                     f"{passes:,.0f} passes over the embedded general corpus (~{GENERAL_CORPUS_TOKENS:.1e} "
                     "tokens): replay memorises it instead of keeping general ability; point data.replay "
                     "at general pretraining data of at least that size")


def _sft_block(plan: Plan, s: StagePlan, block: dict, lr: float, sft_data: str | None, notes: list[str]) -> None:
    block["data"].update(train=sft_data or {"kind": "math", "format": "chat"})
    block["optim"] = {"lr": lr}
    block["train"]["epochs"] = s.settings["epochs"]
    block["sft"] = {"validation_fraction": s.settings["validation_fraction"],
                    "early_stopping_patience": s.settings["early_stopping_patience"]}
    block.update(_adapters(s.strategy))
    if not sft_data:
        notes.append("sft: data.train is the embedded math chat set; point it at your chat data (--sft-data)")


def _rl_block(plan: Plan, s: StagePlan, block: dict, lr: float, rl_prompts: str | None, notes: list[str]) -> None:
    block["data"].update(train=rl_prompts or {"kind": "math", "format": "prompt"})
    block["optim"] = {"lr": lr}
    block["rl"] = {"algorithm": s.settings["algorithm"], "num_generations": s.settings["group_size"],
                   "beta": s.settings["beta"], "rewards": ["math_exact"]}
    block["train"]["epochs"] = 1
    block.update(_adapters(s.strategy))
    if not rl_prompts:
        notes.append("rl: prompts are the embedded math set with the math_exact verifier; set data.train "
                     "and rl.rewards (a verifier or a reward-model directory) for your task")


STAGE_BLOCKS = {"pretrain": _pretrain_block, "cpt": _cpt_block, "sft": _sft_block, "rl": _rl_block}


def plan_to_pipeline(plan: Plan, name: str = "planned", data: str | None = None, checkpoint: str | None = None,
                     sft_data: str | None = None, rl_prompts: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """The plan as a lifecycle pipeline `lmlab run` executes, and notes on what the user must supply.

    Every stage carries the plan's budget, LR, epochs, replay ratio and parallel strategy.
    A stage that continues a model starts from `checkpoint` (or a placeholder path the
    notes name) unless a pretraining stage comes first.
    """
    notes: list[str] = []
    stages: list[dict[str, Any]] = []
    sources = {"pretrain": data, "cpt": data, "sft": sft_data, "rl": rl_prompts}
    for s in plan.stages:
        if s.strategy is not None and s.strategy.setup.shard_group != s.strategy.setup.num_gpus:
            raise LmlabError("a plan with tensor, pipeline or context parallelism is for sizing only: lmlab runs data "
                             "parallelism (DDP, ZeRO, FSDP2) through accelerate", field="--emit",
                             hint="emit without --tp/--pp/--cp, or run the layout with Megatron or torchtitan")
        if s.strategy is None:
            raise LmlabError(f"the {s.stage} stage does not fit on these GPUs, so there is nothing to emit",
                             field="--emit", hint="; ".join(s.cannot_fit) or None)
        if not s.strategy.within_headroom:
            notes.append(f"{s.stage}: {tight_words(s.strategy, plan.gpu)}")
        if distributed_mode(s.strategy.setup).startswith("deepspeed"):  # FSDP2 has neither ZeRO-1 nor this offload
            notes.append(f"{s.stage}: train.distributed: {distributed_mode(s.strategy.setup)} runs through DeepSpeed "
                         "(pip install deepspeed)")
        block: dict[str, Any] = {"stage": s.stage, "train": _train_block(s.strategy), "data": {"seq_len": plan.seq_len}}
        if s.stage in STAGE_LOSS_TILING and s.strategy.setup.loss_tiling != "auto":  # --loss, as the stage runs it
            block["train"]["tiled_loss"] = s.strategy.setup.loss_tiling != "off"
        STAGE_BLOCKS[s.stage](plan, s, block, float(f"{s.settings['lr']:.3g}"), sources[s.stage], notes)
        _optimizer_and_precision(s, block, notes)
        stages.append(block)
    if stages and stages[0]["stage"] != "pretrain":
        source = checkpoint or f"checkpoints/{plan.model.name}"
        stages[0]["model"] = {"from_pretrained": source}
        if not checkpoint or not Path(checkpoint).is_dir():
            notes.append(f"{stages[0]['stage']}: continues {source}, which does not exist yet; put a local HF copy "
                         f"of {plan.model.name} (safetensors) there" + ("" if checkpoint else
                                                                       ", or emit again with --checkpoint DIR"))
    return {"name": name, "seed": 0, "stages": stages}, notes


def launch_command(plan: Plan, pipeline: str) -> str:
    """The command that runs an emitted pipeline on the plan's GPUs (one line per node when several)."""
    if plan.num_gpus <= GPUS_PER_NODE:
        return f"lmlab run {pipeline}" + (f" --nproc {plan.num_gpus}" if plan.num_gpus > 1 else "")
    nodes = nodes_for(plan.num_gpus)
    return (f"lmlab run {pipeline} --nproc {GPUS_PER_NODE} --nnodes {nodes} --node-rank R --master-addr NODE0"
            f"  (on each node, R = 0 .. {nodes - 1}, NODE0 = node 0's address)")


def render(plan: Plan, console) -> None:
    """Rich tables for people: the model, each stage's strategy, memory and time, then the advice."""
    from rich.table import Table

    p, shape = plan.params, plan.model
    head = f"[bold]{shape.name}[/]: {p.total / 1e9:.3f}B parameters"
    if p.active != p.total:
        head += f" ({p.active / 1e9:.3f}B active, {shape.num_experts} experts, top-{shape.experts_per_token})"
    console.print(head + f", on {plan.num_gpus} x {plan.gpu.name} ({plan.gpu.memory_gb:g} GB, "
                  f"{plan.gpu.bf16_tflops:g} {plan.gpu.precision} TFLOPS), seq {plan.seq_len}")
    assumed: dict[tuple[float, str], list[str]] = {}
    for s in plan.stages:
        assumed.setdefault((s.mfu, s.mfu_source), []).append(s.stage)
    for (mfu, source), names in assumed.items():
        console.print(f"MFU {mfu:.1%} for {', '.join(names)}: {source}")
    if not plan.gpu.bf16:
        console.print(f"[yellow]{plan.gpu.name} has no bf16 tensor cores: train in fp16 with loss scaling "
                      "(train.precision: fp16); `auto` would fall back to fp32[/]")
    table = Table(title=f"plan for goal '{plan.goal}'")
    for col in ("stage", "tokens", "strategy", "micro x accum x replicas", "ckpt", "weights", "grads", "optim",
                "activ.", "total/GPU", "time"):
        table.add_column(col, justify="right" if col not in ("stage", "strategy") else "left")
    for s in plan.stages:
        if s.strategy is None:
            table.add_row(s.stage, f"{s.tokens:.3g}", "[red]does not fit[/]", "-", "-", "-", "-", "-", "-", "-", "-")
            continue
        m, c = s.strategy.memory, s.strategy
        table.add_row(s.stage, f"{s.tokens:.3g}", c.name + ("" if c.within_headroom else " [yellow](tight)[/]"),
                      f"{c.setup.micro_batch} x {c.grad_accum} x {c.setup.data_parallel}" + layout_words(c.setup),
                      "yes" if c.setup.gradient_checkpointing else "no",
                      *(f"{v / GB:.1f} GB" for v in (m.weights, m.gradients, m.optimizer, m.activations, m.total)),
                      human_duration(s.seconds) if s.seconds else "-")
    console.print(table)
    steps = [loss_step_words(s, plan.model.vocab_size) for s in plan.stages if s.strategy]
    if steps:  # as each stage runs it (optim.z_loss or train.tiled_loss: false would hold the whole logits)
        console.print("activ. includes the loss step: " + "; ".join(steps))
    for s in plan.stages:
        if s.strategy:
            console.print(f"{s.stage}: {setup_words(s.strategy.setup)}; {time_words(plan, s)}")
    if plan.num_gpus > 1:
        console.print("communication: " + (f"{plan.allreduce_gbps:g} GB/s all-reduce bus bandwidth ("
                                           f"{plan.allreduce_source})" if plan.allreduce_gbps else plan.allreduce_source))
    for s in plan.stages:
        for line in s.cannot_fit:
            console.print(f"[red]{s.stage} does not fit[/]: {line}")
        if s.strategy and not s.strategy.within_headroom:
            console.print(f"[yellow]{s.stage}[/]: {tight_words(s.strategy, plan.gpu)}")
        if s.strategy:
            for note in s.strategy.memory.notes:
                console.print(f"[yellow]{s.stage}[/]: {note}")
    console.print(f"KV cache for inference: {plan.kv_cache_gb_per_sequence:.3f} GB per sequence of {plan.seq_len} "
                  "tokens (bf16)")
    advice = Table(title="rules applied", show_lines=False)
    for col in ("rule", "advice", "why", "source"):
        advice.add_column(col)
    for a in plan.advice:
        style = "yellow" if a.level == "warn" else ""
        advice.add_row(a.rule, f"[{style}]{a.message}[/]" if style else a.message, a.reason, a.source)
    console.print(advice)
