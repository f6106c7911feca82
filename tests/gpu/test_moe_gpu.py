"""GPU checks of the MoE expert-compute backends (run by hand on a CUDA machine).

    pytest -q -s tests/gpu/test_moe_gpu.py      # speeds printed; MOE_GPU_OUT=file.json saves them

* ``grouped_mm`` and (where MegaBlocks imports) ``megablocks`` against ``loop``
  on the same weights, in bf16: outputs and gradients within twice the error of
  the bf16 ``loop`` itself against an fp32 ``loop`` reference (+ a floor);
* forward+backward tokens/s of every available backend at a few token counts.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from liquid_dist.config import MoEConfig
from liquid_dist.model.moe import MoELayer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEVICE = "cuda"
D_MODEL, FFN, EXPERTS = 1024, 2048, 8
FLOOR = 1e-3


def _megablocks_available() -> bool:
    try:
        from liquid_dist.model.megablocks import _grouped_gemm_ops

        _grouped_gemm_ops()
    except RuntimeError:
        return False
    return True


BACKENDS = ["grouped_mm", "loop"] + (["megablocks"] if _megablocks_available() else [])


def _layer(backend: str, dtype: torch.dtype) -> MoELayer:
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=EXPERTS, top_k=2, dynamic_k=True, k_max=4,
                    expert_ffn_dim=FFN, expert_type="mlp", backend=backend)
    return MoELayer(cfg, d_model=D_MODEL).to(DEVICE, dtype)


def _run(layer: MoELayer, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.clone().requires_grad_()
    y, aux = layer(x)
    (y.float().square().mean() + aux["moe_entropy"]).backward()
    grads = [x.grad] + [p.grad for p in layer.expert_parameters()]
    layer.zero_grad(set_to_none=True)
    return y.float(), [g.float() for g in grads]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "loop"])
def test_backend_matches_loop_in_bf16(backend: str) -> None:
    x = torch.randn(4096, D_MODEL, device=DEVICE)
    y_ref, g_ref = _run(_layer("loop", torch.float32), x)
    y_loop, g_loop = _run(_layer("loop", torch.bfloat16), x.bfloat16())
    y, g = _run(_layer(backend, torch.bfloat16), x.bfloat16())
    loop_err = (y_loop - y_ref).abs().max().item()
    assert (y - y_ref).abs().max().item() <= 2 * loop_err + FLOOR
    for a, b, r in zip(g, g_loop, g_ref, strict=True):
        assert (a - r).abs().max().item() <= 3 * (b - r).abs().max().item() + FLOOR


def test_backend_speeds() -> None:
    results: dict[str, dict[str, float]] = {}
    for backend in BACKENDS:
        layer = _layer(backend, torch.bfloat16)
        results[backend] = {}
        for n in (4096, 16384, 65536):
            x = torch.randn(n, D_MODEL, device=DEVICE, dtype=torch.bfloat16)
            _run(layer, x)  # warm-up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(5):
                _run(layer, x)
            torch.cuda.synchronize()
            results[backend][str(n)] = 5 * n / (time.perf_counter() - t0)
    print(json.dumps({"device": torch.cuda.get_device_name(), "tokens_per_s": results},
                     indent=1))
    if os.environ.get("MOE_GPU_OUT"):
        with open(os.environ["MOE_GPU_OUT"], "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "tokens_per_s": results}, fh)
    assert all(v > 0 for r in results.values() for v in r.values())
