"""What a checkpoint holds, as DCP `Stateful` objects (DCP calls state_dict() before saving or loading and
load_state_dict() after), and reading what a checkpoint on disk holds.

Each state is saved under its own top-level key (names as in torchtitan, usable in `checkpoint.exclude_from_loading`):
  model, optimizer  sharded as they live (DTensors), so a resume at another FSDP/TP layout reshards on load
  lr_scheduler      LambdaLR state (the step count)
  dataloader        the loader's state; its `position` counts global samples and is the same on every rank, so DCP
                    keeps one copy (it de-duplicates identical non-sharded keys) and any dp size can continue it
  train_state       step, tokens seen, skipped steps, the tokenizer's identity, the identity of the base weights
                    under adapter-only checkpoints (`base_identity`), the run's resolved config (so a resume can say
                    what changed), the RNG state of rank 0
  semi_sync         DiLoCo's outer weights and momentum (titan/parallel/semi_sync.py); with it, replica groups hold
                    weights of their own between outer steps, so replica r > 0 saves its model and optimizer state
                    under `model.replica<r>.` and `optimizer.replica<r>.` (replica 0's keep the usual names)
Also the initial weights a run starts from (`load_initial_weights`). Which checkpoint is loaded is resume.py's, saving
save.py's.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from titan.checkpoint.store import file_crc32
from titan.config import Checkpoint
from titan.errors import ConfigError
from titan.models.lora import is_adapter

logger = logging.getLogger("titan")


class ModelState:
    """The model's (or this rank's pipeline stages') parameters under their unsharded names. `only`: "adapters"
    keeps LoRA's adapters (save_adapter_only), "base" everything else (initial weights for a LoRA model).
    `replica`: a DiLoCo replica group's index (its names get `replica<r>.` in front when r > 0)."""

    def __init__(self, parts: list[torch.nn.Module], only: str | None = None, replica: int = 0):
        self.parts, self.only, self.prefix = parts, only, f"replica{replica}." if replica else ""

    def _wanted(self, name: str) -> bool:
        return self.only is None or is_adapter(name) == (self.only == "adapters")

    def state_dict(self) -> dict:
        return {self.prefix + k: v for part in self.parts for k, v in get_model_state_dict(part).items()
                if self._wanted(k)}

    def load_state_dict(self, state: dict) -> None:
        state = {k.removeprefix(self.prefix): v for k, v in state.items()}
        # strict only for a whole model: a pipeline stage holds a subset of the names, a filtered state a part.
        options = StateDictOptions(strict=len(self.parts) == 1 and self.only is None)
        for part in self.parts:
            set_model_state_dict(part, state, options=options)


def load_initial_weights(parts: list[torch.nn.Module], cfg: Checkpoint, process_group=None) -> None:
    """checkpoint.initial_load_path's weights (a DCP checkpoint, or an HF folder with initial_load_in_hf) into the
    model's base weights; LoRA adapters keep their initial values. Nothing happens when no path is set."""
    if not cfg.initial_load_path:
        return
    path, key = Path(cfg.initial_load_path), "checkpoint.initial_load_path"
    if not path.is_dir():
        raise ConfigError(f"{key}: {path} is not a folder")
    if (path / "adapter_config.json").is_file():  # a PEFT adapter folder: its base model, then its adapters
        from titan import peft

        peft.load_with_base(parts, path, key)
    elif cfg.initial_load_in_hf:
        from titan import hf

        hf.load_into(parts, path)
    else:
        if "model" not in read_keys(path, key):
            raise ConfigError(f"{key}: {path} holds no model state")
        try:
            dcp.load({"model": ModelState(parts, only="base")}, checkpoint_id=str(path), process_group=process_group)
        except (Exception, CheckpointException) as e:  # noqa: BLE001
            raise ConfigError(f"{key}: cannot load {path} ({one_line(e)})") from None
    logger.info(f"checkpoint: initial weights from {path}")


WEIGHT_FILES = (".safetensors", ".distcp", ".metadata", ".bin", ".pt", ".pth")


