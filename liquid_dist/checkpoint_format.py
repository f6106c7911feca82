"""The training checkpoint on disk: its layout, how to find one, and its one reader.

Layout of ``RUN_DIR/checkpoints/`` (written by liquid_dist.train.checkpoint)::

    latest                   text file: the tag of the newest complete checkpoint
    step_00000100/           one complete checkpoint (tag = step_<8 digits>)
        zero_pp_rank_<r>_mp_rank_00_{model,optim}_states.pt
                             DeepSpeed's files, one pair per rank (ZeRO 1-3; ZeRO 0
                             writes one mp_rank_00_model_states.pt)
        trainer_state.pt     step, counters, wandb run id, world size, ep_size, and
                             for every rank its data-loader and RNG states
                             (tensors, numbers and strings only: read with
                             ``weights_only=True``)
        config.yaml          the resolved config (model.vocab_size an integer)
        tokenizer.model      copy of the tokenizer the data was made with
        done.rank<r>         each rank's "my part is written" marker
        checksums.json       size and SHA-256 of every other file, written last
                             before the checkpoint is renamed into place
    step_00000200.tmp/       a checkpoint being written (or abandoned by a crash)

Everything that reads these files goes through this module:
:func:`find_checkpoint` (``--resume``, ``train.init_from``, the converter, the
sampler), :func:`read_trainer_state`, :func:`read_config`, and
:func:`open_checkpoint`, which indexes DeepSpeed's rank files without
loading them (memory-mapped, through the weights-only unpickler) and returns
any parameter — or its AdamW moments — whole, whatever the world size and
``ep_size`` that wrote it: dense ZeRO-3 parameters are joined from every
rank's slice, expert tensors (partitioned over the expert-data-parallel
group only) are joined per expert-parallel rank and stacked by global expert
index. :func:`verify_checkpoint` checks every file against ``checksums.json``
(``python -m liquid_dist.checkpoint_format verify RUN_DIR`` for every
checkpoint of a run); :func:`find_damage` does one rank's share of that check
when the ranks of a launch verify a checkpoint together. Nothing here imports
DeepSpeed or ``torch.distributed``.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import heapq
import json
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
import yaml

from liquid_dist.parallel.ds_compat import (
    PICKLED_CLASSES,
    check_deepspeed_version,
    ep_rank_of,
    ep_size_of_group,
)

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
_TAG = re.compile(r"^step_(\d{8})$")
_RANK_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_(model|optim)_states\.pt$")


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
        m = _TAG.match(self.tag)
        return int(m.group(1)) if m else -1


# ------------------------------------------------------------------ finding


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags of the complete checkpoints in ``ckpt_dir``, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir()
                  if p.is_dir() and _TAG.match(p.name) and (p / TRAINER_STATE).is_file())


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


def _latest_tag(ckpt_dir: Path) -> Optional[str]:
    """The tag ``ckpt_dir/latest`` names (the newest checkpoint written); None without one."""
    try:
        return (ckpt_dir / LATEST).read_text().strip()
    except FileNotFoundError:
        return None


def latest_step(run_dir: Union[str, Path]) -> int:
    """The step of the newest checkpoint ``run_dir`` wrote (0 before its first), unverified."""
    tag = _latest_tag(Path(run_dir) / CHECKPOINTS)
    return max(0, CheckpointRef(Path(run_dir), tag).step) if tag else 0


def _from_latest(ckpt_dir: Path) -> CheckpointRef:
    tag = _latest_tag(ckpt_dir)
    ref = CheckpointRef(ckpt_dir, tag)
    if not (ref.path / TRAINER_STATE).is_file():
        raise CheckpointError(f"{ckpt_dir / LATEST} names {tag}, which is not a complete "
                              f"checkpoint (no {TRAINER_STATE})")
    return ref


# ------------------------------------------------------------ checksums


def file_digest(path: Path) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex}`` of one file, read in 8 MiB pieces."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while piece := fh.read(8 << 20):
            h.update(piece)
            size += len(piece)
    return {"size": size, "sha256": h.hexdigest()}


def checksummed_files(path: Path) -> list[str]:
    """The files of a checkpoint directory that ``checksums.json`` covers (relative names,
    sorted): every file but the completion markers and the checksums themselves."""
    return sorted(str(f.relative_to(path)) for f in path.rglob("*")
                  if f.is_file() and f.name != CHECKSUMS and not f.name.startswith(DONE_PREFIX))


def hash_shares(sizes: Mapping[str, int], world_size: int) -> list[list[str]]:
    """Which files of a checkpoint (name -> size) each of ``world_size`` ranks hashes
    when they checksum it together (at save, the sizes rank 0 found) or verify it (the
    recorded sizes): the largest file first, each to the rank with the fewest bytes so
    far (the lower rank on a tie), so every file is read once and the ranks read about
    as many bytes each; the same on every rank given the same sizes."""
    shares: list[list[str]] = [[] for _ in range(world_size)]
    loads = [(0, r) for r in range(world_size)]
    for name, size in sorted(sizes.items(), key=lambda item: (-item[1], item[0])):
        load, r = heapq.heappop(loads)
        shares[r].append(name)
        heapq.heappush(loads, (load + size, r))
    return shares


def find_damage(path: Path, *, rank: int = 0, world_size: int = 1) -> list[str]:
    """What is wrong with the checkpoint at ``path`` (one line per file, sorted), as far
    as rank ``rank`` of ``world_size`` looks: each file of its share (:func:`hash_shares`)
    that is missing, truncated or changed since it was written (against ``checksums.json``)
    and, on rank 0, every file that was not written with the checkpoint. A checkpoint
    without a readable ``checksums.json`` cannot be verified: that is its damage. With
    the defaults, everything (liquid_dist.train.checkpoint.find_damage_together splits
    the work over a process group)."""
    try:
        recorded = json.loads((path / CHECKSUMS).read_text())["files"]
        sizes = {name: int(want["size"]) for name, want in recorded.items()}
    except FileNotFoundError:
        return [f"{CHECKSUMS}: missing, so its files cannot be verified (written before "
                "checksums were recorded, or not by this trainer)"]
    except (ValueError, KeyError, TypeError) as exc:
        return [f"{CHECKSUMS}: unreadable ({exc!r})"]
    problems = []
    for name in hash_shares(sizes, world_size)[rank]:
        f, want = path / name, recorded[name]
        if not f.is_file():
            problems.append(f"{name}: missing")
            continue
        have = file_digest(f)
        if have["size"] != want["size"]:
            problems.append(f"{name}: {have['size']} bytes, {want['size']} written")
        elif have["sha256"] != want["sha256"]:
            problems.append(f"{name}: contents changed (sha256 {have['sha256'][:12]}..., "
                            f"{want['sha256'][:12]}... written)")
    if rank == 0:
        problems += [f"{name}: not written with the checkpoint"
                     for name in checksummed_files(path) if name not in recorded]
    return sorted(problems)


DamageFinder = Callable[[Path], list[str]]
"""Every damage of a checkpoint (:func:`find_damage`, or the ranks' shared
liquid_dist.train.checkpoint.find_damage_together)."""


def verify_checkpoint(path: Union[str, Path], damage: DamageFinder = find_damage) -> None:
    """CheckpointError naming every file of the checkpoint at ``path`` that is missing,
    truncated, changed since it was written or not written with it, or saying that it
    has no checksums to verify against (:func:`find_damage`)."""
    problems = damage(Path(path))
    if problems:
        raise CheckpointError(f"{path} is damaged: " + "; ".join(problems))


def newest_valid_checkpoint(run_dir: Union[str, Path], *, before: Optional[int] = None,
                            damage: DamageFinder = find_damage
                            ) -> tuple[Optional[CheckpointRef], list[str]]:
    """``--resume auto``: the newest checkpoint of ``run_dir`` (``latest`` or older; of a
    step below ``before`` if given) whose files verify (:func:`verify_checkpoint` with
    ``damage``), and the messages of the newer ones skipped, newest first. ``(None, [])``
    for a run without such checkpoints; CheckpointError, naming every checkpoint's damage,
    when none verifies."""
    ckpt_dir = Path(run_dir) / CHECKPOINTS
    latest = _latest_tag(ckpt_dir)
    if latest is None:
        return None, []
    last = latest if before is None else min(latest, tag_for(before - 1))
    tags = sorted((p.name for p in ckpt_dir.iterdir()
                   if p.is_dir() and _TAG.match(p.name) and p.name <= last), reverse=True)
    if not tags and before is not None:
        return None, []
    skipped = []
    for tag in tags:
        try:
            verify_checkpoint(ckpt_dir / tag, damage)
        except CheckpointError as exc:
            skipped.append(str(exc))
            continue
        return CheckpointRef(ckpt_dir, tag), skipped
    raise CheckpointError(f"{ckpt_dir}: no checkpoint to resume verifies ("
                          + "; ".join(skipped or [f"'{LATEST}' names {latest}, not there"])
                          + "); resume from a copy, or start anew with --resume none or "
                          "another train.run_dir")


# ------------------------------------------------------- the trainer's files


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


class _Stub:
    """Stand-in for the DeepSpeed objects in a rank file (the ZeRO stage enum, the loss
    scaler): the reader needs their values at most, never their code."""

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __int__(self) -> int:
        return int(self.args[0])


def _stub_classes() -> list[tuple[type, str]]:
    return [(type(name.rsplit(".", 1)[1], (_Stub,), {}), name) for name in PICKLED_CLASSES]


def _load(path: Path) -> dict[str, Any]:
    """A DeepSpeed rank file, memory-mapped, through the weights-only unpickler."""
    try:
        with torch.serialization.safe_globals(_stub_classes()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one clear error
        raise CheckpointError(f"{path}: cannot read ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0]})") from exc


def _read_range(segments: Sequence[torch.Tensor], starts: Sequence[int], begin: int,
                end: int, what: str) -> list[torch.Tensor]:
    """Slices covering [begin, end) of the virtual concatenation of 1-D ``segments``."""
    pieces = []
    i = bisect.bisect_right(starts, begin) - 1
    while begin < end:
        if i >= len(segments):
            raise CheckpointError(f"{what}: the flat partitions end before this parameter "
                                  "(truncated or inconsistent rank files)")
        seg = segments[i]
        local = begin - starts[i]
        take = min(end - begin, seg.numel() - local)
        if take > 0:
            pieces.append(seg[local: local + take])
            begin += take
        i += 1
    return pieces


def _starts(segments: Sequence[torch.Tensor]) -> list[int]:
    out, acc = [], 0
    for s in segments:
        out.append(acc)
        acc += s.numel()
    return out + [acc]


@dataclass(frozen=True)
class _Experts:
    """Where an expert tensor lives: sub-group ``group`` at ``offset`` (``part`` elements
    per rank); ``holders[e]`` = the ranks of expert-parallel rank e's expert-data-parallel
    group in partition order; ``local_shape`` = one rank's (E/P, ...)."""

    group: int
    offset: int
    part: int
    holders: tuple[tuple[int, ...], ...]
    local_shape: torch.Size


