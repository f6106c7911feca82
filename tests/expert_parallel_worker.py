"""One rank of the MoE all-to-all checks (run by tests/test_expert_parallel_units.py via torchrun).

Every rank builds the same full MoELayer (same seed) as a single-process
reference, then a second copy goes through ``apply_expert_parallel``. Each
rank feeds its own tokens; the expert-parallel layer must give the reference's
outputs, input gradients and (summed over ranks) expert gradients. The router
bias sends every token to the experts of expert-parallel rank 0, so rank 1's
experts receive no token and rank 1 sends none to itself: the exchange must
still complete (the test's timeout turns a hang into a failure). In the
"padded" case a third of rank 0's tokens and all of rank 1's are padding: none
of it is sent, and its outputs are exactly zero.

    torchrun --nproc_per_node 2 tests/expert_parallel_worker.py BACKEND OUT_JSON
"""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist

from liquid_dist.config import MoEConfig
from liquid_dist.model.moe import MoELayer
from liquid_dist.parallel.distributed import exit_process, init_distributed
from liquid_dist.parallel.expert_parallel import apply_expert_parallel, expert_range


def main() -> int:
    backend, out_path = sys.argv[1], sys.argv[2]
    env, _ = init_distributed()
    cfg = MoEConfig(num_experts=4, top_k=1, dynamic_k=True, k_max=2, expert_ffn_dim=16,
                    expert_type="mlp", backend=backend)
    torch.manual_seed(0)
    ref = MoELayer(cfg, d_model=8)
    with torch.no_grad():
        ref.router.bias.copy_(torch.tensor([4.0, 4.0, -30.0, -30.0]))
    holder = torch.nn.Module()
    holder.moe = copy.deepcopy(ref)
    layout = apply_expert_parallel(holder, ep_size=2)
    results = {}
    n_empty = 12 if env.rank == 0 else 0
    for case, n_tokens, n_real in (("skewed", 12, 12), ("empty_rank", n_empty, n_empty),
                                   ("padded", 12, 8 if env.rank == 0 else 0)):
        torch.manual_seed(100 + env.rank)
        x = torch.randn(n_tokens, 8)
        mask = None if n_real == n_tokens else torch.arange(n_tokens) < n_real
        x_ref, x_ep = x.clone().requires_grad_(), x.clone().requires_grad_()
        for p in list(ref.parameters()) + list(holder.parameters()):
            p.grad = None
        y_ref, aux_ref = ref(x_ref, mask)
        y_ep, aux_ep = holder.moe(x_ep, mask)
        (y_ref.square().sum() + aux_ref["moe_entropy"]).backward()
        (y_ep.square().sum() + aux_ep["moe_entropy"]).backward()
        start, stop = expert_range(4, 2, layout.ep_rank)
        grad_err = 0.0
        for name in ("w1", "b1", "w2", "b2"):
            g_ref = getattr(ref, name).grad
            g_ref = torch.zeros_like(getattr(ref, name)) if g_ref is None else g_ref.clone()
            dist.all_reduce(g_ref)  # the experts see every rank's tokens
            g_ep = getattr(holder.moe, name).grad
            g_ep = torch.zeros_like(getattr(holder.moe, name)) if g_ep is None else g_ep.clone()
            grad_err = max(grad_err, (g_ep - g_ref[start:stop]).abs().max().item())
        results[case] = {
            "y_err": (y_ep - y_ref).abs().max().item() if n_tokens else 0.0,
            "x_grad_err": (x_ep.grad - x_ref.grad).abs().max().item() if n_tokens else 0.0,
            "router_grad_err": (holder.moe.router.weight.grad
                                - ref.router.weight.grad).abs().max().item(),
            "expert_grad_err": grad_err,
            "usage": aux_ep["expert_usage"].tolist(),
            "padding_out": 0.0 if mask is None else y_ep[~mask].abs().sum().item(),
        }
    results["rank"] = env.rank
    results["global_experts"] = layout.global_experts
    with open(f"{out_path}.rank{env.rank}", "w") as fh:
        json.dump(results, fh)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    exit_process(main())
