"""The one reader of DeepSpeed's rank files (:func:`open_checkpoint`): any parameter, or
its AdamW moments, whole, whatever the world size and ``ep_size`` that wrote it."""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

from liquid_dist.checkpoint_format.layout import (
    STATES,
    WRAPPER_PREFIX,
    CheckpointError,
    CheckpointRef,
)
from liquid_dist.parallel.ds_compat import (
    PICKLED_CLASSES,
    check_deepspeed_version,
    ep_rank_of,
    ep_size_of_group,
)

_RANK_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_(model|optim)_states\.pt$")


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
