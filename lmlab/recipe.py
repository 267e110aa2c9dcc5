"""Pydantic models of a recipe: every block, its defaults and its checks (lmlab.loading reads YAML into them).

One recipe drives one run: which model, which tokenizer, which data, how to
optimise, how long to train and where to write. Every block has defaults, so a
recipe only states what differs. Unknown keys are errors (a typo must never be
silently ignored), and every error names the YAML file, the line and the key path.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from lmlab.hubcache import HUB_ID, from_hub_cache, hf_home
from lmlab.paths import NAME_PATTERN


# The one list of training stages: name -> (what its recipe holds, what the stage does). The CLI makes one
# command per entry, pipelines accept these names (plus `tokenizer` and `eval`), and `run_stage` dispatches them.
STAGES: dict[str, tuple[str, str]] = {
    "pretrain": ("YAML recipe.", "Pretrain a model from a recipe; prints where the HF checkpoint is."),
    "cpt": ("YAML recipe with model.from_pretrained and data.replay.",
            "Continue pretraining on domain data with an exact share of general replay (default 16%)."),
    "sft": ("YAML recipe with model.from_pretrained and chat data.",
            "Supervised fine-tuning (full, LoRA or QLoRA) on chat records, loss on assistant tokens only."),
    "rm": ("YAML recipe: pairs jsonl, or prompts ranked by a verifier.",
           "Train an outcome reward model (TRL RewardTrainer) usable by eval.orm and rl.rewards."),
    "dpo": ("YAML recipe: pairs jsonl, or prompts to sample pairs from.",
            "DPO (preference.loss_type: sigmoid, ipo, apo_zero, ...) in rounds of fresh on-policy pairs."),
    "kto": ("YAML recipe: pairs jsonl, or prompts to sample pairs from.",
            "KTO on desirable / undesirable completions (each pair gives one of each)."),
    "orpo": ("YAML recipe: pairs jsonl, or prompts to sample pairs from.",
             "ORPO: preference optimisation without a reference model."),
    "rl": ("YAML recipe: prompts (with answers for verifiers) and rl.rewards.",
           "RL (GRPO or RLOO) with verifiable and/or learned rewards and a KL term to the reference."),
    "distill": ("YAML recipe with distill.teacher (a checkpoint or ensemble).",
                "Distil a teacher (checkpoint or ensemble) into a student: alpha * CE + (1 - alpha) * T^2 * KL."),
}
StageName = Literal[tuple(STAGES)]  # type: ignore[valid-type]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


SourceKind = Literal["general", "math", "text", "jsonl", "csv", "parquet", "disk", "hub"]
LOCAL_KINDS = ("text", "jsonl", "csv", "parquet", "disk")
RECORD_KINDS = ("jsonl", "csv")  # files of records read line by line (a JSON array counts as jsonl)


def infer_source_kind(path: str) -> SourceKind:
    """Guess a source's kind from a shorthand string, as a user would write it."""
    if path in ("general", "math"):
        return path  # type: ignore[return-value]
    if path.startswith("hub:"):
        return "hub"
    lower = path.lower()
    if lower.endswith((".jsonl", ".json", ".jsonl.gz")):
        return "jsonl"
    if lower.endswith(".csv"):
        return "csv"
    if lower.endswith(".parquet"):
        return "parquet"
    p = Path(path)
    if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()
                       or (p / "state.json").exists()):
        return "disk"
    return "text"  # a path is local unless written hub:NAME; a missing one fails validation, never downloads


