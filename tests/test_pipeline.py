"""Pipeline splitting and its misconfigurations (pure functions, no processes): stage boundaries for the automatic,
layers-per-stage and split-point modes, stage placement for looped and V-shaped schedules, and one-line errors
naming the key."""

from __future__ import annotations

import pytest
import torch

from titan.config import Parallelism
from titan.errors import ConfigError
from titan.models.llama import Transformer, model_args
from titan.parallel.pipeline import Pipeline, prune, schedule_names, stage_layers, stages_of_rank


def _cfg(**kw) -> Parallelism:
    return Parallelism(pipeline_parallel_degree=2, **kw)


def test_installed_torch_offers_the_issue_schedules():
    assert {"GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble"} <= set(
        schedule_names())


def test_automatic_split_is_even_and_covers_every_layer():
    assert stage_layers(6, 2, _cfg(pipeline_parallel_schedule="1F1B")) == [[0, 1, 2], [3, 4, 5]]
    # Multi-stage schedules get two stages per rank; earlier stages take the remainder.
    assert stage_layers(6, 2, _cfg(pipeline_parallel_schedule="Interleaved1F1B")) == [[0, 1], [2, 3], [4], [5]]


def test_layers_per_stage_and_split_points():
    assert stage_layers(6, 2, _cfg(pipeline_parallel_schedule="LoopedBFS",
                                   pipeline_parallel_layers_per_stage=1)) == [[i] for i in range(6)]
    assert stage_layers(4, 2, _cfg(pipeline_parallel_split_points=["layers.1"])) == [[0], [1, 2, 3]]


def test_stage_placement():
    assert stages_of_rank(0, 2, 4, "Interleaved1F1B") == [0, 2]
    assert stages_of_rank(1, 2, 4, "Interleaved1F1B") == [1, 3]
    assert stages_of_rank(0, 2, 4, "ZBVZeroBubble") == [0, 3]  # V: the first rank also holds the last stage
    assert stages_of_rank(1, 2, 4, "ZBVZeroBubble") == [1, 2]


def test_pruned_stages_keep_names_and_ends():
    with torch.device("meta"):
        model = Transformer(model_args("tiny"))
    first, last = prune(model, [0, 1], True, False), prune(model, [2, 3], False, True)
    assert list(first.layers) == ["0", "1"] and first.tok_embeddings is not None and first.output is None
    assert list(last.layers) == ["2", "3"] and last.tok_embeddings is None and last.norm is not None
    assert len(model.layers) == 4  # the original is untouched


@pytest.mark.parametrize("kw, n_layers, key", [
    ({"pipeline_parallel_schedule": "Foo"}, 4, "pipeline_parallel_schedule"),
    ({"pipeline_parallel_schedule": "Interleaved1F1B"}, 3, "pipeline_parallel_degree"),  # 4 stages, 3 layers
    ({"pipeline_parallel_layers_per_stage": 3}, 4, "pipeline_parallel_layers_per_stage"),
    ({"pipeline_parallel_split_points": ["layers.9"]}, 4, "pipeline_parallel_split_points"),
    ({"pipeline_parallel_split_points": ["layers.1", "layers.2"]}, 4, "pipeline_parallel_split_points"),
])
def test_bad_split_names_the_key(kw, n_layers, key):
    with pytest.raises(ConfigError) as e:
        stage_layers(n_layers, 2, _cfg(**kw))
    assert f"parallelism.{key}" in str(e.value) and "\n" not in str(e.value)


def test_unknown_schedule_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="1F1B.*Interleaved1F1B"):
        stage_layers(4, 2, _cfg(pipeline_parallel_schedule="Foo"))


def test_batch_not_divisible_into_microbatches_names_the_key():
    with torch.device("meta"):
        model = Transformer(model_args("tiny"))
    with pytest.raises(ConfigError, match="pipeline_parallel_microbatch_size=3 does not divide "
                                          "training.local_batch_size=8"):
        Pipeline(model, None, _cfg(pipeline_parallel_microbatch_size=3), 8, None, None, torch.device("cpu"))


def test_tied_embeddings_are_rejected():
    with torch.device("meta"):
        model = Transformer(model_args("tiny", tie_embeddings=True))
    with pytest.raises(ConfigError, match="tied embeddings"):
        Pipeline(model, None, _cfg(), 8, None, None, torch.device("cpu"))
