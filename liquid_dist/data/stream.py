"""Virtual streams: shard plan, reading, shuffle buffer, packing, objectives.

The data order does not depend on the world size. ``S`` = the global batch in
examples (micro-batch x grad_accum x world size). Virtual stream ``s`` (0 <= s
< S) is a pure function of (seed, s), the shards and the sources the
:class:`Mixer` assigns it; global step ``i`` of an epoch takes exactly one
example from every stream, all of the step's objective (the epoch's drawn
from (seed, epoch)). Streams go on across epochs: an epoch counts steps. The
step's S examples form W * GA micro-batches
of m = micro_batch_size consecutive streams: micro-batch ``j = k * W + r`` (the
k-th micro-batch of rank r) holds streams ``[j * m, (j + 1) * m)``. A stream's
whole position is a small JSON-able cursor:

* the shard plan: each source's shards are cut into ``units`` (a shard, or a
  ``1/k`` slice of one when the source has fewer shards than S: k =
  ceil(S / shards), slice j holds the samples whose index is j mod k). Visit
  v of stream s reads unit ``P[s + v * S]`` of the endless sequence P =
  perm_0 + perm_1 + ..., perm_c a permutation of the units seeded by (seed,
  source name, c) (identity without shuffling): cycle c is the source's own
  epoch. Streams never run dry, so every step is full: equal batch counts on
  every rank by construction;
* the reading position: visit index and raw sample index in that shard;
* the shuffle buffer as references (shard, sample index), the document being
  packed as (shard, sample index, token offset), and the numpy generator
  state. Restoring re-reads just those documents and skips the raw samples
  already read in the current shard (no decoding, packing or tokenising).

A rank's loader workers split its streams: worker t of w takes positions t,
t + w, ... of each of the rank's micro-batches (a stream stays in one worker
for good) and yields one partial micro-batch per micro-batch.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import webdataset as wds

from liquid_dist.data.errors import BadSample, DataError
from liquid_dist.data.objectives import ExampleShape, collate, prefix_lm, span_corruption
from liquid_dist.data.shards import decode_sample

log = logging.getLogger(__name__)
_TAG_PLAN = 0x504C414E
_TAG_STREAM = 0x5354524D
_TAG_OBJECTIVE = 0x4F424A45
_TAG_MIX = 0x4D495845


@dataclass(frozen=True)
class SourceSpec:
    name: str
    urls: tuple[str, ...]
    shard_documents: tuple[Optional[int], ...]
    """Documents per shard from the manifest (None: unknown) to detect short shards."""
    suffix: str
    """``ids.u16`` or ``ids.u32``: the member every sample must carry."""
    tokens: Optional[int] = None
    """What one pass over the source gives: its manifests' tokens and one EOS per document
    (None: a shard without a manifest)."""
    max_repetition: Optional[float] = None
    """The most epochs of the source a run may read (liquid_dist.data.mixture)."""


@dataclass(frozen=True)
class Stage:
    """A mixture from global step ``start_step`` on: each source's share of the examples
    (aligned with the stream's sources; summing to 1)."""

    start_step: int
    shares: tuple[float, ...]


@dataclass(frozen=True)
class StreamSpec:
    """Everything a worker needs; plain data, cheap to send to worker processes."""

    sources: tuple[SourceSpec, ...]
    stages: tuple[Stage, ...]
    """The mixture by global step: the first from step 0 (one stage without data.stages)."""
    objectives: tuple[str, ...]
    objective_probs: tuple[float, ...]
    shapes: tuple[ExampleShape, ...]
    """Each objective's raw chunk length and (encoder, decoder) batch widths."""
    noise_density: float
    mean_noise_span_length: float
    encoder_length: int
    decoder_length: int
    pad_id: int
    eos_id: int
    decoder_start_ids: tuple[int, ...]
    """The decoder start token of each objective (tokenizer.DECODER_START_IDS)."""
    sentinel_ids: tuple[int, ...]
    vocab_size: int
    batch_size: int
    """Examples per micro-batch (m)."""
    steps_per_epoch: int
    """Global steps per epoch: the same for every world size."""
    shuffle: bool
    shuffle_buffer: int
    policy: str
    seed: int
    rank: int
    world_size: int
    grad_accum: int

    @property
    def streams(self) -> int:
        """S: the global batch in examples, one virtual stream per example of a step."""
        return self.batch_size * self.grad_accum * self.world_size

    def micro_streams(self, k: int) -> range:
        """The streams of this rank's k-th micro-batch of a step (micro-batch k*W + rank)."""
        j = k * self.world_size + self.rank
        return range(j * self.batch_size, (j + 1) * self.batch_size)

    def stage(self, global_step: int) -> Stage:
        """The stage of global step ``global_step``."""
        return [s for s in self.stages if s.start_step <= global_step][-1]

    def owned_streams(self) -> list[int]:
        """Every stream this rank reads, in micro-batch order."""
        return [s for k in range(self.grad_accum) for s in self.micro_streams(k)]

    def epoch_objectives(self, epoch: int) -> np.ndarray:
        """The objective of each step of ``epoch`` (every example of a step has it): drawn
        with the objectives' weights from (seed, epoch)."""
        if len(self.objectives) == 1:
            return np.zeros(self.steps_per_epoch, dtype=np.int64)
        return _rng(self.seed, epoch, _TAG_OBJECTIVE).choice(
            len(self.objectives), size=self.steps_per_epoch,
            p=np.array(self.objective_probs, dtype=np.float64))


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(
        [k % (1 << 64) for k in key])))


