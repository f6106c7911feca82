"""Peak memory of checkpoint conversion against the size of the model.

    python bench/convert.py [--out bench/results/convert.json] [--d-model 512]

Trains a bigger-than-tiny model for one step (2 ranks, ZeRO-3, torchrun on
CPU) to get a real checkpoint, then converts it in subprocesses whose memory
is sampled from /proc every 5 ms:

* ``liquid_dist.convert`` (this project's streaming converter), fp32;
* DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` followed by
  ``safetensors.torch.save_file`` (the whole state dict in memory);
* a baseline of the converter's fixed costs (imports, the shape check's model
  on the meta device), subtracted from both.

``peak_anon`` is the peak of RssAnon (memory the process allocated);
``peak_rss`` (VmHWM) also counts the pages of the memory-mapped checkpoint
files the kernel kept resident, which it can drop under pressure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import train_fixtures as tf  # noqa: E402  (the shared Shakespeare tokenizer and shards)
from procstatus import proc_status  # noqa: E402  (bench/, the script's own directory)

DEEPSPEED_CONVERT = """
import sys, contextlib, io
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import save_file
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    sd = get_fp32_state_dict_from_zero_checkpoint(sys.argv[1], tag=sys.argv[2])
seen, out = set(), {}
for k, v in sd.items():
    if v.data_ptr() not in seen:
        seen.add(v.data_ptr()); out[k] = v.contiguous()
save_file(out, sys.argv[3])
"""
BASELINE = """
import sys, yaml, liquid_dist.convert as c
from liquid_dist.config import model_config_from_dict
# the converter's fixed costs: imports, and the shape check's model on the meta device
# (torch's first meta-device model costs ~70 MiB once, whatever its size)
c._expected_model(model_config_from_dict(yaml.safe_load(open(sys.argv[1]))["model"]))
"""


def _status(pid: int) -> dict[str, int]:
    return proc_status(pid, ("RssAnon", "VmHWM"))


def measure(cmd: list[str]) -> dict[str, float]:
    """Run ``cmd``; its peak RssAnon and VmHWM (bytes) and wall time."""
    env = tf.env()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    anon = hwm = 0
    while proc.poll() is None:
        s = _status(proc.pid)
        anon, hwm = max(anon, s.get("RssAnon", 0)), max(hwm, s.get("VmHWM", 0))
        time.sleep(0.005)
    err = proc.stderr.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{err[-3000:]}")
    return {"peak_anon": anon, "peak_rss": hwm, "wall_s": time.perf_counter() - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "convert.json")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    args = p.parse_args()
    d = args.d_model
    work = Path(tempfile.mkdtemp(prefix="bench_convert_"))
    try:
        run = work / "run"
        overrides = tf.base_overrides(run, steps=1) + [
            f"model.d_model={d}", "model.n_heads=8", "model.n_kv_heads=2",
            f"model.n_encoder_layers={args.layers}", f"model.n_decoder_layers={args.layers}",
            f"model.ffn_dim={4 * d}", "model.moe.num_experts=4",
            f"model.moe.expert_ffn_dim={4 * d}", "model.hyena_filter_dim=16",
            "train.eval_every=100", "train.monitor_every=0"]
        t0 = time.perf_counter()
        proc = tf.launch(2, overrides, launcher="torchrun", timeout=1800)
        assert proc.returncode == 0, tf.tail(proc)
        train_s = time.perf_counter() - t0
        ckpt = run / "checkpoints" / "step_00000001"

        from liquid_dist.convert import open_checkpoint

        shapes = open_checkpoint(ckpt).shapes
        sizes = [math.prod(s) * 4 for s in shapes.values()]
        base = measure([sys.executable, "-c", BASELINE, str(ckpt / "config.yaml")])
        ours = measure([sys.executable, "-m", "liquid_dist.convert", str(run), "--output",
                        str(work / "out"), "--quiet"])
        theirs = measure([sys.executable, "-c", DEEPSPEED_CONVERT, str(run / "checkpoints"),
                          ckpt.name, str(work / "deepspeed.safetensors")])
        mib = 2**20

        def row(m: dict[str, float]) -> dict[str, float]:
            return {"peak_anon_mib": round(m["peak_anon"] / mib, 1),
                    "peak_anon_above_baseline_mib":
                        round((m["peak_anon"] - base["peak_anon"]) / mib, 1),
                    "peak_rss_mib": round(m["peak_rss"] / mib, 1),
                    "wall_s": round(m["wall_s"], 2)}

        result = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "torch": torch.__version__, "cores": __import__("os").cpu_count()},
            "note": "shared 2-core VM (other jobs running); memory sampled every 5 ms, so "
                    "peaks shorter than that can be missed",
            "checkpoint": {"world_size": 2, "zero_stage": 3, "tensors": len(sizes),
                           "parameters": sum(sizes) // 4,
                           "fp32_model_mib": round(sum(sizes) / mib, 1),
                           "largest_tensor_mib": round(max(sizes) / mib, 1),
                           "checkpoint_files_mib": round(sum(
                               f.stat().st_size for f in ckpt.iterdir()) / mib, 1),
                           "train_one_step_s": round(train_s, 1)},
            "baseline_fixed_costs": row(base),
            "liquid_dist.convert": row(ours),
            "deepspeed_zero_to_fp32_then_save_file": row(theirs),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
