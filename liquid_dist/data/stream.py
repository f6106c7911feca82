"""One loader worker's batches: shard plan, reading, shuffle buffer, packing, objectives.

Every rank runs ``W`` logical workers (W = max(1, num_workers)); logical worker
``l`` of rank ``r`` is global worker ``g = r * W + l`` of ``G = world_size * W``.
In epoch ``e`` it yields the epoch's batches ``i`` with ``i % W == l``. Its
stream is a pure function of (seed, e, r, l) and the shards, and its whole
position is a small JSON-able cursor, attached to every batch it yields:

* the shard plan: each source's shards are cut into ``units`` (a shard, or a
  ``1/k`` slice of one when the source has fewer shards than G: k =
  ceil(G / shards), slice j holds the samples whose index is j mod k). Visit
  v of worker g reads unit ``P[g + v * G]`` of the endless sequence P =
  perm_0 + perm_1 + ..., perm_c a seeded permutation of the units (identity
  without shuffling). Streams never run dry, so every worker yields its
  batch quota: equal batch counts on every rank by construction;
* the reading position: visit index and raw sample index in that shard;
* the shuffle buffer as references (shard, sample index), the document being
  packed as (shard, sample index, token offset), and the numpy generator
  state. Restoring re-reads just those documents and skips the raw samples
  already read in the current shard (no decoding, packing or tokenising).
"""

from __future__ import annotations

import logging
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
_TAG_WORKER = 0x574B4552


@dataclass(frozen=True)
class SourceSpec:
    name: str
    urls: tuple[str, ...]
    shard_documents: tuple[Optional[int], ...]
    """Documents per shard from the manifest (None: unknown) to detect short shards."""
    weight: float
    suffix: str
    """``ids.u16`` or ``ids.u32``: the member every sample must carry."""


@dataclass(frozen=True)
class StreamSpec:
    """Everything a worker needs; plain data, cheap to send to worker processes."""

    sources: tuple[SourceSpec, ...]
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
    decoder_start_id: int
    sentinel_ids: tuple[int, ...]
    vocab_size: int
    batch_size: int
    batches_per_epoch: int
    shuffle: bool
    shuffle_buffer: int
    policy: str
    seed: int
    rank: int
    world_size: int
    workers: int
    """Logical workers per rank: max(1, num_workers)."""

    def quota(self, worker: int) -> int:
        """Batches logical worker ``worker`` yields per epoch (i % workers == worker)."""
        return max(0, -(-(self.batches_per_epoch - worker) // self.workers))


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(
        [k % (1 << 64) for k in key])))


