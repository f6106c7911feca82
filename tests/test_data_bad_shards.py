"""Bad shards: each kind is counted with the shard's name (skip) or raised naming it (fail).

Never a hang: every test runs under a timeout, and the loader still yields its
full epoch when bad samples are skipped.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import TMP, data_config, shard_dir

from liquid_dist.data import DataError, build_train_loader

pytestmark = pytest.mark.timeout(120)
SMALL = "task-00000/train-000002.tar"  # the small shard: 25 documents

Members = list[tuple[str, bytes]]


def _members(path: Path) -> Members:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def _write(path: Path, members: Members) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _flip_ids_byte(m: Members) -> Members:
    name, data = m[2]
    return m[:2] + [(name, data[:3] + bytes([data[3] ^ 0x40]) + data[4:])] + m[3:]


def _as_u32(m: Members) -> Members:
    name, data = m[0]
    wide = np.frombuffer(data, "<u2").astype("<u4").tobytes()
    return [(name.replace(".ids.u16", ".ids.u32"), wide)] + m[1:]


def _bad_json(m: Members) -> Members:
    return m[:1] + [(m[1][0], b"{not json")] + m[2:]


def _id_out_of_range(m: Members) -> Members:
    ids = np.full(5, 65000, dtype="<u2").tobytes()
    meta = json.dumps({"source": "x", "doc": 0, "tokens": 5, "crc32": zlib.crc32(ids)})
    return [(m[0][0], ids), (m[1][0], meta.encode())] + m[2:]


def _first_four_samples(m: Members) -> Members:
    return m[:8]


def _damage(name: str, change: Callable[[Path], None]) -> Path:
    out = TMP / f"bad_{name}"
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(shard_dir(), out)
    change(out / SMALL)
    return out


def _rewrite(fn: Callable[[Members], Members]) -> Callable[[Path], None]:
    return lambda path: _write(path, fn(_members(path)))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(15_000)


def _garbage(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 40)


CASES = [
    ("truncated", _truncate, "unreadable_shard"),
    ("not_a_tar", _garbage, "unreadable_shard"),
    ("short", _rewrite(_first_four_samples), "short_shard"),
    ("corrupt_sample", _rewrite(_flip_ids_byte), "corrupt"),
    ("wrong_dtype", _rewrite(_as_u32), "wrong_dtype"),
    ("bad_json", _rewrite(_bad_json), "bad_json"),
    ("id_out_of_range", _rewrite(_id_out_of_range), "id_out_of_range"),
]


def _loader(directory: Path, policy: str, *, alone: bool = False, num_workers: int = 2):
    """Two shards (the damaged one and a good one), or the damaged one alone."""
    good = directory / "task-00000" / "train-000000.tar"
    shards = [str(directory / SMALL)] + ([] if alone else [str(good)])
    cfg = data_config(train_shards=shards, num_workers=num_workers, batches_per_epoch=12,
                      bad_sample_policy=policy)
    return build_train_loader(cfg, rank=0, world_size=1, batch_size=4, seed=0)


@pytest.mark.parametrize("name, change, reason", CASES, ids=[c[0] for c in CASES])
def test_skip_counts_the_bad_data_under_the_shard_name(name, change, reason):
    directory = _damage(name, change)
    loader = _loader(directory, "skip")
    assert sum(1 for _ in loader) == len(loader) == 12
    bad = loader.stats()["bad_samples"]
    assert list(bad) == [str(directory / SMALL)]
    assert bad[str(directory / SMALL)].get(reason, 0) >= 1, bad


@pytest.mark.parametrize("name, change, reason", CASES, ids=[c[0] for c in CASES])
def test_fail_raises_naming_the_shard(name, change, reason):
    directory = _damage(f"{name}_fail", change)
    with pytest.raises(DataError, match=SMALL):
        list(_loader(directory, "fail"))


def test_a_source_without_any_valid_sample_raises_instead_of_hanging():
    def all_wide(path: Path) -> None:
        members = _members(path)
        out: Members = []
        for i in range(0, len(members), 2):
            out += _as_u32(members[i: i + 2])
        _write(path, out)

    directory = _damage("all_bad", all_wide)
    with pytest.raises(DataError, match="no valid sample"):
        list(_loader(directory, "skip", alone=True))
    with pytest.raises(DataError, match="no valid sample"):
        list(_loader(directory, "skip", alone=True, num_workers=0))