@dataclass
class ZeroCheckpoint:
    """An opened checkpoint: where every parameter lives, nothing read yet.

    ``shapes``: DeepSpeed name -> full shape of every stored tensor in file order
    (expert tensors with all ``num_experts``); ``shared``: alias -> canonical
    name (tied weights); ``step`` from the tag; ``ep_size`` the expert
    parallelism that wrote it (1 without).
    """

    path: Path
    step: int
    stage: int
    world_size: int
    ep_size: int
    shapes: dict[str, torch.Size]
    shared: dict[str, str]
    buffers: dict[str, torch.Tensor]
    _locate: dict[str, Any]
    _groups: dict[str, list[list[torch.Tensor]]]
    _steps: list[float]

    def tensor(self, name: str, state: str = "fp32") -> torch.Tensor:
        """The whole tensor ``name``: its fp32 master weight (``state="fp32"``; a buffer
        in its own dtype) or AdamW moment (``exp_avg`` / ``exp_avg_sq``)."""
        if state not in STATES:
            raise ValueError(f"state {state!r}: expected one of {STATES}")
        if name in self.buffers and state == "fp32":
            return self.buffers[name]
        if name not in self._locate:
            raise CheckpointError(f"{self.path}: no parameter {name}")
        shape = self.shapes[name]
        where = self._locate[name]
        if not isinstance(where, _Experts) and where[0] == "full":
            if state != "fp32":
                raise CheckpointError(f"{self.path}: a ZeRO stage 0 checkpoint holds no "
                                      "partitioned optimizer state")
            return where[1]
        groups = self._state_groups(state)
        if isinstance(where, _Experts):
            numel = math.prod(where.local_shape)
            per_rank = [torch.cat([groups[r][where.group][where.offset: where.offset + where.part]
                                   for r in ranks])[:numel].view(where.local_shape)
                        for ranks in where.holders]
            return torch.cat(per_rank)
        numel = math.prod(shape)
        if where[0] == "z3":
            _, group, offset, part = where
            flat = torch.cat([g[group][offset: offset + part] for g in groups])
        else:  # "z12": the group's flat vector is the concatenation of the partitions
            _, group, offset = where
            segs = [g[group] for g in groups]
            flat = torch.cat(_read_range(segs, _starts(segs), offset, offset + numel, name))
        if flat.numel() < numel:
            raise CheckpointError(f"{name}: {flat.numel()} stored elements for shape "
                                  f"{tuple(shape)}")
        return flat[:numel].view(shape)

    def _state_groups(self, state: str) -> list[list[torch.Tensor]]:
        if state not in self._groups:
            raise CheckpointError(f"{self.path}: the optimizer moments of a ZeRO stage "
                                  f"{self.stage} checkpoint are not readable here (stage 3 only)")
        return self._groups[state]

    def optimizer_step(self) -> float:
        """AdamW's step count (the same in every parameter group and on every rank)."""
        steps = set(self._steps)
        if len(steps) != 1:
            raise CheckpointError(f"{self.path}: AdamW step counts differ across parameter "
                                  f"groups/ranks: {sorted(steps)}")
        return steps.pop()

    def parameter_names(self) -> list[str]:
        return [n for n in self.shapes if n not in self.buffers]

    def state_dict(self, prefix: str = WRAPPER_PREFIX) -> dict[str, torch.Tensor]:
        """Every tensor whole (fp32 weights, buffers as stored, tied names included),
        ``prefix`` stripped from the names: a plain model's ``load_state_dict`` input."""
        out = {strip_wrapper(k, prefix): self.tensor(k) for k in self.shapes}
        for alias, source in self.shared.items():
            out[strip_wrapper(alias, prefix)] = out[strip_wrapper(source, prefix)]
        return out