def base_identity(initial_load_path: str, random_init: str, quantized: str = "") -> tuple[str, str]:
    """(digest, description) of the base weights that adapter-only checkpoints (LoRA's save_adapter_only, QLoRA)
    are trained on and do not hold: the name, size and CRC-32 of every weight file under `initial_load_path` (the
    same files elsewhere give the same digest), or, without one, `random_init` (family, flavor and seed, which make
    the seeded initialisation); plus how the base is quantized. ("", "") for a path that is not a folder (the load
    reports it)."""
    if initial_load_path:
        path = Path(initial_load_path)
        if not path.is_dir():
            return "", ""
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_FILES))
        text = "\n".join(f"{f.relative_to(path)} {f.stat().st_size} {file_crc32(f):08x}" for f in files)
        name = str(path)
    else:
        text = name = f"the random initialisation of {random_init}"
    if quantized:
        text, name = f"{text}\nquantized {quantized}", f"{name}, quantized {quantized}"
    return hashlib.sha256(text.encode()).hexdigest(), name


class OptimizerState:
    """The optimizer state keyed by parameter name (not by position), so it reshards like the model; under
    `replica<r>` for a DiLoCo replica group r > 0 (see ModelState)."""

    def __init__(self, parts: list[torch.nn.Module], optimizer: torch.optim.Optimizer, replica: int = 0):
        if len(parts) != 1:
            # One optimizer over several stages' parameters has no single module to name them by.
            raise ConfigError("checkpoint.enable with more than one pipeline stage per rank is not supported yet "
                              "(use a single-stage schedule such as 1F1B)")
        self.part, self.optimizer, self.key = parts[0], optimizer, f"replica{replica}" if replica else None

    def state_dict(self) -> dict:
        state = get_optimizer_state_dict(self.part, self.optimizer)
        return state if self.key is None else {self.key: state}

    def load_state_dict(self, state: dict) -> None:
        set_optimizer_state_dict(self.part, self.optimizer, state if self.key is None else state[self.key])


class TrainState:
    """Progress counters, what the run was trained with (its tokenizer, its resolved config), and the RNG state
    (dropout-free Llama draws no randoms while training; kept for extensions). The RNG state is rank 0's: DCP keeps
    one copy of a non-sharded key."""

    def __init__(self, tokenizer: str = "", tokenizer_name: str = "", run_config: str = "",
                 base: tuple[str, str] = ("", "")):
        self.step, self.tokens_seen, self.skipped_steps = 0, 0, 0
        self.identity = {"tokenizer": tokenizer, "tokenizer_name": tokenizer_name, "config": run_config,
                         "base": base[0], "base_name": base[1]}
        self.tokenizer_aliases = {tokenizer}  # what a checkpoint may have recorded for this tokenizer (not saved)
        self.loaded: dict[str, str] = {}  # those three as the loaded checkpoint recorded them ("" if it did not)
        self.stored: set[str] | None = None  # the keys the checkpoint being loaded has (older ones lack some)

    def state_dict(self) -> dict:
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "skipped_steps": self.skipped_steps,
                 **self.identity, "rng": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state()
        return state if self.stored is None else {k: v for k, v in state.items() if k in self.stored}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.loaded = {k: state.get(k, "") for k in self.identity}
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda_rng"])
        self.stored = None


# ---------------------------------------------------------------------------------------------------------------
# Reading what a checkpoint holds


def read_keys(path: Path, what: str) -> set[str]:
    """Top-level state names stored in a DCP checkpoint; ConfigError naming `path` if it is not one."""
    return {key.split(".", 1)[0] for key in stored_keys(path, what)}


def stored_keys(path: Path, what: str) -> set[str]:
    """Every state name stored in a DCP checkpoint (`model.layers.0...`, `optimizer...`); ConfigError naming `path`
    (as `what`) if it is not one."""
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001 - missing file, unpickling garbage, ...: all mean "not a checkpoint"
        raise ConfigError(f"{what}: {path} is not a readable checkpoint ({one_line(e)})") from None
    return set(metadata.state_dict_metadata)


def one_line(e: BaseException) -> str:
    """An exception in one short line (DCP's CheckpointException: the error under its ranks' tracebacks)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if isinstance(e, CheckpointException) and lines:
        text = lines[-1]  # it carries each failed rank's traceback; the last line is the error itself
    else:
        text = f"{type(e).__name__}: {' '.join(lines)}"
    return text if len(text) < 200 else text[:197] + "..."
