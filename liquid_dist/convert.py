"""Training checkpoint -> the single-GPU format (docs/convert.md).

    python -m liquid_dist.convert RUN_DIR [--step N] --output OUT [--dtype fp32|bf16]
        [--max-shard-size 5GB] [--overwrite]

Reads a checkpoint written by the trainer (DeepSpeed ZeRO 0-3 files of any
world size and ep_size, through liquid_dist.checkpoint_format, the one reader of
that format), reassembles every parameter with its original name and shape,
checks names and shapes against the model the saved config builds, and
writes the directory liquid_dist.model.pretrained describes.

Streaming: the rank files are opened with ``torch.load(weights_only=True,
mmap=True)`` (no pickle code runs, nothing is read until touched); each
parameter is gathered from its slices on every rank, converted, and written
straight into the safetensors file, whose header is computed up front from
the saved shapes. Peak memory is about the largest parameter (twice, for the
gather and the dtype cast), not the model.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import struct
import sys
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from liquid_dist.checkpoint_format import (
    CHECKPOINTS,
    CONFIG_FILE,
    CheckpointError,
    ZeroCheckpoint,
    find_checkpoint,
    open_checkpoint,
    read_config,
    strip_wrapper,
    verify_checkpoint,
)
from liquid_dist.config import (
    Config,
    ConfigError,
    ModelConfig,
    config_from_dict,
    model_config_from_dict,
)
from liquid_dist.data.tokenizer import MODEL_NAME as TOKENIZER_NAME
from liquid_dist.data.tokenizer import Tokenizer
from liquid_dist.model.generation import GenerationConfig
from liquid_dist.model.pretrained import (
    INDEX_NAME,
    MODEL_CARD_NAME,
    WEIGHTS_NAME,
    canonical_names,
    write_generation_config,
    write_model_config,
    write_remote_code,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
              torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL",
              torch.uint8: "U8"}
MOE_EXPERT_PARAMS = ("moe.w1", "moe.b1", "moe.w2", "moe.b2")
"""Expert tensors of a MoELayer: dim 0 is the (global) expert index."""


# ------------------------------------------------------------------ writing


def load_trained_model(checkpoint: str | Path) -> tuple[nn.Module, Config]:
    """A plain model with a checkpoint's weights, in eval mode, and its resolved config.

    ``checkpoint``: a checkpoint directory, a ``checkpoints`` directory or a run
    directory (its ``latest``); its files verified first (a damaged one is a
    CheckpointError naming it, as for the converter).
    """
    from liquid_dist.model import LiquidFoundationModelOptimized

    ref = find_checkpoint(str(checkpoint))
    assert ref is not None
    verify_checkpoint(ref.path)
    cfg = config_from_dict(read_config(ref))
    model = LiquidFoundationModelOptimized(cfg.model)
    model.load_state_dict(open_checkpoint(ref.path).state_dict())
    return model.eval(), cfg


def parse_size(text: str) -> int:
    """``5GB`` / ``500MB`` / ``2GiB`` / ``1048576`` -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"size {text!r}: expected e.g. 5GB, 500MB, 2GiB or a number of bytes")
    base = 1024 if m.group(3) else 1000
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * base ** power)


def _out_dtype(t_dtype: torch.dtype, dtype: torch.dtype) -> torch.dtype:
    return dtype if t_dtype.is_floating_point else t_dtype


