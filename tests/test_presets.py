"""Every preset in train_configs/ (globbed, so new ones are covered): it loads and validates, names an existing
family, flavor and dataset, its parallel degrees fit a plausible world size and the model's shapes, and its batch
sizes give a whole number of accumulation steps. Nothing is built beyond the meta device."""

from pathlib import Path

import pytest
import tomllib

from titan import config, config_io
from titan.build import gradient_accumulation_steps
from titan.data.documents import DATASETS
from titan.models import FAMILIES, model_args
from titan.parallel.mesh import ParallelDims, check_model_fits

PRESETS = sorted((Path(__file__).resolve().parents[1] / "train_configs").glob("*.toml"))


def test_the_glob_finds_the_presets():
    names = {p.name for p in PRESETS}
    assert {"debug_model.toml", "llama3_8b.toml", "llama3_70b.toml", "llama3_405b.toml", "qwen3_debug.toml",
            "qwen3_0.6b.toml", "qwen3_8b.toml", "qwen3_moe_debug.toml", "qwen3_moe_30b_a3b.toml",
            "qwen3_moe_235b_a22b.toml", "deepseek_v3_debug.toml", "deepseek_v3_16b.toml", "deepseek_v3_671b.toml",
            "gpt_oss_debug.toml", "gpt_oss_20b.toml", "gpt_oss_120b.toml"} <= names


def world_sizes(p: config.Parallelism) -> list[int]:
    """The smallest world for the explicit degrees, and one with dp_shard = 8 when the shard degree is -1."""
    others = (p.data_parallel_replicate_degree * p.tensor_parallel_degree * p.pipeline_parallel_degree
              * p.context_parallel_degree)
    if p.data_parallel_shard_degree == -1:
        return [others, 8 * others]
    return [others * p.data_parallel_shard_degree]


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset(path):
    cfg = config_io.load(["--config", str(path)])
    config.validate(cfg)
    flavors = FAMILIES[cfg.model.name].flavors
    assert cfg.model.flavor in flavors, f"{path.name}: {cfg.model.flavor!r} is not a {cfg.model.name} flavor"
    assert cfg.training.dataset in DATASETS or cfg.training.dataset_path, path.name
    args = model_args(cfg.model.name, cfg.model.flavor, max_seq_len=cfg.training.seq_len)

    for world in world_sizes(cfg.parallelism):
        dims = ParallelDims.from_config(cfg.parallelism, world)
        assert dims.pp * dims.dp_replicate * dims.dp_shard * dims.cp * dims.tp == world
        if cfg.parallelism.data_parallel_shard_degree != -1:
            assert dims.dp_shard == cfg.parallelism.data_parallel_shard_degree
        check_model_fits(dims, args)

        steps = gradient_accumulation_steps(cfg.training, dims.dp)
        t = cfg.training
        if t.global_batch_size == -1:
            assert steps == 1
        else:
            assert steps >= 1 and steps * t.local_batch_size * dims.dp == t.global_batch_size

    # The resolved config `titan.train` writes reads back to the same config.
    assert config_io.from_dict(tomllib.loads(config_io.to_toml(cfg))) == cfg
