"""Training checkpoint -> the single-GPU format (docs/convert.md).

    python -m liquid_dist.convert RUN_DIR [--step N] --output OUT [--dtype fp32|bf16]
        [--max-shard-size 5GB] [--overwrite]

Reads a checkpoint written by the trainer (DeepSpeed ZeRO 0-3 files of any
world size), reassembles every parameter with its original name and shape,
checks names and shapes against the model the saved config builds, and
writes the directory liquid_dist.model.pretrained describes.

Streaming: the rank files are opened with ``torch.load(weights_only=True,
mmap=True)`` (no pickle code runs, nothing is read until touched); each
parameter is gathered from its slices on every rank, converted, and written
straight into the safetensors file, whose header is computed up front from
the saved shapes. Peak memory is about the largest parameter (twice, for the
gather and the dtype cast), not the model.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import json
import math
import re
import shutil
import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
import yaml

from liquid_dist.config import ConfigError, ModelConfig, model_config_from_dict
from liquid_dist.model.pretrained import (
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    INDEX_NAME,
    MODEL_CARD_NAME,
    TOKENIZER_NAME,
    WEIGHTS_NAME,
    canonical_names,
)

# the trainer's checkpoint layout (liquid_dist.train.checkpoint; not imported so
# that converting never imports torch.distributed-heavy training code)
CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAINER_STATE = "trainer_state.pt"
CONFIG_FILE = "config.yaml"
EXPERTS_DIR = "experts"
WRAPPER_PREFIX = "model."
"""The trainer's PretrainingModule stores the model as ``model.*``."""

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
              torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL",
              torch.uint8: "U8"}
_RANK_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_(model|optim)_states\.pt$")
MOE_EXPERT_PARAMS = ("moe.w1", "moe.b1", "moe.w2", "moe.b2")
"""Expert tensors of a MoELayer: dim 0 is the (global) expert index."""


class CheckpointError(RuntimeError):
    """The checkpoint is incomplete or inconsistent; the message names what is wrong."""


# ------------------------------------------------------------------ reading


class _ZeroStage(int):
    """Stand-in for deepspeed's ZeroStageEnum (an IntEnum) when unpickling."""


class _Opaque:
    """Stand-in for DeepSpeed objects the converter does not need (the loss scaler)."""

    def __setstate__(self, state: Any) -> None:
        self.state = state


