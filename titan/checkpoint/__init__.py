"""Checkpoints, one module per object: what is saved (state.py), which checkpoint a run continues from and its
loading (resume.py), the saver the training loop talks to (save.py: `Checkpointer`), and the folder on disk —
manifests, the commit, recovery, retention (store.py). Import the submodules: this package imports nothing itself,
so that store.py stays free of torch (the crash tests kill a process inside it)."""
