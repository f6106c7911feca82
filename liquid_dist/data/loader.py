"""Train/validation loaders: a world-size-free data order, equal batches, elastic resume.

``build_train_loader(cfg.data, rank=, world_size=, batch_size=, seed=, grad_accum=)``
returns a :class:`PretrainingLoader`. Iterating it yields the rest of the
current epoch (``len(loader)`` = steps per epoch x grad_accum micro-batches,
the same number on every rank); the next iteration starts the next epoch.
The sequence of global batches is a function of the seed, the global batch
size in examples (micro-batch x grad_accum x world size) and the data alone;
each rank takes its slice of every step (liquid_dist/data/stream.py). Each
batch holds examples of the step's objective at that objective's fixed shape
(Le, Ld) (``objectives.example_shape``: no padding), as a dict of tensors:

* ``encoder_input_ids`` (B, Le) int64
* ``encoder_attention_mask`` (B, Le) bool, True = real token
* ``decoder_input_ids`` (B, Ld) int64, starting with the decoder start token (pad = 0)
* ``labels`` (B, Ld) int64, -100 at ignored positions

``state_dict()`` holds the position and the cursors of the streams this rank
owns. Given to ``load_state_dict()`` of a fresh loader built with the same
settings it continues bitwise. On another world size (same global batch),
:func:`merge_loader_states` of every old rank's state, loaded on every new
rank, continues with exactly the examples of every later step (see docs/data.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from liquid_dist.config import ConfigError, DataConfig
from liquid_dist.data.objectives import OBJECTIVES, example_shape
from liquid_dist.data.shards import resolve_shards
from liquid_dist.data.stream import (
    BATCH_KEYS,
    SourceSpec,
    Stage,
    StreamSpec,
    WorkerStream,
    unpack_batch,
)
from liquid_dist.data.tokenizer import DECODER_START_IDS, Tokenizer

STATE_VERSION = 5


class _EpochDataset(IterableDataset):
    """One rank's micro-batch pieces of one epoch from (step, micro) on.

    Torch worker t is loader worker t of ``workers``; every worker yields one
    piece per micro-batch, and the DataLoader asks its workers in turn from
    worker 0, so pieces arrive micro-batch by micro-batch, worker by worker.
    """

    def __init__(self, spec: StreamSpec, epoch: int, step: int, micro: int, workers: int,
                 cursors: dict[int, dict[str, Any]], mixture: Optional[dict[str, Any]]):
        super().__init__()
        self.spec, self.epoch, self.step, self.micro = spec, epoch, step, micro
        self.workers, self.cursors, self.mixture = workers, cursors, mixture

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        info = get_worker_info()
        t = info.id if info is not None else 0
        return iter(WorkerStream(self.spec, self.epoch, t, self.workers, step=self.step,
                                 micro=self.micro, cursors=self.cursors,
                                 mixture=self.mixture))


def _as_is(item: Any) -> Any:
    """Batches are already tensors; torch's default_convert would walk every cursor entry."""
    return item


def _merge_counts(into: dict[str, int], names: tuple[str, ...], values: list[int]) -> None:
    for name, v in zip(names, values, strict=True):
        into[name] = into.get(name, 0) + v


def _add_stats(a: Any, b: Any) -> Any:
    """Counters added key by key (nested dicts of numbers; a missing key counts 0)."""
    if isinstance(a, dict) or isinstance(b, dict):
        a, b = a or {}, b or {}
        return {k: _add_stats(a.get(k), b.get(k)) for k in sorted(set(a) | set(b))}
    return (a or 0) + (b or 0)


def _check_signature(saved: dict[str, Any], mine: dict[str, Any]) -> None:
    """ValueError unless ``mine`` continues ``saved``: the same settings, and every saved
    source with the same shards (a source added since is allowed)."""
    differs = sorted(k for k in set(mine) | set(saved)
                     if k != "sources" and saved.get(k) != mine.get(k))
    changed = sorted(name for name, shards in saved.get("sources", {}).items()
                     if mine.get("sources", {}).get(name) != shards)
    if differs or changed:
        detail = ", ".join([f"{k}: saved {saved.get(k)!r} now {mine.get(k)!r}" for k in differs]
                           + [f"source '{n}': its shards changed or it is gone" for n in changed])
        raise ValueError(f"loader state is from a different data setup ({detail}); "
                         "a resume needs the same seed, data settings and global batch")


