"""Pretrain LiquidFoundationModelOptimized with DeepSpeed (docs/training.md).

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 --master_port 29511 \\
        launch/pretrain.py --config configs/tiny.yaml [--set train.max_steps=50 ...]
    torchrun --nproc_per_node 2 --master_port 29511 launch/pretrain.py --config configs/tiny.yaml

Exit status: 0 done, 2 bad config, 3 non-finite loss stop, 75 preempted (checkpoint
written; run again with --resume auto), 1 other error.
"""

import argparse
import sys

from liquid_dist.train.entry import pretrain


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML run config (configs/*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key (repeatable)")
    p.add_argument("--resume", default="auto",
                   help="auto (latest checkpoint of train.run_dir, if any), none, or a "
                        "checkpoint / run directory")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by the deepspeed launcher (LOCAL_RANK wins when both exist)")
    args = p.parse_args(argv)
    return pretrain(args.config, args.set, resume=args.resume, local_rank=args.local_rank)


if __name__ == "__main__":
    sys.exit(main())
