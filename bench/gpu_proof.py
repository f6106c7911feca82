"""The one-shot proof of the GPU path, for one bare GPU machine (or ``--cpu-smoke``).

    bash bench/fetch_gpu_wheels.sh                      # here: wheels -> bench/wheels
    python bench/gpu_proof.py --out "$OUT"              # there: one H200 (three training runs)
    python bench/gpu_proof.py --cpu-smoke --out /tmp/p  # the same script end to end on CPU

The GPU machine has torch but no network, DeepSpeed or WebDataset: the script
installs the wheels of ``--wheels`` (default ``bench/wheels``, carried with the
checkout) into ``OUT/site`` when they are missing, and reads the Shakespeare
shards of ``--data`` (default ``data/shakespeare``, carried too; made by
``data_prep/prepare_shakespeare.py``). Everything it writes is under ``--out``:
``gpu_proof.json`` (every figure and verdict, rewritten after every check),
``gpu_proof.log`` and the training runs' logs and ``metrics.jsonl``. Checks, each
recorded as ``ok`` / ``failed`` / ``skipped`` with its reason, so that one failure
does not hide the rest:

1. ``attention``: every local-attention backend (and cross-attention) against
   the fp32 reference at the training shapes of ``configs/small.yaml`` (GQA,
   padding, symmetric encoder and causal decoder windows), with flash-attn's
   rule (error <= 2x a bf16 PyTorch reference's, 3x for gradients), and the
   forward+backward time and peak memory of each. PyTorch's bundled flash
   kernel with a window (``aten._flash_attention_forward``) stands in for
   flash-attn where flash-attn is not installed.
2. ``moe``: the MoE layer (bf16 weights) against a reference that routes
   identically (the layer's own routing, experts computed per token in fp32
   from the same weights upcast), with an expert that receives no tokens;
   forward+backward under ``torch.cuda.set_sync_debug_mode("error")``.
3. ``model_step_sync_free``: one forward+backward of the whole ``small``
   model under the same sync check.
4. ``checkpoint_capture``: an asynchronous save's capture
   (liquid_dist.train.checkpoint_io) of a ZeRO-3 rank's share of the ``small``
   model at W = 1 (12 bytes a parameter) from the GPU: the time the step loop
   waits, the time until the page-locked copies have landed and the copy's
   GB/s (``liquid-plan --host-copy-gbps``), against ``torch.save`` of the same
   state into memory; and whether the file the background writer makes equals
   ``torch.save``'s, device tags included.
5. ``train``: ``configs/small.yaml`` in bf16 under ZeRO-3 on one GPU for
   ``--steps`` steps: first-step loss against a plain forward without
   DeepSpeed, steady real tokens/s, MFU (H200 dense bf16 peak), peak memory,
   and the backends that ran.
6. ``profile``: where the time of a forward+backward of the ``small`` model goes,
   at the training shapes and precision (parameters in bf16 under autocast, as
   DeepSpeed's bf16 runs them; ``train``'s first batch; no optimizer update): the
   forward and backward time of each component of :data:`PROFILE_COMPONENTS` and of
   the rest, as shares of the step, beside the CPU shares that
   ``bench/removal_cost.py`` measured (``bench/results/removal_cost.json``: the step
   time that removing the component saves, ``tiny`` on a CPU). Timed by
   :class:`ComponentTimer` (CUDA events on the GPU, the thread's CPU time on the
   CPU); the labels' times add up to the instrumented step by construction, so the
   check compares their sum with the step measured without instrumentation
   (:data:`PROFILE_STEPS` of each, interleaved, Python's garbage collector paused,
   the middle half of each by step time) and fails when they differ by more than
   10 %: the instrumentation must not change what it measures.
7. ``baseline``: ``configs/small-transformer.yaml`` (every component ablated)
   widened by ``bench/ablations.py``'s equal-parameter rule (the ``model.ffn_dim``
   that brings its total parameters to the full model's) trained like ``train``:
   bf16, ZeRO-3, the same data, seed, batches and steps. Both runs' steady real
   tokens/s, MFU and peak memory, and the ratios full : plain.
8. ``deterministic``: the same training with ``train.deterministic=true``
   (deterministic algorithms, cuBLAS's fixed workspace): whether every operation
   has a deterministic implementation, its steady step time against ``train``'s
   (the switch's cost), and whether its losses equal ``train``'s.

Time on one H200, estimated (no GPU has run it yet): start-up and wheels ~20 s,
``attention`` ~60 s (flex attention compiles for both shapes), ``moe`` ~15 s,
``model_step_sync_free`` ~25 s, ``checkpoint_capture`` ~15 s, ``train`` ~75 s
(launch, DeepSpeed, compilation, 30 steps, a checkpoint), ``profile`` ~30 s,
``baseline`` ~60 s, ``deterministic`` ~75 s: about 6.5 minutes, so that the
proof fits one ten-minute call and a rerun fits the rest of a 15-minute draw
(``deterministic``, last, is the first to be
shortened when the estimates are low). ``--budget-s`` (default 360) bounds it: the
checks from ``train`` on start only with at least :data:`MIN_SECONDS` of the budget
left (else ``skipped``, with the reason); ``profile`` times fewer steps (down to
3) when its 20 would overrun; ``baseline`` and ``deterministic`` train fewer steps
(down to :data:`MIN_STEPS`) when ``train``'s fixed cost and steady step time say
that ``--steps`` would overrun, and are skipped below that; every training run is
killed at the end of the budget. The checks run in the order above, so the
earlier figures always come back.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import glob
import importlib.util
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
NEEDED = ("deepspeed", "webdataset", "hjson", "pydantic")
MIN_SECONDS = {"train": 60.0, "profile": 20.0, "baseline": 45.0, "deterministic": 45.0}
"""The budget a check needs left to start (``--budget-s``)."""
MIN_STEPS = 15
"""The fewest steps ``baseline`` and ``deterministic`` train when the budget shortens
them (the steady figures are medians over the steps after the 10th)."""


# ------------------------------------------------------------------ set-up


def _install_wheels(wheels: Path, site: Path, log: Callable[[str], None]) -> None:
    """Make the packages of NEEDED importable (pip install --target, no network)."""
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        files = sorted(glob.glob(str(wheels / "*.whl")))
        if not files:
            raise SystemExit(f"{missing} are not installed and {wheels} holds no wheels: run "
                             "bash bench/fetch_gpu_wheels.sh on a machine with the registry")
        log(f"installing {len(files)} wheels from {wheels} into {site} (missing: {missing})")
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
                        "--disable-pip-version-check", "-q", "--target", str(site), *files],
                       check=True)
    for path in (str(site), str(REPO)):
        if path not in sys.path:
            sys.path.insert(0, path)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(site), str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                  if p])


def _check(results: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]],
           log: Callable[[str], None], save: Callable[[], None]) -> None:
    """Run one check; record its figures and verdict, or the error that stopped it, and
    save the results so far."""
    log(f"== {name}")
    start = time.perf_counter()
    try:
        out = fn()
        out.setdefault("status", "ok")
    except Exception as exc:  # a failed check is a result, not the end of the proof
        out = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
               "traceback": traceback.format_exc()[-4000:]}
    out["seconds"] = round(time.perf_counter() - start, 2)
    results[name] = out
    save()
    log(f"   {out['status']} in {out['seconds']} s"
        + (f": {out.get('error') or out.get('reason')}" if out["status"] != "ok" else ""))


@contextlib.contextmanager
def _no_host_sync(device):
    """Raise on any CUDA host synchronisation inside the block (CPU: nothing to check)."""
    import torch

    if device.type != "cuda":
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _timed(fn: Callable[[], Any], device, repeats: int) -> tuple[float, float]:
    """(median seconds, peak memory GB above the start) of ``fn()`` after one warm-up call."""
    import torch

    fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) / 1e9 if device.type == "cuda" else None
    return statistics.median(times), peak


# ------------------------------------------------------------------ checks


def _errors(out, grads, ref, ref_grads, low, low_grads) -> dict[str, float]:
    """Max abs errors of a result and its gradients vs the fp32 reference, with the
    low-precision reference's errors that flash-attn's rule compares them to."""
    def err(a, b):
        return float((a.detach().float() - b.detach().float()).abs().max())

    return {"out": err(out, ref), "out_low_ref": err(low, ref),
            "grad": max(err(g, r) for g, r in zip(grads, ref_grads, strict=True)),
            "grad_low_ref": max(err(g, r) for g, r in zip(low_grads, ref_grads, strict=True))}


def check_attention(cfg, device, dtype, smoke: bool) -> dict[str, Any]:
    import torch

    m, d = cfg.model, cfg.data
    batch = 2 if smoke else cfg.train.micro_batch_size
    backends = ["sdpa", "blocked"] + (["flex", "flash", "torch_flash"] if device.type == "cuda"
                                      else [])
    out: dict[str, Any] = {"dtype": str(dtype), "shapes": {}, "backends": {}}
    g = torch.Generator(device="cpu").manual_seed(0)
    for side, length, causal in (("encoder", d.encoder_length, False),
                                 ("decoder", d.decoder_length, True)):
        shape, rows = _attention_case(m, batch, length, causal, backends, device, dtype, g,
                                      3 if smoke else 10)
        out["shapes"][side] = shape
        out["backends"].update({f"{side}/{name}": row for name, row in rows.items()})
    # cross-attention: the decoder's queries over the padded encoder output
    out["backends"]["cross/sdpa"] = _check_cross_attention(cfg, device, dtype, batch, g, smoke)
    failed = [k for k, r in out["backends"].items() if r["status"] == "failed"]
    if failed:
        out["status"] = "failed"
        out["error"] = f"outside flash-attn's error rule: {failed}"
    return out


def _attention_case(m, batch, length, causal, backends, device, dtype, g, repeats):
    """One (length, causal) training shape: every backend vs the fp32 reference."""
    import torch

    from liquid_dist.model.attention import reference_local_attention

    heads, groups, head_dim = m.n_heads, m.n_kv_heads, m.d_model // m.n_heads
    q = torch.randn(batch, length, heads, head_dim, generator=g).to(device, dtype)
    k = torch.randn(batch, length, groups, head_dim, generator=g).to(device, dtype)
    v = torch.randn(batch, length, groups, head_dim, generator=g).to(device, dtype)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=g)
    lengths[0] = length
    mask = (torch.arange(length)[None] < lengths[:, None]).to(device)
    grad_out = torch.randn(q.shape, generator=g).to(device, dtype)
    shape = {"batch": batch, "length": length, "heads": heads, "kv_heads": groups,
             "head_dim": head_dim, "window": m.window, "causal": causal,
             "padded_rows": int((lengths < length).sum())}

    def run(fn, upcast=False):
        qq, kk, vv = (t.detach().float() if upcast else t.detach() for t in (q, k, v))
        for t in (qq, kk, vv):
            t.requires_grad_(True)
        o = fn(qq, kk, vv)
        o.backward(grad_out.to(o.dtype))
        return o, [t.grad for t in (qq, kk, vv)]

    ref, ref_g = run(lambda qq, kk, vv: reference_local_attention(
        qq, kk, vv, m.window, causal, mask), upcast=True)
    low, low_g = run(lambda qq, kk, vv: reference_local_attention(
        qq, kk, vv, m.window, causal, mask, upcast=False))
    floor = 1e-5
    rows: dict[str, Any] = {}
    for name in backends:
        try:
            fn = _backend_fn(name, m.window, causal, mask)
            o, grads = run(fn)
            sec, peak = _timed(lambda fn=fn: run(fn), device, repeats)
            row = {"fwd_bwd_ms": round(1e3 * sec, 3), "peak_gb": peak}
            if name == "torch_flash":  # a speed stand-in: it takes no padding mask
                row["status"] = "ok" if bool(torch.isfinite(o).all()) else "failed"
            else:
                e = _errors(o, grads, ref, ref_g, low, low_g)
                row.update(e, status="ok" if (e["out"] <= 2 * e["out_low_ref"] + floor
                                              and e["grad"] <= 3 * e["grad_low_ref"] + floor)
                           else "failed")
            rows[name] = row
        except Exception as exc:
            rows[name] = {"status": "skipped", "reason": f"{type(exc).__name__}: {str(exc)[:300]}"}
    return shape, rows


def _backend_fn(name: str, window: int, causal: bool, mask):
    """A callable (q, k, v) -> out for one backend, padding mask included (but for
    ``torch_flash``, which has none)."""
    import torch

    from liquid_dist.model.attention import local_attention

    if name != "torch_flash":
        return lambda q, k, v: local_attention(q, k, v, window=window, causal=causal,
                                               backend=name, key_padding_mask=mask)
    if not hasattr(torch.ops.aten, "_flash_attention_forward"):
        raise RuntimeError("this torch exposes no aten._flash_attention_forward")

    def torch_flash(q, k, v):
        # PyTorch's bundled flash-attention 2 kernel with a window, on every position
        # (it takes no padding mask): the stand-in for flash-attn's speed and memory.
        rep = q.shape[2] // k.shape[2]
        return torch.ops.aten._flash_attention_forward(
            q, k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2), None, None,
            q.shape[1], k.shape[1], 0.0, causal, False,
            window_size_left=window, window_size_right=0 if causal else window)[0]

    return torch_flash


def _check_cross_attention(cfg, device, dtype, batch, g, smoke) -> dict[str, Any]:
    import torch

    from liquid_dist.model.attention import CrossAttention

    m, d = cfg.model, cfg.data
    layer = CrossAttention(m).to(device).eval()  # eval: no dropout between the runs
    x = torch.randn(batch, d.decoder_length, m.d_model, generator=g).to(device)
    memory = torch.randn(batch, d.encoder_length, m.d_model, generator=g).to(device)
    lengths = torch.randint(d.encoder_length // 2, d.encoder_length + 1, (batch,), generator=g)
    mask = (torch.arange(d.encoder_length)[None] < lengths[:, None]).to(device)

    def run(dt):
        with torch.autocast(device.type, dtype=dt, enabled=dt != torch.float32):
            return layer(x, memory, mask)

    ref = run(torch.float32)
    low = run(dtype)
    sec, peak = _timed(lambda: run(dtype).float().sum().backward(), device, 3 if smoke else 10)
    err = float((low.float() - ref).abs().max())
    return {"status": "ok" if torch.isfinite(low).all() else "failed", "out_vs_fp32": err,
            "fwd_bwd_ms": round(1e3 * sec, 3), "peak_gb": peak}


def check_moe(cfg, device, dtype) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from liquid_dist.model.moe import MoELayer, route

    m = cfg.model
    torch.manual_seed(0)
    layer = MoELayer(m.moe, m.d_model).to(device=device, dtype=dtype)
    empty = m.moe.num_experts - 1
    with torch.no_grad():  # expert `empty` can never win: it receives no tokens
        layer.router.bias[empty] = -1e4
    n = 2048 if device.type == "cuda" else 64
    x = torch.randn(n, m.d_model, device=device, dtype=dtype, requires_grad=True)
    mask = torch.ones(n, dtype=torch.bool, device=device)
    mask[-n // 8:] = False  # padding rows: no expert may see them
    grad_out = torch.randn(n, m.d_model, device=device, dtype=dtype)
    with _no_host_sync(device):
        y, aux = layer(x, mask)
        y.backward(grad_out)
    grads = {"x": x.grad.float(), "w1": layer.w1.grad.float()}
    # reference: the layer's own routing (its fp32 router on the same input: the same
    # experts and gate weights, with their gradient), each token through its experts one
    # by one, in fp32 from the same (bf16) weights upcast
    xr = x.detach().float().requires_grad_(True)
    weights, experts, _, _ = route(layer.router_logits(xr), m.moe)
    weights = weights.masked_fill(~mask[:, None], 0.0)
    w1, b1 = layer.w1.detach().float().requires_grad_(True), layer.b1.detach().float()
    w2, b2 = layer.w2.detach().float(), layer.b2.detach().float()
    rows = []
    for i in range(n):
        acc = xr.new_zeros(m.d_model)
        for s in range(experts.shape[1]):
            wgt = weights[i, s]
            if wgt.item() != 0:
                e = int(experts[i, s])
                acc = acc + wgt * (F.gelu(xr[i] @ w1[e] + b1[e]) @ w2[e] + b2[e])
        rows.append(acc)
    ref = torch.stack(rows)
    ref.backward(grad_out.float())
    err_out = float((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6))
    err_x = float((grads["x"] - xr.grad).abs().max() / xr.grad.abs().max().clamp_min(1e-6))
    err_w1 = float((grads["w1"] - w1.grad).abs().max() / w1.grad.abs().max().clamp_min(1e-6))
    usage = aux["expert_usage"].float().tolist()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    ok = (max(err_out, err_x, err_w1) <= tol and usage[empty] == 0.0
          and bool((y[~mask] == 0).all()))
    return {"status": "ok" if ok else "failed", "dtype": str(dtype), "tokens": n,
            "backend": layer.cfg.backend, "rel_err_out": err_out, "rel_err_grad_x": err_x,
            "rel_err_grad_w1": err_w1, "tolerance": tol, "expert_usage": usage,
            "empty_expert": empty, "sync_free": device.type == "cuda"}


def check_model_step(cfg, device, dtype) -> dict[str, Any]:
    import torch

    from liquid_dist.model import LiquidFoundationModelOptimized

    torch.manual_seed(0)
    model = LiquidFoundationModelOptimized(cfg.model).to(device)
    b = 2
    enc = torch.randint(4, cfg.model.vocab_size, (b, cfg.data.encoder_length), device=device)
    dec = torch.randint(4, cfg.model.vocab_size, (b, cfg.data.decoder_length), device=device)
    mask = torch.ones_like(enc, dtype=torch.bool)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        model(enc, dec, encoder_attention_mask=mask, labels=dec)  # warm-up: lazy set-up
    with _no_host_sync(device):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(enc, dec, encoder_attention_mask=mask, labels=dec)
        out.loss.backward()
    return {"loss": float(out.loss), "sync_free": device.type == "cuda"}


def check_checkpoint_capture(cfg, device, smoke: bool) -> dict[str, Any]:
    """An asynchronous save's capture (liquid_dist.train.checkpoint_io) of a ZeRO-3 rank's
    share of the ``small`` model at W = 1 (fp32 weights and AdamW's two moments, 12 bytes
    a parameter) from the device: the time the step loop waits (the staging copies
    enqueued into page-locked memory, the rest pickled), until the copies have landed,
    and ``torch.save`` of the same state into memory (what a capture through
    ``torch.save`` costs: pageable copies and serialisation); the file the background
    writer makes equals ``torch.save``'s, device tags included."""
    import io

    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )

    from liquid_dist.model import LiquidFoundationModelOptimized
    from liquid_dist.train.checkpoint_io import HostCapture, HostStage

    with torch.device("meta"):
        n = sum(p.numel() for p in LiquidFoundationModelOptimized(cfg.model).parameters())
    g = torch.Generator(device=device).manual_seed(0)
    state = {"optimizer_state_dict": {
        name: torch.randn(n, generator=g, device=device) for name in ("fp32", "exp_avg",
                                                                      "exp_avg_sq")},
        "step": 1}
    engine = TorchCheckpointEngine()
    engine.zipfile_serialization = True  # DeepSpeed's default for a configured engine

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    stage = HostStage()
    runs = []
    for _ in range(2 if smoke else 3):  # the first pins fresh memory; later ones reuse it
        sync()
        start = time.perf_counter()
        captured = HostCapture(engine, stage)
        stage.reset()
        captured.save(state, "capture.pt")
        stage.copied()
        blocked = time.perf_counter() - start
        stage.wait()
        runs.append((blocked, time.perf_counter() - start))
    written = io.BytesIO()
    captured._serialise(captured.files[0].state(), written)
    sync()
    start = time.perf_counter()
    reference = io.BytesIO()
    torch.save(state, reference)
    save_s = time.perf_counter() - start
    blocked, landed = runs[-1]
    nbytes = 12 * n
    return {"bytes": nbytes, "blocked_s": blocked, "copied_s": landed,
            "first_blocked_s": runs[0][0], "copy_gb_per_s": nbytes / landed / 1e9,
            "torch_save_to_memory_s": save_s, "blocked_ratio": blocked / save_s,
            "same_file": written.getvalue() == reference.getvalue()}


