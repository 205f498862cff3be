"""Which loaders a recipe reads: pre-training windows, chat conversations (SFT), preference pairs (DPO), labelled
completions (KTO) or GRPO's prompts, and the validation loader where the recipe has one."""

from __future__ import annotations

from titan.config import GRPO, SFT, Training, Validation
from titan.data.chat import build_preference_dataloader, build_sft_dataloader, build_sft_validation_dataloader
from titan.data.pretrain import build_pretrain_dataloader, build_validation_dataloader
from titan.data.rl import build_feedback_dataloader, grpo_prompts


def build_dataloaders(training: Training, sft: SFT, validation: Validation, tokenizer, dp_rank: int, dp_size: int,
                      grpo: GRPO | None = None, allow_tokenizer_change: bool = False):
    """(train loader, validation loader or None) for the recipe; for GRPO (its prompts, their chat template), which
    `build_rollouts` turns into the loader. `allow_tokenizer_change`: checkpoint's override key, which also lets a
    prepared folder of another tokenizer be read."""
    if training.recipe == "pretrain":
        allow = {"allow_tokenizer_change": allow_tokenizer_change}
        train = build_pretrain_dataloader(training, tokenizer, dp_rank, dp_size, **allow)
        val = build_validation_dataloader(validation, training, tokenizer, dp_rank, dp_size, **allow) \
            if validation.enable else None
    elif training.recipe == "sft":
        train = build_sft_dataloader(training, sft, tokenizer, dp_rank, dp_size)
        val = build_sft_validation_dataloader(validation, sft, tokenizer, validation.seq_len, dp_rank, dp_size) \
            if validation.enable else None
    elif training.recipe == "kto":
        train, val = build_feedback_dataloader(training, sft, tokenizer, dp_rank, dp_size), None
    elif training.recipe == "grpo":
        train, val = grpo_prompts(training, sft, grpo or GRPO(), tokenizer, dp_size), None
    else:
        train, val = build_preference_dataloader(training, sft, tokenizer, dp_rank, dp_size), None
    return train, val