def strip_wrapper(name: str, prefix: str = WRAPPER_PREFIX) -> str:
    """``name`` without the trainer's wrapper prefix."""
    return name[len(prefix):] if prefix and name.startswith(prefix) else name


def _rank_files(path: Path) -> tuple[dict[int, Path], dict[int, Path]]:
    model, optim = {}, {}
    for p in path.iterdir():
        m = _RANK_FILE.match(p.name)
        if m:
            (model if m.group(2) == "model" else optim)[int(m.group(1))] = p
    return model, optim


def open_checkpoint(path: Union[str, Path]) -> ZeroCheckpoint:
    """Index the DeepSpeed files of checkpoint directory ``path``.

    CheckpointError if a rank file is missing or unreadable, the partitions do
    not add up to the saved shapes, or another DeepSpeed version wrote them.
    """
    path = Path(path)
    step = CheckpointRef(path.parent, path.name).step
    full = path / "mp_rank_00_model_states.pt"
    model_files, optim_files = _rank_files(path)
    if not model_files and full.is_file():  # ZeRO stage 0: one full state dict
        return _open_stage0(path, step, _load(full))
    if not model_files:
        raise CheckpointError(f"{path}: no DeepSpeed model files (zero_pp_rank_*_mp_rank_00_"
                              "model_states.pt or mp_rank_00_model_states.pt)")
    first = _load(model_files[min(model_files)])
    _check_version(first, path)
    world = int(first["dp_world_size"])
    missing = [f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt (rank {r} of {world})"
               for kind, files in (("model", model_files), ("optim", optim_files))
               for r in range(world) if r not in files]
    extra = sorted(r for r in set(model_files) | set(optim_files) if r >= world)
    if missing:
        raise CheckpointError(f"{path}: missing rank file(s): {', '.join(missing)}")
    if extra:
        raise CheckpointError(f"{path}: rank files {extra} beyond the saved world size {world}")
    optims = [_load(optim_files[r])["optimizer_state_dict"] for r in range(world)]
    stage = int(optims[0]["zero_stage"])
    key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
    groups = {"fp32": [[t.detach() for t in o[key]] for o in optims]}
    steps: list[float] = []
    if stage == 3:
        adam = [o["optimizer_state_dict"]["state"] for o in optims]
        if any(adam):
            for state in ("exp_avg", "exp_avg_sq"):
                groups[state] = [[a[i][state] for i in range(len(o[key]))]
                                 for a, o in zip(adam, optims, strict=True)]
            steps = [float(s["step"]) for a in adam for s in a.values()]
        else:  # saved before the first optimizer step: AdamW's state is still to be made
            for state in ("exp_avg", "exp_avg_sq"):
                groups[state] = [[torch.zeros_like(t) for t in g] for g in groups["fp32"]]
            steps = [0.0]
    n_groups = len(groups["fp32"][0])
    if any(len(g) != n_groups for g in groups["fp32"]):
        raise CheckpointError(f"{path}: ranks hold different numbers of parameter groups")
    shape_groups = first["param_shapes"]
    if len(shape_groups) != n_groups:
        raise CheckpointError(f"{path}: {len(shape_groups)} groups of shapes but "
                              f"{n_groups} flat partitions per rank")
    buffers = {k: v for k, v in first["module"].items() if k in set(first["buffer_names"])}
    shapes: dict[str, torch.Size] = {k: v.shape for k, v in buffers.items()}
    locate: dict[str, Any] = {}
    paddings = optims[0].get("param_alignment_paddings")
    ep_sizes = {1}
    for gi, group in enumerate(shape_groups):
        holders = _expert_holders(optims, gi, world, path) if stage == 3 else None
        count = world if holders is None else len(holders[0])
        if holders is not None:
            ep_sizes.add(len(holders))
        offset = 0
        for pi, (name, shape) in enumerate(group.items()):
            numel = math.prod(shape)
            if stage == 3:  # every rank of the partition group holds ceil(numel / count)
                part = math.ceil(numel / count)
                if holders is None:
                    shapes[name] = torch.Size(shape)
                    locate[name] = ("z3", gi, offset, part)
                else:
                    shapes[name] = torch.Size((shape[0] * len(holders), *shape[1:]))
                    locate[name] = _Experts(gi, offset, part, holders, torch.Size(shape))
                offset += part
            else:
                shapes[name] = torch.Size(shape)
                locate[name] = ("z12", gi, offset)
                offset += numel + (paddings[gi][pi] if paddings else 0)
        sizes = [g[gi].numel() for g in groups["fp32"]]
        have = sizes[0] if stage == 3 else sum(sizes)
        if (offset != have or len(set(sizes)) != 1) if stage == 3 else offset > have:
            raise CheckpointError(f"{path}: parameter group {gi} needs {offset} elements, the "
                                  f"rank files hold {sizes} (shape mismatch)")
    if len(ep_sizes) > 2:
        raise CheckpointError(f"{path}: expert groups of several ep_sizes {sorted(ep_sizes)}")
    frozen = first.get("frozen_param_shapes") or {}
    if frozen:
        raise CheckpointError(f"{path}: frozen parameters {list(frozen)} are not supported")
    return ZeroCheckpoint(path, step, stage, world, max(ep_sizes), shapes,
                          dict(first["shared_params"]), buffers, locate, groups, steps)