def check_train(cfg_path: str, sets: list[str], run_dir: Path, out_dir: Path, device,
                steps: int, seconds: float) -> dict[str, Any]:
    """Train ``cfg_path`` with ``sets`` for ``steps`` steps in a subprocess, killed after
    ``seconds``; its steady figures and the first step's loss against a plain forward."""
    import torch

    from liquid_dist.config import load_config
    from liquid_dist.data import build_train_loader
    from liquid_dist.model import LiquidFoundationModelOptimized
    from liquid_dist.model.attention import choose_backend
    from liquid_dist.train.flops import peak_flops_per_device
    from liquid_dist.train.metrics import read_metrics
    from liquid_dist.train.prepare import resolve_vocabulary

    cmd = [sys.executable, str(REPO / "launch" / "pretrain.py"), "--config", cfg_path,
           "--resume", "none"]
    for s in sets:
        cmd += ["--set", s]
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=seconds)
    except subprocess.TimeoutExpired as exc:
        output = exc.output.decode(errors="replace") if isinstance(exc.output, bytes) else \
            exc.output or ""
        (out_dir / "train.log").write_text(output)
        raise RuntimeError(f"training did not finish in the {seconds:.0f} s of the budget "
                           f"left: {output[-1500:]}") from None
    wall = time.time() - start
    (out_dir / "train.log").write_text(proc.stdout)
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        (out_dir / "metrics.jsonl").write_text(metrics.read_text())
    if proc.returncode != 0:
        raise RuntimeError(f"training exited with {proc.returncode}: {proc.stdout[-1500:]}")
    train = read_metrics(run_dir, "train")
    steady = [r for r in train if r["step"] > min(10, steps - 1)] or train

    def med(key: str):
        vals = [r[key] for r in steady if isinstance(r.get(key), (int, float))]
        return statistics.median(vals) if vals else None

    # the first step's loss, recomputed with a plain forward (no DeepSpeed): the same
    # initial weights (drawn from train.seed), the same first batch, parameters in the
    # training precision
    cfg = resolve_vocabulary(load_config(cfg_path, sets))
    model = LiquidFoundationModelOptimized(cfg.model, seed=cfg.train.seed)
    precision = read_metrics(run_dir, "event")[0]["precision"]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    model = model.to(device=device, dtype=dtype)
    loader = build_train_loader(cfg.data, rank=0, world_size=1,
                                batch_size=cfg.train.micro_batch_size, seed=cfg.train.seed)
    batch = {k: v.to(device) for k, v in next(iter(loader)).items()}
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype,
                                         enabled=dtype != torch.float32):
        plain = model(**batch)
    probe = torch.zeros(1, 1, cfg.model.n_heads, cfg.model.d_model // cfg.model.n_heads,
                        device=device, dtype=dtype)
    first = train[0]
    return {
        "steps": steps, "wall_s": round(wall, 1), "precision": precision,
        "first_step_loss": first["loss"], "plain_forward_loss": float(plain.loss),
        "first_step_rel_diff": abs(first["loss"] - float(plain.loss)) / abs(float(plain.loss)),
        "last_loss": train[-1]["loss"],
        "real_tokens_per_s": med("real_tokens_per_s"),
        "target_tokens_per_s": med("target_tokens_per_s"),
        "positions_per_s": med("positions_per_s"), "step_time_s": med("step_time_s"),
        "mfu_positions": med("mfu_positions"), "mfu_real_tokens": med("mfu_real_tokens"),
        "peak_flops_per_device": peak_flops_per_device(device, precision),
        "peak_memory_gb": max(r["memory_gb"] for r in train),
        "attention_backend": (cfg.model.attention_backend if cfg.model.attention_backend
                              != "auto" else choose_backend(probe, cfg.model.window)),
        "moe_backend": cfg.model.moe.backend,
    }


