"""Data: tokenizers (tokenizer.py) and pre-training windows with resumable, layout-independent loaders (pretrain.py)."""

from titan.data.pretrain import IGNORE_INDEX, build_pretrain_dataloader, build_validation_dataloader
from titan.data.tokenizer import Tokenizer, load_tokenizer

__all__ = ["IGNORE_INDEX", "Tokenizer", "build_pretrain_dataloader", "build_validation_dataloader", "load_tokenizer"]
