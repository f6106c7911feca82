"""Shard preparation as a datatrove pipeline: N tasks, one merged manifest.

Every task runs the same three steps (:mod:`.steps`): read its input units
(files, or byte ranges of large files) of the plan (:mod:`.plan`) with
:mod:`liquid_dist.data.text_inputs`, tokenise with the project's sentencepiece
:class:`~liquid_dist.data.Tokenizer`, write its WebDataset shards and manifest
under ``OUTPUT/task-RANK/``. :func:`merge_tasks`
then writes ``OUTPUT/manifest.json``, the manifest the loader reads, listing
the shards where the tasks wrote them. A task run again keeps its complete
shards. One task is the same code as N, and
:func:`prepare_shards` (this machine) the same pipeline as
:func:`submit_shards` (a Slurm job array and a merge job).
"""

from liquid_dist.data.prep.merge import merge_tasks, task_log, unfinished_tasks
from liquid_dist.data.prep.plan import TaskPlan, assign_tasks, doc_ordinal, plan_tasks
from liquid_dist.data.prep.run import (
    SlurmSettings,
    Submitted,
    build_pipeline,
    prepare_shards,
    submit_shards,
)
from liquid_dist.data.prep.steps import (
    PrepSettings,
    SentencePieceTokenizer,
    TextInputsReader,
    WebDatasetShardWriter,
    task_dir_name,
)

__all__ = [
    "PrepSettings", "SentencePieceTokenizer", "SlurmSettings", "Submitted", "TaskPlan",
    "TextInputsReader", "WebDatasetShardWriter", "assign_tasks", "build_pipeline", "doc_ordinal",
    "merge_tasks", "plan_tasks", "prepare_shards", "submit_shards", "task_dir_name", "task_log",
    "unfinished_tasks",
]
