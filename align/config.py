"""What a training run is told: `TrainConfig` (the YAML file and key=value overrides of align/train.py), checked
when made."""

from __future__ import annotations

from dataclasses import dataclass

from align.losses import DIVERGENCES
from data.sources import PromptConfig

OBJECTIVES = ("seq_kd", "token_kd", "seq_kd+token_kd", "references", "early_exit")
EXIT_MODES = ("frozen", "joint")


@dataclass
class TrainConfig(PromptConfig):
    # --- models
    model: str | None = None
    """Small model to fine-tune: Hub name or local folder. Leave empty and set model_config to train from scratch."""
    model_config: dict | None = None
    """A transformers config as a mapping with `model_type` (e.g. bart), for training from scratch."""
    keep_decoder_layers: list[int] | None = None
    """With `model`: keep only these decoder layers (0-based, in order) before training, the embeddings, the encoder
    and the head as they are: a small model made from the large one (DistilBART's shrink and fine-tune), which
    starts out reading the source as the large model does."""
    tokenizer: str | None = None
    """Tokenizer folder or name; defaults to `model`."""
    teacher: str | None = None
    """The large model; needed for token_kd and seq_kd+token_kd."""
    # --- data
    objective: str = "seq_kd"
    calibration: str | None = None
    """Calibration JSONL from align.calibrate (targets for seq_kd / token_kd)."""
    eval_calibration: str | None = None
    """Held-out calibration JSONL for evaluation; without it every 50th calibration pair is held out."""
    drop_loops: int | None = None
    """n: leave out of training the calibration outputs that repeat a sequence of n tokens or never finished (a weak
    large model's loops, which a small model trained on them learns); the held-out ones are all kept."""
    dataset: str | None = None
    """Dataset for `references` (see data/sources.py)."""
    split: str = "train"
    eval_split: str | None = "valid"
    limit: int | None = None
    eval_limit: int | None = 1000
    max_source_length: int = 256
    max_target_length: int = 256
    # --- loss
    divergence: str = "forward_kl"
    jsd_beta: float = 0.5
    kd_weight: float = 0.5
    """Weight of the token-level term in seq_kd+token_kd."""
    label_smoothing: float = 0.0
    # --- early exit (objective early_exit)
    exit_layer: int | None = None
    """The decoder layer after which the exit head reads (1 .. layers - 1)."""
    exit_mode: str = "frozen"
    """frozen: only the exit head trains (the model's output is unchanged); joint: the whole model trains."""
    exit_weight: float = 1.0
    """joint: weight of the exit loss next to the full model's cross-entropy."""
    # --- optimisation
    lr: float = 3e-4
    weight_decay: float = 0.01
    adam_beta2: float = 0.98
    scheduler: str = "linear"
    """Any transformers scheduler name: linear, cosine, inverse_sqrt, constant_with_warmup."""
    warmup_steps: int = 100
    max_grad_norm: float = 1.0
    batch_size: int = 32
    """Examples per process per micro-batch."""
    gradient_accumulation_steps: int = 1
    epochs: float = 1.0
    max_steps: int | None = None
    """Optimizer updates; overrides epochs when set."""
    mixed_precision: str = "no"
    """no, bf16 or fp16 (an accelerate config file's setting wins when launched with one)."""
    seed: int = 0
    num_workers: int = 0
    pad_to_multiple_of: int = 16
    """Batch lengths are rounded up to this, bounding the distinct shapes kernels see."""
    # --- LoRA (peft), merged into the saved checkpoint
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list | str | None = "all-linear"
    # --- outputs
    output_dir: str = "runs/align"
    log_every: int = 50
    eval_every: int = 500
    save_every: int = 1000
    keep_checkpoints: int = 2
    push_to_hub: bool = False
    hub_repo_id: str | None = None
    hub_private: bool = False
    recommended_thresholds: dict | None = None
    """Recommended BiLD thresholds for the model card, e.g. {fallback_threshold: 0.5, rollback_threshold: 3}."""

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        if (self.model is None) == (self.model_config is None):
            raise ValueError("set exactly one of `model` (fine-tune) and `model_config` (train from scratch)")
        if self.keep_decoder_layers is not None:
            keep = self.keep_decoder_layers
            if self.model is None or not keep or sorted(set(keep)) != list(keep) or min(keep) < 0:
                raise ValueError("keep_decoder_layers needs `model` and distinct layer indices in increasing order, "
                                 f"got {keep!r}")
        if self.model_config is not None and "model_type" not in self.model_config:
            raise ValueError("model_config needs a `model_type`, e.g. bart or t5")
        if self.model is None and self.tokenizer is None:
            raise ValueError("training from a config needs `tokenizer`")
        if self.objective == "references" and not self.dataset:
            raise ValueError("objective references needs `dataset`")
        if self.objective == "early_exit":
            if self.model is None or self.exit_layer is None:
                raise ValueError("objective early_exit needs `model` (the model to exit early from) and `exit_layer`")
            if self.exit_mode not in EXIT_MODES:
                raise ValueError(f"exit_mode must be one of {EXIT_MODES}, got {self.exit_mode!r}")
            if not (self.calibration or self.dataset):
                raise ValueError("objective early_exit needs `calibration` (the model's own outputs) or `dataset`")
            if self.lora:
                raise ValueError("objective early_exit trains an exit head (and in joint mode the whole model); lora is not supported")
            if self.exit_weight <= 0:
                raise ValueError(f"exit_weight must be positive, got {self.exit_weight}")
        elif self.objective != "references" and not self.calibration:
            raise ValueError(f"objective {self.objective} needs `calibration` (from align.calibrate)")
        if "token_kd" in self.objective and not self.teacher:
            raise ValueError(f"objective {self.objective} needs `teacher` (the large model)")
        if self.drop_loops is not None and self.drop_loops < 1:
            raise ValueError(f"drop_loops must be a number of tokens (at least 1), got {self.drop_loops}")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise ValueError(f"kd_weight must be in [0, 1], got {self.kd_weight}")
        if self.lr <= 0 or self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("lr must be positive; batch_size and gradient_accumulation_steps at least 1")
        if self.max_steps is None and self.epochs <= 0:
            raise ValueError("set epochs > 0 or max_steps")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.push_to_hub and not self.hub_repo_id:
            raise ValueError("push_to_hub needs hub_repo_id")

