"""The one-shot proof of the GPU path, for one bare GPU machine (or ``--cpu-smoke``).

    bash bench/fetch_gpu_wheels.sh                      # here: wheels -> bench/wheels
    python bench/gpu_proof.py --out "$OUT"              # there: one H200 (two training runs)
    python bench/gpu_proof.py --cpu-smoke --out /tmp/p  # the same script end to end on CPU

The GPU machine has torch but no network, DeepSpeed or WebDataset: the script
installs the wheels of ``--wheels`` (default ``bench/wheels``, carried with the
checkout) into ``OUT/site`` when they are missing, and reads the Shakespeare
shards of ``--data`` (default ``data/shakespeare``, carried too; made by
``data_prep/prepare_shakespeare.py``). Everything it writes is under ``--out``:
``gpu_proof.json`` (every figure and verdict), ``gpu_proof.log`` and the
training run's ``metrics.jsonl``. Checks, each recorded as ``ok`` / ``failed`` /
``skipped`` with its reason, so that one failure does not hide the rest:

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
4. ``train``: ``configs/small.yaml`` in bf16 under ZeRO-3 on one GPU for
   ``--steps`` steps: first-step loss against a plain forward without
   DeepSpeed, steady real tokens/s, MFU (H200 dense bf16 peak), peak memory,
   and the backends that ran.
5. ``deterministic``: the same training with ``train.deterministic=true``
   (deterministic algorithms, cuBLAS's fixed workspace): whether every operation
   has a deterministic implementation, its steady step time against ``train``'s
   (the switch's cost), and whether its losses equal ``train``'s.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import importlib.util
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
           log: Callable[[str], None]) -> None:
    """Run one check; record its figures and verdict, or the error that stopped it."""
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


def check_train(cfg_path: str, sets: list[str], run_dir: Path, out_dir: Path, device,
                steps: int) -> dict[str, Any]:
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
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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


def check_deterministic(train: dict[str, Any], cfg_path: str, sets: list[str], run_dir: Path,
                        out_dir: Path, device, steps: int) -> dict[str, Any]:
    """``train`` again with ``train.deterministic=true``: its cost and its losses."""
    from liquid_dist.train.metrics import read_metrics

    if train.get("status") != "ok":
        return {"status": "skipped", "reason": "the train check did not pass"}
    det_run, det_out = run_dir.with_name(run_dir.name + "_deterministic"), out_dir / "deterministic"
    det_out.mkdir(exist_ok=True)
    got = check_train(cfg_path, [*sets, f"train.run_dir={det_run}", "train.deterministic=true"],
                      det_run, det_out, device, steps)
    losses = [r["loss"] for r in read_metrics(det_run, "train")]
    base = [r["loss"] for r in read_metrics(run_dir, "train")]
    return {"step_time_s": got["step_time_s"], "real_tokens_per_s": got["real_tokens_per_s"],
            "step_time_ratio": (got["step_time_s"] / train["step_time_s"]
                                if got["step_time_s"] and train["step_time_s"] else None),
            "losses_equal_train": losses == base,
            "max_loss_diff": max((abs(a - b) for a, b in zip(losses, base, strict=True)),
                                 default=None)}


# ------------------------------------------------------------------ main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--wheels", type=Path, default=REPO / "bench" / "wheels")
    p.add_argument("--data", type=Path, default=REPO / "data" / "shakespeare")
    p.add_argument("--steps", type=int, default=30)
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
    _check(results, "attention", lambda: check_attention(cfg, device, dtype, args.cpu_smoke),
           log)
    _check(results, "moe", lambda: check_moe(cfg, device, dtype), log)
    _check(results, "model_step_sync_free", lambda: check_model_step(cfg, device, dtype), log)
    _check(results, "train", lambda: check_train(cfg_path, sets, run_dir, args.out, device,
                                                 steps), log)
    _check(results, "deterministic",
           lambda: check_deterministic(results["train"], cfg_path, sets, run_dir, args.out,
                                       device, steps), log)
    (args.out / "gpu_proof.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
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
