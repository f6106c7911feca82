"""How a rank's DeepSpeed checkpoint files are serialised: streamed to their files
(synchronous saves), or copied into host memory while the step loop waits and
serialised, written, made durable and hashed in a thread (``train.async_checkpoint``).

Both go through a DeepSpeed checkpoint engine of this module in place of the
engine's own, with ``torch.save`` into a file object and DeepSpeed's own
serialisation setting, so both give the same bytes (``torch.save`` to a path
would name the archive inside after the file, to a file object ``archive``).
:class:`FileStream` writes each file DeepSpeed saves. :class:`HostCapture` takes a
snapshot instead: every tensor storage of the state goes into the rank's
:class:`HostStage` (page-locked memory when the storage is on a GPU, so the copy
runs at the link's speed and does not stop the stream), the rest of the state is
pickled around them. :class:`BackgroundWrite` then, in a thread, rebuilds each file's state on
the copies and saves it into its file with ``torch.save`` (each storage's
original device recorded by a registered location tagger), fsyncs the file,
hashes the bytes it wrote (no read back) and writes the rank's completion
marker; the protocol around it (commit, ``latest``, failures on every rank) is
liquid_dist.train.checkpoint's.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

from liquid_dist.atomic import write_atomic

# data_ptr of a staged copy -> location tag of the storage it copies (torch.save asks
# the registered taggers, lowest priority number first, for each storage it writes)
_TAGS: dict[int, str] = {}
_TAGGER_PRIORITY = -100  # before torch's own (cpu 10, cuda 20, ...)


def _staged_tag(storage: Any) -> Optional[str]:
    return _TAGS.get(storage.data_ptr()) if storage.device.type == "cpu" else None


torch.serialization.register_package(_TAGGER_PRIORITY, _staged_tag, lambda obj, location: None)


def _host_bytes(size: int, pin: bool) -> torch.Tensor:
    """``size`` bytes of host memory, page-locked (``cudaHostRegister``, exact size, unlike
    the caching host allocator's powers of two) when ``pin``; unlocked when collected."""
    t = torch.empty(size, dtype=torch.uint8)
    if pin:
        err = int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), size, 0))
        if err:
            raise RuntimeError(f"page-locking {size} bytes of host memory for an asynchronous "
                               f"checkpoint failed: cudaError {err}")
        weakref.finalize(t, torch.cuda.cudart().cudaHostUnregister, t.data_ptr())
    return t


class HostStage:
    """A rank's host copies of the tensor storages of a save, kept from save to save: each
    storage gets a slot of exactly its size, page-locked when the storage is on a GPU
    (the copy is then asynchronous on the current stream; :meth:`wait` waits for it). A
    later save stages the same storages in the same order and reuses the slots."""

    def __init__(self) -> None:
        self._slots: list[torch.Tensor] = []
        self._pinned: list[bool] = []
        self._used = 0
        self._copying: dict[torch.device, Any] = {}  # device copied from -> CUDA event

    @property
    def nbytes(self) -> int:
        return sum(slot.numel() for slot in self._slots)

    def reset(self) -> None:
        for slot in self._slots:
            _TAGS.pop(slot.data_ptr(), None)
        self._used = 0
        self._copying = {}

    def stage(self, storage: torch.UntypedStorage) -> torch.UntypedStorage:
        """A host copy of ``storage`` (an empty one is its own copy)."""
        size = storage.nbytes()
        if size == 0:
            return storage
        pin = storage.device.type == "cuda"
        i = self._used
        if i == len(self._slots):
            self._slots.append(_host_bytes(size, pin))
            self._pinned.append(pin)
        elif self._slots[i].numel() != size or self._pinned[i] != pin:
            _TAGS.pop(self._slots[i].data_ptr(), None)
            self._slots[i], self._pinned[i] = _host_bytes(size, pin), pin
        self._used += 1
        slot = self._slots[i]
        source = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
        slot.copy_(source, non_blocking=pin)
        if pin:
            self._copying.setdefault(storage.device, torch.cuda.Event())
        _TAGS[slot.data_ptr()] = torch.serialization.location_tag(storage)
        return slot.untyped_storage()

    def copied(self) -> None:
        """After the last :meth:`stage` of a save: mark the end of the device copies."""
        for device, event in self._copying.items():
            event.record(torch.cuda.current_stream(device))

    def wait(self) -> None:
        """Until the copies :meth:`copied` marked are in host memory."""
        for event in self._copying.values():
            event.synchronize()


class _Snapshot(pickle.Pickler):
    """Pickles a state with each tensor storage replaced by a key of its staged copy
    (the way ``torch.save`` keys storages: one per storage, shared by its views)."""

    def __init__(self, file: Any, stage: HostStage):
        super().__init__(file, protocol=2)
        self.stage = stage
        self.storages: dict[str, torch.UntypedStorage] = {}
        self._keys: dict[int, str] = {}

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, torch.storage.TypedStorage):
            untyped, dtype = obj._untyped_storage, obj.dtype
        elif isinstance(obj, torch.UntypedStorage):
            untyped, dtype = obj, None
        else:
            return None
        key = self._keys.get(untyped._cdata)
        if key is None:
            key = self._keys[untyped._cdata] = str(len(self._keys))
            self.storages[key] = self.stage.stage(untyped)
        return (key, dtype)


