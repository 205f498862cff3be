"""Configuration schema: one dataclass per TOML section, each key with its default, description, choices or range,
and the checks that need nothing but the config itself.

The machinery around it (TOML files with `extends`, the command line, `--help`, writing the resolved config) is
titan/config_io.py's. Checks that need the world size (parallel degrees, batch divisibility) live next to the code
that uses them and raise the same `titan.errors.ConfigError`; every error names the key, so `python -m titan.train`
can print it as one line and exit 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from dataclasses import dataclass, field

import torch

from titan.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """The numbers a numeric key accepts (each item, for a list): finite, within [lo, hi] (open ends with lo_open /
    hi_open; None = unbounded), or one of the sentinels in `also` (e.g. -1 = "automatic"). An int key is also held to
    64 bits. A key declares its range with `opt(..., valid=Range(...))`; without one it must only be finite."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    also: tuple = ()

    def accepts(self, value) -> bool:
        if value in self.also:
            return True
        if not math.isfinite(value) or (isinstance(value, int) and not -INT64 <= value < INT64):
            return False
        below = self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo))
        above = self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi))
        return not (below or above)

    def __str__(self) -> str:
        if self.lo is not None and self.hi is not None:
            text = f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            text = f"{'>' if self.lo_open else '>='} {self.lo:g}"
        elif self.hi is not None:
            text = f"{'<' if self.hi_open else '<='} {self.hi:g}"
        else:
            text = "finite"
        return text + "".join(f" or {v:g}" for v in self.also)


INT64 = 2**63
POSITIVE = Range(0, lo_open=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1)
AUTO = -1  # the sentinel of keys where -1 means "work it out"
SECONDS = Range(1, 2**31 - 1)  # a timeout: timedelta and the collectives' millisecond counters take this much


def opt(default, description: str, choices: tuple | None = None, valid: Range | None = None):
    """A config field: its default, a one-line description for `--help`, optionally the allowed values (`choices`)
    or, for a number, its range (`valid`; see Range)."""
    meta = {"help": description, "choices": choices, "valid": valid}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


# The dtype names a config may use, and what they mean; every component looks them up here.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Job:
    dump_folder: str = opt("./outputs", "folder for the resolved config, metrics, TensorBoard and checkpoints")
    description: str = opt("", "free text describing the run, printed at start")


@dataclass
class Model:
    # The choices are the keys of titan.models.FAMILIES (tests/test_models.py checks that they agree).
    name: str = opt("llama3", "model family (see docs/models.md)",
                    choices=("llama3", "qwen3", "qwen3_moe", "deepseek_v3", "gpt_oss"))
    flavor: str = opt("debugmodel", "size preset from the family's flavors table (e.g. debugmodel, 1B, 8B, 70B; "
                      "qwen3: 0.6B ... 32B; qwen3_moe: 30B-A3B, 235B-A22B; deepseek_v3: 16B, 671B; gpt_oss: 20B, 120B)")
    tokenizer_path: str = opt(
        "", "tiktoken rank file (e.g. a Llama 3 tokenizer.model), a Hugging Face tokenizer.json (needs the hf "
        "extra), or a folder holding either; empty = the shipped 4k-token debug tokenizer, debug_chat = the same "
        "with chat tokens"
    )
    mtp_layers: int = opt(0, "multi-token prediction depths trained after the model (deepseek_v3; DeepSeek-V3 used 1; "
                          "0 = off; see docs/models.md)", valid=NON_NEGATIVE)
    mtp_loss_weight: float = opt(0.3, "weight of the multi-token prediction loss (the mean over depths and tokens; "
                                 "DeepSeek-V3: 0.3, later 0.1)", valid=NON_NEGATIVE)


@dataclass
class Optimizer:
    name: str = opt("AdamW", "optimizer: AdamW, Adam, muon (Muon for the hidden matrices, AdamW for the rest; "
                    "docs/optimizers.md) or SGD (plain, no momentum: for checks)",
                    choices=("AdamW", "Adam", "muon", "SGD"))
    lr: float = opt(8e-4, "peak learning rate (muon: of the hidden matrices)", valid=POSITIVE)
    eps: float = opt(1e-8, "Adam epsilon", valid=POSITIVE)
    weight_decay: float = opt(0.1, "weight decay (decoupled for AdamW and Muon, L2-style for Adam and SGD)",
                              valid=NON_NEGATIVE)
    betas: list[float] = opt([0.9, 0.95], "Adam beta1, beta2", valid=Range(0, 1, hi_open=True))
    implementation: str = opt(
        "foreach", "kernel flavour: fused (one kernel), foreach (batched), for-loop", ("fused", "foreach", "for-loop")
    )
    state_dtype: str = opt("float32", "dtype of the optimizer's moments (Adam's two, Muon's momentum); bfloat16 "
                           "halves their memory", ("float32", "bfloat16"))
    state_rounding: str = opt("stochastic", "how bfloat16 states are rounded: stochastic (unbiased) or nearest",
                              ("stochastic", "nearest"))
    adamw_lr: float = opt(-1.0, "muon: peak lr of the AdamW parameters (embeddings, output head, norms, biases); "
                          "-1 = optimizer.lr", valid=Range(0, lo_open=True, also=(AUTO,)))
    adamw_weight_decay: float = opt(-1.0, "muon: weight decay of the AdamW parameters; -1 = optimizer.weight_decay",
                                    valid=Range(0, also=(AUTO,)))
    muon_momentum: float = opt(0.95, "muon: momentum of the hidden matrices' update", valid=Range(0, 1, hi_open=True))
    muon_nesterov: bool = opt(True, "muon: Nesterov momentum")
    muon_ns_steps: int = opt(5, "muon: Newton-Schulz iterations that orthogonalise the update", valid=Range(1, 99))
    muon_ns_coefficients: list[float] = opt([3.4445, -4.7750, 2.0315], "muon: the quintic iteration's a, b, c",
                                            valid=Range())
    muon_ns_dtype: str = opt("bfloat16", "muon: dtype of the iteration (torch.optim.Muon's is bfloat16; float32 on "
                             "CPUs without fast bf16)", ("float32", "bfloat16"))
    muon_adjust_lr: str = opt(
        "original", "muon: lr scaling by matrix shape A x B: original sqrt(max(1, A/B)), or match_rms_adamw "
        "0.2 sqrt(max(A, B)) (AdamW's lr and weight decay carry over)", ("original", "match_rms_adamw"))