def _weights(stage: Stage, names: Sequence[str]) -> dict[str, float]:
    return {n: w for n, w in zip(names, stage.shares, strict=True) if w > 0}


def mixture_changes(saved: list, saved_sources: Sequence[str], spec: StreamSpec,
                    resume_step: int) -> list[str]:
    """What the stages of ``spec`` change against ``saved`` (a state's ``stages``: [start
    step, {source: share}] each, of the sources ``saved_sources``), resuming at global
    step ``resume_step``: one line per change, each at or after the resume step.
    ValueError naming the first change before it (it would rewrite steps already
    trained)."""
    names = [s.name for s in spec.sources]
    old = [(start, dict(shares)) for start, shares in saved]
    new = [(s.start_step, _weights(s, names)) for s in spec.stages]

    def at(stages: list, step: int) -> dict[str, float]:
        return [w for start, w in stages if start <= step][-1]

    changes = []
    for step in sorted({start for start, _ in old} | {start for start, _ in new}):
        before, after = at(old, step), at(new, step)
        if before == after:
            continue
        if step < resume_step:
            raise ValueError(f"data.stages: the mixture at step {step} was {before}, it is "
                             f"{after} now; steps before the resume step {resume_step} are "
                             "trained: change stages only at or after it")
        changes.append(f"from step {step}: {before} -> {after}")
    added = [n for n in names if n not in saved_sources]
    if added:
        changes.append(f"sources added: {added} (each from its beginning)")
    return changes


def _check_version(state: dict[str, Any]) -> None:
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"loader state version {state.get('version')!r}, "
                         f"expected {STATE_VERSION}")