def _affordable_steps(train: dict[str, Any], wanted: int, seconds: float) -> int:
    """How many of ``wanted`` steps a training run like ``train`` can take in ``seconds``:
    its fixed cost (launch, set-up, compilation, checkpoint: wall time less the steps at
    the steady step time) and steady step time, with a quarter's margin."""
    per_step = train["step_time_s"]
    fixed = max(0.0, train["wall_s"] - train["steps"] * per_step)
    return min(wanted, int((seconds / 1.25 - fixed) / per_step))


def _steps_or_skip(train: dict[str, Any], steps: int, seconds: float) -> int | dict[str, Any]:
    """The steps a run after ``train`` can afford in ``seconds``, or its ``skipped`` record
    (``train`` failed, or fewer than :data:`MIN_STEPS` fit)."""
    if train.get("status") != "ok":
        return {"status": "skipped", "reason": "the train check did not pass"}
    n = _affordable_steps(train, steps, seconds)
    if n < min(steps, MIN_STEPS):
        return {"status": "skipped", "reason": f"{seconds:.0f} s of the budget left: "
                f"{n} steps, under {MIN_STEPS}"}
    return n


def _shortened(sets: list[str], steps: int) -> list[str]:
    return [*sets, f"train.max_steps={steps}", f"train.ckpt_every={steps}",
            f"train.eval_every={steps}"]


