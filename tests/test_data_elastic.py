"""Elastic data order: the global batches depend on the seed, the global batch and the data
only; a resume on another world size, grad_accum or micro-batch continues them exactly."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator

import pytest
import torch
from data_fixtures import data_config

from liquid_dist.data import build_train_loader, merge_loader_states

pytestmark = pytest.mark.timeout(300)

SEED = 13
STEPS = 12
EPOCH = 7  # global steps per epoch: 12 steps cross an epoch boundary


def _endless(loader) -> Iterator[dict[str, torch.Tensor]]:
    while True:
        yield from loader


def _example(batch: dict[str, torch.Tensor], i: int) -> tuple:
    """One example as (encoder ids, labels), real tokens only."""
    enc = batch["encoder_input_ids"][i][batch["encoder_attention_mask"][i]]
    lab = batch["labels"][i][batch["labels"][i] != -100]
    return tuple(enc.tolist()), tuple(lab.tolist())


def _loaders(world: int, micro: int, accum: int, workers: int = 2, **cfg):
    c = data_config(num_workers=workers, batches_per_epoch=EPOCH, **cfg)
    return [build_train_loader(c, rank=r, world_size=world, batch_size=micro, seed=SEED,
                               grad_accum=accum) for r in range(world)]


def _steps(loaders, accum: int, n: int) -> list[Counter]:
    """The multiset of examples of each of the next n global steps of these ranks,
    checking that every micro-batch of a step has the same shape on every rank."""
    its = [_endless(ld) for ld in loaders]
    out = []
    for _ in range(n):
        examples: Counter = Counter()
        shapes = set()
        for _k in range(accum):
            for it in its:
                batch = next(it)
                shapes.add((batch["encoder_input_ids"].shape, batch["labels"].shape))
                examples.update(_example(batch, i) for i in range(len(batch["labels"])))
        assert len(shapes) == 1, f"one objective and shape per step: {shapes}"
        out.append(examples)
    return out


@pytest.fixture(scope="module")
def reference() -> list[Counter]:
    """2 ranks x micro-batch 3 x grad_accum 1, 2 workers each: global batch 6."""
    return _steps(_loaders(2, 3, 1), 1, STEPS)


@pytest.mark.parametrize("world, micro, accum", [(1, 3, 2), (1, 6, 1), (3, 2, 1), (3, 1, 2)])
def test_every_step_holds_the_same_examples_on_any_world_size(reference, world, micro, accum):
    assert sum(reference[0].values()) == 6
    assert len({frozenset(c) for c in reference}) == STEPS, "steps hold different data"
    assert _steps(_loaders(world, micro, accum), accum, STEPS) == reference


def test_a_different_global_batch_or_seed_gives_different_steps(reference):
    # the comparison above can fail: the data order does depend on what it should
    other_seed = [build_train_loader(data_config(num_workers=2, batches_per_epoch=EPOCH),
                                     rank=r, world_size=2, batch_size=3, seed=SEED + 1)
                  for r in range(2)]
    assert _steps(other_seed, 1, 3) != reference[:3]
    assert _steps(_loaders(1, 4, 1), 1, 1)[0] != reference[0]


def test_epoch_length_from_the_manifests_is_the_same_on_every_world_size():
    lengths = set()
    for world, micro, accum in [(2, 3, 1), (1, 3, 2), (3, 2, 1), (1, 6, 1)]:
        c = data_config(num_workers=0)
        loaders = [build_train_loader(c, rank=r, world_size=world, batch_size=micro, seed=0,
                                      grad_accum=accum) for r in range(world)]
        assert len({len(ld) for ld in loaders}) == 1
        assert len(loaders[0]) % accum == 0
        lengths.add(len(loaders[0]) // accum)
    assert len(lengths) == 1 and lengths.pop() > 2


def test_the_batches_do_not_depend_on_the_number_of_workers():
    def run(workers: int) -> list[dict[str, torch.Tensor]]:
        it = _endless(_loaders(2, 3, 2, workers=workers)[1])
        return [next(it) for _ in range(5)]

    ref = run(0)
    for workers in (2, 3, 5):  # 5 > micro-batch 3: capped at 3
        got = run(workers)
        assert all(torch.equal(a[k], b[k]) for a, b in zip(ref, got, strict=True) for k in a)


@pytest.mark.parametrize("stop", [4, 7, 9])
@pytest.mark.parametrize("world, micro, accum", [(1, 3, 2), (3, 2, 1)])
def test_merged_states_resume_on_another_world_size_with_the_same_steps(reference, stop,
                                                                         world, micro, accum):
    first = _loaders(2, 3, 1)
    before = _steps(first, 1, stop)
    assert before == reference[:stop]
    states = [json.loads(json.dumps(ld.state_dict())) for ld in first]  # survives JSON
    merged = merge_loader_states(states)
    resumed = _loaders(world, micro, accum)
    for ld in resumed:
        ld.load_state_dict(merged)
    assert _steps(resumed, accum, STEPS - stop) == reference[stop:]
    # the counters: rank 0 carries the old ranks' total, the sum over ranks is the run's
    counted = sum(sum(ld.stats()["examples_per_objective"].values()) for ld in resumed)
    assert counted == 6 * STEPS
    assert {ld.epoch for ld in resumed} == {STEPS // EPOCH}


def test_merge_and_load_refuse_incomplete_or_mismatched_states():
    first = _loaders(2, 3, 1)
    _steps(first, 1, 2)
    states = [ld.state_dict() for ld in first]
    with pytest.raises(ValueError, match="streams"):
        merge_loader_states(states[:1])
    with pytest.raises(ValueError, match="streams"):
        merge_loader_states([states[0], states[0]])
    with pytest.raises(ValueError, match="lacks streams"):
        _loaders(1, 3, 2)[0].load_state_dict(states[0])  # one rank's state only
    with pytest.raises(ValueError, match="global_batch"):
        _loaders(2, 2, 1)[0].load_state_dict(merge_loader_states(states))
    other_seed = build_train_loader(data_config(num_workers=2, batches_per_epoch=EPOCH),
                                    rank=0, world_size=1, batch_size=6, seed=SEED + 1)
    with pytest.raises(ValueError, match="seed"):
        other_seed.load_state_dict(merge_loader_states(states))
    late = _loaders(2, 3, 1)
    _steps(late, 1, 3)
    with pytest.raises(ValueError, match="different positions"):
        merge_loader_states([states[0], late[1].state_dict()])
    # a stop inside a step: the same layout resumes it, another layout is refused
    accum = _loaders(1, 3, 2)
    it = _endless(accum[0])
    next(it)
    mid = accum[0].state_dict()
    with pytest.raises(ValueError, match="step boundary"):
        merge_loader_states([mid])
    with pytest.raises(ValueError, match="step boundary"):
        _loaders(2, 3, 1)[0].load_state_dict(mid)
    same = _loaders(1, 3, 2)[0]
    same.load_state_dict(mid)
    ref = _endless(_loaders(1, 3, 2)[0])
    expected = [next(ref) for _ in range(4)][1:]
    got = _endless(same)
    for batch in expected:
        b = next(got)
        assert all(torch.equal(batch[k], b[k]) for k in batch)