@dataclass
class LRScheduler:
    warmup_steps: int = opt(200, "steps of linear warm-up from ~0 to the peak lr", valid=NON_NEGATIVE)
    decay_ratio: float | None = opt(
        None, "fraction of the steps spent decaying at the end (none = decay over all steps after warm-up)",
        valid=FRACTION,
    )
    decay_type: str = opt("linear", "shape of the decay", choices=("linear", "sqrt", "cosine"))
    min_lr_factor: float = opt(0.0, "lr at the end of the decay, as a fraction of the peak", valid=FRACTION)


RECIPES = ("pretrain", "sft", "dpo", "grpo", "kto")


@dataclass
class Training:
    recipe: str = opt(
        "pretrain", "what the loop optimises: next-token loss on documents, on chat replies (SFT), preferences "
        "(DPO), rewards of sampled completions (GRPO) or thumbs-up/down replies (KTO); see docs/fine_tuning.md and "
        "docs/rl.md", RECIPES
    )
    dataset: str = opt(
        "austen", "dataset name: austen (documents), tiny_chat / tiny_alpaca / tiny_sharegpt / tiny_prompt_completion "
        "(SFT), tiny_preferences (DPO), tiny_arithmetic / arithmetic (GRPO), tiny_feedback (KTO); or a Hugging Face "
        "dataset hf:org/name[/subset][:split] (or hf:/a/folder) from the local datasets cache (the datasets extra); "
        "see docs/data.md"
    )
    dataset_columns: list[str] = opt(
        [], "hf: datasets: rename columns to the fields titan reads, as field=column (e.g. text=content, "
        "messages=conversation)"
    )
    dataset_streaming: bool = opt(
        False, "hf: datasets, pre-training: stream the records (no Arrow copy of the whole set) into the JSONL file "
        "titan reads"
    )
    dataset_path: str = opt(
        "", "a folder prepared by scripts/prepare_data.py, or text files (.txt, .jsonl, .jsonl.gz, .jsonl.zst, "
        ".parquet) or a folder of them, tokenized at start (chat/preference JSONL for sft/dpo); overrides the named "
        "dataset; see docs/data.md"
    )
    dataset_paths: list[str] = opt(
        [], "several sources (as dataset_path takes) to mix by dataset_weights; replaces dataset/dataset_path"
    )
    dataset_weights: list[float] = opt([], "one weight per dataset_paths entry (normalised); empty = equal",
                                       valid=POSITIVE)
    document_masking: bool = opt(
        False, "pretrain: attention never crosses a document boundary inside a window (block-causal), and the "
        "label crossing one is not trained on"
    )
    reset_positions: bool = opt(False, "with document_masking: RoPE positions restart at 0 with every document")
    local_batch_size: int = opt(8, "sequences per micro-batch on each data-parallel rank", valid=POSITIVE)
    global_batch_size: int = opt(
        -1, "sequences per optimizer step over all ranks; -1 = local_batch_size x dp (no accumulation)",
        valid=Range(0, lo_open=True, also=(AUTO,)),
    )
    seq_len: int = opt(2048, "tokens per sequence", valid=POSITIVE)
    steps: int = opt(10000, "optimizer steps to train", valid=POSITIVE)
    max_norm: float = opt(1.0, "gradient-norm clipping threshold (<= 0 disables clipping)", valid=Range())
    loss_chunk_tokens: int = opt(
        2048, "the output projection and the token loss run over chunks of this many tokens, each chunk's gradients "
        "computed in forward, so only one chunk's logits are held (pre-training and SFT on a plain head, without TP "
        "or PP); a micro-batch that fits in one chunk runs whole; 0 = never chunk",
        valid=NON_NEGATIVE)
    loss_chunk_recompute: bool = opt(
        False, "also chunk where each chunk's logits must be computed again in backward (DPO, IPO, SimPO and ORPO; "
        "LoRA or float8 on the output projection; tensor or pipeline parallelism): one chunk's logits held instead "
        "of all, for a third more matmul work in the head")
    seed: int = opt(0, "seed for weights and data order", valid=Range(0, 2**32 - 1))
    deterministic: bool = opt(False, "use deterministic algorithms: CPU runs become bitwise repeatable")
    mixed_precision_param: str = opt(
        "bfloat16", "compute dtype of parameters (bf16 = FSDP param dtype, or autocast without FSDP)", tuple(DTYPES)
    )
    mixed_precision_reduce: str = opt("float32", "dtype of gradient reduction under FSDP", ("float32", "bfloat16"))
    enable_cpu_offload: bool = opt(False, "keep FSDP-sharded parameters, grads and optimizer state in CPU memory")
    max_consecutive_skips: int = opt(
        5, "a step with a non-finite loss or gradient norm makes no update; after this many such (or spike) steps "
        "in a row the run stops with exit code 3", valid=Range(1)
    )
    loss_spike_factor: float = opt(
        0.0, "also skip a step whose loss exceeds this factor x the mean of the last loss_spike_window updated "
        "steps (PaLM/OLMo-style spike skipping); 0 = off", valid=Range(1, lo_open=True, also=(0.0,))
    )
    loss_spike_window: int = opt(50, "steps in the running mean that loss_spike_factor compares with", valid=Range(1))