def _header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
            metadata: dict[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in entries:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def _plan_shards(entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 limit: int) -> list[list[tuple[str, torch.dtype, tuple[int, ...]]]]:
    shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
    size = 0
    for e in entries:
        nbytes = math.prod(e[2]) * e[1].itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    return shards


def _expected_model(model_cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    from liquid_dist.model import LiquidFoundationModelOptimized

    with torch.device("meta"):  # shapes only: no memory
        return canonical_names(LiquidFoundationModelOptimized(model_cfg))


def _check_against_model(ckpt: ZeroCheckpoint, model_cfg: ModelConfig) -> dict[str, str]:
    """Saved name -> output name; CheckpointError if names or shapes differ from the model."""
    expected = _expected_model(model_cfg)
    names = {k: strip_wrapper(k) for k in ckpt.shapes}
    got = {names[k]: tuple(s) for k, s in ckpt.shapes.items()}
    problems = []
    missing = sorted(expected.keys() - got.keys())
    unexpected = sorted(got.keys() - expected.keys())
    if missing:
        problems.append(f"missing parameters {missing}")
    if unexpected:
        problems.append(f"parameters the model does not have {unexpected}")
    experts = model_cfg.moe.num_experts
    for k in sorted(expected.keys() & got.keys()):
        if got[k] == expected[k]:
            continue
        if k.endswith(MOE_EXPERT_PARAMS) and got[k][:1] != expected[k][:1]:
            problems.append(f"wrong expert count in {k}: checkpoint has {got[k][0]} experts, "
                            f"model.moe.num_experts = {experts}")
        else:
            problems.append(f"shape mismatch {k}: checkpoint {got[k]}, config {expected[k]}")
    if problems:
        raise CheckpointError(f"{ckpt.path} does not match its config.yaml: "
                              + "; ".join(problems))
    return names


def _final_metrics(run_dir: Path, step: int) -> dict[str, Any]:
    train: dict[str, Any] = {}
    evals: dict[str, Any] = {}
    f = run_dir / "metrics.jsonl"
    if f.is_file():
        for line in f.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if r.get("step", 0) > step:
                continue
            if r.get("kind") == "train":
                train = r
            elif r.get("kind") == "eval":
                evals = r
    out = {k: train[k] for k in ("loss", "ce", "recon_encoder", "recon_decoder") if k in train}
    out.update({k: evals[k] for k in ("val_ce", "val_loss", "val_ppl") if k in evals})
    return out


def _model_card(run_cfg: dict[str, Any], ckpt: ZeroCheckpoint, dtype: str,
                n_params: int, metrics: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    t, d = run_cfg.get("train", {}), run_cfg.get("data", {})
    samples = (ckpt.step * t.get("micro_batch_size", 0) * t.get("grad_accum", 0)
               * ckpt.world_size)
    tokens = samples * (d.get("encoder_length", 0) + d.get("decoder_length", 0))
    info = {"training_steps": ckpt.step, "samples_seen": samples, "tokens_seen": tokens,
            "parameters": n_params, "dtype": dtype, "world_size": ckpt.world_size,
            "zero_stage": ckpt.stage, "source": str(ckpt.path), **metrics}
    rows = "\n".join(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
                     for k, v in info.items())
    text = (f"# LiquidFoundationModelOptimized\n\nConverted from the training checkpoint "
            f"`{ckpt.path}` by `python -m liquid_dist.convert`. Tokens seen counts encoder and "
            "decoder positions (step x global batch x both lengths); losses are the last "
            "logged before the checkpoint.\n\n| | |\n|---|---|\n" + rows + "\n\n"
            "```python\nfrom liquid_dist.model import LiquidFoundationModelOptimized\n"
            "model = LiquidFoundationModelOptimized.from_pretrained(\"THIS_DIR\")\n```\n\n"
            "```\npython -m liquid_dist.generate THIS_DIR --prompt \"To be, or not\"\n```\n\n"
            "Without liquid_dist, with `transformers` (the remote code is in this directory):\n\n"
            "```python\nfrom transformers import AutoModelForSeq2SeqLM, AutoTokenizer\n"
            "model = AutoModelForSeq2SeqLM.from_pretrained(\"THIS_DIR\", trust_remote_code=True)\n"
            "tok = AutoTokenizer.from_pretrained(\"THIS_DIR\", trust_remote_code=True)\n```\n")
    return text, info


def convert(run_dir: Union[str, Path], output: Union[str, Path], *, step: Optional[int] = None,
            dtype: str = "fp32", max_shard_size: Union[str, int] = "5GB",
            overwrite: bool = False, progress: bool = True) -> Path:
    """Convert a training checkpoint to the single-GPU format; returns ``output``.

    Raises CheckpointError (incomplete / inconsistent checkpoint) and
    FileExistsError (``output`` exists and ``overwrite`` is False) before
    writing anything; the files are written to a sibling ``.partial``
    directory and moved into place at the end.
    """
    from tqdm import tqdm

    out = Path(output)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists: pass --overwrite to replace it")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    limit = parse_size(max_shard_size) if isinstance(max_shard_size, str) else max_shard_size
    ref = find_checkpoint(str(run_dir), step=step)
    assert ref is not None
    path = ref.path
    verify_checkpoint(path)  # a damaged file is refused, naming it
    if not (path / TOKENIZER_NAME).is_file():
        raise CheckpointError(f"{path}: missing {TOKENIZER_NAME}")
    run_cfg = read_config(ref)
    try:
        model_cfg = model_config_from_dict(run_cfg["model"])
    except ConfigError as exc:
        raise CheckpointError(f"{path / CONFIG_FILE}: {exc}") from exc
    ckpt = open_checkpoint(path)
    names = _check_against_model(ckpt, model_cfg)
    target = DTYPES[dtype]

    entries = []
    for k, shape in ckpt.shapes.items():
        src = ckpt.buffers[k].dtype if k in ckpt.buffers else torch.float32
        entries.append((names[k], _out_dtype(src, target), tuple(shape)))
    source = {names[k]: k for k in ckpt.shapes}
    shards = _plan_shards(entries, limit)
    files = ([WEIGHTS_NAME] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    tied = {strip_wrapper(a): strip_wrapper(b) for a, b in ckpt.shared.items()}
    metadata = {"format": "pt", "tied_weights": json.dumps(tied, sort_keys=True)}

    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    bar = tqdm(total=sum(math.prod(e[2]) * e[1].itemsize for e in entries), unit="B",
               unit_scale=True, desc=f"convert {path.name}", disable=not progress,
               file=sys.stderr)
    try:
        for fname, shard in zip(files, shards, strict=True):
            with open(tmp / fname, "wb") as fh:
                fh.write(_header(shard, metadata))
                for name, out_dtype, shape in shard:
                    t = ckpt.tensor(source[name]).to(out_dtype).contiguous()
                    if tuple(t.shape) != shape:
                        raise CheckpointError(f"{name}: gathered shape {tuple(t.shape)}, "
                                              f"expected {shape}")
                    fh.write(t.reshape(-1).view(torch.uint8).numpy().data)  # no copy
                    bar.update(t.numel() * t.element_size())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(math.prod(e[2]) * e[1].itemsize
                                                for e in entries),
                              "tied_weights": tied},
                 "weight_map": {e[0]: f for f, s in zip(files, shards, strict=True)
                                for e in s}}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    write_model_config(model_cfg, tmp, target)
    write_remote_code(tmp)
    # as in Hugging Face: the model directory's weights, config and code, then the
    # tokenizer saves itself beside them
    Tokenizer(path / TOKENIZER_NAME).save_pretrained(
        tmp, model_max_length=model_cfg.max_encoder_length)
    sentinels = Tokenizer(tmp / TOKENIZER_NAME).sentinel_ids
    write_generation_config(
        GenerationConfig.from_model_config(model_cfg).updated(suppress_tokens=sentinels), tmp)
    n_params = sum(math.prod(e[2]) for e in entries)
    run_root = path.parent.parent if path.parent.name == CHECKPOINTS else path.parent
    card, _ = _model_card(run_cfg, ckpt, dtype, n_params, _final_metrics(run_root, ckpt.step))
    (tmp / MODEL_CARD_NAME).write_text(card)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="liquid-convert", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="run directory, its checkpoints/ directory, or a checkpoint")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--output", "-o", required=True, help="directory to write")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--max-shard-size", default="5GB",
                   help="split the weights into files of at most this size (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        out = convert(args.run_dir, args.output, step=args.step, dtype=args.dtype,
                      max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                      progress=not args.quiet)
    except (CheckpointError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