class _Rebuild(pickle.Unpickler):
    def __init__(self, file: Any, storages: dict[str, torch.UntypedStorage]):
        super().__init__(file)
        self.storages = storages

    def persistent_load(self, pid: Any) -> Any:
        key, dtype = pid
        storage = self.storages[key]
        return storage if dtype is None else torch.storage.TypedStorage(
            wrap_storage=storage, dtype=dtype, _internal=True)


@dataclass
class StagedFile:
    """One file of a save in host memory: its state pickled around its staged storages."""

    path: str
    pickled: bytes
    storages: dict[str, torch.UntypedStorage]

    def state(self) -> Any:
        """The state, its tensors on the staged copies."""
        return _Rebuild(io.BytesIO(self.pickled), self.storages).load()


class _HashingFile:
    """A binary file object that hashes and counts what is written through it."""

    def __init__(self, fh: Any):
        self.fh, self.size, self.digest = fh, 0, hashlib.sha256()

    def write(self, b: Any) -> int:
        self.digest.update(b)
        n = self.fh.write(b)
        self.size += n
        return n

    def flush(self) -> None:
        self.fh.flush()


class FileStream(CheckpointEngine):
    """A checkpoint engine in place of a DeepSpeed engine's own (``engine``) for a save:
    ``save`` serialises into the file, through a file object; loading is the engine's own.
    """

    def __init__(self, engine: CheckpointEngine):
        super().__init__()
        self.name = "liquid_dist.FileStream"
        self.engine = engine

    def create(self, info: Any) -> None:
        pass

    def _serialise(self, state_dict: Any, fh: Any) -> None:
        torch.save(state_dict, fh, _use_new_zipfile_serialization=getattr(
            self.engine, "zipfile_serialization", True))

    def save(self, state_dict: Any, path: str) -> None:
        with open(path, "wb") as fh:
            self._serialise(state_dict, fh)

    def load(self, path: str, map_location: Any = None) -> Any:
        return self.engine.load(path, map_location=map_location)

    def commit(self, info: Any) -> bool:
        return True


class HostCapture(FileStream):
    """:class:`FileStream` that stages each file's storages into ``stage`` and records a
    :class:`StagedFile` instead of writing it."""

    def __init__(self, engine: CheckpointEngine, stage: HostStage):
        super().__init__(engine)
        self.name = "liquid_dist.HostCapture"
        self.host = stage
        self.files: list[StagedFile] = []

    def save(self, state_dict: Any, path: str) -> None:
        out = io.BytesIO()
        snapshot = _Snapshot(out, self.host)
        snapshot.dump(state_dict)
        self.files.append(StagedFile(str(path), out.getvalue(), snapshot.storages))


def save_through(engine: Any, through: FileStream, save: Callable[[], None]) -> None:
    """Run ``save`` (an ``engine.save_checkpoint`` call) with ``through`` as the DeepSpeed
    engine's checkpoint engine."""
    own = engine.checkpoint_engine
    engine.checkpoint_engine = through
    try:
        save()
    finally:
        engine.checkpoint_engine = own


def capture(engine: Any, stage: HostStage, save: Callable[[], None]) -> HostCapture:
    """Run ``save`` with its files captured into ``stage`` (its slots reused): the capture,
    whose ``files`` :class:`BackgroundWrite` writes."""
    stage.reset()
    through = HostCapture(engine.checkpoint_engine, stage)
    save_through(engine, through, save)
    stage.copied()
    return through


class BackgroundWrite:
    """Writes the files of a capture under ``root`` in a thread: each file serialised,
    written, fsynced and hashed as it is written, then ``before_marker()`` (fault
    injection), then the completion ``marker`` (durable). ``digests`` ({name relative
    to root: {size, sha256}}) once done; ``error`` names the file that failed."""

    def __init__(self, captured: HostCapture, root: Path, marker: Path, marker_text: str,
                 before_marker: Callable[[], None]):
        self.captured, self.root = captured, root
        self.marker, self.marker_text, self.before_marker = marker, marker_text, before_marker
        self.digests: dict[str, dict[str, Any]] = {}
        self.error: Optional[str] = None
        self._thread = threading.Thread(target=self._run, name="checkpoint-writer",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        where = str(self.root)
        try:
            self.captured.host.wait()
            for staged in self.captured.files:
                where = staged.path
                Path(staged.path).parent.mkdir(parents=True, exist_ok=True)
                with open(staged.path, "wb") as fh:
                    out = _HashingFile(fh)
                    self.captured._serialise(staged.state(), out)
                    fh.flush()
                    os.fsync(fh.fileno())
                name = str(Path(staged.path).relative_to(self.root))
                self.digests[name] = {"size": out.size, "sha256": out.digest.hexdigest()}
            where = str(self.marker)
            self.before_marker()
            write_atomic(self.marker, self.marker_text, durable=True)
        except Exception as exc:  # reported to every rank at the next step boundary
            self.error = f"{where}: {type(exc).__name__}: {exc}"

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self) -> None:
        self._thread.join()