@dataclass
class Parallelism:
    data_parallel_replicate_degree: int = opt(1, "replicas of the model (DDP-like; HSDP when sharding too)",
                                              valid=POSITIVE)
    data_parallel_shard_degree: int = opt(-1, "FSDP shards; -1 = all ranks not used by other dimensions",
                                          valid=Range(0, lo_open=True, also=(AUTO,)))
    tensor_parallel_degree: int = opt(1, "tensor-parallel ranks (shards heads and FFN)", valid=POSITIVE)
    pipeline_parallel_degree: int = opt(1, "pipeline stages' ranks", valid=POSITIVE)
    context_parallel_degree: int = opt(1, "context-parallel ranks (shards the sequence)", valid=POSITIVE)
    expert_parallel_degree: int = opt(1, "expert-parallel ranks (shard MoE experts), borrowed from dp_shard x cp",
                                      valid=POSITIVE)
    enable_loss_parallel: bool = opt(True, "with TP, compute the loss on vocab-sharded logits (no all-gather)")
    fsdp_reshard_after_forward: str = opt(
        "default", "free gathered weights after forward: default (yes, except the last group), always, never",
        ("default", "always", "never"),
    )
    enable_async_tensor_parallel: bool = opt(False, "overlap TP comms with matmuls (CUDA + compile only)")
    context_parallel_rotate_method: str = opt(
        "allgather", "how CP ranks see every K/V block: gather them once, or pass them around a ring",
        ("allgather", "ring"),
    )
    pipeline_parallel_schedule: str = opt(
        "1F1B", "pipeline schedule: GPipe, 1F1B, Interleaved1F1B, LoopedBFS, InterleavedZeroBubble, ZBVZeroBubble, "
        "DualPipeV (those the installed PyTorch offers)"
    )
    pipeline_parallel_microbatch_size: int = opt(1, "sequences per pipeline micro-batch (divides local_batch_size)",
                                                 valid=POSITIVE)
    pipeline_parallel_layers_per_stage: int | None = opt(
        None, "transformer blocks per stage; none = split evenly into pp x (1, or 2 for multi-stage schedules)",
        valid=POSITIVE,
    )
    pipeline_parallel_split_points: list[str] = opt(
        [], "explicit stage boundaries as the first block of each later stage, e.g. layers.4,layers.8"
    )


@dataclass
class ActivationCheckpoint:
    mode: str = opt("none", "recompute activations in backward to save memory", ("none", "full", "selective"))
    selective_ac_option: str = opt(
        "op", "selective mode: 'op' (save matmul/attention outputs, recompute the rest) or N (every N-th block)"
    )


@dataclass
class MoE:
    """Mixture-of-Experts families only (qwen3_moe; docs/moe.md): a key changed on a dense family is an error."""

    n_experts: int = opt(0, "routed experts per MoE layer; 0 = the flavor's", valid=NON_NEGATIVE)
    top_k: int = opt(0, "experts each token is routed to; 0 = the flavor's", valid=NON_NEGATIVE)
    aux_loss_coef: float = opt(
        0.001, "weight of the sequence-wise auxiliary balance loss (0 = off; Qwen3-MoE's router_aux_loss_coef)",
        valid=NON_NEGATIVE)
    bias_update_rate: float = opt(
        0.0, "auxiliary-loss-free balancing: each optimizer step moves every expert's routing bias by this towards "
        "balance (0 = off; DeepSeek-V3 uses 0.001)", valid=NON_NEGATIVE)
    grouped_mm: bool = opt(True, "experts in torch._grouped_mm calls where the inputs allow it, else a loop")


@dataclass
class Compile:
    enable: bool = opt(False, "torch.compile each transformer block (fullgraph) and the loss")
    components: list[str] = opt(["model", "loss"], "what to compile: model, loss")


@dataclass
class Metrics:
    log_freq: int = opt(10, "print and record metrics every N steps (the first step is always logged)",
                        valid=POSITIVE)
    enable_tensorboard: bool = opt(True, "write TensorBoard scalars to <dump_folder>/tb")
    wandb: bool = opt(False, "also log the same scalars to Weights & Biases (the wandb extra; WANDB_MODE=offline "
                      "keeps the run local)")
    wandb_project: str = opt("titan", "W&B project")
    mlflow: bool = opt(False, "also log the same scalars to MLflow (the mlflow extra; MLFLOW_TRACKING_URI, default "
                       "a file store <dump_folder>/mlruns)")
    mlflow_experiment: str = opt("titan", "MLflow experiment")
    run_name: str = opt("", "the run's name in W&B / MLflow; empty = the dump folder's name")


@dataclass
class Validation:
    enable: bool = opt(False, "evaluate on held-out data during training")
    dataset: str = opt("austen", "dataset name (or hf:org/name[:split]); the named dataset's validation split is used")
    dataset_columns: list[str] = opt([], "hf: datasets: rename columns to the fields titan reads, as field=column")
    dataset_path: str = opt(
        "", "a prepared folder, or text files or a folder of them (as training.dataset_path); overrides the named "
        "dataset's validation split"
    )
    local_batch_size: int = opt(
        AUTO, "sequences per validation batch on each data-parallel rank; -1 = training.local_batch_size",
        valid=Range(0, lo_open=True, also=(AUTO,)))
    seq_len: int = opt(AUTO, "tokens per validation sequence; -1 = training.seq_len",
                       valid=Range(0, lo_open=True, also=(AUTO,)))
    freq: int = opt(100, "validate every N steps", valid=POSITIVE)
    steps: int = opt(10, "batches per validation; -1 = the whole split", valid=Range(0, lo_open=True, also=(AUTO,)))
    lm_eval_tasks: list[str] = opt(
        [], "lm-evaluation-harness tasks scored on the model at every validation, logged beside the loss as "
        "val_<task>_<metric> (the eval extra; not with pipeline or context parallelism); see docs/evaluation.md"
    )
    lm_eval_include: str = opt("", "a folder of lm-eval task YAMLs (tasks over local files, offline)")
    lm_eval_limit: int = opt(0, "at most this many documents per task; 0 = all", valid=NON_NEGATIVE)


CHECKPOINT_STATES = ("model", "optimizer", "lr_scheduler", "dataloader", "train_state", "semi_sync")


