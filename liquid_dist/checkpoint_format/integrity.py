"""A checkpoint's integrity: the checksums written with it, one rank's share of checking
them, the newest checkpoint that verifies, and ``python -m liquid_dist.checkpoint_format
verify``."""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Optional, Union

from liquid_dist.checkpoint_format.layout import (
    CHECKPOINTS,
    CHECKSUMS,
    DONE_PREFIX,
    LATEST,
    TAG_PATTERN,
    TRAINER_STATE,
    CheckpointError,
    CheckpointRef,
    latest_tag,
    tag_for,
)


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
    latest = latest_tag(ckpt_dir)
    if latest is None:
        return None, []
    last = latest if before is None else min(latest, tag_for(before - 1))
    tags = sorted((p.name for p in ckpt_dir.iterdir()
                   if p.is_dir() and TAG_PATTERN.match(p.name) and p.name <= last), reverse=True)
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
        checkpoints = sorted(p for p in ckpt_dir.iterdir()
                             if p.is_dir() and TAG_PATTERN.match(p.name)
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
