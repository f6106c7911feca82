"""Checkpoints: written by every rank, made ``latest`` only when complete everywhere,
and loaded on any number of ranks and any ``ep_size``.

The files and their layout belong to :mod:`liquid_dist.checkpoint_format`;
this module writes them and loads them into a DeepSpeed engine.

Protocol (:meth:`CheckpointManager.save`, called by every rank): rank 0
removes a stale ``.tmp`` of the same tag; every rank writes its DeepSpeed
files into ``<tag>.tmp``, then its marker; rank 0 lists the files written and
every rank hashes its share of them (about 1/W of the bytes:
liquid_dist.checkpoint_format.hash_shares); rank 0 checks every marker, writes
the trainer state, config and tokenizer and then ``checksums.json`` (size and
SHA-256 of every file: liquid_dist.checkpoint_format.verify_checkpoint),
renames ``<tag>.tmp`` to ``<tag>`` and atomically replaces ``latest``, then
deletes all but the newest ``train.keep_last`` checkpoints. Each of these
phases ends with the ranks sharing their verdicts (:func:`together`, in place
of a barrier): a phase that fails on one rank raises the same CheckpointError,
naming that rank and its error, on every rank at once. A rank killed at any
point leaves ``latest`` on the previous checkpoint; the ``.tmp`` is deleted by
the next run. The run directory must be on a filesystem all nodes share.

With ``train.async_checkpoint`` the step loop waits only while every rank copies
the state of its DeepSpeed files into host memory
(liquid_dist.train.checkpoint_io); each rank then serialises, writes, fsyncs and
hashes them and writes its marker in a thread. :meth:`CheckpointManager.poll`, at each
step boundary, shares the ranks' progress (a failure: the same CheckpointError
on every rank, naming the rank and the file); once every rank is done, rank 0
completes the checkpoint as above (the files DeepSpeed wrote directly, such as
its recovery script, hashed then). At most one save is in flight:
:meth:`CheckpointManager.finish` waits for it, before the next save, a rewind,
the end of the run and a preemption exit.

Loading (:meth:`CheckpointManager.load`): on the world size and ``ep_size``
that wrote the checkpoint, DeepSpeed loads its own files (bitwise). On any
other layout every rank *reshards*: it reads each parameter and its AdamW
moments whole from the old rank files (:func:`open_checkpoint`) and keeps its
own ZeRO-3 partition (for an expert tensor, its experts' rows first);
every rank takes the data position of the merged loader states of all old
ranks (docs/parallelism.md, "Elastic resume").
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, TypeVar

import numpy as np
import torch
import torch.distributed as dist
import yaml

from liquid_dist.atomic import write_atomic
from liquid_dist.checkpoint_format import (
    CHECKPOINTS,
    CHECKSUMS,
    CONFIG_FILE,
    DONE_PREFIX,
    LATEST,
    STATE_VERSION,
    STATES,
    TMP_SUFFIX,
    TOKENIZER_FILE,
    TRAINER_STATE,
    CheckpointError,
    CheckpointRef,
    ZeroCheckpoint,
    checksummed_files,
    complete_tags,
    file_digest,
    find_damage,
    hash_shares,
    open_checkpoint,
    read_config,
    read_trainer_state,
    tag_for,
)
from liquid_dist.train.checkpoint_io import (
    BackgroundWrite,
    FileStream,
    HostStage,
    capture,
    save_through,
)
from liquid_dist.train.faults import NO_FAULTS, Faults
from liquid_dist.train.state import TrainerState

T = TypeVar("T")


def rng_state() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU and CUDA), as tensors, numbers
    and tuples only (the trainer state is read with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def seed_everything(seed: int) -> None:
    """Seed this process's python, numpy and torch generators from ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _gather(obj: Any) -> list[Any]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def together(what: str, fn: Callable[[], T]) -> T:
    """``fn()`` on every rank, then the ranks share their verdicts (one all-gather, in
    place of a barrier): its result here when it succeeded everywhere; else, on every
    rank, one CheckpointError naming ``what`` and each rank's failure. A failure on one
    rank thus ends every rank at once instead of leaving the others at a barrier.
    Collective: every rank calls it."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    failure: Optional[BaseException] = None
    try:
        result = fn()
    except Exception as exc:  # shared with the other ranks below
        failure, result = exc, None
    errors = [e for e in _gather(None if failure is None else
                                 f"rank {rank}: {type(failure).__name__}: {failure}") if e]
    if errors:
        raise CheckpointError(f"{what} failed on {len(errors)} rank(s): "
                              + "; ".join(errors)) from failure
    return result


def find_damage_together(path: Path) -> list[str]:
    """liquid_dist.checkpoint_format.find_damage as a collective (every rank calls it, for
    the same checkpoint): each rank hashes its share of the files and every rank gets all
    the damage found, so the ranks reach one verdict having read the checkpoint once
    between them. CheckpointError when the ranks name different checkpoints (their views
    of the run directory differ)."""
    if not dist.is_initialized():
        return find_damage(path)
    mine = together(f"verifying {path}", lambda: find_damage(
        path, rank=dist.get_rank(), world_size=dist.get_world_size()))
    parts = _gather((str(path), mine))
    paths = sorted({p for p, _ in parts})
    if len(paths) > 1:
        raise CheckpointError(f"the ranks verify different checkpoints ({', '.join(paths)}): "
                              "the run directory must look the same from every node")
    return sorted(d for _, part in parts for d in part)


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What :meth:`CheckpointManager.load` read besides the engine's state."""

    trainer: TrainerState
    loader: dict[str, Any]
    """The state this rank's data loader takes (merged from every old rank's when
    resharded: docs/parallelism.md, "Elastic resume")."""
    resharded_from: Optional[tuple[int, int]]
    """(world size, ep_size) of the run that wrote it, when that differs from this one."""


