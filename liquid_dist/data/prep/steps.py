"""The datatrove pipeline steps of shard preparation: read, tokenise, write a task's shards.

Each step is a :class:`datatrove.pipeline.base.PipelineStep`; an executor calls
``step.run(data, rank, world_size)`` once per task and chains the generators.
The documents travel as datatrove ``Document``s: ``id`` is the sample key,
``metadata`` holds ``source`` (the input file key), ``doc`` (the index in that
file), ``ordinal`` (:func:`~liquid_dist.data.prep.plan.doc_ordinal`) and,
after tokenising, ``ids`` (the little-endian ids buffer stored in the shard).

The reader is the project's :mod:`liquid_dist.data.text_inputs`, not one of
datatrove's readers (0.10.1): datatrove has no reader of blank-line separated
text; its ``JsonlReader`` logs a bad JSON line or a record without text as a
warning instead of counting it per file, and ends a file at its first line
that is not UTF-8, dropping the rest; its ``ParquetReader`` numbers only the
rows with text (an empty row shifts the index, hence the train/validation
split, of every later row). The document index and the per-file bad-input
report would not match one machine's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.utils.logging import logger

from liquid_dist.data.errors import DataError
from liquid_dist.data.prep.plan import TaskPlan, doc_ordinal
from liquid_dist.data.shard_writer import (
    ShardSet,
    assign_split,
    count_no_tokens,
    kept_shards,
    manifest_header,
    resume_points,
)
from liquid_dist.data.shards import MANIFEST_NAME, encode_ids, sample_key
from liquid_dist.data.text_inputs import Document as InputDocument
from liquid_dist.data.text_inputs import InputReport, iter_documents
from liquid_dist.data.tokenizer import Tokenizer

BATCH_DOCS = 64
BATCH_CHARS = 1 << 20


def task_dir_name(rank: int) -> str:
    """The directory, relative to the output, that holds task ``rank``'s shards and manifest."""
    return f"task-{rank:05d}"


@dataclass(frozen=True)
class PrepSettings:
    """How every task of a run reads, tokenises and writes (the CLI options of make_shards)."""

    tokenizer: str
    shard_size_mb: float = 64.0
    val_fraction: float = 0.0
    split_seed: int = 0
    txt_docs: Literal["blank-line", "file"] = "blank-line"
    text_field: str = "text"
    policy: Literal["fail", "skip"] = "skip"
    split_mb: float = 256.0
    """Uncompressed jsonl and blank-line text files larger than this are read as byte ranges
    of this size, each its own input unit (0: never cut a file)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction {self.val_fraction} is not in [0, 1)")
        if self.shard_size_mb <= 0:
            raise ValueError(f"shard_size_mb {self.shard_size_mb} must be > 0")
        if self.split_mb < 0:
            raise ValueError(f"split_mb {self.split_mb} must be >= 0")

    @property
    def split_bytes(self) -> Optional[int]:
        return int(self.split_mb * 1024 * 1024) or None

    def recorded(self, tok: Tokenizer, plan: TaskPlan) -> dict[str, Any]:
        """The settings a manifest records: the ones that change the shards' bytes."""
        return {"tokenizer_sha256": tok.sha256, "vocab_size": tok.vocab_size,
                "shard_size_mb": self.shard_size_mb, "val_fraction": self.val_fraction,
                "split_seed": self.split_seed, "txt_docs": self.txt_docs,
                "text_field": self.text_field, "split_mb": self.split_mb, "tasks": plan.tasks,
                "input_sizes": {f.file.key: f.size for f in plan.files}}


class TextInputsReader(PipelineStep):
    """Yields the documents of task ``rank``'s files of the plan, counting bad input per file.

    Each document's metadata gets its split (:func:`assign_split`). The writer
    step calls :meth:`begin` before the first document is drawn: it gives the
    report the task's counts go to and, per split, the first ordinal still to
    write; the documents before it (written by an earlier attempt of the task)
    are read and counted but not passed on. Raises DataError when the
    executor's world size is not the plan's task count, or under policy fail
    on the first bad input.
    """

    name = "text_inputs"
    type = "📖 - READER"

    def __init__(self, plan: TaskPlan, settings: PrepSettings):
        super().__init__()
        self.plan, self.settings = plan, settings
        self.report = InputReport()
        self.resume_from: dict[str, int] = {}

    def begin(self, resume_from: dict[str, int]) -> InputReport:
        """Start a task: a new report (returned), and the split -> first ordinal to pass on."""
        self.report, self.resume_from = InputReport(), dict(resume_from)
        return self.report

    def run(self, data: DocumentsPipeline = None, rank: int = 0,
            world_size: int = 1) -> DocumentsPipeline:
        if world_size != self.plan.tasks:
            raise DataError(f"the plan has {self.plan.tasks} tasks, the executor runs "
                            f"{world_size}")
        settings = self.settings
        for planned in self.plan.files_of(rank):
            for doc in iter_documents([planned.file], self.report, txt_docs=settings.txt_docs,
                                      text_field=settings.text_field, policy=settings.policy):
                ordinal = doc_ordinal(planned.number, doc.index)
                split = assign_split(doc.key, doc.index, settings.val_fraction,
                                     settings.split_seed)
                if ordinal < self.resume_from.get(split, 0):
                    continue
                self.stat_update("documents")
                yield Document(text=doc.text, id=sample_key(ordinal),
                               metadata={"source": doc.key, "doc": doc.index,
                                         "ordinal": ordinal, "split": split})