@dataclass
class Checkpoint:
    """Saving and resuming; see titan/checkpoint.py and docs/checkpointing.md."""

    enable: bool = opt(False, "save checkpoints, and resume from the newest complete one in `folder` at start")
    folder: str = opt("checkpoint", "checkpoint folder, under job.dump_folder; one sub-folder step-<N> per save")
    interval: int = opt(500, "save every N steps (the last step is always saved)", valid=POSITIVE)
    async_mode: str = opt(
        "disabled", "disabled (the loop waits for the write), async (waits only for a copy to CPU memory), "
        "async_with_pinned_mem (on CUDA the copy into reused pinned memory overlaps the next forward/backward)",
        ("disabled", "async", "async_with_pinned_mem")
    )
    keep_latest_k: int = opt(
        10, "keep the newest K complete checkpoints of this run's history (its own saves and what it resumed from); "
        "0 = keep all", valid=NON_NEGATIVE
    )
    load_step: int = opt(
        -1, "resume from step-<N>; -1 = the newest complete checkpoint that passes its integrity check",
        valid=Range(0, also=(AUTO,))
    )
    branch: bool = opt(
        False, "let load_step name a step older than the newest checkpoint (or exclude train_state): the later "
        "checkpoints move to <folder>/superseded/<run id>/ and training continues from load_step"
    )
    continue_on_save_error: bool = opt(
        False, "a save that fails (disk full, read-only) is reported and training goes on; default: stop (exit 4)"
    )
    allow_tokenizer_change: bool = opt(
        False, "resume even if the checkpoint was trained with another tokenizer (token ids change meaning)"
    )
    allow_base_change: bool = opt(
        False, "resume adapter-only checkpoints (lora.save_adapter_only, QLoRA) although the base weights differ "
        "from those they were trained on (initial_load_path's files, or the seed of a random base)"
    )
    model_only: bool = opt(False, "the last step's save holds only the model weights (in export_dtype)")
    export_dtype: str = opt("float32", "dtype of model-only and Hugging Face exports", ("float32", "bfloat16"))
    exclude_from_loading: list[str] = opt(
        [], "states not restored on resume: " + ", ".join(CHECKPOINT_STATES)
    )
    create_seed_checkpoint: bool = opt(False, "one process: write the initial weights as step-0, then exit")
    initial_load_path: str = opt(
        "", "weights to start from when `folder` has no checkpoint: a DCP or HF folder, or a PEFT adapter folder "
        "(its base_model_name_or_path, then its adapters; needs lora.enable)")
    initial_load_in_hf: bool = opt(False, "initial_load_path is a Hugging Face safetensors folder")
    last_save_in_hf: bool = opt(False, "also export the last step as a Hugging Face folder <folder>/step-<N>-hf")


@dataclass
class Float8:
    """Float8 training of the linear layers via torchao; see titan/parallel/float8.py and docs/float8.md."""

    enable: bool = opt(False, "swap nn.Linear for torchao's Float8Linear (float8 matmuls, high-precision weights)")
    recipe_name: str = opt(
        "tensorwise", "scaling recipe: one scale per tensor, per row, or per row with grad_weight in high precision",
        ("tensorwise", "rowwise", "rowwise_with_gw_hp"),
    )
    filter_fqns: list[str] = opt(["output"], "module-name substrings to keep in high precision (nn.Linear)")
    auto_filter_small_kn: bool = opt(
        False, "also keep linears too small to gain from float8 (torchao's H100-measured K/N thresholds)"
    )
    enable_fsdp_float8_all_gather: bool = opt(False, "FSDP all-gathers weights in float8 (tensorwise only)")
    precompute_float8_dynamic_scale_for_fsdp: bool = opt(
        False, "after each optimizer step, compute all weight scales in one all-reduce (needs float8 all-gather)"
    )
    emulate: bool = opt(False, "emulate float8 matmuls in high precision (for GPUs without float8, or tests)")
    cpu_onednn: bool = opt(
        False, "on CPU, let torch._scaled_mm use oneDNN (on AMX Xeons its float8 kernel is a slow reference "
        "implementation); default: PyTorch's own dequantize-then-fp32 kernel, same results"
    )


@dataclass
class SFT:
    """Supervised fine-tuning data: chat JSONL rendered with a chat template; see titan/data/chat.py."""

    chat_template: str = opt(
        "auto", "how conversations become tokens: tokenizer = the Jinja chat_template of the tokenizer's folder "
        "(tokenizer_config.json or chat_template.jinja), as apply_chat_template renders it; auto = that when the "
        "folder has one, else a built-in picked from the special tokens (qwen3: ChatML whose replies open with a "
        "think block; see docs/fine_tuning.md)", ("auto", "tokenizer", "chatml", "qwen3", "llama3"),
    )
    format: str = opt(
        "auto", "record format of the SFT JSONL: auto detects it per file from the first record; see "
        "docs/fine_tuning.md", ("auto", "messages", "alpaca", "sharegpt", "prompt_completion"),
    )
    train_on_prompt: bool = opt(False, "also train on system/user tokens (default: loss on assistant replies only)")
    packing: bool = opt(
        False, "pack several conversations per sequence (best fit), each attending only to itself"
    )


@dataclass
class LoRA:
    """Low-rank adapters on frozen weights; see titan/models/lora.py."""

    enable: bool = opt(False, "freeze the model and train low-rank adapters on the target linears")
    rank: int = opt(8, "adapter rank r", valid=POSITIVE)
    alpha: float = opt(16.0, "adapter scale numerator: the update is (alpha / rank) * B A", valid=POSITIVE)
    dropout: float = opt(0.0, "dropout on the adapters' input", valid=Range(0, 1, hi_open=True))
    target_modules: list[str] = opt(
        ["wq", "wk", "wv", "wo", "w1", "w2", "w3"], "linears to adapt: wq, wk, wv, wo, w1, w2, w3, output"
    )
    init_from: str = opt(
        "", "a PEFT adapter folder (adapter_config.json + adapter_model.safetensors, from titan or PEFT) the adapters "
        "start from when the run does not resume; its r and lora_alpha must equal rank and alpha"
    )
    save_adapter_only: bool = opt(
        False, "checkpoints hold only the adapters (and their optimizer state); the base comes from "
        "checkpoint.initial_load_path on resume"
    )
    quantize_base: str = opt(
        "none", "QLoRA: hold the frozen base weights of the adapted linears in 4-bit NF4 (torchao); checkpoints then "
        "hold only the adapters", ("none", "nf4"),
    )
    nf4_scaler_block_size: int = opt(
        256, "NF4 blocks (of 64 weights) per block of their int8 scale factors; must divide every adapted weight's "
        "block count (per FSDP shard)", valid=POSITIVE
    )


PREFERENCE_LOSSES = ("sigmoid", "ipo", "simpo", "orpo")