def merge_loader_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One state from the ``state_dict()`` of every rank of a run, saved at the same step
    boundary: the cursors of all S streams, the counters summed. Pure function.

    Every new rank, on any world size with the same global batch, loads the result
    with ``load_state_dict`` and takes the streams it now owns. ValueError when the
    states disagree (setup, position), miss streams or stop mid-step.
    """
    if not states:
        raise ValueError("merge_loader_states: no states")
    for st in states:
        _check_version(st)
        _check_signature(st["signature"], states[0]["signature"])
    positions = {(st["epoch"], st["step"], st["micro"], json.dumps(st["mixture"]))
                  for st in states}
    if len(positions) != 1:
        raise ValueError(f"loader states are at different positions {sorted(positions)}: "
                         "merge the states of one checkpoint")
    if states[0]["micro"] != 0:
        raise ValueError(f"loader states stop inside step {states[0]['step']} (after "
                         f"{states[0]['micro']} micro-batches): a resume on another layout "
                         "needs a state saved at a step boundary")
    streams: list[int] = []
    cursors: dict[str, Any] = {}
    stats = states[0]["stats"]
    for i, st in enumerate(states):
        streams += st["streams"]
        cursors.update(st["cursors"])
        if i:
            stats = _add_stats(stats, st["stats"])
    total = states[0]["signature"]["global_batch"]
    if sorted(streams) != list(range(total)):
        missing = sorted(set(range(total)) - set(streams))
        raise ValueError(f"loader states cover {len(set(streams))} of {total} streams "
                         f"(missing {missing[:8]}...; duplicated: "
                         f"{len(streams) != len(set(streams))}): pass every rank's state once")
    return json.loads(json.dumps({
        "version": STATE_VERSION, "epoch": states[0]["epoch"], "step": states[0]["step"],
        "micro": 0, "layout": None, "streams": list(range(total)), "cursors": cursors,
        "mixture": states[0]["mixture"], "stats": stats, "signature": states[0]["signature"],
        "stages": states[0]["stages"]}))


class PretrainingLoader:
    """Micro-batches for one rank; see the module docstring for the batch format.

    ``restart_each_iter`` (validation): every iteration yields the same
    ``len(loader)`` batches from the start of epoch 0.
    """

    def __init__(self, spec: StreamSpec, *, num_workers: int, timeout_s: float,
                 restart_each_iter: bool = False):
        self.spec = spec
        self.num_workers = num_workers
        # a stream lives in one worker: at most one worker per position of a micro-batch
        self.workers = max(1, min(num_workers, spec.batch_size))
        self.timeout_s = timeout_s
        self.restart_each_iter = restart_each_iter
        self._epoch = 0
        self._pos = 0
        self._cursors: dict[int, dict[str, Any]] = {}
        self._mixture: Optional[dict[str, Any]] = None
        self._stats = self._empty_stats()

    def _empty_stats(self) -> dict[str, Any]:
        return {"batches": 0, "tokens_per_source": {}, "examples_per_source": {},
                "examples_per_objective": {}, "encoder_tokens": 0, "encoder_slots": 0,
                "decoder_tokens": 0, "decoder_slots": 0, "bad_samples": {}}

    def __len__(self) -> int:
        """Micro-batches per epoch (the same on every rank): steps x grad_accum."""
        return self.spec.steps_per_epoch * self.spec.grad_accum

    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to."""
        return self._epoch + (1 if self._pos >= len(self) else 0)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.restart_each_iter:
            self._epoch, self._pos, self._cursors, self._mixture = 0, 0, {}, None
        elif self._pos >= len(self):
            self._epoch, self._pos = self._epoch + 1, 0  # the streams go on where they are
        spec, w = self.spec, self.workers
        step, micro = divmod(self._pos, spec.grad_accum)
        dataset = _EpochDataset(spec, self._epoch, step, micro, w, dict(self._cursors),
                                self._mixture)
        loader = DataLoader(dataset, batch_size=None, collate_fn=_as_is,
                            num_workers=self.num_workers and w,
                            timeout=self.timeout_s if self.num_workers > 0 else 0)
        pieces = iter(loader)
        try:
            for first in pieces:
                parts = [first] + [next(pieces) for _ in range(w - 1)]
                batch = self._assemble(parts, step, micro)
                for _, meta in parts:
                    self._cursors.update({int(k): v for k, v in meta["cursors"].items()})
                    self._account_delta(meta["stats"])
                self._mixture = parts[0][1]["mixture"]
                self._pos += 1
                self._account_batch(batch)
                step, micro = divmod(self._pos, spec.grad_accum)
                yield batch
        finally:
            # Stop the workers now, not at garbage collection: after a worker error
            # torch's deferred shutdown can wait MP_STATUS_CHECK_INTERVAL per worker.
            shutdown = getattr(pieces, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def _assemble(self, parts: list[tuple[torch.Tensor, dict[str, Any]]], step: int,
                  micro: int) -> dict[str, torch.Tensor]:
        """The micro-batch from its workers' pieces: row q = position q (stream j*m + q)."""
        spec, w = self.spec, self.workers
        objective = parts[0][1]["objective"]
        for _, meta in parts:
            if (meta["step"], meta["micro"], meta["objective"]) != (step, micro, objective):
                raise RuntimeError(f"loader workers out of step: expected step {step} "
                                   f"micro-batch {micro}, got {meta['step']}/{meta['micro']}")
        shape = spec.shapes[objective]
        m = spec.batch_size
        rows = [len(range(t, m, w)) for t in range(w)]
        pieces = [unpack_batch(packed, n, shape.encoder, shape.decoder)
                  for (packed, _), n in zip(parts, rows, strict=True)]
        if w == 1:
            return pieces[0]
        batch = {}
        for key in BATCH_KEYS:
            first = pieces[0][key]
            out = torch.empty((m, first.shape[1]), dtype=first.dtype)
            for t, piece in enumerate(pieces):
                out[t::w] = piece[key]
            batch[key] = out
        return batch

    def _account_delta(self, delta: dict[str, Any]) -> None:
        st = self._stats
        names = tuple(s.name for s in self.spec.sources)
        _merge_counts(st["tokens_per_source"], names, delta["tokens"])
        _merge_counts(st["examples_per_source"], names, delta["examples"])
        _merge_counts(st["examples_per_objective"], self.spec.objectives, delta["objectives"])
        for url, reasons in delta["bad"].items():
            per = st["bad_samples"].setdefault(url, {})
            for reason, n in reasons.items():
                per[reason] = per.get(reason, 0) + n

    def _account_batch(self, batch: dict[str, torch.Tensor]) -> None:
        st = self._stats
        st["batches"] += 1
        mask = batch["encoder_attention_mask"]
        st["encoder_tokens"] += int(mask.sum())
        st["encoder_slots"] += mask.numel()
        labels = batch["labels"]
        st["decoder_tokens"] += int((labels != -100).sum())
        st["decoder_slots"] += labels.numel()

    def stats(self) -> dict[str, Any]:
        """Counters since the start of training (they survive state_dict round trips).

        ``tokens_per_source``: raw tokens (EOS separators included) drawn from each
        source; ``examples_per_source`` / ``examples_per_objective``; encoder and
        decoder real tokens vs slots (``*_fill`` = fraction not padding);
        ``bad_samples``: {shard: {reason: count}}. After a resume from merged
        states rank 0 carries the old ranks' summed counters and the other ranks
        start from zero, so the sum over ranks stays the run's total.
        """
        st = json.loads(json.dumps(self._stats))
        st["epoch"] = self.epoch
        st["encoder_fill"] = st["encoder_tokens"] / max(1, st["encoder_slots"])
        st["decoder_fill"] = st["decoder_tokens"] / max(1, st["decoder_slots"])
        return st

    def _signature(self) -> dict[str, Any]:
        """What the data order depends on; not the world size, workers or micro-batch."""
        s = self.spec
        return {"seed": s.seed, "global_batch": s.streams,
                "steps_per_epoch": s.steps_per_epoch, "encoder_length": s.encoder_length,
                "decoder_length": s.decoder_length, "objectives": list(s.objectives),
                "shapes": [list(sh) for sh in s.shapes],
                "objective_probs": list(s.objective_probs), "shuffle": s.shuffle,
                "shuffle_buffer": s.shuffle_buffer,
                # each source's shard list and the manifests' document counts:
                # regenerated shards do not match
                "sources": {src.name: hashlib.sha256(json.dumps(
                    [list(src.urls), list(src.shard_documents)]).encode()).hexdigest()
                    for src in s.sources},
                "noise": [s.noise_density, s.mean_noise_span_length]}

    def _layout(self) -> list[int]:
        s = self.spec
        return [s.rank, s.world_size, s.grad_accum, s.batch_size]

    def state_dict(self) -> dict[str, Any]:
        """The exact data position (JSON-able): epoch, step and micro-batches into it, the
        cursors of this rank's streams (by global stream index), the mixer's counts."""
        step, micro = divmod(self._pos, self.spec.grad_accum)
        return json.loads(json.dumps({
            "version": STATE_VERSION, "epoch": self._epoch, "step": step, "micro": micro,
            "layout": self._layout(), "streams": self.spec.owned_streams(),
            "cursors": {str(k): v for k, v in sorted(self._cursors.items())},
            "mixture": self._mixture, "stats": self._stats, "signature": self._signature(),
            "stages": self._stages()}))

    def _stages(self) -> list:
        return stage_weights(self.spec.stages, [src.name for src in self.spec.sources])

    def load_state_dict(self, state: dict[str, Any]) -> list[str]:
        """Continue from ``state``: this rank's own state, or :func:`merge_loader_states`
        of every rank's state (for any world size, grad_accum and micro-batch with the
        same global batch). ValueError if it came from a different data setup, lacks
        streams this rank owns, or stops mid-step on another layout. Returns what the
        mixture changed against the state's (:func:`mixture_changes`: stages changed and
        sources added at or after the resume step).
        """
        _check_version(state)
        _check_signature(state["signature"], self._signature())
        changes = mixture_changes(
            state["stages"], list(state["signature"]["sources"]), self.spec,
            state["epoch"] * self.spec.steps_per_epoch + state["step"])
        mine = self.spec.owned_streams()
        missing = sorted(set(mine) - set(state["streams"]))
        if missing:
            raise ValueError(f"loader state lacks streams {missing[:8]}... of rank "
                             f"{self.spec.rank}: a resume on another rank or world size loads "
                             "merge_loader_states() of every rank's state")
        if state["micro"] != 0 and state["layout"] != self._layout():
            raise ValueError(f"loader state stops inside step {state['step']} on layout "
                             f"[rank, world, grad_accum, batch] {state['layout']}, this "
                             f"loader is {self._layout()}: resume at a step boundary")
        self._epoch = state["epoch"]
        self._pos = state["step"] * self.spec.grad_accum + state["micro"]
        owned = set(mine)
        self._cursors = {int(k): v for k, v in state["cursors"].items() if int(k) in owned}
        self._mixture = state["mixture"]
        if state["layout"] == self._layout() or self.spec.rank == 0:
            self._stats = json.loads(json.dumps(state["stats"]))
        else:
            self._stats = self._empty_stats()
        return changes


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


def source_names(sources: list) -> list[str]:
    """The names of ``data.sources`` entries (``sourceI`` when unnamed), or ``["train"]``
    for ``data.train_shards``."""
    return [s.get("name", f"source{i}") for i, s in enumerate(sources)] or ["train"]


def config_stages(stages: list, sources: list) -> tuple[Stage, ...]:
    """The training mixture by step of ``data.stages`` and ``data.sources`` (as in a config
    or a checkpoint's saved config): the stages (a source a stage leaves out has weight
    0), or one stage of the sources' weights; shares normalised to sum to 1."""
    names = source_names(sources)
    if stages:
        weighted = [(st["start_step"], [float(st["weights"].get(n, 0.0)) for n in names])
                    for st in stages]
    else:
        weighted = [(0, [float(s.get("weight", 1.0)) for s in sources] or [1.0])]
    return tuple(Stage(start, tuple(w / sum(weights) for w in weights))
                 for start, weights in weighted)


def stage_weights(stages: Sequence[Stage], names: Sequence[str]) -> list:
    """``stages`` as [start step, {source: share}] (positive shares only): what a loader
    state records and :func:`mixture_changes` compares."""
    return [[s.start_step, _weights(s, names)] for s in stages]


def _sources(cfg: DataConfig, split: str, tok: Tokenizer) -> tuple[list[SourceSpec], list]:
    if split == "train" and cfg.sources:
        entries = [(name, s["shards"], s.get("manifest"),
                    s.get("max_repetition", cfg.max_repetition))
                   for name, s in zip(source_names(cfg.sources), cfg.sources, strict=True)]
    elif split == "train":
        entries = [("train", cfg.train_shards, None, cfg.max_repetition)]
    else:
        if cfg.val_shards is None:
            raise ConfigError("data.val_shards", None, "a shard spec to build a validation loader")
        entries = [("val", cfg.val_shards, None, None)]
    names = [e[0] for e in entries]
    if len(set(names)) != len(names):
        raise ConfigError("data.sources", names, "distinct source names")
    specs, sets = [], []
    for name, shards, manifest, max_repetition in entries:
        shard_set = resolve_shards(shards, split, manifest)
        tokens = (None if shard_set.tokens is None
                  else shard_set.tokens + shard_set.documents)
        specs.append(SourceSpec(name=name, urls=shard_set.urls,
                                shard_documents=shard_set.shard_documents,
                                suffix=shard_set.suffix_for(tok, f"source '{name}' ({shards})"),
                                tokens=tokens, max_repetition=max_repetition))
        sets.append(shard_set)
    return specs, sets


def stream_spec(cfg: DataConfig, split: str, *, world_size: int, batch_size: int, seed: int,
                num_steps: Optional[int] = None, grad_accum: int = 1,
                rank: int = 0) -> StreamSpec:
    """The stream of ``split`` (``train`` / ``val``) for ``rank`` of ``world_size``: the
    tokenizer, the objectives' shapes, the shards and the epoch length resolved and
    checked (ConfigError / DataError naming the key or file). Everything a run's data
    needs from files, read once: the run plan (liquid_dist.train.prepare) resolves it
    before any process group, and :func:`open_loader` opens it on each rank."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world_size {world_size}: need 0 <= rank < world_size")
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size} must be >= 1")
    if grad_accum < 1:
        raise ValueError(f"grad_accum {grad_accum} must be >= 1")
    tok = Tokenizer(cfg.tokenizer)
    objectives, probs = _objectives(cfg)
    shapes = []
    for name in objectives:
        shape = example_shape(name, encoder_length=cfg.encoder_length,
                              decoder_length=cfg.decoder_length,
                              noise_density=cfg.noise_density,
                              mean_noise_span_length=cfg.mean_noise_span_length,
                              max_spans=tok.num_sentinels)
        if name == "span_corruption" and tok.num_sentinels == 0:
            raise ConfigError("data.tokenizer", cfg.tokenizer,
                              "a tokenizer with sentinels for span corruption")
        if shape is None:
            raise ConfigError("data.decoder_length", cfg.decoder_length,
                              "room for span corruption targets (noise spans, sentinels and "
                              f"EOS) of an encoder of data.encoder_length={cfg.encoder_length}")
        shapes.append(shape)
    sources, sets = _sources(cfg, split, tok)
    if num_steps is None and split == "train" and cfg.batches_per_epoch > 0:
        num_steps = cfg.batches_per_epoch
    if num_steps is None:
        unknown = [s.name for s, ss in zip(sources, sets, strict=True) if ss.tokens is None]
        if unknown:
            raise ConfigError("data.batches_per_epoch", cfg.batches_per_epoch,
                              f"a positive count: sources {unknown} have no manifest to size "
                              "an epoch from")
        stream_tokens = sum(s.tokens for s in sources)
        mean_raw = sum(p * sh.raw for p, sh in zip(probs, shapes, strict=True))
        global_batch = batch_size * grad_accum * world_size
        num_steps = max(1, math.floor(stream_tokens / mean_raw / global_batch))
    return StreamSpec(
        sources=tuple(sources),
        stages=config_stages(cfg.stages, cfg.sources) if split == "train" else (Stage(0, (1.0,)),),
        objectives=objectives,
        objective_probs=probs,
        shapes=tuple(shapes), noise_density=cfg.noise_density,
        mean_noise_span_length=cfg.mean_noise_span_length, encoder_length=cfg.encoder_length,
        decoder_length=cfg.decoder_length, pad_id=tok.pad_id, eos_id=tok.eos_id,
        decoder_start_ids=tuple(DECODER_START_IDS[o] for o in objectives),
        sentinel_ids=tok.sentinel_ids, vocab_size=tok.vocab_size,
        batch_size=batch_size, steps_per_epoch=num_steps, shuffle=split == "train",
        shuffle_buffer=cfg.shuffle_buffer if split == "train" else 0,
        policy=cfg.bad_sample_policy, seed=seed, rank=rank, world_size=world_size,
        grad_accum=grad_accum)


def open_loader(cfg: DataConfig, spec: StreamSpec, rank: int) -> PretrainingLoader:
    """The loader of ``rank`` on a resolved :func:`stream_spec` (of any rank): the training
    stream (shuffled) resumable across epochs, the validation stream the same batches on
    every pass."""
    if not 0 <= rank < spec.world_size:
        raise ValueError(f"rank {rank} / world_size {spec.world_size}: need 0 <= rank < "
                         "world_size")
    return PretrainingLoader(dataclasses.replace(spec, rank=rank), num_workers=cfg.num_workers,
                             timeout_s=cfg.worker_timeout_s,
                             restart_each_iter=not spec.shuffle)


def build_train_loader(data_cfg: DataConfig, *, rank: int, world_size: int, batch_size: int,
                       seed: int, grad_accum: int = 1) -> PretrainingLoader:
    """The training loader of one rank: shuffled shards and documents, resumable.

    ``batch_size`` is the micro-batch; each global step is ``grad_accum``
    micro-batches on each of ``world_size`` ranks, S = batch_size x grad_accum x
    world_size examples whose sequence depends on the seed, S and the data
    only. Epoch length: ``data.batches_per_epoch`` global steps, or (when 0)
    one pass over the manifests' tokens, ``floor(tokens / mean chunk / S)``
    steps; ``len(loader)`` = steps x grad_accum.
    """
    return open_loader(data_cfg, stream_spec(data_cfg, "train", world_size=world_size,
                                             batch_size=batch_size, seed=seed,
                                             grad_accum=grad_accum), rank)


def build_val_loader(data_cfg: DataConfig, *, rank: int, world_size: int, batch_size: int,
                     seed: int, num_batches: Optional[int] = None,
                     grad_accum: int = 1) -> PretrainingLoader:
    """The validation loader of one rank: no shuffling, the same batches on every pass.

    A pass is ``num_batches`` (e.g. ``train.eval_steps``; by default one pass
    over the validation manifest's tokens) global batches of batch_size x
    grad_accum x world_size examples, split like the training steps: the same
    examples for any layout of the same global batch; ``len(loader)`` =
    num_batches x grad_accum.
    """
    return open_loader(data_cfg, stream_spec(data_cfg, "val", world_size=world_size,
                                             batch_size=batch_size, seed=seed,
                                             num_steps=num_batches, grad_accum=grad_accum),
                       rank)
