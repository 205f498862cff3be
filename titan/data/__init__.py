"""Data: tokenizers (tokenizer.py), reading documents (documents.py), the prepared token layout (tokens.py),
preparing a corpus (prepare.py), pre-training windows and their resumable, layout-independent loaders (pretrain.py),
and chat/preference data (chat.py). Import the submodules: this package imports nothing itself, so a tokenizing
worker does not load torch."""