@dataclass
class DPO:
    """Preference optimisation (training.recipe = "dpo"); see titan/objectives/preference.py and docs/fine_tuning.md."""

    loss: str = opt(
        "sigmoid", "preference loss: sigmoid (DPO), ipo, simpo, orpo; simpo and orpo need no reference model",
        PREFERENCE_LOSSES,
    )
    beta: float = opt(
        0.1, "sigmoid/ipo: strength of the tie to the reference model (higher = stay closer; IPO's tau); simpo: "
        "scale of its length-normalised reward (the paper uses 2 to 2.5); unused by orpo", valid=POSITIVE
    )
    simpo_gamma: float = opt(0.5, "simpo: target reward margin gamma", valid=NON_NEGATIVE)
    orpo_lambda: float = opt(0.1, "orpo: weight lambda of the odds-ratio term added to the chosen reply's NLL",
                             valid=POSITIVE)
    ipo_normalize: bool = opt(
        True, "ipo: divide each reply's log-ratio by its token count (TRL's IPO, which TRL confirmed with the IPO "
        "authors); false = the paper's summed log-probabilities"
    )
    orpo_nll: str = opt(
        "prompt_and_reply", "orpo: the NLL term: the mean over every prompt and reply token of the batch's chosen rows "
        "(TRL, the ORPO authors' code), or the chosen reply's per-token mean per pair (reply)",
        ("prompt_and_reply", "reply"),
    )
    label_smoothing: float = opt(
        0.0, "sigmoid: the assumed fraction of flipped preference labels (conservative DPO, cDPO): the loss is "
        "-(1 - e) log sigmoid(m) - e log sigmoid(-m)", valid=Range(0, 0.5, hi_open=True)
    )
    precompute_reference: bool = opt(
        False, "sigmoid/ipo: compute the reference model's log-probabilities of every pair once before training "
        "(stored in <dump_folder>/reference_logps.pt and reused by a resumed run); training then holds no reference "
        "model and runs no reference forward pass"
    )


GRPO_LOSSES = ("dapo", "grpo", "dr_grpo")


@dataclass
class GRPO:
    """Online RL with verifiable rewards (training.recipe = "grpo"); keys named as TRL's GRPOConfig where it has
    them. See titan/rollout.py, titan/objectives/grpo.py and docs/rl.md."""

    num_generations: int = opt(8, "completions sampled per prompt (the group its advantages are normalised in)",
                               valid=Range(2))
    max_completion_length: int = opt(256, "new tokens per completion at most; a prompt may take training.seq_len + "
                                     "1 - this many tokens", valid=POSITIVE)
    temperature: float = opt(1.0, "sampling temperature of the rollouts", valid=POSITIVE)
    top_p: float = opt(1.0, "nucleus sampling: keep the most likely tokens up to this probability",
                       valid=Range(0, 1, lo_open=True))
    top_k: int = opt(0, "sample among the k most likely tokens; 0 = all", valid=NON_NEGATIVE)
    reward_functions: list[str] = opt(
        ["titan.rewards:math_answer"], "reward functions as \"package.module:function\", called as TRL calls them "
        "(prompts=, completions=, completion_ids=, every other dataset column)")
    reward_weights: list[float] = opt([], "one weight per reward function; empty = 1.0 each", valid=Range())
    scale_rewards: str = opt("group", "divide advantages by the group's reward std (group, GRPO) or not (none, "
                             "Dr. GRPO)", ("group", "none"))
    loss_type: str = opt("dapo", "aggregation: dapo (token mean over the step), grpo (mean per completion, then "
                         "over completions), dr_grpo (sum / (completions x max_completion_length))", GRPO_LOSSES)
    epsilon: float = opt(0.2, "clip range below: ratio >= 1 - epsilon", valid=Range(0, 1, lo_open=True))
    epsilon_high: float | None = opt(None, "clip range above: ratio <= 1 + epsilon_high (DAPO's clip-higher uses "
                                     "0.28); none = epsilon", valid=POSITIVE)
    beta: float = opt(0.0, "weight of the KL penalty to the frozen reference model (0 = no reference, as DAPO)",
                      valid=NON_NEGATIVE)
    num_iterations: int = opt(1, "optimizer steps on each batch of rollouts (mu; > 1 keeps the sampling "
                              "policy's log-probabilities for the ratio)", valid=POSITIVE)
    mask_truncated_completions: bool = opt(False, "overlong filtering: completions cut at max_completion_length "
                                           "(no stop token) add nothing to the loss")
    overlong_buffer_len: int = opt(0, "DAPO's soft overlong punishment: completions longer than max_completion_"
                                   "length - this many tokens get a reward falling linearly to -factor; 0 = off",
                                   valid=NON_NEGATIVE)
    overlong_penalty_factor: float = opt(1.0, "the soft overlong punishment's largest penalty", valid=NON_NEGATIVE)
    generation_batch_size: int = opt(0, "completions per call of the generator (bounds its memory); 0 = all of "
                                     "this rank's completions of the step at once", valid=NON_NEGATIVE)


KTO_LOSSES = ("kto",)


@dataclass
class KTO:
    """Kahneman-Tversky optimisation (training.recipe = "kto") on unpaired prompt/completion/label data; keys as
    TRL's KTOConfig. See titan/objectives/kto.py and docs/rl.md."""

    beta: float = opt(0.1, "strength of the tie to the reference model", valid=POSITIVE)
    desirable_weight: float = opt(1.0, "weight of the losses of desirable (label true) completions", valid=POSITIVE)
    undesirable_weight: float = opt(1.0, "weight of the losses of undesirable (label false) completions",
                                    valid=POSITIVE)


@dataclass
class Profiling:
    enable_profiling: bool = opt(False, "record torch.profiler traces (one profiled step every profile_freq steps)")
    save_traces_folder: str = opt(
        "profile_traces", "traces go to <dump_folder>/<this>/iteration_<step>/rank<r>_trace.json"
    )
    profile_freq: int = opt(10, "profile one step out of every N (steps N, 2N, ...; the steps before it warm up)",
                            valid=POSITIVE)
    enable_memory_snapshot: bool = opt(False, "record CUDA allocator history and dump snapshots (CUDA only)")
    save_memory_snapshot_folder: str = opt(
        "memory_snapshot", "snapshots go to <dump_folder>/<this>/iteration_<step>/rank<r>_memory_snapshot.pickle"
    )


