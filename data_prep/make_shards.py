"""Tokenise text into WebDataset shards with a manifest: a datatrove pipeline of N tasks on this
machine or on a Slurm job array (deterministic, resumable).

    python data_prep/make_shards.py --tokenizer data/tokenizer/tokenizer.model \\
        --input corpus/ --output data/shards --tasks 8 --workers 8 --val-fraction 0.01

    python data_prep/make_shards.py --tokenizer /shared/tokenizer.model \\
        --input 's3://bucket/corpus/*.jsonl.zst' --output /shared/shards --tasks 1000 \\
        --executor slurm --partition cpu --time 4:00:00 --mem-per-cpu-gb 4 --concurrency 200

Each task reads its part of the inputs (files in input order, large files cut
into byte ranges; docs/data.md), tokenises with the sentencepiece model and
writes OUTPUT/task-RANK/{train,val}-NNNNNN.tar (one sample per document:
KEY.ids.u16 or KEY.ids.u32 little-endian ids + KEY.json metadata) and
OUTPUT/task-RANK/manifest.json; the merge writes OUTPUT/manifest.json, which
lists every task's shards (per shard: documents, tokens, bytes, sha256) and
is what the loader reads. The documents, their ids and their train/val split
are the same for any --tasks. Bad inputs are counted per file and reported.

--executor local (the default) runs --workers tasks at a time here and
merges. --executor slurm submits the tasks as a job array and the merge as a
job that starts after every element succeeded, prints the job ids and
returns. Run the same command again after a failure: only unfinished tasks
run, and a task killed part-way keeps its complete shards. datatrove's logs,
completion markers and Slurm logs are in OUTPUT/datatrove/ (--logging-dir).
--verify checks an existing output against its manifest.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from liquid_dist.data.errors import DataError
from liquid_dist.data.prep import (
    PrepSettings,
    SlurmSettings,
    Submitted,
    prepare_shards,
    submit_shards,
)
from liquid_dist.data.shards import verify_shards


def _sbatch_arg(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not key:
        raise argparse.ArgumentTypeError(f"--sbatch-arg {text!r}: expected KEY=VALUE")
    return key.lstrip("-"), value if sep else ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", help="tokenizer.model")
    p.add_argument("--input", nargs="+",
                   help="files, directories, globs or fsspec URLs (s3://, https://, ...)")
    p.add_argument("--output", required=True, help="shard directory")
    p.add_argument("--shard-size-mb", type=float, default=64.0)
    p.add_argument("--tasks", type=int, default=1, help="tasks the inputs are divided into")
    p.add_argument("--workers", type=int,
                   help="--executor local: tasks run at a time (default: cores, at most --tasks)")
    p.add_argument("--val-fraction", type=float, default=0.0)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--txt-docs", choices=["blank-line", "file"], default="blank-line")
    p.add_argument("--text-field", default="text", help="JSON field holding the text")
    p.add_argument("--bad-input", choices=["fail", "skip"], default="skip")
    p.add_argument("--split-mb", type=float, default=256.0,
                   help="read uncompressed jsonl / text files larger than this as byte ranges "
                        "of this size, spread over the tasks (0: never cut a file)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete an existing output instead of resuming it")
    p.add_argument("--verify", action="store_true", help="only check OUTPUT against its manifest")
    p.add_argument("--logging-dir",
                   help="datatrove's logs, stats, completion marks and Slurm logs "
                        "(default: OUTPUT/datatrove)")
    slurm = p.add_argument_group("--executor slurm")
    p.add_argument("--executor", choices=["local", "slurm"], default="local")
    slurm.add_argument("--partition", help="partition of the job array and the merge job")
    slurm.add_argument("--time", default="24:00:00", help="time limit per task")
    slurm.add_argument("--cpus-per-task", type=int, default=1)
    slurm.add_argument("--mem-per-cpu-gb", type=int, default=2)
    slurm.add_argument("--concurrency", type=int, default=-1,
                       help="array elements running at once (-1: no limit)")
    slurm.add_argument("--job-name", default="liquid-prep")
    slurm.add_argument("--sbatch-arg", type=_sbatch_arg, action="append", default=[],
                       metavar="KEY=VALUE", help="another #SBATCH option (repeatable)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.verify:
        problems = verify_shards(args.output)
        for line in problems:
            print(line, file=sys.stderr)
        print(f"{args.output}: {'OK' if not problems else f'{len(problems)} problems'}")
        return 1 if problems else 0
    if not args.tokenizer or not args.input:
        p.error("--tokenizer and --input are required (unless --verify)")
    if args.tasks < 1:
        p.error(f"--tasks {args.tasks} must be >= 1")
    if args.executor == "slurm" and not args.partition:
        p.error("--executor slurm needs --partition")
    settings = PrepSettings(
        str(args.tokenizer), shard_size_mb=args.shard_size_mb, val_fraction=args.val_fraction,
        split_seed=args.split_seed, txt_docs=args.txt_docs, text_field=args.text_field,
        policy=args.bad_input, split_mb=args.split_mb)
    start = time.time()
    try:
        if args.executor == "slurm":
            submitted = submit_shards(
                args.input, args.output, settings,
                SlurmSettings(args.partition, time=args.time, cpus_per_task=args.cpus_per_task,
                              mem_per_cpu_gb=args.mem_per_cpu_gb,
                              concurrency=args.concurrency, job_name=args.job_name,
                              sbatch_args=tuple(args.sbatch_arg)),
                tasks=args.tasks, overwrite=args.overwrite, logging_dir=args.logging_dir)
            _print_submitted(submitted, args.tasks, args.output)
            return 0
        workers = args.workers or min(args.tasks, os.cpu_count() or 1)
        if workers < 1:
            p.error(f"--workers {workers} must be >= 1")
        manifest = prepare_shards(args.input, args.output, settings, tasks=args.tasks,
                                  workers=workers, overwrite=args.overwrite,
                                  logging_dir=args.logging_dir)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for split, t in manifest["totals"].items():
        print(f"{split}: {t['shards']} shards, {t['documents']} documents, {t['tokens']} tokens")
    print(f"wrote {args.output} ({time.time() - start:.1f} s)")
    return 0


def _print_submitted(submitted: Submitted, tasks: int, output: str) -> None:
    if submitted.array_job:
        print(f"array job {submitted.array_job}: {len(submitted.tasks)} of {tasks} tasks "
              f"({_ranges(submitted.tasks)})")
    else:
        print(f"every one of the {tasks} tasks has finished")
    if submitted.merge_job:
        after = f", after job {submitted.array_job}" if submitted.array_job else ""
        print(f"merge job {submitted.merge_job}{after}: writes {output}/manifest.json")
    else:
        print(f"the merge has run: {output}/manifest.json")
    print(f"Slurm logs: {submitted.slurm_logs}")


def _ranges(ranks: list[int]) -> str:
    """'0-3,7' for [0, 1, 2, 3, 7]."""
    parts, start = [], None
    for i, rank in enumerate(ranks):
        if start is None:
            start = rank
        if i + 1 == len(ranks) or ranks[i + 1] != rank + 1:
            parts.append(f"{start}" if start == rank else f"{start}-{rank}")
            start = None
    return ",".join(parts)


if __name__ == "__main__":
    sys.exit(main())