def check_baseline(train: dict[str, Any], cfg_path: str, sets: list[str], run_dir: Path,
                   out_dir: Path, device, steps: int, seconds: float,
                   log: Callable[[str], None]) -> dict[str, Any]:
    """``configs/small-transformer.yaml`` at the full model's total parameters (the
    ``model.ffn_dim`` of bench/ablations.py's rule), trained like ``train``."""
    import torch

    from bench.ablations import ffn_matching_total
    from liquid_dist.config import load_config
    from liquid_dist.model import LiquidFoundationModelOptimized
    from liquid_dist.model.counts import count_parameters
    from liquid_dist.train.metrics import read_metrics

    n = _steps_or_skip(train, steps, seconds)
    if isinstance(n, dict):
        return n
    plain_path = REPO / "configs" / "small-transformer.yaml"

    def total(path, overrides) -> int:
        with torch.device("meta"):
            return count_parameters(LiquidFoundationModelOptimized(
                load_config(path, overrides).model))["total"]

    full_total = total(cfg_path, sets)
    ffn = ffn_matching_total(plain_path, sets, full_total)
    base_run, base_out = run_dir.with_name(run_dir.name + "_baseline"), out_dir / "baseline"
    base_out.mkdir(exist_ok=True)
    base_sets = [*sets, f"model.ffn_dim={ffn}", f"train.run_dir={base_run}"]
    if n < steps:
        base_sets = _shortened(base_sets, n)
    plain_total = total(plain_path, base_sets)
    plain = check_train(str(plain_path), base_sets, base_run, base_out, device, n, seconds)
    tokens = {name: [r.get("data_tokens/train") for r in read_metrics(d, "train")][:n]
              for name, d in (("full", run_dir), ("plain", base_run))}

    def ratio(a, b):
        return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None

    keys = ("real_tokens_per_s", "step_time_s", "mfu_positions", "mfu_real_tokens",
            "peak_memory_gb")
    out = {
        "figures": ("CPU smoke: tiny shapes on this machine's CPU, not GPU figures"
                    if device.type == "cpu" else torch.cuda.get_device_name()),
        "config": "configs/small-transformer.yaml", "ffn_dim": ffn,
        "rule": "bench/ablations.py ffn_matching_total: the model.ffn_dim (a multiple of 8) "
                "closest to the full model's total parameters",
        "parameters": {"full": full_total, "plain": plain_total}, "steps": n,
        "shortened": n < steps,
        "same_data_tokens_per_step": tokens["full"] == tokens["plain"],
        "full": {k: train.get(k) for k in keys},
        "plain": {k: plain.get(k) for k in (*keys, "first_step_rel_diff", "last_loss",
                                            "attention_backend", "moe_backend", "wall_s")},
        "full_over_plain": {
            "step_time": ratio(train["step_time_s"], plain["step_time_s"]),
            "real_tokens_per_s": ratio(train["real_tokens_per_s"], plain["real_tokens_per_s"]),
            "mfu_real_tokens": ratio(train["mfu_real_tokens"], plain["mfu_real_tokens"]),
            "peak_memory": ratio(train["peak_memory_gb"], plain["peak_memory_gb"])},
    }
    r = out["full_over_plain"]
    log(f"   {out['figures']}: plain transformer of {plain_total:,} parameters (ffn_dim {ffn}; "
        f"full {full_total:,}): full : plain step time {r['step_time']:.2f}x, real tokens/s "
        f"{r['real_tokens_per_s']:.2f}x, peak memory {r['peak_memory']:.2f}x")
    if not out["same_data_tokens_per_step"]:
        out["status"] = "failed"
        out["error"] = "the two runs consumed different data tokens per step"
    return out