@dataclass
class Comm:
    init_timeout_seconds: int = opt(300, "collective timeout until the first step ends (covers start-up, compile)",
                                    valid=SECONDS)
    train_timeout_seconds: int = opt(100, "collective timeout after the first step: a rank stuck this long fails",
                                     valid=SECONDS)


@dataclass
class SemiSync:
    """Low-communication data parallelism across replica groups (docs/parallelism.md, "DiLoCo")."""

    method: str = opt(
        "none", "none: gradients are reduced across dp_replicate every step (HSDP); diloco: each replica group trains "
        "sync_every steps on its own, then the replicas average their progress in an outer step", ("none", "diloco"))
    sync_every: int = opt(500, "diloco: inner steps H between outer steps (the DiLoCo paper's 500)", valid=Range(1))
    outer_lr: float = opt(0.7, "diloco: lr of the outer SGD step (the paper's 0.7)", valid=POSITIVE)
    outer_momentum: float = opt(0.9, "diloco: Nesterov momentum of the outer step (the paper's 0.9; 0 = plain SGD, "
                                "which with outer_lr 1 averages the replicas)", valid=Range(0, 1, hi_open=True))
    fragments: int = opt(1, "diloco: parameter fragments synchronised in turn, one every sync_every / fragments "
                         "steps (streaming DiLoCo)", valid=Range(1))
    comm_dtype: str = opt("float32", "diloco: dtype the pseudo-gradient is all-reduced in", ("float32", "bfloat16"))


@dataclass
class Config:
    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    training: Training = field(default_factory=Training)
    parallelism: Parallelism = field(default_factory=Parallelism)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    compile: Compile = field(default_factory=Compile)
    moe: MoE = field(default_factory=MoE)
    metrics: Metrics = field(default_factory=Metrics)
    validation: Validation = field(default_factory=Validation)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    profiling: Profiling = field(default_factory=Profiling)
    comm: Comm = field(default_factory=Comm)
    semi_sync: SemiSync = field(default_factory=SemiSync)
    float8: Float8 = field(default_factory=Float8)
    sft: SFT = field(default_factory=SFT)
    lora: LoRA = field(default_factory=LoRA)
    dpo: DPO = field(default_factory=DPO)
    grpo: GRPO = field(default_factory=GRPO)
    kto: KTO = field(default_factory=KTO)


# ---------------------------------------------------------------------------------------------------------------
# Checks that need only the config. Checks involving the world size live in titan/parallel/mesh.py.


def _check_values(cfg: Config) -> None:
    """Every key's value against its declared kind: numbers within their Range (finite, 64-bit ints at least), text
    that is valid Unicode (bytes a shell passed that are not UTF-8 arrive as surrogates, which no file, log line or
    config.toml can hold)."""
    for section, cls in sections().items():
        obj = getattr(cfg, section)
        for key, (tp, f) in section_keys(cls).items():
            value, base = getattr(obj, key), unwrap_optional(tp)[0]
            items = value if isinstance(value, list) else [value]
            item_type = typing.get_args(base)[0] if typing.get_origin(base) is list else base
            for item in items:
                if item is None or item_type is bool:
                    continue
                if item_type in (int, float) and not (f.metadata.get("valid") or Range()).accepts(item):
                    raise ConfigError(f"{section}.{key} must be {f.metadata.get('valid') or Range()} "
                                      f"(got {_shown(value)})")
                if item_type is str and not _is_text(item):
                    raise ConfigError(f"{section}.{key} must be UTF-8 text (got {_shown(value)})")


def _is_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown(value) -> str:
    """A value as an error message shows it: printable whatever it holds (ints of any size, surrogates)."""
    text = ascii(value) if isinstance(value, (str, list)) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def validate(cfg: Config) -> None:
    _check_values(cfg)
    o = cfg.optimizer
    if len(o.betas) != 2:
        raise ConfigError(f"optimizer.betas must be two numbers in [0, 1) (got {o.betas})")
    if len(o.muon_ns_coefficients) != 3:
        raise ConfigError(f"optimizer.muon_ns_coefficients must be three numbers a, b, c "
                          f"(got {o.muon_ns_coefficients})")
    if o.name == "SGD" and o.state_dtype != "float32":
        raise ConfigError(f"optimizer.state_dtype={o.state_dtype} with optimizer.name=SGD: plain SGD keeps no state")
    if o.name == "muon" and cfg.training.enable_cpu_offload:
        raise ConfigError("optimizer.name=muon with training.enable_cpu_offload is not supported (its step gathers the "
                          "sharded matrices, which then live in host memory, where NCCL cannot gather them)")
    if o.name == "muon" and cfg.lora.enable:
        raise ConfigError("optimizer.name=muon with lora.enable is not supported (Muon is for full hidden matrices; "
                          "train LoRA adapters with AdamW)")
    for key in ("job.dump_folder", "checkpoint.folder"):
        section, name = key.split(".")
        if not getattr(getattr(cfg, section), name).strip():
            raise ConfigError(f"{key} must name a folder (got an empty string)")
    c = cfg.checkpoint
    if c.load_step != AUTO and not c.enable:
        raise ConfigError(f"checkpoint.load_step={c.load_step} needs checkpoint.enable = true (without it nothing is "
                          f"loaded: the run would start afresh beside that checkpoint)")
    for state in c.exclude_from_loading:
        if state not in CHECKPOINT_STATES:
            raise ConfigError(f"checkpoint.exclude_from_loading: unknown state {state!r} "
                              f"(valid: {', '.join(CHECKPOINT_STATES)}){did_you_mean(state, CHECKPOINT_STATES)}")
    ac = cfg.activation_checkpoint
    if ac.mode == "selective" and ac.selective_ac_option != "op" and not (
        ac.selective_ac_option.isdigit() and 0 < int(ac.selective_ac_option) < INT64
    ):
        raise ConfigError(
            "activation_checkpoint.selective_ac_option must be 'op' or a positive integer "
            f"(got {ac.selective_ac_option!r})"
        )
    for c in cfg.compile.components:
        if c not in ("model", "loss"):
            raise ConfigError(f"compile.components: unknown component {c!r} (valid: model, loss)"
                              f"{did_you_mean(c, ('model', 'loss'))}")
    _validate_data(cfg)
    _validate_finetuning(cfg)
    _validate_moe(cfg)
    _validate_semi_sync(cfg)