class SourceSpec(Strict):
    """One data source. A bare string is shorthand: `general`, `math`, a path, or `hub:NAME`."""

    kind: SourceKind
    path: str | None = None  # file, directory or glob for local kinds; dataset name for hub
    field: str = "text"  # column that holds the text (pretraining) or records (SFT)
    name: str | None = None  # hub dataset config name
    split: str = "train"  # hub / disk split; for math: "id" or "ood"
    weight: float = Field(1.0, gt=0)  # relative share when several sources are mixed
    limit: int | None = Field(None, gt=0)  # keep at most this many documents
    # chat records written with other names (LLaMA-Factory's dataset_info columns / tags): lmlab's name -> the
    # file's, for record fields (messages, instruction, output, prompt, completion, system, ...) and for the
    # keys inside a message (role, content); `roles` maps the file's role names to user / assistant / system / tool
    columns: dict[str, str] = Field(default_factory=dict)
    roles: dict[str, str] = Field(default_factory=dict)
    # math generator only
    format: Literal["text", "chat", "prompt"] = "text"
    num_examples: int = Field(20000, gt=0)
    seed: int | None = None
    balance: Literal["operations", "facts"] = "operations"  # each operation a third, or each ID fact alike

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):
            kind = infer_source_kind(value)
            if kind in ("general", "math"):
                return {"kind": kind}
            return {"kind": kind, "path": value.removeprefix("hub:")}
        return value

    @model_validator(mode="after")
    def _check_path(self) -> "SourceSpec":
        if self.kind in LOCAL_KINDS + ("hub",) and not self.path:
            raise ValueError(f"a '{self.kind}' source needs a path")
        if self.kind in LOCAL_KINDS:
            import glob

            if not (Path(self.path).exists() or glob.glob(self.path)):
                raise ValueError(f"file not found: {self.path}")
        if self.kind == "math" and self.split not in ("id", "ood", "train"):
            raise ValueError("math split must be 'id' or 'ood'")
        return self


def as_list(value: Any) -> Any:
    """A lone item (a string or a mapping) as a list of one: recipes may write `train: general`."""
    return [value] if isinstance(value, (str, dict)) else value


def _future(info: ValidationInfo) -> set[str]:
    """Artifact paths an earlier pipeline stage will write: valid inputs before they exist."""
    return (info.context or {}).get("future_artifacts", set())


