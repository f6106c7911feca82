"""Tokenise text into WebDataset shards with a manifest (parallel, deterministic, resumable).

    python data_prep/make_shards.py --tokenizer data/tokenizer/tokenizer.model \\
        --input corpus/ --output data/shards --shard-size-mb 64 --workers 8 --val-fraction 0.01

Writes OUTPUT/train-000000.tar ..., OUTPUT/val-000000.tar ... (one sample per
document: KEY.ids.u16 or KEY.ids.u32 little-endian ids + KEY.json metadata)
and OUTPUT/manifest.json (per shard: documents, tokens, bytes, sha256).
Re-running with the same settings keeps complete shards and rewrites the
partial one; the output bytes depend only on the inputs and settings, not on
--workers. Bad inputs are counted per file and reported at the end. --verify
checks an existing output against its manifest.

With --tasks N the same preparation runs as a datatrove pipeline of N tasks
on this machine, --workers of them at a time: each task reads a contiguous
run of the input files, writes OUTPUT/task-RANK/{train,val}-NNNNNN.tar and
OUTPUT/task-RANK/manifest.json, and the merge writes OUTPUT/manifest.json
listing every task's shards (the loader reads it like any other). The
documents, their ids and their split are the same for any N. Running the
command again runs only the unfinished tasks (datatrove's logs and completion
markers are in OUTPUT/datatrove/).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from liquid_dist.data.errors import DataError
from liquid_dist.data.shard_writer import make_shards
from liquid_dist.data.shards import verify_shards


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", help="tokenizer.model")
    p.add_argument("--input", nargs="+", help="files or directories")
    p.add_argument("--output", required=True, help="shard directory")
    p.add_argument("--shard-size-mb", type=float, default=64.0)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="tokenising processes; with --tasks, tasks run at a time")
    p.add_argument("--tasks", type=int,
                   help="run as a datatrove pipeline of this many tasks (see above)")
    p.add_argument("--val-fraction", type=float, default=0.0)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--txt-docs", choices=["blank-line", "file"], default="blank-line")
    p.add_argument("--text-field", default="text", help="JSON field holding the text")
    p.add_argument("--bad-input", choices=["fail", "skip"], default="skip")
    p.add_argument("--overwrite", action="store_true",
                   help="ignore an existing manifest instead of resuming")
    p.add_argument("--verify", action="store_true", help="only check OUTPUT against its manifest")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        if args.verify:
            problems = verify_shards(args.output)
            for line in problems:
                print(line, file=sys.stderr)
            print(f"{args.output}: {'OK' if not problems else f'{len(problems)} problems'}")
            return 1 if problems else 0
        if not args.tokenizer or not args.input:
            p.error("--tokenizer and --input are required (unless --verify)")
        start = time.time()
        if args.tasks is not None:
            if args.tasks < 1:
                p.error(f"--tasks {args.tasks} must be >= 1")
            try:
                from liquid_dist.data.prep import PrepSettings, prepare_shards
            except ImportError as exc:
                raise DataError(str(exc)) from exc
            settings = PrepSettings(
                str(args.tokenizer), shard_size_mb=args.shard_size_mb,
                val_fraction=args.val_fraction, split_seed=args.split_seed,
                txt_docs=args.txt_docs, text_field=args.text_field, policy=args.bad_input)
            manifest = prepare_shards(args.input, args.output, settings, tasks=args.tasks,
                                      workers=args.workers, overwrite=args.overwrite)
        else:
            manifest = make_shards(
                args.input, args.output, args.tokenizer, shard_size_mb=args.shard_size_mb,
                workers=args.workers, val_fraction=args.val_fraction,
                split_seed=args.split_seed, txt_docs=args.txt_docs,
                text_field=args.text_field, policy=args.bad_input,
                overwrite=args.overwrite, progress=not args.no_progress)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for split, t in manifest["totals"].items():
        print(f"{split}: {t['shards']} shards, {t['documents']} documents, {t['tokens']} tokens")
    print(f"wrote {args.output} ({time.time() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
