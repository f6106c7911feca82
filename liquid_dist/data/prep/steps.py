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

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from liquid_dist.data.errors import DataError
from liquid_dist.data.prep.plan import TaskPlan, doc_ordinal
from liquid_dist.data.shard_writer import ShardSet, assign_split, manifest_header
from liquid_dist.data.shards import (
    encode_ids,
    sample_key,
)
from liquid_dist.data.text_inputs import Document as InputDocument
from liquid_dist.data.text_inputs import InputReport, iter_documents
from liquid_dist.data.tokenizer import Tokenizer

BATCH_DOCS = 64
BATCH_CHARS = 1 << 20
_SHARD_DIR_FILE = re.compile(r"^((train|val)-\d{6}\.tar|manifest\.json)(\.tmp)?$")


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

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction {self.val_fraction} is not in [0, 1)")
        if self.shard_size_mb <= 0:
            raise ValueError(f"shard_size_mb {self.shard_size_mb} must be > 0")

    def recorded(self, tok: Tokenizer, plan: TaskPlan) -> dict[str, Any]:
        """The settings a manifest records: the ones that change the shards' bytes."""
        return {"tokenizer_sha256": tok.sha256, "vocab_size": tok.vocab_size,
                "shard_size_mb": self.shard_size_mb, "val_fraction": self.val_fraction,
                "split_seed": self.split_seed, "txt_docs": self.txt_docs,
                "text_field": self.text_field, "tasks": plan.tasks,
                "input_sizes": {f.file.key: f.size for f in plan.files}}


class TextInputsReader(PipelineStep):
    """Yields the documents of task ``rank``'s files of the plan, counting bad input per file.

    ``report`` holds the counts of the task last run (the writer step puts it
    in the task manifest). Raises DataError when the executor's world size is
    not the plan's task count, or under policy fail on the first bad input.
    """

    name = "text_inputs"
    type = "📖 - READER"

    def __init__(self, plan: TaskPlan, settings: PrepSettings):
        super().__init__()
        self.plan, self.settings = plan, settings
        self.report = InputReport()

    def run(self, data: DocumentsPipeline = None, rank: int = 0,
            world_size: int = 1) -> DocumentsPipeline:
        if world_size != self.plan.tasks:
            raise DataError(f"the plan has {self.plan.tasks} tasks, the executor runs "
                            f"{world_size}")
        self.report = InputReport()
        for planned in self.plan.files_of(rank):
            for doc in iter_documents([planned.file], self.report,
                                      txt_docs=self.settings.txt_docs,
                                      text_field=self.settings.text_field,
                                      policy=self.settings.policy):
                ordinal = doc_ordinal(planned.number, doc.index)
                self.stat_update("documents")
                yield Document(text=doc.text, id=sample_key(ordinal),
                               metadata={"source": doc.key, "doc": doc.index,
                                         "ordinal": ordinal})


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


def clear_shard_dir(directory: Path) -> None:
    """Delete the shards, partial shards and manifest in ``directory`` (what a task, or
    make_shards, writes there); other files and subdirectories stay."""
    if directory.is_dir():
        for path in directory.iterdir():
            if _SHARD_DIR_FILE.match(path.name):
                path.unlink()


class WebDatasetShardWriter(PipelineStep):
    """Writes task ``rank``'s documents to ``OUTPUT/task-RANK/{train,val}-NNNNNN.tar`` and
    ``OUTPUT/task-RANK/manifest.json``, and passes the documents on.

    Shards are written as by :func:`~liquid_dist.data.make_shards` (same samples,
    fixed tar metadata, ``NAME.tmp`` renamed when complete, a shard closed at
    ``shard_size_mb``); the manifest is rewritten after every shard and says
    ``complete`` once the task's last shard is written, with the totals and the
    reader's per-file report. A rerun of the task first deletes what the task
    wrote before. A document without tokens is counted ``empty`` (DataError
    under policy fail, naming the file and the document).
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
        clear_shard_dir(out)
        out.mkdir(parents=True, exist_ok=True)
        tok = Tokenizer(self.settings.tokenizer)
        shards = ShardSet(out, {**manifest_header(tok, self.settings.tokenizer), "task": rank,
                                "files": [f.file.key for f in self.plan.files_of(rank)],
                                "settings": self.settings.recorded(tok, self.plan)},
                          self.settings.shard_size_mb)
        for doc in data or ():
            meta = doc.metadata
            source, index = meta["source"], meta["doc"]
            split = assign_split(source, index, self.settings.val_fraction,
                                 self.settings.split_seed)
            if shards.add(meta["ordinal"], split, InputDocument(source, index, doc.text),
                          meta["ids"], self.reader.report, self.settings.policy):
                self.stat_update(split)
                yield doc
        shards.finish(self.reader.report)

