"""Train exactly as launch/pretrain.py does, then write the live model's logits (test harness).

    torchrun --nproc_per_node 2 tests/live_logits_harness.py --logits OUT.pt --config ...

After the run, while the process group and the DeepSpeed engine are still up,
every rank runs the engine's model (ZeRO-3 partitions, expert exchange and
all) in eval mode on :func:`probe_inputs`; rank 0 saves the logits to
``--logits``. A test compares them with what a converted checkpoint gives.
"""

from __future__ import annotations

import argparse

import torch

from liquid_dist.parallel.distributed import exit_process
from liquid_dist.train import entry
from liquid_dist.train.trainer import Trainer


def probe_inputs(vocab_size: int, encoder_length: int,
                 decoder_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two seeded rows of random ids; the second row's encoder half padding."""
    g = torch.Generator().manual_seed(0)
    enc = torch.randint(2, vocab_size, (2, encoder_length), generator=g)
    dec = torch.randint(2, vocab_size, (2, decoder_length), generator=g)
    mask = torch.ones_like(enc, dtype=torch.bool)
    mask[1, encoder_length // 2:] = False
    return enc, dec, mask


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--logits", required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--resume", default="auto")
    args = p.parse_args()

    class LogitsAfterTraining(Trainer):
        def run(self, stop=None) -> int:
            code = super().run(stop)
            m = self.cfg.model
            enc, dec, mask = probe_inputs(m.vocab_size, m.max_encoder_length,
                                          m.max_decoder_length)
            self.engine.eval()
            with torch.no_grad():
                out = self.engine.module.model(enc.to(self.device), dec.to(self.device),
                                               encoder_attention_mask=mask.to(self.device))
            if self.env.rank == 0:
                torch.save(out.logits.float().cpu(), args.logits)
            return code

    entry.Trainer = LogitsAfterTraining  # pretrain() builds the trainer by this name
    return entry.pretrain(args.config, args.set, resume=args.resume)


if __name__ == "__main__":
    exit_process(main())
