"""The run plan: a config resolved, once and before any process group, into everything
the build needs; and the start point, where the weights come from, resolved once the
process group exists (docs/training.md, "From a config to a running engine").

:func:`resolve_run` takes what depends on the config, the world size and the
device only — the precision, the MoE backend, the expert layout and the
DeepSpeed config — from liquid_dist.parallel.build_plan.resolve_build (which
the planner, liquid_dist.plan, calls too), and adds what needs files: the
vocabulary from the tokenizer, the data streams (shards, epoch length) and the
token plan (what the run draws from each source, refused beyond a source's
``max_repetition``).
:func:`resolve_start` finds the checkpoint to resume and the model to start
from, each checked against the config, a checkpoint's files verified before
anything reads them: the launch passes
liquid_dist.train.checkpoint.find_damage_together, so that the ranks share the
reading and reach one verdict. Every problem is a ConfigError, DataError or
CheckpointError naming the key or file, the same on every rank, raised while
there is nothing to clean up; the trainer reads only the plan and the start point.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from liquid_dist.checkpoint_format import (
    CheckpointRef,
    DamageFinder,
    find_checkpoint,
    find_damage,
    newest_valid_checkpoint,
    read_config,
    verify_checkpoint,
)
from liquid_dist.config import (
    Config,
    ConfigError,
    DataConfig,
    check_same_architecture,
    validate,
)
from liquid_dist.data.mixture import TokenPlan, token_plan
from liquid_dist.data.stream import StreamSpec
from liquid_dist.parallel.build_plan import BuildPlan, resolve_build


@dataclass(frozen=True)
class RunPlan:
    """A launch: the build and the data streams."""

    build: BuildPlan
    train_data: StreamSpec
    """The training stream (of rank 0; liquid_dist.data.open_loader opens any rank's)."""
    val_data: Optional[StreamSpec]
    val_sources: dict[str, StreamSpec]
    """The validation stream of each ``data.val_sources`` entry, by name."""
    token_plan: TokenPlan
    """What ``train.max_steps`` steps draw from each training source, checked against the
    sources' ``max_repetition``."""

    @property
    def config(self) -> Config:
        return self.build.config


@dataclass(frozen=True)
class StartPoint:
    """Where a launch's weights come from."""

    resume: Optional[CheckpointRef] = None
    """The checkpoint to continue (``--resume``): its files verified, checked resumable
    on this layout."""
    resume_skipped: tuple[str, ...] = ()
    """``--resume auto``: why each newer checkpoint was passed over (a damaged file)."""
    init_from_pretrained: Optional[Path] = None
    """``train.init_from`` when it is a converted model directory (weights only)."""
    init_from_checkpoint: Optional[CheckpointRef] = None
    """``train.init_from`` when it is a training checkpoint (weights only)."""


def resolve_vocabulary(cfg: Config) -> Config:
    """A copy of ``cfg`` with ``model.vocab_size`` an integer, checked against the tokenizer.

    ``auto`` takes the tokenizer's size; an explicit size below it is a
    ConfigError (ids past the embedding would crash mid-run), as are special
    token ids that differ from the tokenizer's.
    """
    from liquid_dist.data import Tokenizer
    from liquid_dist.data.tokenizer import DECODER_START_IDS

    tok_path = Path(cfg.data.tokenizer)
    if not tok_path.is_file():
        raise ConfigError("data.tokenizer", cfg.data.tokenizer,
                          "an existing sentencepiece model file (data_prep/train_tokenizer.py "
                          "writes one; scripts/demo.sh prepares the Shakespeare one)")
    tok = Tokenizer(tok_path)
    m = cfg.model
    if m.vocab_size == "auto":
        vocab = tok.vocab_size
    else:
        vocab = int(m.vocab_size)
        if vocab < tok.vocab_size:
            raise ConfigError("model.vocab_size", vocab,
                              f"'auto' or an integer >= the tokenizer's vocabulary "
                              f"({tok.vocab_size}, {tok_path})")
    for name, tok_id in (("pad_token_id", tok.pad_id), ("eos_token_id", tok.eos_id),
                         ("decoder_start_token_id", DECODER_START_IDS["prefix_lm"])):
        if getattr(m, name) != tok_id:
            raise ConfigError(f"model.{name}", getattr(m, name),
                              f"{tok_id}, the id the tokenizer and the data loader use")
    out = dataclasses.replace(cfg, model=dataclasses.replace(m, vocab_size=vocab))
    validate(out)
    return out


def resolve_run(cfg: Config, *, world_size: int, device_type: str) -> RunPlan:
    """The :class:`RunPlan` of ``cfg`` on ``world_size`` ranks of ``device_type``. See
    the module doc."""
    from liquid_dist.data.loader import stream_spec

    cfg = resolve_vocabulary(cfg)
    build = resolve_build(cfg, world_size=world_size, device_type=device_type)
    t = cfg.train
    if t.wandb.mode != "disabled" and importlib.util.find_spec("wandb") is None:
        raise ConfigError("train.wandb.mode", t.wandb.mode,
                          "'disabled' unless wandb is installed (pip install wandb)")
    train_data = stream_spec(cfg.data, "train", world_size=world_size,
                             batch_size=t.micro_batch_size, seed=t.seed, grad_accum=t.grad_accum)
    def val_stream(data: DataConfig) -> StreamSpec:
        return stream_spec(data, "val", world_size=world_size, batch_size=t.micro_batch_size,
                           seed=t.seed, num_steps=t.eval_steps, grad_accum=t.grad_accum)

    val_data = None if cfg.data.val_shards is None else val_stream(cfg.data)
    val_sources = {name: val_stream(dataclasses.replace(cfg.data, val_shards=shards))
                   for name, shards in cfg.data.val_sources.items()}
    tokens = token_plan(train_data, t.max_steps)
    tokens.check()
    return RunPlan(build=build, train_data=train_data, val_data=val_data,
                   val_sources=val_sources, token_plan=tokens)


def _check_mixture(plan: RunPlan, ref: CheckpointRef) -> None:
    """ConfigError when the training mixture differs from the checkpoint's before the
    resume step (data.stages may change only at or after it; docs/data.md)."""
    from liquid_dist.data.loader import config_stages, mixture_changes, source_names, stage_weights

    saved = read_config(ref)["data"]
    names = source_names(saved.get("sources", []))
    stages = config_stages(saved.get("stages", []), saved.get("sources", []))
    gone = [n for n in names if n not in {s.name for s in plan.train_data.sources}]
    if gone:
        raise ConfigError("data.sources", [s.name for s in plan.train_data.sources],
                          f"the sources of the checkpoint being resumed ({ref.path}), "
                          f"{gone} included: sources may be added on resume, not removed "
                          "(give a source weight 0 in the stages instead)")
    added = [s.name for s in plan.train_data.sources if s.name not in names]
    if added and plan.config.data.batches_per_epoch == 0:
        raise ConfigError("data.batches_per_epoch", 0,
                          f"the loader epoch's length in steps: sources {added} are added on "
                          f"resume ({ref.path}), and with 0 the epoch length would follow "
                          "their tokens (set the one the checkpoint's run has)")
    try:
        mixture_changes(stage_weights(stages, names), names, plan.train_data, ref.step)
    except ValueError as exc:
        raise ConfigError("data.stages", plan.config.data.stages,
                          f"the mixture of the checkpoint being resumed ({ref.path}) before "
                          f"its step {ref.step}: {exc}") from None


def resolve_start(plan: RunPlan, resume: str = "none", damage: DamageFinder = find_damage
                  ) -> StartPoint:
    """The :class:`StartPoint` of ``plan``: resuming ``resume`` (``auto``, ``none`` or a
    checkpoint path; see liquid_dist.checkpoint_format.find_checkpoint), or starting from
    ``train.init_from``; every checkpoint's files verified with ``damage`` before anything
    reads them. See the module doc."""
    from liquid_dist.model.pretrained import check_compatible, is_pretrained_dir
    from liquid_dist.train.checkpoint import check_resumable

    cfg = plan.config
    t = cfg.train
    skipped: list[str] = []
    if resume == "auto":  # the newest that verifies
        ref, skipped = newest_valid_checkpoint(t.run_dir, damage=damage)
    else:
        ref = find_checkpoint(resume)
        if ref is not None:
            verify_checkpoint(ref.path, damage)
    if ref is not None:
        check_resumable(cfg, ref, plan.build.world_size)
        _check_mixture(plan, ref)
    pretrained = checkpoint = None
    if t.init_from and is_pretrained_dir(t.init_from):
        pretrained = Path(t.init_from)
        check_compatible(cfg.model, pretrained)
    elif t.init_from:
        checkpoint = find_checkpoint(t.init_from)
        assert checkpoint is not None  # a path, never "none"
        verify_checkpoint(checkpoint.path, damage)
        check_same_architecture(read_config(checkpoint)["model"], cfg.model,
                                f"the train.init_from checkpoint {checkpoint.path}")
    return StartPoint(resume=ref, resume_skipped=tuple(skipped),
                      init_from_pretrained=pretrained, init_from_checkpoint=checkpoint)