@dataclass(frozen=True)
class Saved:
    """A checkpoint made ``latest``: the step loop waited ``blocked_s`` for it, and
    ``total_s`` passed from the start of the save to its commit."""

    ref: CheckpointRef
    step: int
    blocked_s: float
    total_s: float


@dataclass
class _InFlight:
    """An asynchronous save between its capture and its commit."""

    step: int
    trainer: dict[str, Any]
    per_rank: list[Any]
    config: dict[str, Any]
    tokenizer_path: str | Path
    writer: BackgroundWrite
    began: float
    blocked_s: float


class CheckpointManager:
    """Saves and loads the checkpoints of one run directory (see the module docstring).

    ``every``: the save cadence in steps (:meth:`due`). ``asynchronous``: write in the
    background (``train.async_checkpoint``). ``expert_layout``: this rank's
    experts (parallel.ep_size > 1), None without.
    ``seed``: the run's seed, for the RNG of a rank that did not exist before.
    ``faults``: where a test makes a checkpoint write fail (liquid_dist.train.faults).
    """

    def __init__(self, run_dir: str | Path, *, keep_last: int, rank: int, world_size: int,
                 every: int = 1, asynchronous: bool = False, expert_layout: Any = None,
                 seed: int = 0, faults: Faults = NO_FAULTS):
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / CHECKPOINTS
        self.keep_last, self.every = keep_last, every
        self.rank = rank
        self.world_size = world_size
        self.expert_layout = expert_layout
        self.seed = seed
        self.faults = faults
        self.asynchronous = asynchronous
        self._stage = HostStage() if asynchronous else None
        self._in_flight: Optional[_InFlight] = None

    def due(self, step: int, *, last: bool) -> bool:
        """Whether the step ``step`` saves: every ``every`` steps (``train.ckpt_every``) and
        the last one."""
        return last or step % self.every == 0

    @property
    def ep_size(self) -> int:
        return 1 if self.expert_layout is None else self.expert_layout.ep_size

    def remove_incomplete(self) -> list[str]:
        """Rank 0 deletes checkpoints a crash left half-written; every rank waits."""
        def remove() -> list[str]:
            removed = []
            if self.rank == 0 and self.dir.is_dir():
                for p in self.dir.iterdir():
                    if p.is_dir() and p.name.endswith(TMP_SUFFIX):
                        shutil.rmtree(p)
                        removed.append(p.name)
            return removed

        return together(f"removing the incomplete checkpoints of {self.dir}", remove)

    def save(self, engine: Any, state: TrainerState, rank_state: dict[str, Any],
             config: dict[str, Any], tokenizer_path: str | Path) -> Optional[Saved]:
        """Write the checkpoint of ``state.step`` (every rank calls this; see the protocol
        above): the checkpoint made ``latest``, or None when it is being written in the
        background (:meth:`poll` / :meth:`finish` complete it; :meth:`finish` the save
        in flight before the next one).

        ``state``: the trainer's (the same on every rank). ``rank_state``: this
        rank's part (data-loader state); RNG states are added here.
        """
        assert self._in_flight is None, "finish() the save in flight before the next"
        began = time.perf_counter()
        step = state.step
        tag = tag_for(step)
        tmp_tag = tag + TMP_SUFFIX
        tmp = self.dir / tmp_tag
        what = f"the checkpoint of step {step} ({tmp})"
        marker = tmp / f"{DONE_PREFIX}{self.rank}"

        def prepare() -> None:
            if self.rank == 0:
                self.dir.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)

        def write_part() -> None:
            save_through(engine, FileStream(engine.checkpoint_engine), lambda: (
                engine.save_checkpoint(str(self.dir), tag=tmp_tag, save_latest=False)))
            self.faults.in_checkpoint_write(step, self.rank, self.run_dir)
            write_atomic(marker, str(step), durable=True)

        per_rank = _gather({**rank_state, "rng": rng_state()})
        together(f"preparing {what}", prepare)
        if self.asynchronous:
            stage = self._stage
            assert stage is not None
            captured = together(f"capturing {what}", lambda: capture(
                engine, stage, lambda: engine.save_checkpoint(
                    str(self.dir), tag=tmp_tag, save_latest=False)))
            writer = BackgroundWrite(captured, tmp, marker, str(step), lambda: (
                self.faults.in_checkpoint_write(step, self.rank, self.run_dir)))
            self._in_flight = _InFlight(step, state.state_dict(), per_rank, config,
                                        tokenizer_path, writer, began,
                                        time.perf_counter() - began)
            return None
        together(f"writing {what}", write_part)
        # rank 0 lists DeepSpeed's files (one list: a rank whose view of the directory
        # lags cannot leave a file out), every rank hashes its share of them
        sizes = _broadcast(together(f"listing {what}", lambda: {
            name: (tmp / name).stat().st_size for name in checksummed_files(tmp)}
            if self.rank == 0 else None))
        digests = _gather(together(f"hashing {what}", lambda: {
            name: file_digest(tmp / name)
            for name in hash_shares(sizes, self.world_size)[self.rank]}))
        together(f"completing {what}", lambda: self._commit(
            tmp, tag, state.state_dict(), per_rank, digests, config, tokenizer_path)
            if self.rank == 0 else None)
        took = time.perf_counter() - began
        return Saved(CheckpointRef(self.dir, tag), step, took, took)

    @property
    def in_flight(self) -> Optional[int]:
        """The step of the save being written in the background, if any."""
        return None if self._in_flight is None else self._in_flight.step

    def poll(self) -> Optional[Saved]:
        """At a step boundary (every rank calls it, collective while a save is in flight):
        complete the save in flight if every rank has written its part; CheckpointError on
        every rank, naming the rank and file, if one failed."""
        if self._in_flight is None:
            return None
        return self._settle(wait=False)

    def finish(self) -> Optional[Saved]:
        """Wait for the save in flight and complete it (every rank calls it)."""
        if self._in_flight is None:
            return None
        return self._settle(wait=True)

    def _settle(self, wait: bool) -> Optional[Saved]:
        job = self._in_flight
        assert job is not None
        if wait:
            job.writer.wait()
        tag = tag_for(job.step)
        tmp = self.dir / (tag + TMP_SUFFIX)
        what = f"the checkpoint of step {job.step} ({tmp})"
        reports = _gather((job.writer.done(), job.writer.error))
        errors = [f"rank {r}: {error}" for r, (_, error) in enumerate(reports) if error]
        if errors:
            self._in_flight = None
            raise CheckpointError(f"writing {what} failed on {len(errors)} rank(s): "
                                  + "; ".join(errors))
        if not all(done for done, _ in reports):
            return None
        self._in_flight = None
        digests = _gather(job.writer.digests)
        together(f"completing {what}", lambda: self._commit(
            tmp, tag, job.trainer, job.per_rank, digests, job.config,
            job.tokenizer_path) if self.rank == 0 else None)
        return Saved(CheckpointRef(self.dir, tag), job.step, job.blocked_s,
                     time.perf_counter() - job.began)

    def _commit(self, tmp: Path, tag: str, trainer: dict[str, Any], per_rank: list[Any],
                digests: list[dict[str, Any]], config: dict[str, Any],
                tokenizer_path: str | Path) -> None:
        """Rank 0: check every rank's marker, write the trainer state, config, tokenizer and
        checksums (hashing the files no rank hashed), rename ``<tag>.tmp`` to ``<tag>``,
        point ``latest`` at it, prune."""
        missing = [r for r in range(self.world_size)
                   if not (tmp / f"{DONE_PREFIX}{r}").exists()]
        if missing:
            raise RuntimeError(f"checkpoint {tmp}: ranks {missing} did not write their "
                               "part (is the run directory on a filesystem every node "
                               "shares?)")
        torch.save({"version": STATE_VERSION, "world_size": self.world_size,
                    "ep_size": self.ep_size, "ranks": per_rank, **trainer},
                   tmp / TRAINER_STATE)
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
        shutil.copy2(tokenizer_path, tmp / TOKENIZER_FILE)
        recorded = {name: d for part in digests for name, d in part.items()}
        for name in checksummed_files(tmp):  # what rank 0 wrote here, or DeepSpeed directly
            if name not in recorded:
                recorded[name] = file_digest(tmp / name)
        write_atomic(tmp / CHECKSUMS, json.dumps(
            {"algorithm": "sha256", "files": dict(sorted(recorded.items()))}, indent=1),
            durable=True)
        final = self.dir / tag
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        write_atomic(self.dir / LATEST, tag + "\n", durable=True)
        self._prune(keep=tag)

    def _prune(self, keep: str) -> None:
        tags = complete_tags(self.dir)
        for old in tags[: max(0, len(tags) - self.keep_last)]:
            if old != keep:
                shutil.rmtree(self.dir / old)

    def load(self, engine: Any, ref: CheckpointRef) -> LoadedCheckpoint:
        """Load weights, optimizer state, RNG and data position (every rank calls this);
        returns the trainer state, this rank's loader state and the layout resharded from.
        """
        state = together(f"reading {ref.path}", lambda: read_trainer_state(ref))
        trainer = TrainerState()
        trainer.load_state_dict(state)
        ranks = state["ranks"]
        written_on = (state["world_size"], state["ep_size"])
        if written_on == (self.world_size, self.ep_size):
            path, _ = engine.load_checkpoint(str(ref.load_dir), tag=ref.tag,
                                             load_optimizer_states=True,
                                             load_lr_scheduler_states=False)
            if path is None:
                raise CheckpointError(f"DeepSpeed could not load {ref.path}")
            set_rng_state(ranks[self.rank]["rng"])
            return LoadedCheckpoint(trainer, ranks[self.rank]["loader"], None)
        from liquid_dist.data import merge_loader_states

        load_resharded(engine, open_checkpoint(ref.path), self.expert_layout, moments=True)
        if self.rank < len(ranks):  # the RNG streams of the ranks that remain
            set_rng_state(ranks[self.rank]["rng"])
        else:  # a new rank: its own stream, a function of the run's seed and position
            seed_everything(self.seed + 1_000_003 * trainer.step + self.rank)
        return LoadedCheckpoint(trainer, merge_loader_states([r["loader"] for r in ranks]),
                                written_on)