def check_deterministic(train: dict[str, Any], cfg_path: str, sets: list[str], run_dir: Path,
                        out_dir: Path, device, steps: int, seconds: float) -> dict[str, Any]:
    """``train`` again with ``train.deterministic=true``: its cost and its losses."""
    from liquid_dist.train.metrics import read_metrics

    n = _steps_or_skip(train, steps, seconds)
    if isinstance(n, dict):
        return n
    det_run, det_out = run_dir.with_name(run_dir.name + "_deterministic"), out_dir / "deterministic"
    det_out.mkdir(exist_ok=True)
    det_sets = [*sets, f"train.run_dir={det_run}", "train.deterministic=true"]
    got = check_train(cfg_path, det_sets if n == steps else _shortened(det_sets, n), det_run,
                      det_out, device, n, seconds)
    losses = [r["loss"] for r in read_metrics(det_run, "train")]
    base = [r["loss"] for r in read_metrics(run_dir, "train")][:n]
    return {"steps": n, "shortened": n < steps,
            "step_time_s": got["step_time_s"], "real_tokens_per_s": got["real_tokens_per_s"],
            "step_time_ratio": (got["step_time_s"] / train["step_time_s"]
                                if got["step_time_s"] and train["step_time_s"] else None),
            "losses_equal_train": losses == base,
            "max_loss_diff": max((abs(a - b) for a, b in zip(losses, base, strict=True)),
                                 default=None)}


# ------------------------------------------------------------------ profile

