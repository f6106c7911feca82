"""Pretrain LiquidFoundationModelOptimized with DeepSpeed (docs/training.md).

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 --master_port 29511 \\
        launch/pretrain.py --config configs/tiny.yaml [--set train.max_steps=50 ...]
    torchrun --nproc_per_node 2 --master_port 29511 launch/pretrain.py --config configs/tiny.yaml

Exit status: 0 done, 2 bad config, 3 non-finite loss stop, 75 preempted (checkpoint
written; run again with --resume auto), 1 other error (liquid_dist.train.exit_status).
"""

from liquid_dist.parallel.distributed import exit_process
from liquid_dist.train.entry import argument_parser, pretrain


def main(argv: list[str] | None = None) -> int:
    args = argument_parser().parse_args(argv)
    return pretrain(args.config, args.set, resume=args.resume, local_rank=args.local_rank)


if __name__ == "__main__":
    exit_process(main())