def load_resharded(engine: Any, ckpt: ZeroCheckpoint, expert_layout: Any, *,
                   moments: bool) -> None:
    """Set every parameter of a ZeRO-3 ``engine`` from ``ckpt``, written on any world size
    and ep_size: the fp32 master weights and, with ``moments``, AdamW's moments and step.

    Each rank reads every parameter whole (one at a time, memory-mapped) and keeps
    its own partition; an expert tensor is first cut to this rank's experts
    (``expert_layout``). Collective: every rank calls it. CheckpointError when
    the checkpoint lacks a parameter or holds it in another shape.
    """
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    from liquid_dist.parallel.ds_compat import (
        init_adam_state,
        is_expert_parameter,
        local_partition,
        refresh_working_params,
        zero3_optimizer,
    )

    zero3_optimizer(engine)  # ValueError for another stage
    if moments:
        init_adam_state(engine, ckpt.optimizer_step())
    for name, param in engine.module.named_parameters():
        if name not in ckpt.shapes:
            raise CheckpointError(f"{ckpt.path} has no parameter {name}")
        for state in STATES if moments else STATES[:1]:
            full = ckpt.tensor(name, state)
            if is_expert_parameter(param):
                experts = expert_layout.global_experts
                full = full[experts[0]: experts[-1] + 1]
            if tuple(full.shape) != tuple(param.ds_shape):
                raise CheckpointError(f"{ckpt.path}: {name} has shape {tuple(full.shape)} "
                                      f"here, this run's parameter {tuple(param.ds_shape)}")
            local = local_partition(param, full.float())
            if state == "fp32":
                safe_set_local_fp32_param(param, local)
            else:
                safe_set_local_optimizer_state(param, local, state)
    for name, buf in engine.module.named_buffers():
        if name in ckpt.buffers:
            buf.data.copy_(ckpt.buffers[name])
    refresh_working_params(engine)


