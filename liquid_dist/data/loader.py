"""Train/validation loaders: equal batches on every rank, exact resume, statistics.

``build_train_loader(cfg.data, rank=, world_size=, batch_size=, seed=)`` returns a
:class:`PretrainingLoader`. Iterating it yields the rest of the current
epoch (``len(loader)`` batches per epoch, the same number on every rank);
the next iteration starts the next epoch. Each batch holds examples of one
objective at that objective's fixed shape (Le, Ld) (``objectives.example_shape``:
no padding), as a dict of tensors:

* ``encoder_input_ids`` (B, Le) int64
* ``encoder_attention_mask`` (B, Le) bool, True = real token
* ``decoder_input_ids`` (B, Ld) int64, starting with the decoder start token (pad = 0)
* ``labels`` (B, Ld) int64, -100 at ignored positions

``state_dict()`` after n batches, given to ``load_state_dict()`` of a fresh
loader built with the same settings, continues with exactly batch n of the
uninterrupted stream (see docs/data.md for the mechanism).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from liquid_dist.config import ConfigError, DataConfig
from liquid_dist.data.errors import DataError
from liquid_dist.data.objectives import OBJECTIVES, example_shape
from liquid_dist.data.shards import SUFFIX_OF_DTYPE, resolve_shards
from liquid_dist.data.stream import SourceSpec, StreamSpec, WorkerStream, unpack_batch
from liquid_dist.data.tokenizer import Tokenizer

STATE_VERSION = 2


class _EpochDataset(IterableDataset):
    """The batches of one epoch from batch ``start`` on, for one rank.

    Torch worker t plays logical worker (t + start) % W: the DataLoader always
    asks worker 0 first, and batch ``start`` belongs to logical worker
    ``start % W``; round-robin order then matches the uninterrupted stream.
    """

    def __init__(self, spec: StreamSpec, epoch: int, start: int,
                 cursors: dict[int, dict[str, Any]]):
        super().__init__()
        self.spec, self.epoch, self.start, self.cursors = spec, epoch, start, cursors

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        info = get_worker_info()
        t = info.id if info is not None else 0
        worker = (t + self.start) % self.spec.workers
        return iter(WorkerStream(self.spec, self.epoch, worker, self.cursors.get(worker)))


def _as_is(item: Any) -> Any:
    """Batches are already tensors; torch's default_convert would walk every cursor entry."""
    return item


def _merge_counts(into: dict[str, int], names: tuple[str, ...], values: list[int]) -> None:
    for name, v in zip(names, values, strict=True):
        into[name] = into.get(name, 0) + v