PROFILE_COMPONENTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    # (name, "module.Class" in liquid_dist.model, the model.ablate names whose CPU
    # removal cost bench/removal_cost.py measured)
    ("frequency", "frequency.FrequencyHyenaAttention", ("frequency",)),
    ("embedding_stem_compression", "embedding.EnhancedLiquidEmbedding",
     ("embedding_conv", "compression")),
    ("local_attention", "attention.EnhancedLocalAttentionWithGQA", ()),
    ("cross_attention", "attention.CrossAttention", ()),
    ("moe", "moe.MoELayer", ("moe",)),
    ("gated_conv", "conv.OptimizedGatedConvolution", ("deformable_conv",)),
    ("lstm", "memory.EnhancedLSTM", ("lstm",)),
)
"""The components that ``profile`` times. Every module of a listed class is timed
under its name, the innermost one where they nest (the frequency module inside the
embedding); the rest of the step (norms, the blocks' feed-forward layers, residual
adds, the token and position lookups, the output head and the loss) is ``rest``."""
REST = "rest"
PROFILE_STEPS = 20
"""Steps ``profile`` times with and without instrumentation, interleaved."""
ADDS_UP_TOLERANCE = 0.10
"""How far the profile's labelled times may be from the uninstrumented step."""


@functools.cache
def _mark_function():
    """The autograd identity that calls ``mark`` when its outputs' gradient arrives."""
    import torch

    class Mark(torch.autograd.Function):
        @staticmethod
        def forward(ctx, mark, *tensors):
            ctx.mark = mark
            ctx.set_materialize_grads(False)  # pass a missing gradient on as None
            return tuple(t.view_as(t) for t in tensors)

        @staticmethod
        def backward(ctx, *grads):
            ctx.mark()
            return (None, *grads)

    return Mark


def _through_mark(obj: Any, mark: Callable[[], None]) -> Any:
    """``obj`` (a tensor or tuples, lists and dicts holding tensors) with every tensor
    that requires grad passed through one :func:`_mark_function` node, so that ``mark``
    runs once in the backward, when all their gradients have arrived; None (keep ``obj``)
    when no tensor requires grad."""
    import torch

    found: dict[int, Any] = {}

    def collect(o):
        if isinstance(o, torch.Tensor):
            if o.requires_grad:
                found[id(o)] = o
        elif isinstance(o, (tuple, list)):
            for x in o:
                collect(x)
        elif isinstance(o, dict):
            for x in o.values():
                collect(x)

    collect(obj)
    if not found or not torch.is_grad_enabled():
        return None
    new = dict(zip(found, _mark_function().apply(mark, *found.values()), strict=True))

    def rebuild(o):
        if isinstance(o, torch.Tensor):
            return new.get(id(o), o)
        if isinstance(o, (tuple, list)):
            return type(o)(rebuild(x) for x in o)
        if isinstance(o, dict):
            return {k: rebuild(v) for k, v in o.items()}
        return o

    return rebuild(obj)


class ComponentTimer:
    """The forward and backward time of each component of a model, in one step.

    A mark is a timestamp with the label and phase that the time up to the next mark
    belongs to: a CUDA event recorded on the current stream on a GPU; on the CPU,
    whose operations are synchronous, the thread's CPU time (``time.thread_time()``,
    which other processes' load inflates far less than the wall clock; run torch
    with one thread). In the forward, hooks mark a component's entry (its label) and
    its exit (the enclosing label). In the backward, an identity autograd node on the
    component's outputs marks the arrival of their gradient (its label), and one on
    its inputs the moment the gradient has gone through it (the enclosing label, as
    it was in the forward). A component whose inputs are token ids (the embedding)
    ends where the gradient reaches its lookup tables (``nn.Embedding``), which count
    as the rest. Every interval between two marks belongs to one label: nested
    components are not counted twice, and the labels' times add up to the
    instrumented step. That they describe the uninstrumented step is what
    :func:`check_profile` checks. On the CPU the hooks time themselves and their own
    time (``own``) is left out of the timeline; what autograd spends calling the
    marker nodes stays in. On a GPU the hooks run on the CPU beside the stream's work,
    which the events time.
    """

    def __init__(self, model, components: dict[str, type], device):
        import torch
        from torch import nn

        self.cuda = device.type == "cuda"
        self.labels: dict[Any, str] = {}
        for module in model.modules():
            for name, cls in components.items():
                if isinstance(module, cls):
                    self.labels[module] = name
            if isinstance(module, nn.Embedding):
                self.labels[module] = REST
        self.event = torch.cuda.Event if self.cuda else None
        self.marks: list[tuple[str, str, Any]] = []
        self.stack = [REST]
        self.own = 0.0  # CPU seconds the hooks took in this step

    def mark(self, label: str, phase: str, at: float | None = None) -> None:
        """Mark now (on the CPU: at CPU time ``at``, less the hooks' own time so far)."""
        if self.event is not None:
            stamp = self.event(enable_timing=True)
            stamp.record()
        else:
            stamp = (time.thread_time() if at is None else at) - self.own
        self.marks.append((label, phase, stamp))

    def _backward_mark(self, label: str) -> Callable[[], None]:
        def mark():
            entered = time.thread_time()
            self.mark(label, "backward", entered)
            self.own += time.thread_time() - entered
        return mark

    def _pre_hook(self, label: str):
        def hook(module, args, kwargs):
            entered = time.thread_time()
            parent = self.stack[-1]
            self.stack.append(label)
            self.mark(label, "forward", entered)
            out = _through_mark((args, kwargs), self._backward_mark(parent))
            self.own += time.thread_time() - entered
            return out
        return hook

    def _post_hook(self, label: str):
        def hook(module, args, kwargs, output):
            entered = time.thread_time()
            self.stack.pop()
            self.mark(self.stack[-1], "forward", entered)
            out = _through_mark(output, self._backward_mark(label))
            self.own += time.thread_time() - entered
            return out
        return hook

    def step(self, fn: Callable[[], Any], instrumented: bool) -> dict[tuple[str, str], float]:
        """Run ``fn`` (forward, then ``.backward()`` of what it returns); seconds per
        (label, phase), only ``(rest, forward)`` and ``(rest, backward)`` when not
        ``instrumented``. ``own`` is then the CPU time the hooks took."""
        import torch

        handles = []
        if instrumented:
            for module, label in self.labels.items():
                handles += [
                    module.register_forward_pre_hook(self._pre_hook(label), with_kwargs=True),
                    module.register_forward_hook(self._post_hook(label), with_kwargs=True)]
        self.marks, self.stack, self.own = [], [REST], 0.0
        try:
            self.mark(REST, "forward")
            loss = fn()
            self.mark(REST, "backward")
            loss.backward()
            self.mark("end", "end")
        finally:
            for h in handles:
                h.remove()
        if self.cuda:
            torch.cuda.synchronize()
        out: dict[tuple[str, str], float] = {}
        for (label, phase, a), (_, _, b) in itertools.pairwise(self.marks):
            sec = a.elapsed_time(b) / 1e3 if self.cuda else b - a
            out[label, phase] = out.get((label, phase), 0.0) + sec
        return out


