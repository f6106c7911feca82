"""How a rank's DeepSpeed checkpoint files are serialised: streamed to their files
(synchronous saves) or captured into host memory while the step loop waits, then
written, made durable and hashed in a thread (``train.async_checkpoint``).

Both go through a DeepSpeed checkpoint engine of this module in place of the
engine's own, with ``torch.save`` into a file object and DeepSpeed's own
serialisation setting, so both give the same bytes (``torch.save`` to a path
would name the archive inside after the file, to a buffer ``archive``).
:class:`FileStream` writes each file DeepSpeed saves; :class:`HostCapture`
serialises it into the rank's :class:`HostBuffer` instead. The buffer is one per
rank, kept from save to save (it grows in chunks to the largest share once,
then is reused). :class:`BackgroundWrite` then writes each
captured file, fsyncs it, hashes the bytes it wrote (no read back) and writes
the rank's completion marker, in a thread; the protocol around it (commit,
``latest``, failures on every rank) is liquid_dist.train.checkpoint's.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

from liquid_dist.atomic import write_atomic


class HostBuffer:
    """Host memory with the ``write`` of a file, for ``torch.save``: chunks of ``chunk``
    bytes, added as the writes need them and kept for the next use, so it grows without
    copying and holds at most one chunk more than the largest contents."""

    def __init__(self, chunk: int = 64 << 20) -> None:
        self.chunk = chunk
        self.chunks: list[bytearray] = []
        self.size = 0

    @property
    def capacity(self) -> int:
        return len(self.chunks) * self.chunk

    def reset(self) -> None:
        self.size = 0

    def write(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        done = 0
        while done < view.nbytes:
            index, offset = divmod(self.size, self.chunk)
            if index == len(self.chunks):
                self.chunks.append(bytearray(self.chunk))
            take = min(self.chunk - offset, view.nbytes - done)
            self.chunks[index][offset:offset + take] = view[done:done + take]
            done += take
            self.size += take
        return done

    def flush(self) -> None:
        pass

    def pieces(self, start: int, end: int) -> Iterator[memoryview]:
        """The bytes [start, end) as views of the chunks, in order."""
        while start < end:
            index, offset = divmod(start, self.chunk)
            take = min(self.chunk - offset, end - start)
            yield memoryview(self.chunks[index])[offset:offset + take]
            start += take


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
    """:class:`FileStream` that serialises into ``buffer`` and records (path, start, end)
    of each file instead of writing it."""

    def __init__(self, engine: CheckpointEngine, buffer: HostBuffer):
        super().__init__(engine)
        self.name = "liquid_dist.HostCapture"
        self.buffer = buffer
        self.files: list[tuple[str, int, int]] = []

    def save(self, state_dict: Any, path: str) -> None:
        start = self.buffer.size
        self._serialise(state_dict, self.buffer)
        self.files.append((str(path), start, self.buffer.size))


def save_through(engine: Any, through: FileStream, save: Callable[[], None]) -> None:
    """Run ``save`` (an ``engine.save_checkpoint`` call) with ``through`` as the DeepSpeed
    engine's checkpoint engine."""
    own = engine.checkpoint_engine
    engine.checkpoint_engine = through
    try:
        save()
    finally:
        engine.checkpoint_engine = own


def capture(engine: Any, buffer: HostBuffer, save: Callable[[], None]) -> list[tuple[str, int,
                                                                                      int]]:
    """Run ``save`` with its files captured into ``buffer`` (emptied first): the (path,
    start, end) of each file."""
    buffer.reset()
    through = HostCapture(engine.checkpoint_engine, buffer)
    save_through(engine, through, save)
    return through.files


class BackgroundWrite:
    """Writes captured files under ``root`` in a thread: each file written, fsynced and
    hashed from memory, then ``before_marker()`` (fault injection), then the completion
    ``marker`` (durable). ``digests`` ({name relative to root: {size, sha256}}) once
    done; ``error`` names the file that failed."""

    def __init__(self, buffer: HostBuffer, files: list[tuple[str, int, int]], root: Path,
                 marker: Path, marker_text: str, before_marker: Callable[[], None]):
        self.buffer, self.files, self.root = buffer, files, root
        self.marker, self.marker_text, self.before_marker = marker, marker_text, before_marker
        self.digests: dict[str, dict[str, Any]] = {}
        self.error: Optional[str] = None
        self._thread = threading.Thread(target=self._run, name="checkpoint-writer",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        where = str(self.root)
        try:
            for path, start, end in self.files:
                where = path
                digest = hashlib.sha256()
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                with open(path, "wb") as fh:
                    for piece in self.buffer.pieces(start, end):
                        fh.write(piece)
                        digest.update(piece)
                    fh.flush()
                    os.fsync(fh.fileno())
                name = str(Path(path).relative_to(self.root))
                self.digests[name] = {"size": end - start, "sha256": digest.hexdigest()}
            where = str(self.marker)
            self.before_marker()
            write_atomic(self.marker, self.marker_text, durable=True)
        except Exception as exc:  # reported to every rank at the next step boundary
            self.error = f"{where}: {type(exc).__name__}: {exc}"

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self) -> None:
        self._thread.join()