def _open_stage0(path: Path, step: int, state: dict[str, Any]) -> ZeroCheckpoint:
    _check_version(state, path)
    module, shared, first_of = {}, {}, {}
    for k, v in state["module"].items():
        # a full state dict lists tied weights under every name: one storage, kept once
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key in first_of:
            shared[k] = first_of[key]
        else:
            first_of[key] = k
            module[k] = v
    buffers = {k: v for k, v in module.items() if k in set(state.get("buffer_names", ()))}
    return ZeroCheckpoint(path, step, 0, 1, 1, {k: v.shape for k, v in module.items()},
                          shared, buffers, {k: ("full", v) for k, v in module.items()}, {}, [])


def _check_version(model_state: dict[str, Any], path: Path) -> None:
    try:
        check_deepspeed_version(str(model_state.get("ds_version")), f"of checkpoint {path}")
    except RuntimeError as exc:
        raise CheckpointError(str(exc)) from exc


def _expert_holders(optims: list[dict[str, Any]], group: int, world: int,
                    path: Path) -> Optional[tuple[tuple[int, ...], ...]]:
    """None for a sub-group partitioned over all ranks; for an expert sub-group (ZeRO-3's
    ``ds_zero_partition_groups``: partitioned over an expert-data-parallel group), the
    ranks of each expert-parallel rank's group, in partition order, by expert-parallel rank."""
    meta = [o.get("ds_zero_partition_groups") for o in optims]
    if meta[0] is None:
        return None
    info = [m[group] for m in meta]
    if int(info[0]["partition_count"]) == world:
        return None
    names = set(info[0]["group_names"])
    if len(names) != 1:
        raise CheckpointError(f"{path}: parameter group {group} mixes partition groups {names}")
    ep_size = ep_size_of_group(names.pop())
    holders: dict[int, list[tuple[int, int]]] = {}
    for rank, i in enumerate(info):
        holders.setdefault(ep_rank_of(rank, ep_size), []).append((int(i["partition_rank"]), rank))
    if sorted(holders) != list(range(ep_size)) or any(
            sorted(p for p, _ in h) != list(range(world // ep_size)) for h in holders.values()):
        raise CheckpointError(f"{path}: parameter group {group}: the partitions over "
                              f"expert-parallel groups of ep_size {ep_size} do not cover every "
                              f"expert once ({info})")
    return tuple(tuple(r for _, r in sorted(holders[e])) for e in range(ep_size))


def main(argv: Optional[list[str]] = None) -> int:
    """``verify PATH``: every complete checkpoint of a run directory (or a checkpoints
    directory, or one checkpoint) against its checksums. Exit 0 when all verify, 1 when
    any is damaged or unverifiable, 2 when PATH holds no checkpoint."""
    ap = argparse.ArgumentParser(prog="python -m liquid_dist.checkpoint_format",
                                 description=main.__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="check every file of the checkpoints of PATH")
    verify.add_argument("path", type=Path)
    args = ap.parse_args(argv)
    path: Path = args.path
    if (path / TRAINER_STATE).is_file() or (path / CHECKSUMS).is_file():
        checkpoints = [path]
    else:
        ckpt_dir = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
        # every checkpoint directory, the ones a damage left without their trainer state too
        checkpoints = sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and _TAG.match(p.name)
                             ) if ckpt_dir.is_dir() else []
    if not checkpoints:
        print(f"error: {path}: no complete checkpoint", file=sys.stderr)
        return 2
    bad = 0
    for ckpt in checkpoints:
        try:
            verify_checkpoint(ckpt)
            print(f"ok       {ckpt}")
        except CheckpointError as exc:
            bad += 1
            print(f"FAILED   {exc}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