def _validate_semi_sync(cfg: Config) -> None:
    s, p = cfg.semi_sync, cfg.parallelism
    if s.method == "none":
        return
    if p.data_parallel_replicate_degree < 2:
        raise ConfigError(f"semi_sync.method={s.method} trains replica groups apart: it needs parallelism."
                          f"data_parallel_replicate_degree >= 2 (got {p.data_parallel_replicate_degree})")
    if s.fragments > s.sync_every:
        raise ConfigError(f"semi_sync.fragments={s.fragments} exceeds semi_sync.sync_every={s.sync_every}: each "
                          f"fragment needs a step of its own")
    if cfg.moe.bias_update_rate > 0:
        # The routing bias is a buffer, which the outer step does not average: the replicas' biases would drift apart.
        raise ConfigError(f"semi_sync.method={s.method} with moe.bias_update_rate={cfg.moe.bias_update_rate:g} is not "
                          f"supported yet; set moe.bias_update_rate = 0 (the auxiliary loss still balances)")


# The model.name choices with Mixture-of-Experts layers (tests/test_moe.py checks).
MOE_FAMILIES = ("qwen3_moe", "deepseek_v3", "gpt_oss")


def _validate_moe(cfg: Config) -> None:
    ac = cfg.activation_checkpoint
    if (cfg.model.name in MOE_FAMILIES and cfg.compile.enable and "model" in cfg.compile.components
            and ac.mode == "selective" and ac.selective_ac_option == "op"):
        # An MoE block is compiled in parts around its eager MoE layer (titan/parallel/parallelize.py:compile_blocks);
        # torch 2.13's op-level recompute then meets the compiled parts' profiler ops out of order in backward.
        raise ConfigError("activation_checkpoint.selective_ac_option = op with compile.enable does not work for the "
                          f"Mixture-of-Experts blocks of model.name={cfg.model.name} yet; use activation_checkpoint."
                          "mode = full, or selective with selective_ac_option = N")
    _validate_mtp(cfg)


def _validate_mtp(cfg: Config) -> None:
    """Multi-token prediction shifts each sequence by whole tokens and shares the embedding with the output head: the
    axes that split a sequence (cp, tp's sequence parallel) or the model's ends (pp) do not carry it (yet)."""
    if not cfg.model.mtp_layers:
        return
    p = cfg.parallelism
    for key, degree in (("pipeline_parallel_degree", p.pipeline_parallel_degree),
                        ("context_parallel_degree", p.context_parallel_degree),
                        ("tensor_parallel_degree", p.tensor_parallel_degree)):
        if degree > 1:
            raise ConfigError(f"model.mtp_layers={cfg.model.mtp_layers} with parallelism.{key}={degree} is not "
                              "supported: multi-token prediction trains under FSDP/HSDP, expert parallelism, "
                              "activation checkpointing, compile and float8")
    if cfg.training.recipe == "dpo":
        raise ConfigError("model.mtp_layers is a token loss (training.recipe = pretrain or sft), not a preference one")


def _validate_data(cfg: Config) -> None:
    t = cfg.training
    if t.dataset_paths:
        if t.dataset_path:
            raise ConfigError("training.dataset_path and training.dataset_paths are both set; use one (a single "
                              "source, or several to mix)")
        if t.recipe != "pretrain":
            raise ConfigError(f"training.dataset_paths (mixing) applies to training.recipe = pretrain (got "
                              f"{t.recipe}); set training.dataset_path")
        if t.dataset_weights and len(t.dataset_weights) != len(t.dataset_paths):
            raise ConfigError(f"training.dataset_weights has {len(t.dataset_weights)} entries for "
                              f"{len(t.dataset_paths)} training.dataset_paths")
        if not t.dataset_weights:
            t.dataset_weights = [1.0] * len(t.dataset_paths)
        if not all(w > 0 and math.isfinite(w) for w in t.dataset_weights):
            raise ConfigError(f"training.dataset_weights must be finite numbers > 0 (got {t.dataset_weights})")
    elif t.dataset_weights:
        raise ConfigError("training.dataset_weights is set without training.dataset_paths")
    if t.reset_positions and not t.document_masking:
        raise ConfigError("training.reset_positions needs training.document_masking = true")
    if t.document_masking and t.recipe != "pretrain":
        raise ConfigError(f"training.document_masking applies to training.recipe = pretrain (got {t.recipe}); "
                          f"SFT masks packed conversations with sft.packing")
    _validate_validation(cfg)


def _validate_validation(cfg: Config) -> None:
    """Validation's shapes default to training's (-1); under pipeline parallelism they must be training's, whose
    micro-batch shapes the schedule was built for."""
    t, v = cfg.training, cfg.validation
    defaulted = tuple(key for key in ("seq_len", "local_batch_size") if getattr(v, key) == AUTO)
    for key in defaulted:
        setattr(v, key, getattr(t, key))
    if defaulted:  # which ones follow training's (scripts/plan.py re-derives them when it changes training's)
        v.defaulted = defaulted
    if v.enable and cfg.parallelism.pipeline_parallel_degree > 1:
        for key, value, train in (("seq_len", v.seq_len, t.seq_len),
                                  ("local_batch_size", v.local_batch_size, t.local_batch_size)):
            if value != train:
                raise ConfigError(f"validation.{key}={value} differs from training.{key}={train}, which pipeline "
                                  f"parallelism's schedule needs (its micro-batches have training's shape)")