def source_key(name: str) -> int:
    """A source's key in the seeds of its shard plan: from its name, so that adding a
    source leaves the others' plans as they were."""
    return zlib.crc32(name.encode("utf-8"))


class UnitPlan:
    """Which (shard, slice) virtual stream g reads on its v-th visit of a source."""

    def __init__(self, num_shards: int, streams: int, shuffle: bool, seed: int, source: int):
        self.slices = max(1, -(-streams // num_shards))
        self.units = num_shards * self.slices
        self.streams = streams
        self.shuffle = shuffle
        self._key = (seed, source, _TAG_PLAN)
        self._cycle = -1
        self._perm: Optional[np.ndarray] = None

    def unit(self, g: int, visit: int) -> tuple[int, int]:
        """(shard index, slice index) of visit ``visit`` of stream ``g``."""
        cycle, r = divmod(g + visit * self.streams, self.units)
        u = r
        if self.shuffle:
            if cycle != self._cycle:
                self._perm = _rng(*self._key, cycle).permutation(self.units)
                self._cycle = cycle
            assert self._perm is not None
            u = int(self._perm[r])
        return divmod(u, self.slices)


class Mixer:
    """Which source each example of a step draws from.

    Within a stage, the examples of each objective go to the sources in turn by
    a greedy rule: the next one to the source furthest behind its share (the
    largest (n + 1) x share - count after n examples; the lowest index on a
    tie), so every source stays within two examples of its share of the
    objective's examples. A step's S picks, in that order, reach the streams
    through a permutation seeded by (seed, global step). The counts per
    objective and source are the state: global (the same on every rank),
    restarted at each stage's first step.
    """

    def __init__(self, spec: StreamSpec, state: Optional[dict[str, Any]] = None):
        self.spec = spec
        self.stage_start = -1
        self.counts = self._zeros()
        if state is not None:
            self.stage_start = state["stage"]
            self.counts = [[state["counts"].get(o, {}).get(src.name, 0) for src in spec.sources]
                           for o in spec.objectives]

    def _zeros(self) -> list[list[int]]:
        return [[0] * len(self.spec.sources) for _ in self.spec.objectives]

    def state(self) -> dict[str, Any]:
        """JSON-able: the first step of the stage counted and the counts by name."""
        names = [src.name for src in self.spec.sources]
        return {"stage": self.stage_start,
                "counts": {o: dict(zip(names, row, strict=True))
                           for o, row in zip(self.spec.objectives, self.counts, strict=True)}}

    def step(self, global_step: int, o: int) -> np.ndarray:
        """The source index of each stream's example in global step ``global_step``, whose
        objective is ``o``."""
        spec = self.spec
        stage = spec.stage(global_step)
        if stage.start_step != self.stage_start:
            self.stage_start = stage.start_step
            self.counts = self._zeros()
        counts, shares = self.counts[o], stage.shares
        if len(shares) == 1:
            counts[0] += spec.streams
            return np.zeros(spec.streams, dtype=np.int64)
        n = sum(counts)
        picks = [0] * spec.streams
        for q in range(spec.streams):
            n += 1
            j, best = 0, n * shares[0] - counts[0]
            for i in range(1, len(shares)):
                behind = n * shares[i] - counts[i]
                if behind > best:
                    j, best = i, behind
            counts[j] += 1
            picks[q] = j
        order = _rng(spec.seed, global_step, _TAG_MIX).permutation(spec.streams)
        return np.array(picks, dtype=np.int64)[order]


def shard_samples(url: str) -> Iterator[dict[str, Any]]:
    """Raw WebDataset samples of one shard (local path, ``pipe:`` command or URL)."""
    return iter(wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples()))


class Stats:
    """Per-batch deltas of the counters the loader aggregates and reports."""

    def __init__(self, n_sources: int, n_objectives: int):
        self.tokens = [0] * n_sources
        self.examples = [0] * n_sources
        self.objectives = [0] * n_objectives
        self.bad: dict[str, dict[str, int]] = {}
        self._warned: set[tuple[str, str]] = set()

    def bad_sample(self, url: str, reason: str, detail: str) -> None:
        per = self.bad.setdefault(url, {})
        per[reason] = per.get(reason, 0) + 1
        if (url, reason) not in self._warned:
            self._warned.add((url, reason))
            log.warning("bad data in %s: %s (skipped and counted; later ones of this kind "
                        "in this shard are only counted)", url, detail)

    def take(self) -> dict[str, Any]:
        out = {"tokens": self.tokens, "examples": self.examples, "objectives": self.objectives,
               "bad": self.bad}
        self.tokens = [0] * len(self.tokens)
        self.examples = [0] * len(self.examples)
        self.objectives = [0] * len(self.objectives)
        self.bad = {}
        return out


class SourceStream:
    """Endless stream of documents of one source for one virtual stream, then of tokens.

    ``take(n)`` returns the next n tokens of the concatenation doc + [EOS] +
    doc + [EOS] + ... where documents come out of the shuffle buffer.
    """

    def __init__(self, spec: StreamSpec, index: int, g: int, rng: np.random.Generator,
                 stats: Stats):
        self.spec, self.src, self.g = spec, spec.sources[index], g
        self.plan = UnitPlan(len(self.src.urls), spec.streams, spec.shuffle, spec.seed,
                             source_key(self.src.name))
        self.rng, self.stats = rng, stats
        self.visit = 0
        self.pos = 0
        self.visit_docs = 0
        self.dry_units: set[int] = set()
        """The units (shard x slices + slice) visited without a valid sample since the last
        visit that gave one: all of them means the source has no valid sample left."""
        self.buffer: list[tuple[tuple[int, int], np.ndarray]] = []
        self.cur: Optional[tuple[tuple[int, int], np.ndarray]] = None
        self.off = 0
        self._samples: Optional[Iterator[dict[str, Any]]] = None
        self._shard = self._slice = 0

    # ---------------------------------------------------------------- cursor

    def cursor(self) -> dict[str, Any]:
        return {"visit": self.visit, "pos": self.pos, "visit_docs": self.visit_docs,
                "dry_units": sorted(self.dry_units),
                "buffer": [i for ref, _ in self.buffer for i in ref],
                "cur": None if self.cur is None else [*self.cur[0], self.off]}

    def restore(self, cursor: dict[str, Any]) -> None:
        self.visit, self.pos = cursor["visit"], cursor["pos"]
        self.visit_docs, self.dry_units = cursor["visit_docs"], set(cursor["dry_units"])
        flat = cursor["buffer"]
        buffer_refs = [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
        refs = list(buffer_refs)
        if cursor["cur"] is not None:
            refs.append(tuple(cursor["cur"][:2]))
        docs = self._reread(refs)
        self.buffer = [(ref, docs[ref]) for ref in buffer_refs]
        if cursor["cur"] is not None:
            ref = tuple(cursor["cur"][:2])
            self.cur, self.off = (ref, docs[ref]), cursor["cur"][2]
        self._samples = None

    def _reread(self, refs: list[tuple[int, int]]) -> dict[tuple[int, int], np.ndarray]:
        """Documents named by (shard, sample index), read again from their shards."""
        wanted: dict[int, set[int]] = {}
        for shard, idx in refs:
            wanted.setdefault(shard, set()).add(idx)
        docs = {}
        for shard, idxs in sorted(wanted.items()):
            url = self.src.urls[shard]
            last = max(idxs)
            try:
                for idx, sample in enumerate(shard_samples(url)):
                    if idx in idxs:
                        docs[(shard, idx)] = decode_sample(
                            sample, suffix=self.src.suffix, vocab_size=self.spec.vocab_size)
                    if idx == last:
                        break
            except Exception as exc:
                raise DataError(f"{url}: cannot restore the loader position, the shard changed "
                                f"since the checkpoint ({exc})") from exc
            if any((shard, i) not in docs for i in idxs):
                raise DataError(f"{url}: cannot restore the loader position, the shard has fewer "
                                f"samples than at the checkpoint")
        return docs

    # ---------------------------------------------------------------- reading

    def _bad(self, url: str, reason: str, detail: str) -> None:
        if self.spec.policy == "fail":
            raise DataError(f"{url}: {detail}")
        self.stats.bad_sample(url, reason, f"{reason}: {detail}")

    def _open_visit(self) -> None:
        if len(self.dry_units) >= self.plan.units:
            raise DataError(
                f"source '{self.src.name}': every one of its {self.plan.units} shard units "
                f"gave no valid sample, in a row (stream {self.g}); shards: "
                f"{self.src.urls[:4]}...")
        self._shard, self._slice = self.plan.unit(self.g, self.visit)
        url = self.src.urls[self._shard]
        self._samples = shard_samples(url)
        for skipped in range(self.pos):
            try:
                next(self._samples)
            except Exception as exc:
                raise DataError(f"{url}: cannot restore the loader position, the shard ended "
                                f"or failed after {skipped} of {self.pos} samples ({exc!r})"
                                ) from exc

    def _end_visit(self) -> None:
        if self.visit_docs:
            self.dry_units.clear()
        else:
            self.dry_units.add(self._shard * self.plan.slices + self._slice)
        self.visit += 1
        self.pos = self.visit_docs = 0
        self._samples = None

    def _read(self) -> tuple[tuple[int, int], np.ndarray]:
        """The next valid document of this stream's plan, as ((shard, index), ids)."""
        while True:
            if self._samples is None:
                self._open_visit()
            assert self._samples is not None
            url = self.src.urls[self._shard]
            try:
                sample = next(self._samples)
            except StopIteration:
                expected = self.src.shard_documents[self._shard]
                if expected is not None and self.pos != expected:
                    self._bad(url, "short_shard",
                              f"ended after {self.pos} samples, the manifest lists {expected}")
                self._end_visit()
                continue
            except Exception as exc:
                self._bad(url, "unreadable_shard", f"after {self.pos} samples: "
                          f"{type(exc).__name__}: {exc}")
                self._end_visit()
                continue
            idx = self.pos
            self.pos += 1
            if idx % self.plan.slices != self._slice:
                continue
            try:
                ids = decode_sample(sample, suffix=self.src.suffix,
                                    vocab_size=self.spec.vocab_size)
            except BadSample as exc:
                self._bad(url, exc.reason, f"sample {sample.get('__key__')}: {exc}")
                continue
            self.visit_docs += 1
            return (self._shard, idx), ids

    def _next_doc(self) -> tuple[tuple[int, int], np.ndarray]:
        size = self.spec.shuffle_buffer
        if size <= 0:
            return self._read()
        while len(self.buffer) < size:
            self.buffer.append(self._read())
        k = int(self.rng.integers(len(self.buffer)))
        doc = self.buffer[k]
        self.buffer[k] = self._read()
        return doc

    def take(self, n: int) -> np.ndarray:
        """The next ``n`` tokens of the packed stream (documents separated by EOS)."""
        out = np.empty(n, dtype=np.int64)
        filled = 0
        while filled < n:
            if self.cur is None:
                self.cur, self.off = self._next_doc(), 0
            ids = self.cur[1]
            if self.off < len(ids):
                m = min(len(ids) - self.off, n - filled)
                out[filled: filled + m] = ids[self.off: self.off + m]
                filled += m
                self.off += m
            else:
                out[filled] = self.spec.eos_id
                filled += 1
                self.cur = None
        return out


class VirtualStream:
    """The examples of virtual stream ``stream``: one per global step, across epochs."""

    def __init__(self, spec: StreamSpec, stream: int, stats: Stats,
                 cursor: Optional[dict[str, Any]] = None):
        self.spec, self.stream = spec, stream
        self.rng = _rng(spec.seed, stream, _TAG_STREAM)
        self.stats = stats
        self.sources = [SourceStream(spec, i, stream, self.rng, stats)
                        for i in range(len(spec.sources))]
        if cursor is not None:
            self.rng.bit_generator.state = cursor["rng"]
            for s in self.sources:  # a source added since starts at its beginning
                if s.src.name in cursor["sources"]:
                    s.restore(cursor["sources"][s.src.name])

    def cursor(self) -> dict[str, Any]:
        """The stream's position: its generator and each source's cursor, by source name."""
        return {"rng": self.rng.bit_generator.state,
                "sources": {s.src.name: s.cursor() for s in self.sources}}

    def example(self, o: int, s: int) -> tuple[np.ndarray, np.ndarray]:
        """The stream's next example, of objective ``o``, from source ``s``."""
        spec = self.spec
        n = spec.shapes[o].raw
        tokens = self.sources[s].take(n)
        self.stats.tokens[s] += n
        self.stats.examples[s] += 1
        self.stats.objectives[o] += 1
        if spec.objectives[o] == "span_corruption":
            return span_corruption(tokens, self.rng, noise_density=spec.noise_density,
                                   mean_noise_span_length=spec.mean_noise_span_length,
                                   sentinel_ids=spec.sentinel_ids, eos_id=spec.eos_id)
        return prefix_lm(tokens, encoder_length=spec.encoder_length, eos_id=spec.eos_id)


class WorkerStream:
    """Worker ``worker`` of ``workers`` of ``spec.rank``: its pieces of the rank's
    micro-batches in ``epoch``, from step ``step`` of it, micro-batch ``micro`` on.

    The piece of micro-batch k holds positions worker, worker + workers, ... of
    it (streams ``micro_streams(k)[worker::workers]``). ``cursors`` (by stream)
    restores the streams that had already yielded examples, in this epoch or an
    earlier one; ``mixture`` the :class:`Mixer` state at the start of step ``step``.
    """

    def __init__(self, spec: StreamSpec, epoch: int, worker: int, workers: int, *,
                 step: int = 0, micro: int = 0,
                 cursors: Optional[dict[int, dict[str, Any]]] = None,
                 mixture: Optional[dict[str, Any]] = None):
        self.spec, self.epoch, self.worker, self.workers = spec, epoch, worker, workers
        self.step, self.micro = step, micro
        self.stats = Stats(len(spec.sources), len(spec.objectives))
        self.mixer = Mixer(spec, mixture)
        cursors = cursors or {}
        self.streams = {s: VirtualStream(spec, s, self.stats, cursors.get(s))
                        for k in range(spec.grad_accum)
                        for s in spec.micro_streams(k)[worker::workers]}

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        """(packed piece, meta) pairs; meta = {step, micro, objective, cursors of the
        piece's streams after it, the mixer state after it (at the start of the next step
        after the step's last micro-batch, of this step before), stats delta}.

        Every example of a step has the step's objective, at that objective's fixed
        shape: no padding. The piece is :func:`pack_batch`'s single tensor;
        :func:`unpack_batch` restores it.
        """
        spec = self.spec
        objectives = spec.epoch_objectives(self.epoch)
        while self.step < spec.steps_per_epoch:
            o = int(objectives[self.step])
            shape = spec.shapes[o]
            before = self.mixer.state()
            picks = self.mixer.step(self.epoch * spec.steps_per_epoch + self.step, o)
            after = self.mixer.state()
            while self.micro < spec.grad_accum:
                mine = spec.micro_streams(self.micro)[self.worker::self.workers]
                arrays = collate([self.streams[s].example(o, int(picks[s])) for s in mine],
                                 encoder_length=shape.encoder, decoder_length=shape.decoder,
                                 pad_id=spec.pad_id, decoder_start_id=spec.decoder_start_ids[o])
                last = self.micro == spec.grad_accum - 1
                meta = {"step": self.step, "micro": self.micro, "objective": o,
                        "cursors": {s: self.streams[s].cursor() for s in mine},
                        "mixture": after if last else before,
                        "stats": self.stats.take()}
                self.micro += 1
                yield pack_batch(arrays), meta
            self.step, self.micro = self.step + 1, 0


BATCH_KEYS = ("encoder_input_ids", "encoder_attention_mask", "decoder_input_ids", "labels")


def pack_batch(arrays: dict[str, np.ndarray]) -> torch.Tensor:
    """The four batch arrays as one flat int64 tensor.

    Worker processes hand tensors over through shared memory at a cost per
    storage (about 0.5 ms); one storage instead of four doubles a worker's rate.
    """
    return torch.from_numpy(np.concatenate([arrays[k].reshape(-1).astype(np.int64, copy=False)
                                            for k in BATCH_KEYS]))


def unpack_batch(flat: torch.Tensor, batch_size: int, encoder_length: int,
                 decoder_length: int) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack_batch`: contiguous (B, L) views, the mask as bool."""
    enc, mask, dec, labels = flat.split([batch_size * encoder_length] * 2
                                        + [batch_size * decoder_length] * 2)
    return {"encoder_input_ids": enc.view(batch_size, encoder_length),
            "encoder_attention_mask": mask.view(batch_size, encoder_length).bool(),
            "decoder_input_ids": dec.view(batch_size, decoder_length),
            "labels": labels.view(batch_size, decoder_length)}