_DS_GLOBALS = [(_ZeroStage, "deepspeed.runtime.zero.config.ZeroStageEnum"),
               (_Opaque, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
               (_Opaque, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler")]


def _load(path: Path) -> dict[str, Any]:
    """A DeepSpeed rank file, memory-mapped, through the weights-only unpickler."""
    try:
        with torch.serialization.safe_globals(_DS_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one clear error
        raise CheckpointError(f"{path}: cannot read ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0]})") from exc


def resolve_checkpoint(run_dir: Union[str, Path], step: Optional[int] = None) -> Path:
    """The checkpoint directory to convert.

    ``run_dir``: a run directory, its ``checkpoints`` directory, or one
    checkpoint directory. ``step`` None takes ``latest``. CheckpointError when
    there is no complete checkpoint to take.
    """
    path = Path(run_dir)
    if (path / TRAINER_STATE).is_file() and step is None:
        return path
    ckpt_dir = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{path}: no such run or checkpoint directory")
    complete = sorted(p.name for p in ckpt_dir.iterdir()
                      if p.is_dir() and re.fullmatch(r"step_\d{8}", p.name)
                      and (p / TRAINER_STATE).is_file())
    if step is not None:
        tag = f"step_{step:08d}"
        if tag in complete:
            return ckpt_dir / tag
        if (ckpt_dir / tag).is_dir() or (ckpt_dir / f"{tag}.tmp").is_dir():
            raise CheckpointError(f"{ckpt_dir / tag}: incomplete checkpoint (no "
                                  f"{TRAINER_STATE}: still being written or abandoned)")
        raise CheckpointError(f"{ckpt_dir}: no checkpoint of step {step}; complete ones: "
                              f"{complete or 'none'}")
    if not (ckpt_dir / LATEST).is_file():
        raise CheckpointError(f"{ckpt_dir}: no '{LATEST}' file, so no complete checkpoint to "
                              f"convert (complete ones: {complete or 'none'}; pass --step)")
    tag = (ckpt_dir / LATEST).read_text().strip()
    if not (ckpt_dir / tag / TRAINER_STATE).is_file():
        raise CheckpointError(f"{ckpt_dir / LATEST} names {tag}, which is not a complete "
                              f"checkpoint (no {TRAINER_STATE})")
    return ckpt_dir / tag


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


@dataclass
class ZeroCheckpoint:
    """An opened checkpoint: where every parameter lives, nothing read yet.

    ``shapes``: DeepSpeed name -> shape of every stored tensor in file order;
    ``shared``: alias -> canonical name (tied weights); ``step`` from the tag.
    """

    path: Path
    step: int
    stage: int
    world_size: int
    shapes: dict[str, torch.Size]
    shared: dict[str, str]
    _buffers: dict[str, torch.Tensor]
    _locate: dict[str, Any]
    _groups: list[list[torch.Tensor]]

    def tensor(self, name: str) -> torch.Tensor:
        """The full fp32 (or buffer-dtype) tensor ``name``, gathered from every rank."""
        if name in self._buffers:
            return self._buffers[name]
        shape = self.shapes[name]
        numel = math.prod(shape)
        kind, *where = self._locate[name]
        if kind == "full":
            return where[0]
        if kind == "experts":
            name_in_shard, pieces, num_experts = where
            return assemble_experts(name, {e: shard["tensors"][name_in_shard][i]
                                           for e, (shard, i) in pieces.items()}, num_experts)
        if kind == "z3":
            group, offset, part = where
            flat = torch.cat([g[group][offset: offset + part] for g in self._groups])
        else:  # "z12"
            group, offset = where
            segs = [g[group] for g in self._groups]
            flat = torch.cat(_read_range(segs, _starts(segs), offset, offset + numel, name))
        if flat.numel() < numel:
            raise CheckpointError(f"{name}: {flat.numel()} stored elements for shape "
                                  f"{tuple(shape)}")
        return flat[:numel].view(shape)


def _rank_files(path: Path) -> tuple[dict[int, Path], dict[int, Path]]:
    model, optim = {}, {}
    for p in path.iterdir():
        m = _RANK_FILE.match(p.name)
        if m:
            (model if m.group(2) == "model" else optim)[int(m.group(1))] = p
    return model, optim


def open_checkpoint(path: Path) -> ZeroCheckpoint:
    """Index the DeepSpeed files of checkpoint directory ``path`` (CheckpointError if a
    rank file is missing, or the partitions do not add up to the saved shapes)."""
    m = re.fullmatch(r"step_(\d{8})", path.name)
    step = int(m.group(1)) if m else -1
    full = path / "mp_rank_00_model_states.pt"
    model_files, optim_files = _rank_files(path)
    if not model_files and full.is_file():  # ZeRO stage 0: one full state dict
        module, shared, first_of = {}, {}, {}
        for k, v in _load(full)["module"].items():
            # a full state dict lists tied weights under every name: one storage, kept once
            key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
            if key in first_of:
                shared[k] = first_of[key]
            else:
                first_of[key] = k
                module[k] = v
        return ZeroCheckpoint(path, step, 0, 1, {k: v.shape for k, v in module.items()},
                              shared, {}, {k: ("full", v) for k, v in module.items()}, [])
    if not model_files:
        raise CheckpointError(f"{path}: no DeepSpeed model files (zero_pp_rank_*_mp_rank_00_"
                              "model_states.pt or mp_rank_00_model_states.pt)")
    first = _load(model_files[min(model_files)])
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
    groups = [list(o[key]) for o in optims]
    # one count per parameter group: expert groups are partitioned over fewer ranks
    counts = optims[0]["partition_count"]
    counts = ([int(c) for c in counts] if isinstance(counts, (list, tuple))
              else [int(counts)] * len(groups[0]))
    if max(counts) != world:
        raise CheckpointError(f"{path}: optimizer partitioned over {max(counts)} ranks, model "
                              f"files say {world}")
    if any(len(g) != len(groups[0]) for g in groups):
        raise CheckpointError(f"{path}: ranks hold different numbers of parameter groups")
    shape_groups = first["param_shapes"]
    if len(shape_groups) != len(groups[0]):
        raise CheckpointError(f"{path}: {len(shape_groups)} groups of shapes but "
                              f"{len(groups[0])} flat partitions per rank")
    buffers = {k: v for k, v in first["module"].items() if k in set(first["buffer_names"])}
    shapes: dict[str, torch.Size] = {k: v.shape for k, v in buffers.items()}
    locate: dict[str, Any] = {}
    paddings = optims[0].get("param_alignment_paddings")
    for gi, group in enumerate(shape_groups):
        if stage == 3:
            counts[gi] = _z3_partition_count(group, groups[0][gi].numel(), counts[gi], world)
        offset = 0
        for pi, (name, shape) in enumerate(group.items()):
            numel = math.prod(shape)
            shapes[name] = torch.Size(shape)
            if stage == 3:  # every rank of the group holds ceil(numel / P) at one offset
                part = math.ceil(numel / int(counts[gi]))
                # a group split over fewer ranks (experts under expert parallelism)
                # is not one tensor across all ranks: its values come from experts/
                locate[name] = ("z3", gi, offset, part) if counts[gi] == world else ("local",)
                offset += part
            else:  # the group's flat vector is the concatenation of the ranks' partitions
                locate[name] = ("z12", gi, offset)
                offset += numel + (paddings[gi][pi] if paddings else 0)
        sizes = [g[gi].numel() for g in groups]
        have = sizes[0] if stage == 3 else sum(sizes)
        if (offset != have or len(set(sizes)) != 1) if stage == 3 else offset > have:
            raise CheckpointError(f"{path}: parameter group {gi} needs {offset} elements, the "
                                  f"rank files hold {sizes} (shape mismatch)")
    _add_expert_shards(path, shapes, locate)
    local = [n for n, where in locate.items() if where[0] == "local"]
    if local:
        raise CheckpointError(f"{path}: {local} are partitioned over a subset of the ranks "
                              f"(expert parallelism) but {EXPERTS_DIR}/ does not hold them")
    frozen = first.get("frozen_param_shapes") or {}
    if frozen:
        raise CheckpointError(f"{path}: frozen parameters {list(frozen)} are not supported")
    return ZeroCheckpoint(path, step, stage, world, shapes, dict(first["shared_params"]),
                          buffers, locate, groups)


def _z3_partition_count(group: Mapping[str, Any], size: int, saved: int, world: int) -> int:
    """Over how many ranks a ZeRO-3 parameter group is partitioned: the saved count if
    the group's per-rank size agrees, else the divisor of the world size that does
    (expert groups are partitioned over the expert-data-parallel group only)."""
    numels = [math.prod(s) for s in group.values()]
    for p in [saved] + [p for p in range(world, 0, -1) if world % p == 0]:
        if sum(math.ceil(n / p) for n in numels) == size:
            return p
    return saved  # the size check below reports the mismatch


def _add_expert_shards(path: Path, shapes: dict[str, torch.Size],
                       locate: dict[str, Any]) -> None:
    """Point every expert tensor of an expert-parallel checkpoint at ``experts/``.

    Layout (docs/parallelism.md): ``experts/meta.json`` (ep_size, num_experts)
    and ``ep_rank<e>.pt`` = ``{"global_experts": [...], "tensors": {name: (E/ep, ...)}}``
    per expert-parallel rank, names without the trainer's ``model.`` prefix.
    """
    meta_path = path / EXPERTS_DIR / "meta.json"
    if not meta_path.is_file():
        return
    meta = json.loads(meta_path.read_text())
    files = [path / EXPERTS_DIR / f"ep_rank{e}.pt" for e in range(int(meta["ep_size"]))]
    missing = [f"{EXPERTS_DIR}/{f.name}" for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{path}: missing expert shard file(s) {missing} "
                              f"(ep_size {meta['ep_size']})")
    pieces: dict[str, dict[int, tuple[dict[str, Any], int]]] = {}
    for f in files:
        shard = _load(f)
        for name, t in shard["tensors"].items():
            if t.shape[0] != len(shard["global_experts"]):
                raise CheckpointError(f"{f}: {name} holds {t.shape[0]} experts, the file lists "
                                      f"{shard['global_experts']}")
            for i, e in enumerate(shard["global_experts"]):
                if e in pieces.setdefault(name, {}):
                    raise CheckpointError(f"{f}: expert {e} of {name} is stored twice")
                pieces[name][e] = (shard, i)
    num_experts = int(meta["num_experts"])
    for name, by_expert in pieces.items():
        _check_expert_indices(name, by_expert, num_experts)
        shard, i = next(iter(by_expert.values()))
        key = WRAPPER_PREFIX + name
        shapes[key] = torch.Size((num_experts, *shard["tensors"][name].shape[1:]))
        locate[key] = ("experts", name, by_expert, num_experts)


def _check_expert_indices(name: str, indices: Any, num_experts: int) -> None:
    have, want = set(indices), set(range(num_experts))
    if have != want:
        raise CheckpointError(
            f"{name}: wrong expert count: have experts {sorted(have)}, the model has "
            f"{num_experts} (missing {sorted(want - have)}, unexpected {sorted(have - want)})")


def assemble_experts(name: str, shards: Mapping[int, torch.Tensor],
                     num_experts: int) -> torch.Tensor:
    """One MoE tensor (num_experts, ...) from per-expert pieces keyed by global expert index.

    Expert-parallel checkpoints store each expert on the rank that owns it;
    whatever the world size and ep_size were, the pieces of one tensor must be
    exactly the indices 0..num_experts-1, all of one shape. CheckpointError
    names the missing or extra indices, or the odd shapes.
    """
    _check_expert_indices(name, shards, num_experts)
    shapes = {tuple(t.shape) for t in shards.values()}
    if len(shapes) != 1:
        raise CheckpointError(f"{name}: expert pieces have different shapes {sorted(shapes)}")
    return torch.stack([shards[e] for e in range(num_experts)])


# ------------------------------------------------------------------ writing


def parse_size(text: str) -> int:
    """``5GB`` / ``500MB`` / ``2GiB`` / ``1048576`` -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"size {text!r}: expected e.g. 5GB, 500MB, 2GiB or a number of bytes")
    base = 1024 if m.group(3) else 1000
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * base ** power)


def _out_dtype(t_dtype: torch.dtype, dtype: torch.dtype) -> torch.dtype:
    return dtype if t_dtype.is_floating_point else t_dtype


def _header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
            metadata: dict[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in entries:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def _plan_shards(entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 limit: int) -> list[list[tuple[str, torch.dtype, tuple[int, ...]]]]:
    shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
    size = 0
    for e in entries:
        nbytes = math.prod(e[2]) * e[1].itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    return shards


def _strip(name: str) -> str:
    return name[len(WRAPPER_PREFIX):] if name.startswith(WRAPPER_PREFIX) else name


def _expected_model(model_cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    from liquid_dist.model import LiquidFoundationModelOptimized

    with torch.device("meta"):  # shapes only: no memory
        return canonical_names(LiquidFoundationModelOptimized(model_cfg))


def _check_against_model(ckpt: ZeroCheckpoint, model_cfg: ModelConfig) -> dict[str, str]:
    """Saved name -> output name; CheckpointError if names or shapes differ from the model."""
    expected = _expected_model(model_cfg)
    names = {k: _strip(k) for k in ckpt.shapes}
    got = {names[k]: tuple(s) for k, s in ckpt.shapes.items()}
    problems = []
    missing = sorted(expected.keys() - got.keys())
    unexpected = sorted(got.keys() - expected.keys())
    if missing:
        problems.append(f"missing parameters {missing}")
    if unexpected:
        problems.append(f"parameters the model does not have {unexpected}")
    experts = model_cfg.moe.num_experts
    for k in sorted(expected.keys() & got.keys()):
        if got[k] == expected[k]:
            continue
        if k.endswith(MOE_EXPERT_PARAMS) and got[k][:1] != expected[k][:1]:
            problems.append(f"wrong expert count in {k}: checkpoint has {got[k][0]} experts, "
                            f"model.moe.num_experts = {experts}")
        else:
            problems.append(f"shape mismatch {k}: checkpoint {got[k]}, config {expected[k]}")
    if problems:
        raise CheckpointError(f"{ckpt.path} does not match its config.yaml: "
                              + "; ".join(problems))
    return names


def _final_metrics(run_dir: Path, step: int) -> dict[str, Any]:
    train: dict[str, Any] = {}
    evals: dict[str, Any] = {}
    f = run_dir / "metrics.jsonl"
    if f.is_file():
        for line in f.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if r.get("step", 0) > step:
                continue
            if r.get("kind") == "train":
                train = r
            elif r.get("kind") == "eval":
                evals = r
    out = {k: train[k] for k in ("loss", "ce", "recon_encoder", "recon_decoder") if k in train}
    out.update({k: evals[k] for k in ("val_ce", "val_loss", "val_ppl") if k in evals})
    return out


def _model_card(run_cfg: dict[str, Any], ckpt: ZeroCheckpoint, dtype: str,
                n_params: int, metrics: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    t, d = run_cfg.get("train", {}), run_cfg.get("data", {})
    samples = (ckpt.step * t.get("micro_batch_size", 0) * t.get("grad_accum", 0)
               * ckpt.world_size)
    tokens = samples * (d.get("encoder_length", 0) + d.get("decoder_length", 0))
    info = {"training_steps": ckpt.step, "samples_seen": samples, "tokens_seen": tokens,
            "parameters": n_params, "dtype": dtype, "world_size": ckpt.world_size,
            "zero_stage": ckpt.stage, "source": str(ckpt.path), **metrics}
    rows = "\n".join(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
                     for k, v in info.items())
    text = (f"# LiquidFoundationModelOptimized\n\nConverted from the training checkpoint "
            f"`{ckpt.path}` by `python -m liquid_dist.convert`. Tokens seen counts encoder and "
            "decoder positions (step x global batch x both lengths); losses are the last "
            "logged before the checkpoint.\n\n| | |\n|---|---|\n" + rows + "\n\n"
            "```python\nfrom liquid_dist.model import LiquidFoundationModelOptimized\n"
            "model = LiquidFoundationModelOptimized.from_pretrained(\"THIS_DIR\")\n```\n\n"
            "```\npython -m liquid_dist.generate THIS_DIR --prompt \"To be, or not\"\n```\n")
    return text, info


def convert(run_dir: Union[str, Path], output: Union[str, Path], *, step: Optional[int] = None,
            dtype: str = "fp32", max_shard_size: Union[str, int] = "5GB",
            overwrite: bool = False, progress: bool = True) -> Path:
    """Convert a training checkpoint to the single-GPU format; returns ``output``.

    Raises CheckpointError (incomplete / inconsistent checkpoint) and
    FileExistsError (``output`` exists and ``overwrite`` is False) before
    writing anything; the files are written to a sibling ``.partial``
    directory and moved into place at the end.
    """
    from tqdm import tqdm

    out = Path(output)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists: pass --overwrite to replace it")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    limit = parse_size(max_shard_size) if isinstance(max_shard_size, str) else max_shard_size
    path = resolve_checkpoint(run_dir, step)
    for need in (CONFIG_FILE, TOKENIZER_NAME):
        if not (path / need).is_file():
            raise CheckpointError(f"{path}: missing {need}")
    run_cfg = yaml.safe_load((path / CONFIG_FILE).read_text())
    try:
        model_cfg = model_config_from_dict(run_cfg["model"])
    except ConfigError as exc:
        raise CheckpointError(f"{path / CONFIG_FILE}: {exc}") from exc
    ckpt = open_checkpoint(path)
    names = _check_against_model(ckpt, model_cfg)
    target = DTYPES[dtype]

    entries = []
    for k, shape in ckpt.shapes.items():
        src = ckpt._buffers[k].dtype if k in ckpt._buffers else torch.float32
        entries.append((names[k], _out_dtype(src, target), tuple(shape)))
    source = {names[k]: k for k in ckpt.shapes}
    shards = _plan_shards(entries, limit)
    files = ([WEIGHTS_NAME] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    tied = {_strip(a): _strip(b) for a, b in ckpt.shared.items()}
    metadata = {"format": "pt", "tied_weights": json.dumps(tied, sort_keys=True)}

    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    bar = tqdm(total=sum(math.prod(e[2]) * e[1].itemsize for e in entries), unit="B",
               unit_scale=True, desc=f"convert {path.name}", disable=not progress,
               file=sys.stderr)
    try:
        for fname, shard in zip(files, shards, strict=True):
            with open(tmp / fname, "wb") as fh:
                fh.write(_header(shard, metadata))
                for name, out_dtype, shape in shard:
                    t = ckpt.tensor(source[name]).to(out_dtype).contiguous()
                    if tuple(t.shape) != shape:
                        raise CheckpointError(f"{name}: gathered shape {tuple(t.shape)}, "
                                              f"expected {shape}")
                    fh.write(t.reshape(-1).view(torch.uint8).numpy().data)  # no copy
                    bar.update(t.numel() * t.element_size())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(math.prod(e[2]) * e[1].itemsize
                                                for e in entries),
                              "tied_weights": tied},
                 "weight_map": {e[0]: f for f, s in zip(files, shards, strict=True)
                                for e in s}}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    (tmp / CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(model_cfg), indent=2) + "\n")
    shutil.copy2(path / TOKENIZER_NAME, tmp / TOKENIZER_NAME)
    gen = {"decoder_start_token_id": model_cfg.decoder_start_token_id,
           "pad_token_id": model_cfg.pad_token_id, "eos_token_id": model_cfg.eos_token_id,
           "max_new_tokens": model_cfg.max_decoder_length, "do_sample": False,
           "temperature": 1.0, "top_k": None, "top_p": None, "num_beams": 1}
    (tmp / GENERATION_CONFIG_NAME).write_text(json.dumps(gen, indent=2) + "\n")
    n_params = sum(math.prod(e[2]) for e in entries)
    run_root = path.parent.parent if path.parent.name == CHECKPOINTS else path.parent
    card, _ = _model_card(run_cfg, ckpt, dtype, n_params, _final_metrics(run_root, ckpt.step))
    (tmp / MODEL_CARD_NAME).write_text(card)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="liquid-convert", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="run directory, its checkpoints/ directory, or a checkpoint")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--output", "-o", required=True, help="directory to write")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--max-shard-size", default="5GB",
                   help="split the weights into files of at most this size (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        out = convert(args.run_dir, args.output, step=args.step, dtype=args.dtype,
                      max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                      progress=not args.quiet)
    except (CheckpointError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
