"""Data pipeline: tokenizer, WebDataset shards, pretraining objectives, loaders.

See docs/data.md. Public API:

* :class:`Tokenizer`, :func:`train_tokenizer` — sentencepiece with fixed ids
  (pad=0, eos=1, unk=2, bos=3) and ``<extra_id_i>`` sentinels.
* :mod:`liquid_dist.data.prep` (imported on its own: it needs datatrove) —
  text -> WebDataset shards + manifest, as a datatrove pipeline of N tasks on
  this machine or a Slurm job array (parallel, resumable).
* :func:`build_train_loader`, :func:`build_val_loader` -> :class:`PretrainingLoader`;
  :func:`merge_loader_states` — every rank's loader state as one, to resume on
  another world size.
* :func:`span_corruption`, :func:`prefix_lm`, :func:`collate`, :func:`example_shape` —
  the objectives and their fixed batch shapes.
* :class:`DataError` — bad input, naming the file or shard.
"""

from liquid_dist.data.errors import BadSample, DataError
from liquid_dist.data.loader import (
    PretrainingLoader,
    build_train_loader,
    build_val_loader,
    merge_loader_states,
)
from liquid_dist.data.objectives import (
    IGNORE_INDEX,
    ExampleShape,
    collate,
    example_shape,
    prefix_lm,
    prefix_lm_raw_length,
    span_corruption,
    span_corruption_raw_length,
)
from liquid_dist.data.shards import read_manifest, resolve_shards, verify_shards
from liquid_dist.data.text_inputs import InputFile, InputReport, expand_inputs, iter_documents
from liquid_dist.data.tokenizer import Tokenizer, train_tokenizer

__all__ = [
    "IGNORE_INDEX", "BadSample", "DataError", "ExampleShape", "InputFile", "InputReport",
    "PretrainingLoader", "Tokenizer", "build_train_loader", "build_val_loader", "collate",
    "example_shape", "expand_inputs", "iter_documents", "merge_loader_states",
    "prefix_lm", "prefix_lm_raw_length", "read_manifest", "resolve_shards", "span_corruption",
    "span_corruption_raw_length", "train_tokenizer", "verify_shards",
]
