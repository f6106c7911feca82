"""Staged mixtures (data.stages): the mixture by step, each source continuing where it
stopped, exact and elastic resume across stages, and changing the stages on resume."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter

import numpy as np
import pytest
from data_fixtures import data_config, same_batches, shard_dir, take_batches

from liquid_dist.config import Config as RunConfig
from liquid_dist.config import ConfigError, DataConfig, validate
from liquid_dist.data import build_train_loader, merge_loader_states
from liquid_dist.data.mixture import token_plan
from liquid_dist.data.stream import Mixer, Stage

pytestmark = pytest.mark.timeout(300)
SEED = 5


def _cfg(stages: list, names: tuple[str, ...] = ("a", "b"), **extra: object) -> DataConfig:
    # prefix LM without a shuffle buffer: a source's tokens depend on its reading position
    # alone, so one loader's steps can be compared with another's
    settings = {"objective": "prefix_lm", "shuffle_buffer": 0, "batches_per_epoch": 40,
                **extra}
    return data_config(sources=[{"name": n, "shards": str(shard_dir())} for n in names],
                       stages=stages, **settings)


def _loader(cfg: DataConfig, rank: int = 0, world: int = 1, micro: int = 4):
    return build_train_loader(cfg, rank=rank, world_size=world, batch_size=micro, seed=SEED)


def test_each_stage_draws_from_its_sources_only_from_its_start_step():
    loader = _loader(_cfg([{"start_step": 0, "weights": {"a": 1}},
                           {"start_step": 3, "weights": {"b": 1}}]))
    take_batches(loader, 3)
    assert loader.stats()["examples_per_source"] == {"a": 12, "b": 0}
    take_batches(loader, 2)
    assert loader.stats()["examples_per_source"] == {"a": 12, "b": 8}


def test_a_source_continues_where_it_stopped_in_its_next_stage():
    a_b_a = take_batches(_loader(_cfg([{"start_step": 0, "weights": {"a": 1}},
                                {"start_step": 3, "weights": {"b": 1}},
                                {"start_step": 6, "weights": {"a": 1}}])), 9)
    only_a = take_batches(_loader(_cfg([{"start_step": 0, "weights": {"a": 1}}])), 6)
    only_b = take_batches(_loader(_cfg([{"start_step": 0, "weights": {"b": 1}}])), 3)
    assert same_batches(a_b_a[:3], only_a[:3])
    assert same_batches(a_b_a[3:6], only_b)  # b from its beginning
    assert same_batches(a_b_a[6:], only_a[3:])  # a: nothing read twice, nothing skipped


STAGES = [{"start_step": 0, "weights": {"a": 3, "b": 1}},
          {"start_step": 4, "weights": {"a": 1, "b": 1}}]


def test_exact_and_elastic_resume_across_a_stage_boundary():
    cfg = _cfg(STAGES)
    straight = take_batches(_loader(cfg, micro=4), 8)
    # 2 ranks x micro-batch 2 to step 3, then one rank of micro-batch 4 from the merged state
    ranks = [_loader(cfg, r, 2, 2) for r in range(2)]
    halves = [take_batches(ld, 3) for ld in ranks]
    for step in range(3):
        rows = Counter(tuple(row.tolist()) for h in halves
                       for row in h[step]["encoder_input_ids"])
        assert rows == Counter(tuple(row.tolist()) for row in straight[step]["encoder_input_ids"])
    resumed = _loader(cfg, micro=4)
    assert resumed.load_state_dict(merge_loader_states([ld.state_dict() for ld in ranks])) == []
    assert same_batches(take_batches(resumed, 5), straight[3:])


def test_stages_may_change_on_resume_at_or_after_the_resume_step_only():
    old = _loader(_cfg(STAGES))
    take_batches(old, 4)
    state = old.state_dict()
    later = [*STAGES[:1], {"start_step": 4, "weights": {"a": 1, "b": 3}},
             {"start_step": 6, "weights": {"b": 1}}]
    changed = _loader(_cfg(later))
    changes = changed.load_state_dict(state)
    assert changes == ["from step 4: {'a': 0.5, 'b': 0.5} -> {'a': 0.25, 'b': 0.75}",
                       "from step 6: {'a': 0.5, 'b': 0.5} -> {'b': 1.0}"]
    assert same_batches(take_batches(changed, 4), take_batches(_loader(_cfg(later)), 8)[4:])
    rewritten = [STAGES[0], {"start_step": 2, "weights": {"a": 1}}]
    with pytest.raises(ValueError, match=r"data.stages: the mixture at step 2 was "
                                         r"\{'a': 0.75, 'b': 0.25\}, it is \{'a': 1.0\} now; "
                                         r"steps before the resume step 4 are trained"):
        _loader(_cfg(rewritten)).load_state_dict(state)


def test_a_source_added_on_resume_starts_at_its_beginning():
    old = _loader(_cfg(STAGES))
    take_batches(old, 4)
    added = [*STAGES, {"start_step": 6, "weights": {"c": 1}}]
    grown = _loader(_cfg(added, names=("a", "b", "c")))
    changes = grown.load_state_dict(old.state_dict())
    assert changes == ["from step 6: {'a': 0.5, 'b': 0.5} -> {'c': 1.0}",
                       "sources added: ['c'] (each from its beginning)"]
    from_start = _loader(_cfg(added, names=("a", "b", "c")))
    assert same_batches(take_batches(grown, 4), take_batches(from_start, 8)[4:])


def test_every_source_gets_its_share_of_each_objective_within_two_examples():
    spec = _loader(_cfg([], names=("a", "b", "c"))).spec
    rng = np.random.default_rng(0)
    for _ in range(20):
        weights = rng.random(3) ** 3 * (rng.random(3) > 0.2) + [1e-3, 0, 0]
        shares = weights / weights.sum()
        mixer = Mixer(dataclasses.replace(spec, stages=(Stage(0, tuple(shares)),)))
        drawn = np.zeros(3)
        for step in range(30):  # 4 examples a step
            picks = mixer.step(step, 0)
            drawn += np.bincount(picks, minlength=3)
            assert np.all(np.abs(drawn - (step + 1) * 4 * shares) < 2), (shares, drawn)
            assert not drawn[shares == 0].any()


def test_the_token_plan_equals_what_the_ranks_draw_within_two_examples_per_stage_and_objective():
    stages = [{"start_step": 0, "weights": {"a": 3, "b": 1}},
              {"start_step": 5, "weights": {"a": 1, "b": 2}}]
    cfg = _cfg(stages, objective="mixture", batches_per_epoch=4)  # epochs of 4 steps
    ranks = [_loader(cfg, r, 2, 3) for r in range(2)]
    for ld in ranks:
        take_batches(ld, 11)
    drawn = Counter()
    for ld in ranks:
        drawn.update(ld.stats()["tokens_per_source"])
    spec = ranks[0].spec
    plan = {s.name: s.planned for s in token_plan(spec, 11).sources}
    assert sum(plan.values()) == sum(drawn.values())
    slack = 2 * len(stages) * sum(shape.raw for shape in spec.shapes)
    for name in ("a", "b"):
        assert abs(plan[name] - drawn[name]) <= slack, (plan, drawn)


def test_the_sources_go_on_across_a_loader_epoch_boundary():
    """The loader's epoch only counts steps: the sources' reading positions, shard plans and
    shuffle buffers go on (a source is read to its end before any document repeats)."""
    def cfg(steps):
        return _cfg([{"start_step": 0, "weights": {"a": 3, "b": 1}}], shuffle_buffer=8,
                    batches_per_epoch=steps)
    short = _loader(cfg(2))
    assert same_batches(take_batches(short, 7), take_batches(_loader(cfg(40)), 7))
    assert short.epoch == 3


@pytest.mark.parametrize("stages, sources, key", [
    ([{"start_step": 0, "weights": {"train": 1}}], [], "data.stages"),
    ([{"start_step": 1, "weights": {"a": 1}}], ["a"], "data.stages[0].start_step"),
    ([{"start_step": 0, "weights": {"a": 1}}, {"start_step": 0, "weights": {"a": 2}}], ["a"],
     "data.stages[1].start_step"),
    ([{"start_step": 0, "weights": {"z": 1}}], ["a"], "data.stages[0].weights.z"),
    ([{"start_step": 0, "weights": {"a": 0}}], ["a"], "data.stages[0].weights"),
    ([{"start_step": 0, "weights": {"a": -1}}], ["a"], "data.stages[0].weights.a"),
    ([{"start_step": 0}], ["a"], "data.stages[0]"),
])
def test_bad_stages_are_config_errors_naming_the_key(stages, sources, key):
    data = DataConfig(sources=[{"name": n, "shards": "x"} for n in sources], stages=stages)
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'")):
        validate(RunConfig(data=data))
    weighted = DataConfig(sources=[{"name": "a", "shards": "x", "weight": 2}],
                          stages=[{"start_step": 0, "weights": {"a": 1}}])
    with pytest.raises(ConfigError, match=r"'data.sources\[0\].weight'"):
        validate(RunConfig(data=weighted))