class PretrainingLoader:
    """Batches for one rank; see the module docstring for the batch format.

    ``restart_each_iter`` (validation): every iteration yields the same
    ``len(loader)`` batches from the start of epoch 0.
    """

    def __init__(self, spec: StreamSpec, *, num_workers: int, timeout_s: float,
                 restart_each_iter: bool = False):
        self.spec = spec
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.restart_each_iter = restart_each_iter
        self._epoch = 0
        self._pos = 0
        self._cursors: dict[int, dict[str, Any]] = {}
        self._stats = self._empty_stats()

    def _empty_stats(self) -> dict[str, Any]:
        return {"batches": 0, "tokens_per_source": {}, "examples_per_source": {},
                "examples_per_objective": {}, "encoder_tokens": 0, "encoder_slots": 0,
                "decoder_tokens": 0, "decoder_slots": 0, "bad_samples": {}}

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank)."""
        return self.spec.batches_per_epoch

    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to."""
        return self._epoch + (1 if self._pos >= len(self) else 0)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.restart_each_iter:
            self._epoch, self._pos, self._cursors = 0, 0, {}
        elif self._pos >= len(self):
            self._epoch, self._pos, self._cursors = self._epoch + 1, 0, {}
        dataset = _EpochDataset(self.spec, self._epoch, self._pos, dict(self._cursors))
        loader = DataLoader(dataset, batch_size=None, collate_fn=_as_is,
                            num_workers=self.num_workers,
                            timeout=self.timeout_s if self.num_workers > 0 else 0)
        batches = iter(loader)
        try:
            for packed, meta in batches:
                shape = self.spec.shapes[meta["objective"]]
                batch = unpack_batch(packed, self.spec.batch_size, shape.encoder, shape.decoder)
                self._cursors[meta["worker"]] = meta["cursor"]
                self._pos += 1
                self._account(batch, meta["stats"])
                yield batch
        finally:
            # Stop the workers now, not at garbage collection: after a worker error
            # torch's deferred shutdown can wait MP_STATUS_CHECK_INTERVAL per worker.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def _account(self, batch: dict[str, torch.Tensor], delta: dict[str, Any]) -> None:
        st = self._stats
        st["batches"] += 1
        names = tuple(s.name for s in self.spec.sources)
        _merge_counts(st["tokens_per_source"], names, delta["tokens"])
        _merge_counts(st["examples_per_source"], names, delta["examples"])
        _merge_counts(st["examples_per_objective"], self.spec.objectives, delta["objectives"])
        mask = batch["encoder_attention_mask"]
        st["encoder_tokens"] += int(mask.sum())
        st["encoder_slots"] += mask.numel()
        labels = batch["labels"]
        st["decoder_tokens"] += int((labels != -100).sum())
        st["decoder_slots"] += labels.numel()
        for url, reasons in delta["bad"].items():
            per = st["bad_samples"].setdefault(url, {})
            for reason, n in reasons.items():
                per[reason] = per.get(reason, 0) + n

    def stats(self) -> dict[str, Any]:
        """Counters since the start of training (they survive state_dict round trips).

        ``tokens_per_source``: raw tokens (EOS separators included) drawn from each
        source; ``examples_per_source`` / ``examples_per_objective``; encoder and
        decoder real tokens vs slots (``*_fill`` = fraction not padding);
        ``bad_samples``: {shard: {reason: count}}.
        """
        st = json.loads(json.dumps(self._stats))
        st["epoch"] = self.epoch
        st["encoder_fill"] = st["encoder_tokens"] / max(1, st["encoder_slots"])
        st["decoder_fill"] = st["decoder_tokens"] / max(1, st["decoder_slots"])
        return st

    def _signature(self) -> dict[str, Any]:
        s = self.spec
        # the shard list and the manifests' document counts: regenerated shards do not match
        urls = json.dumps([[list(src.urls), list(src.shard_documents)]
                           for src in s.sources]).encode()
        return {"seed": s.seed, "rank": s.rank, "world_size": s.world_size,
                "workers": s.workers, "batch_size": s.batch_size,
                "batches_per_epoch": s.batches_per_epoch, "encoder_length": s.encoder_length,
                "decoder_length": s.decoder_length, "objectives": list(s.objectives),
                "shapes": [list(sh) for sh in s.shapes],
                "objective_probs": list(s.objective_probs), "shuffle_buffer": s.shuffle_buffer,
                "sources": [[src.name, src.weight] for src in s.sources],
                "shards_sha256": hashlib.sha256(urls).hexdigest(),
                "noise": [s.noise_density, s.mean_noise_span_length]}

    def state_dict(self) -> dict[str, Any]:
        """The exact data position (JSON-able): epoch, batches into it, worker cursors."""
        return json.loads(json.dumps({
            "version": STATE_VERSION, "epoch": self._epoch, "batch_in_epoch": self._pos,
            "cursors": {str(k): v for k, v in self._cursors.items()},
            "stats": self._stats, "signature": self._signature()}))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; ValueError if it came from a different data setup.

        Exact resume needs the same seed, rank, world size, worker count, batch
        size, lengths, objectives and shards: the stream is a function of them.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}, "
                             f"expected {STATE_VERSION}")
        mine = self._signature()
        differs = sorted(k for k in mine if state["signature"].get(k) != mine[k])
        if differs:
            detail = ", ".join(f"{k}: saved {state['signature'].get(k)!r} now {mine[k]!r}"
                               for k in differs)
            raise ValueError(f"loader state is from a different data setup ({detail}); "
                             "an exact resume needs the same settings")
        self._epoch = state["epoch"]
        self._pos = state["batch_in_epoch"]
        self._cursors = {int(k): v for k, v in state["cursors"].items()}
        self._stats = json.loads(json.dumps(state["stats"]))


# ------------------------------------------------------------ building


def _objectives(cfg: DataConfig) -> tuple[tuple[str, ...], tuple[float, ...]]:
    if cfg.objective != "mixture":
        return (cfg.objective,), (1.0,)
    names = tuple(sorted(cfg.objective_weights))
    unknown = set(names) - set(OBJECTIVES)
    if unknown:
        raise ConfigError("data.objective_weights", cfg.objective_weights,
                          f"keys among {list(OBJECTIVES)}")
    total = float(sum(cfg.objective_weights[n] for n in names))
    return names, tuple(cfg.objective_weights[n] / total for n in names)


