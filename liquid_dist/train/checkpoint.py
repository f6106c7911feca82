"""Checkpoints: DeepSpeed shards + trainer state, made ``latest`` only when complete everywhere.

Layout of ``RUN_DIR/checkpoints/``::

    latest                   text file: the tag of the newest complete checkpoint
    step_00000100/           one complete checkpoint (tag = step_<8 digits>)
        zero_pp_rank_*_mp_rank_00_{model,optim}_states.pt   DeepSpeed, one pair per rank
        trainer_state.pt     step, counters, wandb run id, world size, and for every
                             rank its data-loader state and RNG states
        config.yaml          the resolved config (model.vocab_size an integer)
        tokenizer.model      copy of the tokenizer the data was made with
        experts/             only with parallel.ep_size > 1: meta.json and one
                             ep_rank<e>.pt per expert-parallel rank, every expert
                             under its global index (docs/parallelism.md)
        done.rank<r>         each rank's "my part is written" marker
    step_00000200.tmp/       a checkpoint being written (or abandoned by a crash)

Protocol (:meth:`CheckpointManager.save`, called by every rank): rank 0
removes a stale ``.tmp`` of the same tag; every rank writes its DeepSpeed
files into ``<tag>.tmp``, then its marker; a barrier; rank 0 checks every
marker, writes the trainer state, config and tokenizer, renames ``<tag>.tmp``
to ``<tag>`` and atomically replaces ``latest``, then deletes all but the
newest ``train.keep_last`` checkpoints; a final barrier. A rank killed at any
point leaves ``latest`` on the previous checkpoint; the ``.tmp`` is deleted by
the next run. The run directory must be on a filesystem all nodes share.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import yaml

from liquid_dist.train import testhooks

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAINER_STATE = "trainer_state.pt"
CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.model"
TMP_SUFFIX = ".tmp"
STATE_VERSION = 1
_TAG = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


@dataclass(frozen=True)
class CheckpointRef:
    """A complete checkpoint: ``load_dir / tag``."""

    load_dir: Path
    tag: str

    @property
    def path(self) -> Path:
        return self.load_dir / self.tag


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags of the complete checkpoints in ``ckpt_dir``, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir()
            if p.is_dir() and _TAG.match(p.name) and (p / TRAINER_STATE).exists()]
    return sorted(tags)


def find_checkpoint(resume: str, run_dir: str | Path) -> Optional[CheckpointRef]:
    """What ``--resume`` names: ``none`` -> None; ``auto`` -> ``latest`` of the run
    directory, or None when it has none; a path -> a checkpoint directory, a
    directory holding ``latest``, or a run directory (FileNotFoundError otherwise)."""
    if resume == "none":
        return None
    if resume == "auto":
        ckpt_dir = Path(run_dir) / CHECKPOINTS
        if not (ckpt_dir / LATEST).exists():
            return None
        return _from_latest(ckpt_dir)
    path = Path(resume)
    if (path / TRAINER_STATE).exists():
        return CheckpointRef(path.parent, path.name)
    for ckpt_dir in (path, path / CHECKPOINTS):
        if (ckpt_dir / LATEST).exists():
            return _from_latest(ckpt_dir)
    raise FileNotFoundError(f"--resume {resume}: not a checkpoint (no {TRAINER_STATE}), nor a "
                            f"directory with a '{LATEST}' file, nor a run directory")


def _from_latest(ckpt_dir: Path) -> CheckpointRef:
    tag = (ckpt_dir / LATEST).read_text().strip()
    ref = CheckpointRef(ckpt_dir, tag)
    if not (ref.path / TRAINER_STATE).exists():
        raise FileNotFoundError(f"{ckpt_dir / LATEST} names {tag}, which is not a complete "
                                "checkpoint")
    return ref


def rng_state() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _gather(obj: Any) -> list[Any]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class CheckpointManager:
    """Saves and loads the checkpoints of one run directory (see the module docstring)."""

    def __init__(self, run_dir: str | Path, *, keep_last: int, rank: int, world_size: int,
                 expert_layout: Any = None, model: Any = None):
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / CHECKPOINTS
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        # expert parallelism (ep_size > 1): every checkpoint also gets experts/
        # with each expert under its global index (docs/parallelism.md)
        self.expert_layout = expert_layout
        self.model = model

    def remove_incomplete(self) -> list[str]:
        """Rank 0 deletes checkpoints a crash left half-written; every rank waits."""
        removed = []
        if self.rank == 0 and self.dir.is_dir():
            for p in self.dir.iterdir():
                if p.is_dir() and p.name.endswith(TMP_SUFFIX):
                    shutil.rmtree(p)
                    removed.append(p.name)
        _barrier()
        return removed

    def save(self, engine: Any, step: int, rank_state: dict[str, Any],
             shared_state: dict[str, Any], config: dict[str, Any],
             tokenizer_path: str | Path) -> CheckpointRef:
        """Write the checkpoint of ``step`` (every rank calls this; see the protocol above).

        ``rank_state``: this rank's part (data-loader state); RNG states are
        added here. ``shared_state``: the same on every rank (counters, run id).
        """
        tag = tag_for(step)
        tmp_tag = tag + TMP_SUFFIX
        tmp = self.dir / tmp_tag
        per_rank = _gather({**rank_state, "rng": rng_state()})
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        _barrier()
        engine.save_checkpoint(str(self.dir), tag=tmp_tag, save_latest=False)
        if self.expert_layout is not None:
            from liquid_dist.parallel.expert_parallel import save_expert_shards

            save_expert_shards(self.model, self.expert_layout, tmp, self.world_size)
        testhooks.maybe_pause_checkpoint(step, self.rank, self.run_dir)
        _write_atomic(tmp / f"done.rank{self.rank}", str(step))
        _barrier()
        if self.rank == 0:
            missing = [r for r in range(self.world_size) if not (tmp / f"done.rank{r}").exists()]
            if missing:
                raise RuntimeError(f"checkpoint {tmp}: ranks {missing} did not write their "
                                   "part (is the run directory on a filesystem every node "
                                   "shares?)")
            state = {"version": STATE_VERSION, "step": step, "world_size": self.world_size,
                     "ranks": per_rank, **shared_state}
            torch.save(state, tmp / TRAINER_STATE)
            (tmp / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
            shutil.copy2(tokenizer_path, tmp / TOKENIZER_FILE)
            final = self.dir / tag
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            _write_atomic(self.dir / LATEST, tag + "\n")
            self._prune(keep=tag)
        _barrier()
        return CheckpointRef(self.dir, tag)

    def _prune(self, keep: str) -> None:
        tags = complete_tags(self.dir)
        for old in tags[: max(0, len(tags) - self.keep_last)]:
            if old != keep:
                shutil.rmtree(self.dir / old)

    def load(self, engine: Any, ref: CheckpointRef) -> dict[str, Any]:
        """Load weights, optimizer and this rank's RNG; returns the trainer state with
        ``rank_state`` = this rank's part. ValueError if the world size differs."""
        state = torch.load(ref.path / TRAINER_STATE, map_location="cpu", weights_only=False)
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"{ref.path}: trainer state version {state.get('version')!r}, "
                             f"expected {STATE_VERSION}")
        if state["world_size"] != self.world_size:
            raise ValueError(
                f"{ref.path} was written by {state['world_size']} ranks, this run has "
                f"{self.world_size}: an exact resume (ZeRO partitions, every rank's data "
                "position) needs the same world size; use train.init_from to start a new run "
                "from its weights instead")
        from liquid_dist.parallel.expert_parallel import check_expert_checkpoint

        check_expert_checkpoint(ref.path, self.expert_layout, self.world_size)
        path, _ = engine.load_checkpoint(str(ref.load_dir), tag=ref.tag,
                                         load_optimizer_states=True,
                                         load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed could not load {ref.path}")
        mine = state["ranks"][self.rank]
        set_rng_state(mine["rng"])
        state["rank_state"] = mine
        return state


def load_weights(engine: Any, ref: CheckpointRef) -> None:
    """Load only the model weights of ``ref`` (``train.init_from``): no optimizer, data or step.

    ValueError when ``ref`` or this run uses expert parallelism: DeepSpeed's
    files then hold per-rank expert slices; convert the checkpoint
    (``liquid-convert``) and start from the converted directory instead.
    """
    from liquid_dist.parallel.expert_parallel import is_expert_parameter, read_expert_metadata

    if read_expert_metadata(ref.path) is not None or any(
            is_expert_parameter(p) for p in engine.module.parameters()):
        raise ValueError(f"train.init_from={ref.path}: a DeepSpeed checkpoint cannot seed a run "
                         "when either uses parallel.ep_size > 1; convert it (liquid-convert) "
                         "and set train.init_from to the converted directory")
    path, _ = engine.load_checkpoint(str(ref.load_dir), tag=ref.tag, load_module_only=True,
                                     load_optimizer_states=False,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed could not load weights from {ref.path}")


def consolidated_state_dict(ref: CheckpointRef, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The full fp32 weights of a checkpoint as one state dict (single process, no GPU).

    ZeRO 1-3 shards are merged with DeepSpeed's ``zero_to_fp32``, expert-parallel
    checkpoints by ``consolidate_expert_parallel_checkpoint`` (all experts, global
    order); ``prefix`` (the trainer's wrapper module) is stripped from the names.
    """
    from liquid_dist.parallel.expert_parallel import (
        consolidate_expert_parallel_checkpoint,
        read_expert_metadata,
    )

    zero_files = list(ref.path.glob("zero_pp_rank_*_optim_states.pt")) + list(
        ref.path.glob("bf16_zero_pp_rank_*_optim_states.pt"))
    if read_expert_metadata(ref.path) is not None:
        # zero_to_fp32 cannot merge expert-parallel partitions (docs/parallelism.md)
        sd = consolidate_expert_parallel_checkpoint(ref.path)
    elif zero_files:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # zero_to_fp32 narrates every shard on stdout/stderr; keep the caller's output clean
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            sd = get_fp32_state_dict_from_zero_checkpoint(str(ref.load_dir), tag=ref.tag)
    else:
        sd = torch.load(ref.path / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)["module"]
    return {(k[len(prefix):] if k.startswith(prefix) else k): v.float() for k, v in sd.items()}


def read_config(ref: CheckpointRef) -> dict[str, Any]:
    """The resolved config saved with a checkpoint."""
    return yaml.safe_load((ref.path / CONFIG_FILE).read_text())


def check_resumable(config: dict[str, Any], ref: CheckpointRef) -> None:
    """ConfigError unless ``config`` has the checkpoint's model and ZeRO stage.

    (Other settings may change on resume; the data loader refuses a changed data
    setup itself.)
    """
    from liquid_dist.config import ConfigError, flatten_keys

    saved = read_config(ref)
    # ep_size fixes which experts every rank's ZeRO partitions hold
    old = {**flatten_keys(saved["model"], "model."),
           "parallel.zero_stage": saved["parallel"]["zero_stage"],
           "parallel.ep_size": saved["parallel"].get("ep_size", 1)}
    new = {**flatten_keys(config["model"], "model."),
           "parallel.zero_stage": config["parallel"]["zero_stage"],
           "parallel.ep_size": config["parallel"].get("ep_size", 1)}
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise ConfigError(changed[0], new.get(changed[0]),
                          f"the value of the checkpoint being resumed ({ref.path}; {detail}); "
                          "use --resume none or another train.run_dir for a different model")
