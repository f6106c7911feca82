"""Print greedy and top-p continuations of validation prompts from a trained checkpoint.

    python launch/sample.py --checkpoint runs/tiny [--num 2] [--max-new-tokens 48] [--top-p 0.9]
"""

import argparse
import sys

from liquid_dist.train.sample import validation_samples


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="run directory, its checkpoints/ directory, or one checkpoint")
    p.add_argument("--num", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for i, s in enumerate(validation_samples(args.checkpoint, num=args.num,
                                             max_new_tokens=args.max_new_tokens,
                                             top_p=args.top_p, seed=args.seed)):
        print(f"--- sample {i}\n[prompt]    ...{s['prompt'][-300:]}\n"
              f"[reference] {s['reference']}\n[greedy]    {s['greedy']}\n"
              f"[top-p {args.top_p}] {s['sampled']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