def load_weights(engine: Any, ref: CheckpointRef, expert_layout: Any = None) -> None:
    """Load only the model weights of ``ref`` (``train.init_from``): no optimizer state,
    data position or step. Under ZeRO-3 from any world size and ep_size (resharded)."""
    if engine.zero_optimization_stage() == 3:
        load_resharded(engine, open_checkpoint(ref.path), expert_layout, moments=False)
        return
    path, _ = engine.load_checkpoint(str(ref.load_dir), tag=ref.tag, load_module_only=True,
                                     load_optimizer_states=False,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load weights from {ref.path}")


def global_batch(train: dict[str, Any], world_size: int) -> int:
    return int(train["micro_batch_size"]) * int(train["grad_accum"]) * world_size


def check_resumable(cfg: Any, ref: CheckpointRef, world_size: int) -> None:
    """ConfigError unless ``cfg`` on ``world_size`` ranks can continue the checkpoint's run.

    Runs at launch, before anything is built. The architecture must be the checkpoint's
    (:func:`~liquid_dist.config.check_same_architecture`; run settings may
    change), and so must ``parallel.zero_stage`` and the global batch
    (micro_batch_size x grad_accum x world size): the message says which
    micro-batch sizes and accumulations keep it. World size and ep_size may
    change (resharded on load) with ZeRO-3.
    """
    from liquid_dist.config import ConfigError, check_same_architecture

    saved = read_config(ref)
    state = read_trainer_state(ref)
    check_same_architecture(saved["model"], cfg.model, f"the checkpoint being resumed "
                            f"({ref.path}; use --resume none or another train.run_dir for a "
                            "different model)")
    stage = saved["parallel"]["zero_stage"]
    if cfg.parallel.zero_stage != stage:
        raise ConfigError("parallel.zero_stage", cfg.parallel.zero_stage,
                          f"{stage}, the ZeRO stage of the checkpoint being resumed ({ref.path})")
    old_world, old_ep = state["world_size"], state["ep_size"]
    if (old_world, old_ep) != (world_size, cfg.parallel.ep_size) and stage != 3:
        raise ConfigError("parallel.zero_stage", stage,
                          f"3 to resume on another world size or ep_size ({ref.path} was "
                          f"written by {old_world} ranks with ep_size {old_ep}, this run has "
                          f"{world_size} with ep_size {cfg.parallel.ep_size}): a ZeRO "
                          f"stage {stage} checkpoint resumes on its own layout only")
    want = global_batch(saved["train"], old_world)
    t = cfg.train
    have = global_batch({"micro_batch_size": t.micro_batch_size, "grad_accum": t.grad_accum},
                        world_size)
    if have != want:
        per_rank, rest = divmod(want, world_size)
        if rest:
            how = (f"no micro_batch_size x grad_accum keeps it on {world_size} ranks "
                   f"({want} is not a multiple of {world_size}); resume on a world size "
                   f"that divides {want}")
        else:
            pairs = [(m, per_rank // m) for m in range(per_rank, 0, -1) if per_rank % m == 0]
            how = (f"on {world_size} ranks, micro_batch_size x grad_accum = {per_rank}: "
                   + ", ".join(f"train.micro_batch_size={m} train.grad_accum={g}"
                               for m, g in pairs[:4]))
        raise ConfigError(
            "train.micro_batch_size", t.micro_batch_size,
            f"a global batch of {want} (micro_batch_size {saved['train']['micro_batch_size']} x "
            f"grad_accum {saved['train']['grad_accum']} x {old_world} ranks, the checkpoint "
            f"{ref.path}); this run has {t.micro_batch_size} x {t.grad_accum} x {world_size} "
            f"= {have}; {how}")