def _validate_finetuning(cfg: Config) -> None:
    t, p = cfg.training, cfg.parallelism
    if t.recipe in ("dpo", "grpo", "kto"):
        needs = "whole sequences' log-probabilities on one rank" + (", and generates with the whole model"
                                                                   if t.recipe == "grpo" else "")
        for key, degree in (("pipeline_parallel_degree", p.pipeline_parallel_degree),
                            ("context_parallel_degree", p.context_parallel_degree)):
            if degree > 1:
                raise ConfigError(f"training.recipe={t.recipe} does not support parallelism.{key}={degree} yet (it "
                                  f"needs {needs})")
        if t.recipe == "dpo" and cfg.dpo.precompute_reference and cfg.dpo.loss in ("simpo", "orpo"):
            raise ConfigError(f"dpo.precompute_reference: dpo.loss={cfg.dpo.loss} has no reference model")
        if cfg.validation.enable:
            raise ConfigError(f"validation.enable is not supported with training.recipe={t.recipe} (the logged "
                              f"{'rewards are' if t.recipe == 'grpo' else 'reward accuracy and margin are'} the "
                              f"progress measures)")
    if t.recipe == "grpo":
        _validate_grpo(cfg)
    v = cfg.validation
    if v.lm_eval_tasks and not v.enable:
        raise ConfigError("validation.lm_eval_tasks are scored at every validation: set validation.enable = true")
    if v.lm_eval_tasks and (p.pipeline_parallel_degree > 1 or p.context_parallel_degree > 1):
        raise ConfigError("validation.lm_eval_tasks needs every rank to hold whole sequences: not with parallelism."
                          "pipeline_parallel_degree or context_parallel_degree > 1 (score the export with "
                          "scripts/eval.py instead)")
    if cfg.lora.init_from and not cfg.lora.enable:
        raise ConfigError(f"lora.init_from={cfg.lora.init_from} loads LoRA adapters: set lora.enable = true")
    if cfg.lora.enable and cfg.float8.enable:
        raise ConfigError("lora.enable and float8.enable together are not supported (float8 would convert the "
                          "frozen base linears that LoRA wraps)")
    if cfg.lora.enable and cfg.moe.bias_update_rate > 0:
        # The bias is base-model state: adapter-only checkpoints and the merged export would lose what it learnt.
        raise ConfigError(f"moe.bias_update_rate={cfg.moe.bias_update_rate:g} moves the routing of a base model that "
                          f"lora.enable keeps frozen; set moe.bias_update_rate = 0 (the auxiliary loss still works)")
    _validate_qlora(cfg)


def _validate_grpo(cfg: Config) -> None:
    g, t = cfg.grpo, cfg.training
    if g.max_completion_length >= t.seq_len:
        raise ConfigError(f"grpo.max_completion_length={g.max_completion_length} leaves no room for a prompt in "
                          f"training.seq_len={t.seq_len} (prompt + completion <= seq_len + 1 tokens)")
    if g.reward_weights and len(g.reward_weights) != len(g.reward_functions):
        raise ConfigError(f"grpo.reward_weights has {len(g.reward_weights)} entries for "
                          f"{len(g.reward_functions)} grpo.reward_functions")
    if g.overlong_buffer_len >= g.max_completion_length:
        raise ConfigError(f"grpo.overlong_buffer_len={g.overlong_buffer_len} must be below grpo.max_completion_"
                          f"length={g.max_completion_length}")


def _validate_qlora(cfg: Config) -> None:
    q = cfg.lora
    if q.quantize_base == "none":
        return
    if not q.enable:
        raise ConfigError(f"lora.quantize_base={q.quantize_base} quantizes the frozen base under LoRA adapters: set "
                          f"lora.enable = true")
    p = cfg.parallelism
    if p.tensor_parallel_degree > 1:
        raise ConfigError(f"lora.quantize_base={q.quantize_base} does not support parallelism.tensor_parallel_degree="
                          f"{p.tensor_parallel_degree} (torchao's NF4 weights have no tensor-parallel matmul); "
                          f"shard with FSDP instead")
    if cfg.training.enable_cpu_offload:
        raise ConfigError(f"lora.quantize_base={q.quantize_base} with training.enable_cpu_offload is not supported")
    if cfg.checkpoint.create_seed_checkpoint:
        raise ConfigError(f"checkpoint.create_seed_checkpoint with lora.quantize_base={q.quantize_base}: a seed "
                          f"checkpoint holds full-precision weights; write it without lora.quantize_base")


# ---------------------------------------------------------------------------------------------------------------
# Schema introspection


@functools.cache  # the schema does not change while running; get_type_hints evaluates every annotation anew
def sections() -> dict[str, type]:
    """{section name: its dataclass} (shared: do not modify)."""
    return typing.get_type_hints(Config)


@functools.cache
def section_keys(section_cls) -> dict[str, tuple[object, dataclasses.Field]]:
    """{key: (its type, its field)} of a section's dataclass (shared: do not modify)."""
    hints = typing.get_type_hints(section_cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(section_cls)}


def unwrap_optional(tp):
    """`X | None` -> (X, True); anything else -> (tp, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def type_name(tp) -> str:
    base, optional = unwrap_optional(tp)
    if typing.get_origin(base) is list:
        name = f"list[{typing.get_args(base)[0].__name__}]"
    else:
        name = base.__name__
    return f"{name} | none" if optional else name


# Other trainers' names for titan's keys: a suggestion by meaning where spelling is too far apart
# (`--optimizer.learning_rate` is closer in letters to `--optimizer.name` than to `--optimizer.lr`).
SYNONYMS = {"learning_rate": "lr", "max_lr": "lr", "min_lr": "min_lr_factor", "warmup": "warmup_steps",
            "num_warmup_steps": "warmup_steps", "max_steps": "steps", "num_steps": "steps", "train_steps": "steps",
            "total_steps": "steps", "batch_size": "local_batch_size", "micro_batch_size": "local_batch_size",
            "grad_clip": "max_norm", "max_grad_norm": "max_norm", "clip_grad_norm": "max_norm",
            "gradient_clipping": "max_norm", "sequence_length": "seq_len", "max_seq_len": "seq_len",
            "save_interval": "interval", "save_steps": "interval", "output_dir": "dump_folder",
            "tokenizer": "tokenizer_path", "model_name": "name"}


def did_you_mean(word: str, options) -> str:
    options = list(options)
    head, dot, last = word.rpartition(".")
    synonym = SYNONYMS.get(last.lstrip("-"))
    if synonym is not None:
        candidate = f"{head}{dot}{synonym}" if dot else word[: len(word) - len(last.lstrip("-"))] + synonym
        if candidate in options:
            return f" (did you mean '{candidate}'?)"
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""