class UnitPlan:
    """Which (shard, slice) global worker g reads on its v-th visit of a source."""

    def __init__(self, num_shards: int, global_workers: int, shuffle: bool, seed: int,
                 epoch: int, source: int):
        self.slices = max(1, -(-global_workers // num_shards))
        self.units = num_shards * self.slices
        self.global_workers = global_workers
        self.shuffle = shuffle
        self._key = (seed, epoch, source, _TAG_PLAN)
        self._cycle = -1
        self._perm: Optional[np.ndarray] = None

    def unit(self, g: int, visit: int) -> tuple[int, int]:
        """(shard index, slice index) of visit ``visit`` of global worker ``g``."""
        cycle, r = divmod(g + visit * self.global_workers, self.units)
        u = r
        if self.shuffle:
            if cycle != self._cycle:
                self._perm = _rng(*self._key, cycle).permutation(self.units)
                self._cycle = cycle
            assert self._perm is not None
            u = int(self._perm[r])
        return divmod(u, self.slices)


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
    """Endless stream of documents of one source for one worker, then of tokens.

    ``take(n)`` returns the next n tokens of the concatenation doc + [EOS] +
    doc + [EOS] + ... where documents come out of the shuffle buffer.
    """

    def __init__(self, spec: StreamSpec, index: int, g: int, epoch: int,
                 rng: np.random.Generator, stats: Stats):
        self.spec, self.src, self.g = spec, spec.sources[index], g
        self.plan = UnitPlan(len(self.src.urls), spec.world_size * spec.workers, spec.shuffle,
                             spec.seed, epoch, index)
        self.rng, self.stats = rng, stats
        self.visit = 0
        self.pos = 0
        self.visit_docs = 0
        self.dry_visits = 0
        self.buffer: list[tuple[tuple[int, int], np.ndarray]] = []
        self.cur: Optional[tuple[tuple[int, int], np.ndarray]] = None
        self.off = 0
        self._samples: Optional[Iterator[dict[str, Any]]] = None
        self._shard = self._slice = 0

    # ---------------------------------------------------------------- cursor

    def cursor(self) -> dict[str, Any]:
        return {"visit": self.visit, "pos": self.pos, "visit_docs": self.visit_docs,
                "dry_visits": self.dry_visits,
                "buffer": [i for ref, _ in self.buffer for i in ref],
                "cur": None if self.cur is None else [*self.cur[0], self.off]}

    def restore(self, cursor: dict[str, Any]) -> None:
        self.visit, self.pos = cursor["visit"], cursor["pos"]
        self.visit_docs, self.dry_visits = cursor["visit_docs"], cursor["dry_visits"]
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
        if self.dry_visits >= self.plan.units:
            raise DataError(
                f"source '{self.src.name}': {self.dry_visits} shard visits in a row gave no "
                f"valid sample (worker {self.g}); shards: {self.src.urls[:4]}...")
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
        self.dry_visits = 0 if self.visit_docs else self.dry_visits + 1
        self.visit += 1
        self.pos = self.visit_docs = 0
        self._samples = None

    def _read(self) -> tuple[tuple[int, int], np.ndarray]:
        """The next valid document of this worker's plan, as ((shard, index), ids)."""
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


class WorkerStream:
    """The batches of logical worker ``worker`` of ``spec.rank`` in ``epoch``."""

    def __init__(self, spec: StreamSpec, epoch: int, worker: int,
                 cursor: Optional[dict[str, Any]] = None):
        self.spec, self.epoch, self.worker = spec, epoch, worker
        self.rng = _rng(spec.seed, epoch, spec.rank, worker, _TAG_WORKER)
        self.stats = Stats(len(spec.sources), len(spec.objectives))
        g = spec.rank * spec.workers + worker
        self.sources = [SourceStream(spec, i, g, epoch, self.rng, self.stats)
                        for i in range(len(spec.sources))]
        weights = np.array([s.weight for s in spec.sources], dtype=np.float64)
        self._source_p = weights / weights.sum()
        self._objective_p = np.array(spec.objective_probs, dtype=np.float64)
        self.batches = 0
        if cursor is not None:
            self.rng.bit_generator.state = cursor["rng"]
            self.batches = cursor["batches"]
            for s, c in zip(self.sources, cursor["sources"], strict=True):
                s.restore(c)

    def cursor(self) -> dict[str, Any]:
        return {"batches": self.batches, "rng": self.rng.bit_generator.state,
                "sources": [s.cursor() for s in self.sources]}

    def _example(self, o: int) -> tuple[np.ndarray, np.ndarray]:
        """One example of objective ``o``."""
        spec = self.spec
        s = int(self.rng.choice(len(self.sources), p=self._source_p)) if len(self.sources) > 1 \
            else 0
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

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        """(packed batch, meta) pairs; meta = {worker, objective, cursor after this batch,
        stats delta}.

        Every batch holds examples of one objective, drawn per batch with the
        objective weights, at that objective's fixed shape: no padding. The batch
        is :func:`pack_batch`'s single tensor; :func:`unpack_batch` restores it.
        """
        spec = self.spec
        while self.batches < spec.quota(self.worker):
            o = int(self.rng.choice(len(spec.objectives), p=self._objective_p)) \
                if len(spec.objectives) > 1 else 0
            shape = spec.shapes[o]
            arrays = collate([self._example(o) for _ in range(spec.batch_size)],
                             encoder_length=shape.encoder, decoder_length=shape.decoder,
                             pad_id=spec.pad_id, decoder_start_id=spec.decoder_start_id)
            self.batches += 1
            yield pack_batch(arrays), {"worker": self.worker, "objective": o,
                                       "cursor": self.cursor(), "stats": self.stats.take()}


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