def _existing_dir(field: str, what: str):
    """A validator for a directory field: it must exist, or be an artifact an earlier stage will write;
    a hub id (`Qwen/Qwen3-0.6B`) resolves to its snapshot in the local HF cache."""
    def check(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or Path(value).is_dir() or value in _future(info):
            return value
        if HUB_ID.fullmatch(value):
            cached = from_hub_cache(value)
            if cached:
                return cached
            raise ValueError(f"{what} directory not found: {value} is not a local directory, and the hub model "
                             f"{value} is not in the local HF cache ({hf_home()}); nothing is downloaded at run "
                             f"time: get it with `hf download {value} --local-dir models/{value.split('/')[-1]}` "
                             "and give that directory")
        raise ValueError(f"{what} directory not found: {value}")
    return field_validator(field)(classmethod(check))


ATTENTION_KERNELS = ("auto", "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


class ModelConfig(Strict):
    """A transformers causal LM built from a config, or a local HF checkpoint."""

    arch: Literal["llama", "qwen3", "qwen3_moe", "mixtral"] = "llama"
    from_pretrained: str | None = None  # local HF directory (safetensors only)
    hidden_size: int = Field(128, gt=0)
    num_layers: int = Field(4, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int = Field(2, gt=0)  # GQA (playbook: groups of 2-8)
    head_dim: int | None = Field(None, gt=0)
    intermediate_size: int = Field(384, gt=0)
    tie_embeddings: bool = True
    rope_theta: float = Field(10000.0, gt=0)
    max_position_embeddings: int = Field(2048, gt=0)
    # MoE (qwen3_moe, mixtral)
    num_experts: int = Field(4, gt=0)
    num_experts_per_tok: int = Field(2, gt=0)
    moe_intermediate_size: int | None = None
    # auto: FlashAttention-2 on CUDA with flash-attn (variable-length on packed rows), else SDPA
    # (lmlab.stages.speed); or eager, sdpa, flash_attention_2/3, flex_attention, a hub kernel
    attn_implementation: str = "auto"
    trust_remote_code: bool = False
    overrides: dict[str, Any] = Field(default_factory=dict)  # passed to the transformers config

    _exists = _existing_dir("from_pretrained", "checkpoint")

    @field_validator("attn_implementation")
    @classmethod
    def _attention(cls, value: str) -> str:
        if value not in ATTENTION_KERNELS and "/" not in value:
            raise ValueError(f"unknown attention '{value}' (one of {', '.join(ATTENTION_KERNELS)}, or a hub kernel)")
        return value

    @model_validator(mode="after")
    def _heads(self) -> "ModelConfig":
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        if self.arch in ("qwen3_moe", "mixtral") and self.num_experts_per_tok > self.num_experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_experts "
                             f"({self.num_experts}): each token is routed to that many experts")
        return self


class TokenizerConfig(Strict):
    """Use an existing HF tokenizer directory, or train a byte-level BPE on the data."""

    path: str | None = None
    vocab_size: int = Field(4096, ge=300)
    min_frequency: int = Field(2, ge=1)
    train_sources: list[SourceSpec] | None = None  # default: the recipe's training data
    max_train_bytes: int = Field(20_000_000, gt=0)

    _list = field_validator("train_sources", mode="before")(classmethod(lambda cls, v: as_list(v)))

    _exists = _existing_dir("path", "tokenizer")


class DataConfig(Strict):
    train: list[SourceSpec] = Field(default_factory=lambda: [SourceSpec(kind="general")])
    validation: list[SourceSpec] | None = None  # default: a held-out fraction of train
    # CPT and SFT: general data replayed into the domain data, as an exact share of training tokens (EvoLM: 16%).
    # Its held-out part is also evaluated, so forgetting shows as `eval_replay_loss` (before and after).
    replay: list[SourceSpec] | None = None
    replay_ratio: float = Field(0.16, ge=0, lt=1)
    validation_fraction: float = Field(0.01, ge=0, lt=0.5)
    seq_len: int = Field(256, gt=1)
    streaming: bool = False  # for sources larger than the disk: tokenised on the fly instead of stored
    # processes that tokenise into the token store (default: every core); the tokens do not depend on it
    num_proc: int | None = Field(None, gt=0)
    shuffle_buffer: int = Field(10_000, gt=0)  # streaming shuffle window
    # data-constrained training (Kotha et al.): train on only this many unique tokens, the same subset for
    # every seed (chosen after the validation split, so validation stays the same held-out text)
    unique_tokens: int | None = Field(None, gt=0)

    _list = field_validator("train", "validation", "replay", mode="before")(classmethod(lambda cls, v: as_list(v)))

    @model_validator(mode="after")
    def _unique_needs_map_style(self) -> "DataConfig":
        if self.unique_tokens is not None and self.streaming:
            raise ValueError("unique_tokens picks a fixed subset of the data: it needs streaming: false")
        return self


class OptimConfig(Strict):
    # any HF Trainer `optim` name; auto: adamw_torch_fused on CUDA, adamw_torch on CPU; muon: Muon for the
    # hidden matrices, AdamW (lr, betas, eps, weight_decay below) for embeddings, head, norms and biases
    optimizer: str = "auto"
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)  # never applied to embeddings, norms or biases
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    schedule: Literal["cosine", "wsd", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)  # docs/rules.md §4: warm up over 5-10% of steps
    decay_ratio: float = Field(0.2, gt=0, le=1)  # wsd: fraction of steps spent decaying
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    grad_clip: float = Field(1.0, ge=0)  # docs/rules.md §4: clip grad norm at 1.0
    z_loss: float = Field(0.0, ge=0)  # coefficient of the logsumexp^2 penalty (PaLM); 0 = off
    # optimizer: muon only; defaults: nanochat's base training (matrix LR 0.02, momentum 0.95, no decay)
    muon_lr: float = Field(0.02, gt=0)
    muon_momentum: float = Field(0.95, ge=0, lt=1)
    muon_weight_decay: float = Field(0.0, ge=0)


class GuardConfig(Strict):
    """The divergence guard: bad steps are skipped; a run of them rolls back to the last good checkpoint."""

    enabled: bool = True
    loss_spike: float = Field(10.0, gt=1)  # a loss above this multiple of the running median is a bad step
    grad_spike: float = Field(100.0, gt=1)  # likewise for the gradient norm (before clipping)
    patience: int = Field(3, ge=1)  # bad steps in a row before a rollback
    rollbacks: int = Field(2, ge=0)  # rollbacks before the run stops with an error
    lr_factor: float = Field(0.5, gt=0, lt=1)  # the LR is multiplied by this at each rollback


BUDGET_KEYS = ("tokens", "tokens_per_param", "max_steps", "epochs")  # one of them is the training budget

# train.distributed: one accelerate config file per mode (configs/accelerate/)
DistributedMode = Literal["auto", "ddp", "zero2", "zero3", "zero3_offload", "zero3_hybrid", "deepspeed_zero1",
                          "deepspeed_zero2", "deepspeed_zero2_offload", "deepspeed_zero3", "deepspeed_zero3_offload",
                          "deepspeed_zero3_offload_optimizer"]
# the modes that shard anything across ranks: every one but DDP (and auto, which is DDP unless a launch says more)
SHARDED_MODES = tuple(mode for mode in get_args(DistributedMode) if mode not in ("auto", "ddp"))

class TrainConfig(Strict):
    tokens: int | None = Field(None, gt=0)  # training budget in tokens...
    tokens_per_param: float | None = Field(None, gt=0)  # ...or as a multiple of parameters
    max_steps: int | None = Field(None, gt=0)  # ...or in optimizer steps...
    epochs: float | None = Field(None, gt=0)  # ...or in passes over the data (SFT default: docs/rules.md §4)
    micro_batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on a capable GPU
    gradient_checkpointing: bool = False  # `lmlab plan` turns it on when activations would not fit
    compile: bool | Literal["auto"] = "auto"  # torch.compile; auto: on CUDA for packed rows (fixed shapes)
    liger: bool | Literal["auto"] = "auto"  # Liger's fused kernels; auto: on CUDA when liger-kernel is installed
    # pretraining, CPT and distillation compute the loss in tiles of tokens x vocabulary, never the whole logits
    # (lmlab.models.tiled; same loss and gradients); auto: when one micro-batch's fp32 logits would exceed
    # 128 MiB (below that, tiles save nothing and cost a recomputation); false: from the whole logits.
    # optim.z_loss needs every position's normaliser and so the whole logits
    tiled_loss: bool | Literal["auto"] = "auto"
    # parallelism over the processes of `--nproc`, `torchrun` or `accelerate launch`, one accelerate config
    # file each (configs/accelerate/): ddp replicates; zero2 shards gradients and optimizer state, zero3 also
    # weights, offload keeps them on CPU, hybrid shards within a node (FSDP2); deepspeed_* the same stages
    # through DeepSpeed; auto: DDP, or whatever the launch config sets
    distributed: DistributedMode = "auto"
    # seconds a rank waits in a collective (a gradient all-reduce, a barrier) before it gives up and the job
    # stops with a line naming the rank that failed; it must exceed rank 0's longest lone work (preparing a
    # large token store while the others wait). Set it for the whole launch (a pipeline: in defaults).
    collective_timeout: int = Field(1800, gt=0)
    eval_every: int = Field(100, gt=0)
    eval_batches: int = Field(20, gt=0)
    log_every: int = Field(10, gt=0)
    save_every: int = Field(200, gt=0)
    keep_last: int = Field(2, gt=0)
    num_workers: int = Field(0, ge=0)
    peak_tflops: float | None = Field(None, gt=0)  # device peak for MFU; default from the GPU name
    guard: GuardConfig = Field(default_factory=GuardConfig)  # non-finite or spiking steps: skip, roll back, stop

    @model_validator(mode="after")
    def _one_budget(self) -> "TrainConfig":
        given = [k for k in BUDGET_KEYS if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give only one training budget, not {' and '.join(given)}")
        return self


class SFTConfig(Strict):
    """Supervised fine-tuning on chat records, through TRL's SFTTrainer."""

    layout: Literal["auto", "messages", "alpaca", "sharegpt", "prompt_completion"] = "auto"  # how records are written
    # auto: the checkpoint's own template (lmlab's ChatML for an lmlab vocabulary without one); tokenizer: the
    # checkpoint's, never replaced; chatml / chatml_think: lmlab's, with generation markers (lmlab.stages.posttrain)
    chat_template: Literal["auto", "tokenizer", "chatml", "chatml_think"] = "auto"
    enable_thinking: bool | None = None  # chatml_think: None leaves the choice to each record
    assistant_only_loss: bool = True
    packing: bool = False  # padding-free packing; faster, but hurts small or diverse sets (playbook)
    overlong: Literal["truncate", "drop"] = "truncate"  # samples longer than data.seq_len, always counted
    validation_fraction: float = Field(0.1, ge=0, lt=0.5)
    early_stopping_patience: int | None = Field(3, gt=0)
    eval_math: int = Field(200, ge=0)  # after training, greedy accuracy on this many ID and OOD math problems


class LoRAConfig(Strict):
    """LoRA through peft; QLoRA adds an NF4 double-quantised (or LLM.int8) base through bitsandbytes (CUDA only)."""

    enabled: bool = False
    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"
    quantize: Literal["none", "nf4", "int8"] = "none"  # the frozen base in 4-bit NF4 or LLM.int8 (bitsandbytes)


class PreferenceConfig(Strict):
    """DPO (and its loss variants), KTO and ORPO on TRL, trained on fresh on-policy pairs each round.

    docs/rules.md §5: LR 5-20x below SFT, beta 0.01-0.5 (0.1 default), one epoch per round,
    because preference optimisation overfits after one epoch.
    """

    loss_type: list[str] = Field(default_factory=lambda: ["sigmoid"])  # DPO: sigmoid, ipo, apo_zero, ...; summed
    beta: float = Field(0.1, gt=0)
    rounds: int = Field(1, ge=1)  # each round samples pairs from the current policy, then trains one epoch
    samples: int = Field(4, ge=2)  # responses sampled per prompt; best vs worst become a pair
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(48, gt=0)
    scorer: str = "math_exact"  # a verifier or a reward-model directory that ranks the samples
    # rm only: the model whose samples are ranked into pairs (the policy the reward model will judge), when the
    # reward model starts from another, usually stronger, model; default: model.from_pretrained samples itself
    policy: str | None = None
    lr_ratio: float = Field(0.1, gt=0, le=1)  # without optim.lr: the input model's SFT LR x this

    _list = field_validator("loss_type", mode="before")(classmethod(lambda cls, v: [v] if isinstance(v, str) else v))


class PromptFilterConfig(Strict):
    """Difficulty filtering before RL (as DAPO's dynamic sampling and Polaris do, once, offline): the starting
    policy samples each candidate prompt `samples` times at the RL temperature, and only prompts whose pass
    rate (samples that every verifier scores 1) lies in [min_pass_rate, max_pass_rate) are trained on. A
    group the policy always solves has zero advantage: it costs a step's generation and teaches nothing."""

    samples: int = Field(4, ge=1)
    min_pass_rate: float = Field(0.0, ge=0, lt=1)
    max_pass_rate: float = Field(1.0, gt=0, le=1)

    @model_validator(mode="after")
    def _range(self) -> "PromptFilterConfig":
        if self.min_pass_rate >= self.max_pass_rate:
            raise ValueError(f"min_pass_rate {self.min_pass_rate} must be below max_pass_rate {self.max_pass_rate}")
        return self


class RLConfig(Strict):
    """GRPO or RLOO on TRL with verifiable and/or learned rewards (docs/rules.md §1: RL lifts OOD generalisation)."""

    algorithm: Literal["grpo", "rloo"] = "grpo"
    rewards: list[str] = Field(default_factory=lambda: ["math_exact"])  # verifiers or reward-model directories
    reward_weights: list[float] | None = None
    num_generations: int = Field(8, ge=2)  # group size
    beta: float = Field(0.04, ge=0)  # KL to the reference; 0 drops the reference model
    temperature: float = Field(1.0, gt=0)
    max_completion_length: int = Field(48, gt=0)
    epsilon: float = Field(0.2, gt=0)  # clipping range
    lr_ratio: float = Field(0.1, gt=0, le=1)  # without optim.lr: the input model's SFT LR x this
    # train only on the prompts the starting policy does not always solve (verifier rewards only); the
    # candidates are data.train's prompts
    filter: PromptFilterConfig | None = None

    _list = field_validator("rewards", mode="before")(classmethod(lambda cls, v: as_list(v)))

    @model_validator(mode="after")
    def _weights(self) -> "RLConfig":
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise ValueError(f"{len(self.reward_weights)} reward_weights for {len(self.rewards)} rewards")
        return self


class DistillConfig(Strict):
    """Distil a teacher (checkpoint or ensemble) into the student on packed text (Kotha et al., 2025)."""

    teacher: str | None = None  # a checkpoint or ensemble directory (in a pipeline: the previous stage's model)
    alpha: float = Field(0.5, ge=0, le=1)  # weight of the label CE; 1 - alpha goes to KL(teacher || student)
    temperature: float = Field(1.0, gt=0)
    top_k: int | None = Field(None, gt=0)  # keep only the teacher's top-k tokens (renormalised)
    # with top_k: run the teacher once over the training rows and read its top-k from disk at every epoch
    cache_teacher: bool = False
    data_format: Literal["text", "chat"] = "text"  # chat: SFT records, loss on assistant tokens only

    @model_validator(mode="after")
    def _cache_needs_top_k(self) -> "DistillConfig":
        if self.cache_teacher and self.top_k is None:
            raise ValueError("cache_teacher stores the teacher's top-k tokens: set top_k too")
        return self

    _exists = _existing_dir("teacher", "teacher")


class EvalConfig(Strict):
    """Task evaluation during training (any stage), logged to metrics.jsonl as `task/<task>/<metric>`."""

    tasks: list[str] = Field(default_factory=list)  # embedded task names or task YAML files
    every: int = Field(100, gt=0)  # steps
    n: int = Field(50, gt=0)  # items per embedded task
    samples: int = Field(4, ge=1)  # per prompt, for maj@k, pass@k and the ORM score
    orm: str | None = None  # a verifier (math_exact) or a reward-model directory


class OutputConfig(Strict):
    dir: str = "runs"  # the run directory is <dir>/<recipe name>
    report_to: list[str] = Field(default_factory=lambda: ["tensorboard"])  # + metrics.jsonl always


class Recipe(Strict):
    name: str = Field(pattern=NAME_PATTERN)  # one directory level: letters, digits, _ - ., no leading dot
    stage: StageName = "pretrain"
    seed: int = 0
    # the blocks every stage reads: what to train, on what, how, how long, what to watch, where to write
    model: ModelConfig = Field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    # one block per method; a stage reads its own (pydantic copies these defaults for every recipe)
    sft: SFTConfig = SFTConfig()
    lora: LoRAConfig = LoRAConfig()
    preference: PreferenceConfig = PreferenceConfig()
    rl: RLConfig = RLConfig()
    distill: DistillConfig = DistillConfig()

    @model_validator(mode="after")
    def _stage_inputs(self) -> "Recipe":
        if self.stage == "distill" and not self.distill.teacher:
            raise ValueError("the distill stage needs distill.teacher (a checkpoint or ensemble directory)")
        if self.stage not in ("pretrain", "distill") and not self.model.from_pretrained:
            raise ValueError(f"the {self.stage} stage continues a model: set model.from_pretrained to a checkpoint")
        if self.lora.enabled and self.stage in ("pretrain", "cpt", "distill"):
            raise ValueError(f"LoRA is for post-training stages, not {self.stage}")
        if self.stage == "distill" and self.distill.cache_teacher and self.data.streaming:
            raise ValueError("distill.cache_teacher runs the teacher over every training row first, and streamed "
                             "data has no fixed rows: set data.streaming: false or cache_teacher: false")
        if self.data.replay and self.stage not in ("pretrain", "cpt", "sft"):
            raise ValueError(f"data.replay mixes general text into language-model training (cpt, sft); the "
                             f"{self.stage} stage has no such loss to mix it into")
        return self

    @model_validator(mode="after")
    def _seq_fits(self) -> "Recipe":
        if self.model.from_pretrained is None and self.data.seq_len > self.model.max_position_embeddings:
            raise ValueError(f"data.seq_len ({self.data.seq_len}) exceeds model.max_position_embeddings "
                             f"({self.model.max_position_embeddings})")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir) / self.name


def merge_blocks(base: dict, extra: dict) -> dict:
    """`extra` deep-merged over `base`, as a copy: how pipeline defaults and study bases meet each run's blocks."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = merge_blocks(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out
