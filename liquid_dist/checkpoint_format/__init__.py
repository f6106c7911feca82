"""The training checkpoint on disk: its layout, how to find one, and its one reader.

Layout of ``RUN_DIR/checkpoints/`` (written by liquid_dist.train.checkpoint)::

    latest                   text file: the tag of the newest complete checkpoint
    step_00000100/           one complete checkpoint (tag = step_<8 digits>)
        zero_pp_rank_<r>_mp_rank_00_{model,optim}_states.pt
                             DeepSpeed's files, one pair per rank (ZeRO 1-3; ZeRO 0
                             writes one mp_rank_00_model_states.pt)
        trainer_state.pt     step, counters, wandb run id, world size, ep_size, and
                             for every rank its data-loader and RNG states
                             (tensors, numbers and strings only: read with
                             ``weights_only=True``)
        config.yaml          the resolved config (model.vocab_size an integer)
        tokenizer.model      copy of the tokenizer the data was made with
        done.rank<r>         each rank's "my part is written" marker
        checksums.json       size and SHA-256 of every other file, written last
                             before the checkpoint is renamed into place
    step_00000200.tmp/       a checkpoint being written (or abandoned by a crash)

Everything that reads these files goes through this package, one module per
concern — :mod:`.layout` (names, tags, finding a checkpoint, its trainer state
and config), :mod:`.integrity` (checksums and their verification) and
:mod:`.zero` (the one reader of DeepSpeed's rank files):
:func:`find_checkpoint` (``--resume``, ``train.init_from``, the converter, the
sampler), :func:`read_trainer_state`, :func:`read_config`, and
:func:`open_checkpoint`, which indexes DeepSpeed's rank files without
loading them (memory-mapped, through the weights-only unpickler) and returns
any parameter — or its AdamW moments — whole, whatever the world size and
``ep_size`` that wrote it: dense ZeRO-3 parameters are joined from every
rank's slice, expert tensors (partitioned over the expert-data-parallel
group only) are joined per expert-parallel rank and stacked by global expert
index. :func:`verify_checkpoint` checks every file against ``checksums.json``
(``python -m liquid_dist.checkpoint_format verify RUN_DIR`` for every
checkpoint of a run); :func:`find_damage` does one rank's share of that check
when the ranks of a launch verify a checkpoint together. Nothing here imports
DeepSpeed or ``torch.distributed``.
"""

from liquid_dist.checkpoint_format.integrity import (
    DamageFinder,
    checksummed_files,
    file_digest,
    find_damage,
    hash_shares,
    newest_valid_checkpoint,
    verify_checkpoint,
)
from liquid_dist.checkpoint_format.layout import (
    CHECKPOINTS,
    CHECKSUMS,
    CONFIG_FILE,
    DONE_PREFIX,
    LATEST,
    STATE_VERSION,
    STATES,
    TAG_PATTERN,
    TMP_SUFFIX,
    TOKENIZER_FILE,
    TRAINER_STATE,
    WRAPPER_PREFIX,
    CheckpointError,
    CheckpointRef,
    complete_tags,
    find_checkpoint,
    latest_step,
    latest_tag,
    read_config,
    read_trainer_state,
    tag_for,
)
from liquid_dist.checkpoint_format.zero import ZeroCheckpoint, open_checkpoint, strip_wrapper

__all__ = [
    "CHECKPOINTS", "CHECKSUMS", "CONFIG_FILE", "DONE_PREFIX", "LATEST", "STATES", "STATE_VERSION",
    "TAG_PATTERN", "TMP_SUFFIX", "TOKENIZER_FILE", "TRAINER_STATE", "WRAPPER_PREFIX",
    "CheckpointError", "CheckpointRef", "DamageFinder", "ZeroCheckpoint", "checksummed_files",
    "complete_tags", "file_digest", "find_checkpoint", "find_damage", "hash_shares",
    "latest_step", "latest_tag", "newest_valid_checkpoint", "open_checkpoint", "read_config",
    "read_trainer_state", "strip_wrapper", "tag_for", "verify_checkpoint",
]