def _batches(docs: Iterable[Document]) -> Iterator[list[Document]]:
    batch: list[Document] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc.text)
        if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


class SentencePieceTokenizer(PipelineStep):
    """Adds ``metadata["ids"]``: the ids :meth:`Tokenizer.encode` gives the text, as the
    shard's little-endian buffer (empty for a document without tokens)."""

    name = "sentencepiece"
    type = "🔢 - TOKENIZER"

    def __init__(self, tokenizer: str):
        super().__init__()
        self.tokenizer = tokenizer

    def run(self, data: DocumentsPipeline = None, rank: int = 0,
            world_size: int = 1) -> DocumentsPipeline:
        tok = Tokenizer(self.tokenizer)
        for batch in _batches(data or ()):
            with self.track_time(unit="batch"):
                encoded = tok.encode_batch([doc.text for doc in batch])
            for doc, ids in zip(batch, encoded, strict=True):
                doc.metadata["ids"] = encode_ids(ids, tok.ids_dtype)
                self.stat_update("tokens", value=len(ids))
                yield doc


class WebDatasetShardWriter(PipelineStep):
    """Writes task ``rank``'s documents to ``OUTPUT/task-RANK/{train,val}-NNNNNN.tar`` and
    ``OUTPUT/task-RANK/manifest.json``, and passes the documents on.

    Shards are written by a :class:`~liquid_dist.data.shard_writer.ShardSet` (fixed tar
    metadata, ``NAME.tmp`` renamed when complete, a shard closed at ``shard_size_mb``);
    the manifest is rewritten after every shard and says ``complete`` once the task's last
    shard is written, with the totals and the reader's per-file report. A task run again
    (after a kill, a failure or a requeue) keeps the complete shards its earlier attempt
    listed, once their size and sha256 verify, and writes from the document after them
    (:func:`~liquid_dist.data.shard_writer.kept_shards`): only the partial shard is
    redone. A document without tokens is counted ``empty`` (DataError under policy fail,
    naming the file and the document).
    """

    name = "webdataset_shards"
    type = "💽 - WRITER"

    def __init__(self, output_dir: str, plan: TaskPlan, settings: PrepSettings,
                 reader: TextInputsReader):
        super().__init__()
        self.output_dir, self.plan, self.settings, self.reader = (
            output_dir, plan, settings, reader)

    def run(self, data: DocumentsPipeline = None, rank: int = 0,
            world_size: int = 1) -> DocumentsPipeline:
        out = Path(self.output_dir) / task_dir_name(rank)
        out.mkdir(parents=True, exist_ok=True)
        tok = Tokenizer(self.settings.tokenizer)
        header = {**manifest_header(tok, self.settings.tokenizer), "task": rank,
                  "files": [f.file.key for f in self.plan.files_of(rank)],
                  "settings": self.settings.recorded(tok, self.plan)}
        kept = kept_shards(out, self._earlier_attempt(out, header))
        report = self.reader.begin(resume_points(kept))
        for shard in (s for split in kept.values() for s in split):
            for key, index in shard.get("no_tokens", []):
                count_no_tokens(report, key, index)
        if any(kept.values()):
            logger.info(f"task {rank}: kept {sum(map(len, kept.values()))} shards of an "
                        f"earlier attempt; writing from the next document")
        shards = ShardSet(out, header, self.settings.shard_size_mb, kept)
        progress = _Progress(rank, shards.manifest["shards"])
        for doc in data or ():
            meta = doc.metadata
            split = meta["split"]
            if shards.add(meta["ordinal"], split, InputDocument(meta["source"], meta["doc"],
                                                                 doc.text),
                          meta["ids"], report, self.settings.policy):
                self.stat_update(split)
                progress.log(shards.manifest["shards"])
                yield doc
        shards.finish(report)

    @staticmethod
    def _earlier_attempt(out: Path, header: dict[str, Any]) -> Optional[dict[str, Any]]:
        """The manifest an earlier attempt of this task left, when written with the same
        header (settings, files, tokenizer); else None."""
        path = out / MANIFEST_NAME
        if not path.is_file():
            return None
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            return None
        same = all(old.get(k) == v for k, v in header.items() if k != "complete")
        return old if same else None


class _Progress:
    """Logs each shard a task completes: the task's shards and tokens, and tokens/s since
    the task started (shards kept from an earlier attempt are not counted in the rate)."""

    def __init__(self, rank: int, shards: list[dict]):
        self.rank, self.start, self.shards = rank, time.monotonic(), len(shards)
        self.kept_tokens = sum(s["tokens"] for s in shards)

    def log(self, shards: list[dict]) -> None:
        if len(shards) == self.shards:
            return
        self.shards = len(shards)
        tokens = sum(s["tokens"] for s in shards)
        rate = (tokens - self.kept_tokens) / max(time.monotonic() - self.start, 1e-9)
        logger.info(f"task {self.rank}: {len(shards)} shards written, {tokens} tokens, "
                    f"{rate:,.0f} tokens/s")
