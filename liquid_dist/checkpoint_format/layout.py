"""The checkpoint directory's layout: names, tags, finding a checkpoint, and reading its
trainer state and config (the package doc shows the layout)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
import yaml

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAINER_STATE = "trainer_state.pt"
CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.model"
TMP_SUFFIX = ".tmp"
CHECKSUMS = "checksums.json"
DONE_PREFIX = "done.rank"
STATE_VERSION = 2
"""Version of ``trainer_state.pt`` (2: weights-only contents, ``ep_size``)."""
WRAPPER_PREFIX = "model."
"""The trainer's PretrainingModule stores the model as ``model.*``."""
STATES = ("fp32", "exp_avg", "exp_avg_sq")
"""What :meth:`ZeroCheckpoint.tensor` reads: the fp32 master weight, AdamW's moments."""
TAG_PATTERN = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """No such checkpoint, or one that is incomplete or inconsistent; the message says which."""


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

    @property
    def step(self) -> int:
        m = TAG_PATTERN.match(self.tag)
        return int(m.group(1)) if m else -1


# ------------------------------------------------------------------ finding


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags of the complete checkpoints in ``ckpt_dir``, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir()
                  if p.is_dir() and TAG_PATTERN.match(p.name) and (p / TRAINER_STATE).is_file())


def find_checkpoint(spec: Union[str, Path], *,
                    step: Optional[int] = None) -> Optional[CheckpointRef]:
    """The checkpoint ``spec`` names.

    ``none`` -> None. Any other ``spec`` is a path: a checkpoint directory, a
    directory of checkpoints or a run directory, and names its checkpoint of
    ``step`` (default: ``latest``). CheckpointError when that is not a
    complete checkpoint, naming what is there. (``--resume auto``, the newest
    checkpoint of ``run_dir`` that verifies: :func:`newest_valid_checkpoint`.)
    """
    if str(spec) == "none":
        return None
    path = Path(spec)
    if (path / TRAINER_STATE).is_file() and (step is None or CheckpointRef(
            path.parent, path.name).step == step):
        return CheckpointRef(path.parent, path.name)
    ckpt_dir = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{path}: no such run or checkpoint directory")
    complete = complete_tags(ckpt_dir)
    if step is not None:
        tag = tag_for(step)
        if tag in complete:
            return CheckpointRef(ckpt_dir, tag)
        if (ckpt_dir / tag).is_dir() or (ckpt_dir / (tag + TMP_SUFFIX)).is_dir():
            raise CheckpointError(f"{ckpt_dir / tag}: incomplete checkpoint (no "
                                  f"{TRAINER_STATE}: still being written or abandoned)")
        raise CheckpointError(f"{ckpt_dir}: no checkpoint of step {step}; complete ones: "
                              f"{complete or 'none'}")
    if not (ckpt_dir / LATEST).is_file():
        raise CheckpointError(f"{path}: not a checkpoint (no {TRAINER_STATE}), and {ckpt_dir} "
                              f"has no '{LATEST}' file (complete checkpoints: "
                              f"{complete or 'none'}; name one by its step)")
    return _from_latest(ckpt_dir)


def latest_tag(ckpt_dir: Path) -> Optional[str]:
    """The tag ``ckpt_dir/latest`` names (the newest checkpoint written); None without one."""
    try:
        return (ckpt_dir / LATEST).read_text().strip()
    except FileNotFoundError:
        return None


def latest_step(run_dir: Union[str, Path]) -> int:
    """The step of the newest checkpoint ``run_dir`` wrote (0 before its first), unverified."""
    tag = latest_tag(Path(run_dir) / CHECKPOINTS)
    return max(0, CheckpointRef(Path(run_dir), tag).step) if tag else 0


def _from_latest(ckpt_dir: Path) -> CheckpointRef:
    tag = latest_tag(ckpt_dir)
    ref = CheckpointRef(ckpt_dir, tag)
    if not (ref.path / TRAINER_STATE).is_file():
        raise CheckpointError(f"{ckpt_dir / LATEST} names {tag}, which is not a complete "
                              f"checkpoint (no {TRAINER_STATE})")
    return ref


# ------------------------------------------------------------ checksums


def read_trainer_state(ref: CheckpointRef) -> dict[str, Any]:
    """``trainer_state.pt`` (weights-only); CheckpointError for another version."""
    path = ref.path / TRAINER_STATE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one clear error
        raise CheckpointError(f"{path}: cannot read ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0]}); it may predate trainer state "
                              f"version {STATE_VERSION}") from exc
    if state.get("version") != STATE_VERSION:
        raise CheckpointError(f"{path}: trainer state version {state.get('version')!r}, "
                              f"expected {STATE_VERSION}")
    return state


def read_config(ref: CheckpointRef) -> dict[str, Any]:
    """The resolved config saved with a checkpoint."""
    path = ref.path / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{ref.path}: missing {CONFIG_FILE}")
    return yaml.safe_load(path.read_text())


# ------------------------------------------------------- DeepSpeed's files