def _profile_components() -> dict[str, type]:
    import importlib

    from liquid_dist.config import ABLATIONS

    out = {}
    for name, where, ablated in PROFILE_COMPONENTS:
        unknown = set(ablated) - set(ABLATIONS)
        if unknown:
            raise ValueError(f"profile component {name}: {sorted(unknown)} are not model.ablate "
                             f"names {list(ABLATIONS)}")
        module, cls = where.rsplit(".", 1)
        out[name] = getattr(importlib.import_module(f"liquid_dist.model.{module}"), cls)
    return out


def cpu_removal_shares(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Each profiled component's share of the step by ``bench/removal_cost.py``'s results
    at ``path`` (the sum over its ``model.ablate`` names; None for a component that cannot
    be removed), and where they come from."""
    if not path.is_file():
        return ({name: None for name, _, _ in PROFILE_COMPONENTS},
                {"source": str(path.relative_to(REPO)), "missing": True})
    data = json.loads(path.read_text())
    share = {r["variant"]: r["share_of_full_step"]["median"] for r in data["rows"]}
    shares = {name: (sum(share[f"no_{a}"] for a in ablated) if ablated else None)
              for name, _, ablated in PROFILE_COMPONENTS}
    return shares, {
        "source": str(path.relative_to(REPO)), "date": data["date"], "machine": data["machine"],
        "settings": data["settings"],
        "method": "CPU removal cost: 1 - step time without the component / the full model's "
                  "(the MoE's against the dense FFN that replaces it; the embedding stem and "
                  "compression: the sum of both removals)"}


def _middle_half(values: list, key: Callable[[Any], float]) -> list:
    """The middle half of ``values`` ordered by ``key`` (all of them when fewer than 4)."""
    cut = len(values) // 4
    return sorted(values, key=key)[cut:len(values) - cut]


def check_profile(cfg, device, dtype, seconds: float, train: dict[str, Any],
                  log: Callable[[str], None]) -> dict[str, Any]:
    """Each component's forward and backward time in a step of the model at ``cfg``'s
    training shapes (:class:`ComponentTimer`), in at most about ``seconds``."""
    import torch

    from liquid_dist.data import build_train_loader
    from liquid_dist.model import LiquidFoundationModelOptimized

    started = time.perf_counter()
    components = _profile_components()
    model = LiquidFoundationModelOptimized(cfg.model, seed=cfg.train.seed)
    model = model.to(device=device, dtype=dtype).train()
    loader = build_train_loader(cfg.data, rank=0, world_size=1,
                                batch_size=cfg.train.micro_batch_size, seed=cfg.train.seed)
    batch = {k: v.to(device) for k, v in next(iter(loader)).items()}
    timer = ComponentTimer(model, components, device)

    def forward():
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return model(**batch).loss

    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # the CPU timer counts the calling thread's time
    try:
        for instrumented in (False, True, False):  # warm-up: compilation, allocator, caches
            begun = time.perf_counter()
            timer.step(forward, instrumented)
        wall = time.perf_counter() - begun
        left = seconds - (time.perf_counter() - started)
        steps = max(3, min(PROFILE_STEPS, int(left / (2.5 * wall))))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        gc.collect()
        gc.disable()  # as timeit does: no collection lands in one kind of step only
        plain, timed = [], []
        for _ in range(steps):  # interleaved: machine noise hits both alike
            plain.append(sum(timer.step(forward, False).values()))
            timed.append((timer.step(forward, True), timer.own))
    finally:
        gc.enable()
        torch.set_num_threads(threads)
    # the middle half of each (by step time): the same estimator for both, sparing
    # the steps that the machine interrupted; the labels' means add up to the
    # instrumented steps' mean
    measured = statistics.fmean(_middle_half(plain, float))
    timed = _middle_half(timed, lambda t: sum(t[0].values()))
    own = statistics.fmean(o for _, o in timed)
    timed = [t for t, _ in timed]
    cpu_shares, cpu_source = cpu_removal_shares(REPO / "bench" / "results" / "removal_cost.json")
    rows: dict[str, dict[str, Any]] = {}
    for name in [*components, REST]:
        fwd = statistics.fmean(t.get((name, "forward"), 0.0) for t in timed)
        bwd = statistics.fmean(t.get((name, "backward"), 0.0) for t in timed)
        rows[name] = {"forward_ms": 1e3 * fwd, "backward_ms": 1e3 * bwd,
                      "total_ms": 1e3 * (fwd + bwd),
                      "modules": sum(label == name for label in timer.labels.values()),
                      "cpu_removal_share": cpu_shares.get(name)}
    attributed = sum(r["total_ms"] for r in rows.values()) / 1e3
    for r in rows.values():
        r["share"] = r["total_ms"] / 1e3 / attributed
    ratio = attributed / measured
    out: dict[str, Any] = {
        "figures": ("CPU smoke: tiny shapes on this machine's CPU, not GPU figures"
                    if device.type == "cpu" else torch.cuda.get_device_name()),
        "dtype": str(dtype), "timer": ("CUDA events" if device.type == "cuda"
                                       else "time.thread_time, one torch thread"),
        "shapes": {"batch": cfg.train.micro_batch_size, "encoder_length": cfg.data.encoder_length,
                   "decoder_length": cfg.data.decoder_length},
        "steps": steps, "averaged_steps": len(timed), "measured_step_ms": 1e3 * measured,
        "attributed_step_ms": 1e3 * attributed, "attributed_over_measured": ratio,
        "tolerance": ADDS_UP_TOLERANCE, "components": rows,
        "hooks_own_cpu_ms": 1e3 * own, "cpu_removal_cost": cpu_source,
        "train_step_ms": (1e3 * train["step_time_s"] if train.get("status") == "ok"
                          and train.get("step_time_s") else None),
        "peak_memory_gb": (torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda"
                           else None),
    }
    log(f"   {out['figures']}: step {1e3 * measured:.1f} ms measured, "
        f"{1e3 * attributed:.1f} ms attributed ({ratio:.3f}x), {steps} steps"
        + (f"; train's ZeRO-3 step with the update: {out['train_step_ms']:.1f} ms"
           if out["train_step_ms"] is not None else ""))
    for name, r in rows.items():
        cpu = r["cpu_removal_share"]
        log(f"   {name:>27}: forward {r['forward_ms']:8.2f} ms  backward {r['backward_ms']:8.2f}"
            f" ms  share {r['share']:6.1%}"
            + (f"  (CPU removal cost {cpu:.1%})" if cpu is not None else ""))
    if abs(ratio - 1) > ADDS_UP_TOLERANCE:
        out["status"] = "failed"
        out["error"] = (f"the components' times add up to {ratio:.3f}x the uninstrumented step, "
                        f"outside 1 +- {ADDS_UP_TOLERANCE}: the instrumentation distorts the step")
    return out


# ------------------------------------------------------------------ main


def main() -> int:
    started = time.monotonic()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--wheels", type=Path, default=REPO / "bench" / "wheels")
    p.add_argument("--data", type=Path, default=REPO / "data" / "shakespeare")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--budget-s", type=float, default=360.0,
                   help="seconds from the start that the checks from train on may take: they "
                        "shorten or skip themselves to end within it (module doc)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="the same checks on CPU at tiny shapes: proves the script, not the GPU")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log_file = open(args.out / "gpu_proof.log", "a", encoding="utf-8")

    def log(line: str) -> None:
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    _install_wheels(args.wheels, args.out / "site", log)
    import torch

    from liquid_dist.config import load_config
    from liquid_dist.data import Tokenizer

    if not args.cpu_smoke and not torch.cuda.is_available():
        log("no CUDA device: run with --cpu-smoke on a machine without one")
        return 2
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    tokenizer = args.data / "tokenizer" / "tokenizer.model"
    if not tokenizer.is_file():
        tokenizer = next(iter(sorted(args.data.rglob("tokenizer.model"))), tokenizer)
    shards = args.data / "shards" if (args.data / "shards").is_dir() else args.data
    vocab = Tokenizer(tokenizer).vocab_size
    run_dir = Path("/tmp") / f"liquid_gpu_proof_{os.getpid()}"  # checkpoints stay out of OUT
    steps = 3 if args.cpu_smoke else args.steps
    sets = [f"model.vocab_size={vocab}", f"data.tokenizer={tokenizer}",
            f"data.train_shards={shards}", f"data.val_shards={shards}",
            f"train.run_dir={run_dir}", f"train.max_steps={steps}", "train.log_every=1",
            f"train.ckpt_every={steps}", f"train.eval_every={steps}", "train.eval_steps=2",
            "train.warmup_steps=10", "data.num_workers=2",
            # no dropout: the first step's loss is compared with a plain forward
            "model.dropout=0.0"]
    if args.cpu_smoke:
        sets += ["model.d_model=64", "model.n_heads=4", "model.n_encoder_layers=1",
                 "model.n_decoder_layers=1", "model.ffn_dim=128", "model.max_encoder_length=64",
                 "model.max_decoder_length=32", "model.window=8", "model.band_block=16",
                 "model.moe.expert_ffn_dim=64", "data.encoder_length=64",
                 "data.decoder_length=32", "train.micro_batch_size=2", "data.num_workers=0"]
    cfg_path = str(REPO / "configs" / "small.yaml")
    cfg = load_config(cfg_path, sets)
    results: dict[str, Any] = {
        "benchmark": "gpu_proof", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu_smoke": args.cpu_smoke, "config": "configs/small.yaml", "overrides": sets,
        "machine": {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "cuda": torch.version.cuda,
                    "python": platform.python_version(), "platform": platform.platform(),
                    "triton": _version("triton"), "deepspeed": _version("deepspeed"),
                    "flash_attn": _version("flash_attn")},
    }
    out_json = args.out / "gpu_proof.json"

    def save() -> None:
        results["elapsed_s"] = round(time.monotonic() - started, 1)
        out_json.write_text(json.dumps(results, indent=1, default=str) + "\n")

    def left() -> float:
        return args.budget_s - (time.monotonic() - started)

    def run(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        """A check that needs MIN_SECONDS[name] of the budget left (if it is named there)."""
        need = MIN_SECONDS.get(name, 0.0)
        _check(results, name, fn if left() >= need else lambda: {
            "status": "skipped", "reason": f"{max(left(), 0):.0f} s of the --budget-s "
                                           f"{args.budget_s:.0f} left, under the {need:.0f} s "
                                           "it needs"}, log, save)

    results["budget_s"] = args.budget_s
    run("attention", lambda: check_attention(cfg, device, dtype, args.cpu_smoke))
    run("moe", lambda: check_moe(cfg, device, dtype))
    run("model_step_sync_free", lambda: check_model_step(cfg, device, dtype))
    run("checkpoint_capture", lambda: check_checkpoint_capture(cfg, device, args.cpu_smoke))
    run("train", lambda: check_train(cfg_path, sets, run_dir, args.out, device, steps, left()))
    run("profile", lambda: check_profile(cfg, device, dtype, left(), results["train"], log))
    run("baseline", lambda: check_baseline(results["train"], cfg_path, sets, run_dir, args.out,
                                           device, steps, left(), log))
    run("deterministic", lambda: check_deterministic(results["train"], cfg_path, sets, run_dir,
                                                     args.out, device, steps, left()))
    failed = [k for k, v in results.items() if isinstance(v, dict) and v.get("status") == "failed"]
    log(f"wrote {args.out / 'gpu_proof.json'}; failed checks: {failed or 'none'}")
    return 1 if failed else 0


def _version(module: str):
    try:
        return __import__(module).__version__
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