def _sources(cfg: DataConfig, split: str, tok: Tokenizer) -> tuple[list[SourceSpec], list]:
    if split == "train" and cfg.sources:
        entries = [(s.get("name", f"source{i}"), s["shards"], float(s.get("weight", 1.0)),
                    s.get("manifest")) for i, s in enumerate(cfg.sources)]
    elif split == "train":
        entries = [("train", cfg.train_shards, 1.0, None)]
    else:
        if cfg.val_shards is None:
            raise ConfigError("data.val_shards", None, "a shard spec to build a validation loader")
        entries = [("val", cfg.val_shards, 1.0, None)]
    names = [e[0] for e in entries]
    if len(set(names)) != len(names):
        raise ConfigError("data.sources", names, "distinct source names")
    specs, sets = [], []
    for name, shards, weight, manifest in entries:
        shard_set = resolve_shards(shards, split, manifest)
        if shard_set.tokenizer_sha256 not in (None, tok.sha256):
            raise DataError(f"source '{name}' ({shards}): shards were made with another "
                            f"tokenizer (sha256 {shard_set.tokenizer_sha256[:12]}..., "
                            f"data.tokenizer {tok.path} is {tok.sha256[:12]}...)")
        dtype = shard_set.dtype or tok.ids_dtype
        if dtype != tok.ids_dtype:
            raise DataError(f"source '{name}': manifest dtype {dtype}, the tokenizer's "
                            f"vocabulary needs {tok.ids_dtype}")
        specs.append(SourceSpec(name=name, urls=shard_set.urls,
                                shard_documents=shard_set.shard_documents, weight=weight,
                                suffix=SUFFIX_OF_DTYPE[dtype]))
        sets.append(shard_set)
    return specs, sets


def _build(cfg: DataConfig, split: str, *, rank: int, world_size: int, batch_size: int,
           seed: int, num_batches: Optional[int]) -> PretrainingLoader:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world_size {world_size}: need 0 <= rank < world_size")
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size} must be >= 1")
    tok = Tokenizer(cfg.tokenizer)
    objectives, probs = _objectives(cfg)
    shapes = []
    for name in objectives:
        shape = example_shape(name, encoder_length=cfg.encoder_length,
                              decoder_length=cfg.decoder_length,
                              noise_density=cfg.noise_density,
                              mean_noise_span_length=cfg.mean_noise_span_length,
                              max_spans=tok.num_sentinels)
        if shape is None or (name == "span_corruption" and tok.num_sentinels == 0):
            raise ConfigError("data.decoder_length", cfg.decoder_length,
                              "room for span corruption targets, and a tokenizer with "
                              "sentinels")
        shapes.append(shape)
    sources, sets = _sources(cfg, split, tok)
    workers = max(1, cfg.num_workers)
    if num_batches is None and split == "train" and cfg.batches_per_epoch > 0:
        num_batches = cfg.batches_per_epoch
    if num_batches is None:
        unknown = [s.name for s, ss in zip(sources, sets, strict=True) if ss.tokens is None]
        if unknown:
            raise ConfigError("data.batches_per_epoch", cfg.batches_per_epoch,
                              f"a positive count: sources {unknown} have no manifest to size "
                              "an epoch from")
        stream_tokens = sum(ss.tokens + ss.documents for ss in sets)
        mean_raw = sum(p * sh.raw for p, sh in zip(probs, shapes, strict=True))
        num_batches = max(1, math.floor(stream_tokens / mean_raw / (world_size * batch_size)))
    spec = StreamSpec(
        sources=tuple(sources), objectives=objectives, objective_probs=probs,
        shapes=tuple(shapes), noise_density=cfg.noise_density,
        mean_noise_span_length=cfg.mean_noise_span_length, encoder_length=cfg.encoder_length,
        decoder_length=cfg.decoder_length, pad_id=tok.pad_id, eos_id=tok.eos_id,
        decoder_start_id=tok.pad_id, sentinel_ids=tok.sentinel_ids, vocab_size=tok.vocab_size,
        batch_size=batch_size, batches_per_epoch=num_batches, shuffle=split == "train",
        shuffle_buffer=cfg.shuffle_buffer if split == "train" else 0,
        policy=cfg.bad_sample_policy, seed=seed, rank=rank, world_size=world_size,
        workers=workers)
    return PretrainingLoader(spec, num_workers=cfg.num_workers, timeout_s=cfg.worker_timeout_s,
                             restart_each_iter=split == "val")


def build_train_loader(data_cfg: DataConfig, *, rank: int, world_size: int, batch_size: int,
                       seed: int) -> PretrainingLoader:
    """The training loader of one rank: shuffled shards and documents, resumable.

    Epoch length: ``data.batches_per_epoch``, or (when 0) one pass over the
    manifests' tokens divided among ``world_size`` ranks.
    """
    return _build(data_cfg, "train", rank=rank, world_size=world_size, batch_size=batch_size,
                  seed=seed, num_batches=None)


def build_val_loader(data_cfg: DataConfig, *, rank: int, world_size: int, batch_size: int,
                     seed: int, num_batches: Optional[int] = None) -> PretrainingLoader:
    """The validation loader of one rank: no shuffling, the same batches on every pass.

    ``num_batches`` (e.g. ``train.eval_steps``) caps a pass; by default one pass
    over the validation manifest's tokens.
    """
    return _build(data_cfg, "val", rank=rank, world_size=world_size, batch_size=batch_size,
                  seed=seed, num_batches=num_batches)
