"""Component ablations of ``tiny``: paired seeds, baselines of equal size, several points.

    python bench/ablations.py --threads 1                       # the whole protocol, one process
    python bench/ablations.py --threads 1 --seeds 0 1 2 --removal-seeds 0 \
        --variants full transformer_params transformer_time t5 --output a.json &
    python bench/ablations.py --threads 1 --seeds 0 1 --variants no_frequency no_compression \
        no_embedding_conv no_deformable_conv no_moe no_lstm transformer --output b.json &
    python bench/ablations.py --merge a.json b.json --output bench/results/ablations.json
    python bench/ablations.py --resummarize bench/results/ablations.json   # summary only
    python bench/ablations.py --smoke [--data DIR] [--output X.json]   # 2 steps, the test

(``--threads 1`` when other processes share the cores: torch's default of one
thread per core then runs several times slower, and the timings say so. The
split above runs the protocol as two processes, one per core, in about 45
minutes on a 2-core machine; ``--merge`` checks that both ran the same protocol
on the same batches and computes one summary.)

On the demo's Shakespeare data (``--data``, default ``data/shakespeare``, made by
``data_prep/prepare_shakespeare.py`` if missing) it trains, in one CPU process,
with a plain PyTorch loop (no DeepSpeed: the comparison is between models):

* ``full``: ``configs/tiny.yaml``'s model;
* ``no_<x>``: the same with ``model.ablate=[x]``, for each of the six removable
  components (docs/model.md, "Ablations");
* ``transformer``: ``configs/tiny-transformer.yaml``'s model (all six removed, same widths);
* ``transformer_params``: the plain transformer with the ``model.ffn_dim`` that
  brings its total parameters to ``tiny``'s;
* ``transformer_time``: the plain transformer with ``--time-matched-layers``
  layers a side (5: measured at about ``tiny``'s time per step);
* ``t5``: ``transformers``' ``T5ForConditionalGeneration`` with the vocabulary,
  d_model, heads, depth and tied embeddings of ``tiny`` and the feed-forward
  width that brings its total parameter count closest to ``tiny``'s (printed;
  ``--t5-d-ff`` fixes it). Skipped, with a note in the results, when
  ``transformers`` is not installed.

The protocol: every seed of ``--seeds`` (offsets of ``train.seed``; each moves
the models' initialisation and the training data order) runs the headline arms
(:data:`HEADLINE`: full and its three equal-size baselines), the first
``--removal-seeds`` of them also the single removals and ``transformer``.
Within a seed every variant sees exactly the same batches: ``--steps`` training
batches of the project's loader (``build_train_loader``, one rank,
``--batch-size`` examples, the mixture objective) materialised once, and every
seed the same validation batches (their SHA-256, as each model consumed them,
is in the results). The models train interleaved, one step of each in turn,
so that machine noise hits all alike. Optimisation follows the trainer
(liquid_dist/train/trainer.py): fp32, AdamW with ``train.lr``,
``train.beta1/beta2``, ``train.weight_decay`` by the one
``liquid_dist.model.utils.param_groups`` rule, gradient-norm clipping at
``train.grad_clip``, the learning rate of ``lr_at(step)`` (warm-up then cosine
to ``train.min_lr`` at the last step); the project's models back-propagate
their loss (token-weighted CE + auxiliary terms), T5 its CE; an update with a
non-finite loss (or repaired activations) is skipped and counted.

At ``--eval-points`` evenly spaced steps (the last at ``--steps``) each model is
scored: validation CE (token-weighted over every real target of the validation
batches) and held-out bits per byte of the validation documents
(``liquid_dist.evaluate``, prefix-LM windows, ``--eval-tokens`` targets). Per run
(variant, seed): parameters (total and active per token), time per training
step (mean after ``--warmup`` untimed steps), final train CE, the curve, the
final figures and ``mean_k`` (dynamic k's experts per token). The summary
(:func:`summarize`): per variant, mean ± std over its seeds, and the paired
differences against ``full`` seed by seed with their mean, std and 95 % paired
t interval; the verdict on validation CE is a paired t-test: ``better`` or
``worse`` when the interval excludes 0, else ``no difference``. Results
(machine, date, settings, runs, summary) go to ``--output``, a chart of the
validation curves to ``--plot`` (matplotlib, optional), a markdown table to
stdout. ``--resummarize`` re-derives the summary of a result file from the
per-seed runs it stores.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from liquid_dist.config import ABLATIONS, load_config
from liquid_dist.data import IGNORE_INDEX, Tokenizer, build_train_loader, build_val_loader
from liquid_dist.model import LiquidFoundationModelOptimized
from liquid_dist.model.counts import count_parameters
from liquid_dist.model.utils import param_groups
from liquid_dist.train.schedule import lr_at

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("encoder_input_ids", "encoder_attention_mask", "decoder_input_ids", "labels")
VARIANTS: dict[str, str] = {
    "full": "configs/tiny.yaml",
    **{f"no_{name}": f"tiny, model.ablate=[{name}]" for name in ABLATIONS},
    "transformer": "configs/tiny-transformer.yaml (all six removed)",
    "transformer_params": "tiny-transformer with model.ffn_dim sized to tiny's total parameters",
    "transformer_time": "tiny-transformer with --time-matched-layers layers a side "
                        "(about tiny's time per step)",
    "t5": "transformers T5ForConditionalGeneration, sized to tiny's total parameters",
}
HEADLINE = ("full", "transformer_params", "transformer_time", "t5")
"""The arms every seed of ``--seeds`` runs; the others run the first ``--removal-seeds``."""


# ------------------------------------------------------------------ data


def prepare_data(data_dir: Path) -> tuple[Path, Path]:
    """(tokenizer model, shards directory) of ``data_dir``, made by the demo's data step
    (data_prep/prepare_shakespeare.py, as scripts/demo.sh runs it) when missing."""
    tokenizer, shards = data_dir / "tokenizer" / "tokenizer.model", data_dir / "shards"
    if not (tokenizer.is_file() and (shards / "manifest.json").is_file()):
        print(f"preparing the Shakespeare corpus into {data_dir}", flush=True)
        subprocess.run([sys.executable, str(ROOT / "data_prep" / "prepare_shakespeare.py"),
                        "--output", str(data_dir)], check=True)
    return tokenizer, shards


def take_batches(loader, n: int) -> list[dict[str, torch.Tensor]]:
    """The first ``n`` batches of ``loader``, across epochs if one is shorter."""
    out: list[dict[str, torch.Tensor]] = []
    while len(out) < n:
        before = len(out)
        for batch in loader:
            out.append({k: batch[k] for k in KEYS})
            if len(out) == n:
                break
        if len(out) == before:
            raise RuntimeError("the training loader yielded no batch")
    return out


def digest(h: Any, batch: dict[str, torch.Tensor]) -> None:
    for k in KEYS:
        t = batch[k]
        h.update(f"{k}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.contiguous().numpy().tobytes())


# ------------------------------------------------------------------ models


@dataclass
class Output:
    """The fields of the project's ModelOutput that this benchmark and evaluate() read."""

    logits: torch.Tensor
    loss: Optional[torch.Tensor]
    ce_sum: Optional[torch.Tensor]
    num_targets: Optional[torch.Tensor]
    aux_loss: torch.Tensor
    aux: dict[str, torch.Tensor] = field(default_factory=dict)


class T5Adapter(nn.Module):
    """A Hugging Face T5 called like LiquidFoundationModelOptimized: the project's batch
    keys in, ``logits`` / ``loss`` (= CE) / ``ce_sum`` / ``num_targets`` out. The decoder
    start token (0) and the pad / EOS ids (0 / 1) are T5's own conventions too."""

    def __init__(self, config: Any):
        super().__init__()
        from transformers import T5ForConditionalGeneration

        self.t5 = T5ForConditionalGeneration(config)

    def forward(self, encoder_input_ids: torch.Tensor, decoder_input_ids: torch.Tensor,
                encoder_attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None,
                decoder_attention_mask: Optional[torch.Tensor] = None) -> Output:
        if decoder_attention_mask is None and labels is not None:
            decoder_attention_mask = labels != IGNORE_INDEX  # the project's rule
        out = self.t5(input_ids=encoder_input_ids,
                      attention_mask=None if encoder_attention_mask is None
                      else encoder_attention_mask.long(),
                      decoder_input_ids=decoder_input_ids,
                      decoder_attention_mask=None if decoder_attention_mask is None
                      else decoder_attention_mask.long(),
                      use_cache=False, return_dict=True)
        zero = out.logits.new_zeros((), dtype=torch.float32)
        if labels is None:
            return Output(out.logits, None, None, None, zero)
        ce_sum = F.cross_entropy(out.logits.float().flatten(0, 1), labels.flatten(),
                                 ignore_index=IGNORE_INDEX, reduction="sum")
        n = (labels != IGNORE_INDEX).sum()
        ce = ce_sum / n.clamp(min=1)
        return Output(out.logits, ce, ce_sum, n, zero, {"ce": ce})


def t5_config(model_cfg: Any, target_total: int, d_ff: Optional[int] = None) -> Any:
    """T5 v1.1-style (gated GELU, no dropout beyond tiny's) with tiny's vocabulary, width,
    heads, depth and embedding tying; ``d_ff`` (a multiple of 64) brings the total
    parameter count closest to ``target_total`` unless given."""
    from transformers import T5Config, T5ForConditionalGeneration

    m = model_cfg

    def build(width: int) -> Any:
        return T5Config(vocab_size=m.vocab_size, d_model=m.d_model,
                        d_kv=m.d_model // m.n_heads, num_heads=m.n_heads,
                        num_layers=m.n_encoder_layers, num_decoder_layers=m.n_decoder_layers,
                        d_ff=width, feed_forward_proj="gated-gelu",
                        tie_word_embeddings=m.tie_embeddings, dropout_rate=m.dropout,
                        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)

    def total(width: int) -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in T5ForConditionalGeneration(build(width)).parameters())

    return build(d_ff if d_ff is not None else matching_width(total, target_total, 64))


def matching_width(total: Callable[[int], int], target_total: int, multiple: int) -> int:
    """The width (a multiple of ``multiple``, at least one) whose ``total(width)`` parameter
    count is closest to ``target_total``; the total is linear in the width."""
    a, b = total(64), total(128)
    per_unit = (b - a) / 64
    return max(multiple, multiple * round((64 + (target_total - a) / per_unit) / multiple))


def transformers_version() -> Optional[str]:
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


# ------------------------------------------------------------------ training


@dataclass
class Run:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    params: dict[str, int]
    config: dict[str, Any]
    step_s: list[float] = field(default_factory=list)
    ce: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    skipped: int = 0
    train_hash: Any = field(default_factory=hashlib.sha256)
    mean_k: list[float] = field(default_factory=list)
    curve: list[dict[str, Any]] = field(default_factory=list)


def ffn_matching_total(path: Path, common: list[str], target_total: int) -> int:
    """The ``model.ffn_dim`` (a multiple of 8) that brings the config at ``path`` closest to
    ``target_total`` parameters (the total is linear in it)."""
    def total(ffn: int) -> int:
        cfg = load_config(path, common + [f"model.ffn_dim={ffn}"])
        with torch.device("meta"):
            return count_parameters(LiquidFoundationModelOptimized(cfg.model))["total"]

    return matching_width(total, target_total, 8)


def build_runs(names: list[str], cfgs: dict[str, Any], t5_d_ff: Optional[int],
               seed: int) -> tuple[list[Run], dict[str, str]]:
    """The models and optimizers (each built right after ``manual_seed(seed)``); notes of
    the variants that cannot run."""
    runs, skipped = [], {}
    t = cfgs["full"].train
    for name in names:
        torch.manual_seed(seed)
        if name == "t5":
            if transformers_version() is None:
                skipped[name] = ("transformers is not installed (pip install transformers): "
                                 "T5 row skipped")
                print(f"note: {skipped[name]}", flush=True)
                continue
            with torch.device("meta"):
                full_total = count_parameters(LiquidFoundationModelOptimized(
                    cfgs["full"].model))["total"]
            config = t5_config(cfgs["full"].model, full_total, t5_d_ff)
            torch.manual_seed(seed)
            model = T5Adapter(config)
            n = sum(p.numel() for p in model.parameters())
            params = {"total": n, "dense": n, "experts": 0, "active_per_token_min": n,
                      "active_per_token_max": n}
            described = {k: getattr(config, k) for k in (
                "vocab_size", "d_model", "d_kv", "num_heads", "num_layers",
                "num_decoder_layers", "d_ff", "feed_forward_proj", "tie_word_embeddings",
                "dropout_rate", "relative_attention_num_buckets",
                "relative_attention_max_distance")}
            described["transformers"] = transformers_version()
            print(f"t5 config: {described}", flush=True)
        else:
            cfg = cfgs[name]
            model = LiquidFoundationModelOptimized(cfg.model)
            params = count_parameters(model)
            described = {"ablate": list(cfg.model.ablate)}
        model.train()
        optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr,
                                      betas=(t.beta1, t.beta2), weight_decay=t.weight_decay)
        runs.append(Run(name, model, optimizer, params, described))
        print(f"{name:>20}: {params['total']:>10,d} parameters, "
              f"{params['active_per_token_min']:>10,d} active per token", flush=True)
    return runs, skipped


def train_step(run: Run, batch: dict[str, torch.Tensor], lr: float, grad_clip: float) -> None:
    digest(run.train_hash, batch)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    start = time.perf_counter()
    out = run.model(batch["encoder_input_ids"], batch["decoder_input_ids"],
                    encoder_attention_mask=batch["encoder_attention_mask"],
                    labels=batch["labels"])
    repaired = int(out.aux.get("nonfinite_activations", 0))
    if bool(torch.isfinite(out.loss)) and repaired == 0:
        out.loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(),
                                              grad_clip if grad_clip > 0 else math.inf)
        if bool(torch.isfinite(norm)):
            run.optimizer.step()
        else:
            run.skipped += 1
    else:
        run.skipped += 1
    run.optimizer.zero_grad(set_to_none=True)
    run.step_s.append(time.perf_counter() - start)
    run.ce.append(float(out.ce_sum.detach()) / max(1, int(out.num_targets)))
    run.loss.append(float(out.loss.detach()))
    if "moe_mean_k" in out.aux:
        run.mean_k.append(float(out.aux["moe_mean_k"]))


@torch.no_grad()
def validation_ce(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> tuple[float, int,
                                                                                       str]:
    """(token-weighted CE over every real target of ``batches``, targets, batches' SHA-256)."""
    model.eval()
    h, nats, n = hashlib.sha256(), 0.0, 0
    for batch in batches:
        digest(h, batch)
        out = model(batch["encoder_input_ids"], batch["decoder_input_ids"],
                    encoder_attention_mask=batch["encoder_attention_mask"],
                    labels=batch["labels"])
        nats += float(out.ce_sum)
        n += int(out.num_targets)
    return nats / max(n, 1), n, h.hexdigest()


def heldout(model: nn.Module, tok: Tokenizer, shards: Path, data_cfg: Any, model_cfg: Any, *,
            max_tokens: Optional[int], batch_size: int) -> dict[str, Any]:
    """Held-out CE and bits per byte of the validation documents of ``shards`` through
    liquid_dist.evaluate (prefix-LM windows of the training shape): the one place that
    calls its API."""
    from liquid_dist.data.stream import Stats
    from liquid_dist.data.text_inputs import InputReport
    from liquid_dist.evaluate import evaluate, iter_token_documents, make_settings

    model.eval()
    settings = make_settings("prefix_lm", data_cfg, tok, model_cfg)
    docs = iter_token_documents([str(shards)], tok, InputReport(), Stats(1, 1), split="val")
    r = evaluate(model, tok, docs, settings, batch_size=batch_size, max_tokens=max_tokens)
    return {k: r[k] for k in ("objective", "ce", "ppl", "bits_per_byte", "tokens", "bytes",
                              "documents", "examples", "truncated")}


# ------------------------------------------------------------------ report


def mean_std(xs: list[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (None with one value) of ``xs``."""
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else None,
            "n": len(xs)}


LEVEL = 0.95
"""Coverage of the paired intervals of :func:`paired` (two-sided)."""


def t_central_mass(t: float, df: int) -> float:
    """P(|T| ≤ t) for Student's t with ``df`` ≥ 1 degrees of freedom and t ≥ 0: the exact
    finite series of Abramowitz & Stegun 26.7.3 (odd ``df``) and 26.7.4 (even ``df``)."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    term = total = 1.0
    if df % 2 == 0:
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return math.sin(theta) * total
    if df == 1:
        return 2 * theta / math.pi
    for k in range(1, (df - 1) // 2):
        term *= c2 * (2 * k) / (2 * k + 1)
        total += term
    return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)


def t_critical(level: float, df: int) -> float:
    """The c > 0 with P(|T| ≤ c) = ``level`` (0 < level < 1) for Student's t with ``df`` ≥ 1
    degrees of freedom (12.706 for 95 % and df 1, 4.303 for df 2), to 1e-12 relative."""
    if not 0 < level < 1 or df < 1:
        raise ValueError(f"t_critical(level={level}, df={df}): expected 0 < level < 1, df >= 1")
    lo, hi = 0.0, 1.0
    while t_central_mass(hi, df) < level:
        lo, hi = hi, 2 * hi
    while hi - lo > 1e-12 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_central_mass(mid, df) < level else (lo, mid)
    return (lo + hi) / 2


def paired(diffs: list[float], level: float = LEVEL) -> dict[str, Any]:
    """The paired differences ``diffs`` (one per seed), their mean ± sample std and the
    two-sided ``level`` paired t interval of their mean, mean ± t_{n-1} · std / √n
    (``interval`` None with one difference, which has no spread)."""
    out = {**mean_std(diffs), "diffs": list(diffs), "interval": None}
    if len(diffs) > 1:
        half = t_critical(level, len(diffs) - 1) * out["std"] / math.sqrt(len(diffs))
        out["interval"] = [out["mean"] - half, out["mean"] + half]
    return out


def verdict(interval: Optional[list[float]]) -> str:
    """``better`` / ``worse`` when the interval of (arm − base) validation CE lies wholly
    below / above 0, ``no difference`` when it holds 0, ``one seed`` without an interval."""
    if interval is None:
        return "one seed"
    lo, hi = interval
    return "better" if hi < 0 else "worse" if lo > 0 else "no difference"


SUMMARY_KEYS = ("val_ce", "bits_per_byte", "time_per_step_s")


def summarize(rows: list[dict[str, Any]], base: str = "full") -> dict[str, Any]:
    """Per variant, over its seeds: mean ± std of ``SUMMARY_KEYS``; against ``base``, over
    the seeds both ran, the paired differences (variant − base, seed by seed) of each key
    with their mean ± std and 95 % paired t interval (:func:`paired`).

    The verdict is a paired t-test on validation CE: ``better`` / ``worse`` when the
    interval excludes 0, ``no difference`` when it holds 0, ``one seed`` with one pair
    (:func:`verdict`). Rows whose status is not ``ok`` are left out.
    """
    by: dict[str, dict[int, dict[str, Any]]] = {}
    for r in rows:
        if r["status"] == "ok":
            by.setdefault(r["variant"], {})[r["seed"]] = r
    out: dict[str, Any] = {}
    for variant, seeds in by.items():
        order = sorted(seeds)
        entry: dict[str, Any] = {"seeds": order}
        for k in SUMMARY_KEYS:
            entry[k] = mean_std([seeds[s][k] for s in order])
        pairs = [s for s in order if s in by.get(base, {})]
        if variant != base and pairs:
            diffs = {k: paired([seeds[s][k] - by[base][s][k] for s in pairs])
                     for k in SUMMARY_KEYS}
            entry[f"vs_{base}"] = {
                **diffs, "seeds": pairs,
                "test": f"paired t, two-sided {LEVEL:.0%} interval of the mean difference",
                "verdict": verdict(diffs["val_ce"]["interval"]),
                "time_ratio": entry["time_per_step_s"]["mean"]
                / statistics.fmean(by[base][s]["time_per_step_s"] for s in pairs)}
        out[variant] = entry
    return out


def table(summary: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per variant, mean ± std over its seeds, the paired Δ vs full
    (mean ± std, 95 % paired t interval) and the verdict."""
    def pm(d: dict[str, Any], fmt: str) -> str:
        std = "" if d["std"] is None else f" ± {d['std']:{fmt.lstrip('+')}}"
        return f"{d['mean']:{fmt}}{std}"

    def interval(d: dict[str, Any]) -> str:
        return "–" if d["interval"] is None else "[{:+.3f}, {:+.3f}]".format(*d["interval"])

    params = {r["variant"]: r["params"] for r in rows if r["status"] == "ok"}
    lines = ["| variant | seeds | params (active) | s/step (× full) | val CE | Δ val CE vs full "
             "(paired) | 95 % interval of Δ | bits/byte | Δ bits/byte | verdict |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for variant in VARIANTS:
        if variant not in summary:
            notes = [r.get("note", "") for r in rows if r["variant"] == variant]
            if notes:
                lines.append(f"| {variant} | skipped: {notes[0]} | | | | | | | | |")
            continue
        e, p = summary[variant], params[variant]
        vs = e.get("vs_full")
        lines.append(
            f"| {variant} | {len(e['seeds'])} | {p['total'] / 1e6:.2f} M "
            f"({p['active_per_token_min'] / 1e6:.2f} M) | {e['time_per_step_s']['mean']:.3f} "
            f"({vs['time_ratio'] if vs else 1.0:.2f}) | {pm(e['val_ce'], '.3f')} | "
            f"{pm(vs['val_ce'], '+.3f') if vs else '–'} | "
            f"{interval(vs['val_ce']) if vs else '–'} | {pm(e['bits_per_byte'], '.3f')} | "
            f"{pm(vs['bits_per_byte'], '+.3f') if vs else '–'} | "
            f"{vs['verdict'] if vs else 'reference'} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> Optional[str]:
    """Validation CE along training (mean over seeds, the band their min..max) per variant;
    returns why nothing was drawn, or None."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return "matplotlib is not installed: no plot"
    fig = Figure(figsize=(9, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for index, variant in enumerate(VARIANTS):
        curves = [r["curve"] for r in rows if r["variant"] == variant and r["status"] == "ok"]
        if not curves:
            continue
        steps = [p["step"] for p in curves[0]]
        values = [[c[i]["val_ce"] for c in curves] for i in range(len(steps))]
        style = "-" if variant == "full" or variant.startswith("no_") else "--"
        # the colour cycle has 10 colours: one each, black past them
        line, = ax.plot(steps, [statistics.fmean(v) for v in values], style, label=variant,
                        color=f"C{index}" if index < 10 else "black",
                        linewidth=2.5 if variant in HEADLINE else 1.2)
        ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values],
                        color=line.get_color(), alpha=0.15)
    ax.set(xlabel="step", ylabel="validation CE (nats / target)",
           title="validation cross-entropy (mean over seeds, band: min..max)")
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return None


# ------------------------------------------------------------------ main


def evaluate_point(run: Run, step: int, val_batches: list[dict[str, torch.Tensor]],
                   tok: Tokenizer, shards: Path, data_cfg: Any, model_cfg: Any,
                   eval_tokens: Optional[int], batch_size: int) -> None:
    """Validation CE and held-out bits per byte of ``run`` now, appended to its curve."""
    val_ce, val_targets, val_hash = validation_ce(run.model, val_batches)
    try:
        held = heldout(run.model, tok, shards, data_cfg, model_cfg, max_tokens=eval_tokens,
                       batch_size=batch_size)
    except Exception as exc:  # recorded (and caught by the test), not the end of the run
        held = {"error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc()[-3000:]}
        print(f"warning: held-out evaluation of {run.name} failed: {held['error']}",
              flush=True)
    run.model.train()
    run.curve.append({"step": step, "val_ce": val_ce, "val_targets": val_targets,
                      "val_batches_sha256": val_hash,
                      "bits_per_byte": held.get("bits_per_byte"), "heldout": held})


MERGE_FREE = ("seeds", "removal_seeds")
"""Settings that may differ between the result files that :func:`merge` combines."""


def merge(paths: list[Path], output: Path, plot_path: Optional[Path]) -> int:
    """Combine result files of runs that split the protocol (seeds or variants run by
    separate processes, e.g. one per core): their rows, one summary over all of them."""
    results = [json.loads(path.read_text()) for path in paths]
    first = {k: v for k, v in results[0]["settings"].items() if k not in MERGE_FREE}
    rows: list[dict[str, Any]] = []
    for path, result in zip(paths, results, strict=True):
        mine = {k: v for k, v in result["settings"].items() if k not in MERGE_FREE}
        if mine != first:
            differ = sorted(k for k in first.keys() | mine.keys() if first.get(k) != mine.get(k))
            raise SystemExit(f"{path}: settings {differ} differ from {paths[0]}'s: "
                             "only runs of the same protocol merge")
        rows += result["variants"]
    keys = [(r["variant"], r["seed"]) for r in rows if r["status"] == "ok"]
    if len(keys) != len(set(keys)):
        raise SystemExit(f"the files hold a (variant, seed) run twice: {sorted(keys)}")
    by_seed = {}
    for r in rows:  # every variant of a seed trained on the same batches
        if r["status"] == "ok":
            by_seed.setdefault(r["seed"], set()).add(r["train_batches_sha256"])
    if any(len(h) > 1 for h in by_seed.values()):
        raise SystemExit("runs of one seed trained on different batches: not one protocol")
    rows.sort(key=lambda r: (list(VARIANTS).index(r["variant"]), r["seed"]))
    summary = summarize(rows)
    out = {**results[0], "summary": summary, "variants": rows,
           "merged_from": [{"file": str(p), "date": r["date"], "machine": r["machine"],
                            "conditions": r["conditions"], "seeds": r["settings"]["seeds"]}
                           for p, r in zip(paths, results, strict=True)]}
    out["settings"] = {**out["settings"],
                       "seeds": sorted({r["seed"] for r in rows}),
                       "removal_seeds": sorted({r["seed"] for r in rows
                                                if r["variant"] not in HEADLINE})}
    output.parent.mkdir(parents=True, exist_ok=True)
    if plot_path is not None:
        why = plot(rows, plot_path)
        out["plot"] = why or str(plot_path)
    output.write_text(json.dumps(out, indent=2) + "\n")
    print(table(summary, rows))
    print(f"\nwrote {output}", flush=True)
    return 0


def resummarize(path: Path, output: Path) -> int:
    """Rewrite the result file ``path`` to ``output`` with its summary re-derived by
    :func:`summarize` from the per-seed runs it stores (no training); every other field is
    kept, and ``summarized`` records today's date."""
    result = json.loads(path.read_text())
    summary = summarize(result["variants"])
    result = {**result, "summary": summary, "summarized": datetime.date.today().isoformat()}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(table(summary, result["variants"]))
    print(f"\nwrote {output}", flush=True)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=8,
                   help="examples per step (8: the demo's global batch, 2 ranks x 4)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="seed offsets: each shifts the models' init and the training data order")
    p.add_argument("--removal-seeds", type=int, default=2,
                   help="how many of --seeds the single removals (no_*, transformer) run")
    p.add_argument("--eval-points", type=int, default=5,
                   help="validation CE and bits/byte this many times, evenly, the last at --steps")
    p.add_argument("--time-matched-layers", type=int, default=5,
                   help="layers a side of transformer_time")
    p.add_argument("--warmup", type=int, default=10,
                   help="first steps of each variant left out of the time per step")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--data", type=Path, default=ROOT / "data" / "shakespeare",
                   help="a prepare_shakespeare.py output (tokenizer/ and shards/)")
    p.add_argument("--val-batches", type=int, default=None,
                   help="validation batches (default: one pass over the validation shards)")
    p.add_argument("--eval-tokens", type=int, default=20000,
                   help="held-out target tokens for bits per byte (0: all)")
    p.add_argument("--t5-d-ff", type=int, default=None,
                   help="T5 feed-forward width (default: the one matching tiny's total)")
    p.add_argument("--output", type=Path, default=None,
                   help="default bench/results/ablations.json (--smoke: a temporary folder)")
    p.add_argument("--plot", type=Path, default=None,
                   help="default: the output's name with .png")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's; 1 is far faster on a busy machine)")
    p.add_argument("--smoke", action="store_true",
                   help="2 steps, seeds 0 1, 2 validation batches, 256 held-out tokens (the test)")
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="no training: combine these result files (runs of other seeds or "
                        "variants with the same settings otherwise) into --output")
    p.add_argument("--resummarize", type=Path, default=None, metavar="FILE",
                   help="no training: recompute the summary (paired tests) of the result file "
                        "FILE from its stored runs into --output (default: FILE itself)")
    args = p.parse_args(argv)
    if args.resummarize:
        return resummarize(args.resummarize, args.output or args.resummarize)
    if args.merge:
        if args.output is None:
            p.error("--merge needs --output")
        return merge(args.merge, args.output, None if args.no_plot else
                     (args.plot or args.output.with_suffix(".png")))
    if args.smoke:
        args.steps, args.warmup, args.seeds, args.eval_points = 2, 1, [0, 1], 2
        args.val_batches = args.val_batches or 2
        args.eval_tokens = 256
    if args.output is None:
        args.output = (Path(tempfile.mkdtemp(prefix="ablations_smoke_")) / "ablations.json"
                       if args.smoke else ROOT / "bench" / "results" / "ablations.json")
    if args.plot is None:
        args.plot = args.output.with_suffix(".png")
    if not 0 <= args.warmup < args.steps:
        p.error(f"--warmup {args.warmup}: expected 0 .. steps - 1 = {args.steps - 1}")
    if not 1 <= args.eval_points <= args.steps:
        p.error(f"--eval-points {args.eval_points}: expected 1 .. steps = {args.steps}")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds {args.seeds}: expected distinct seeds")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    names = [n for n in VARIANTS if n in args.variants]  # canonical order
    eval_tokens = args.eval_tokens or None
    started = time.perf_counter()
    load_start = os.getloadavg()

    tokenizer, shards = prepare_data(args.data.resolve())
    tok = Tokenizer(tokenizer)
    common = [f"model.vocab_size={tok.vocab_size}", f"data.tokenizer={tokenizer}",
              f"data.train_shards={shards}", f"data.val_shards={shards}", "data.num_workers=0"]
    tiny_path = ROOT / "configs" / "tiny.yaml"
    plain_path = ROOT / "configs" / "tiny-transformer.yaml"
    tiny = load_config(tiny_path, common)
    with torch.device("meta"):
        tiny_total = count_parameters(LiquidFoundationModelOptimized(tiny.model))["total"]
    layers = args.time_matched_layers
    cfgs = {"full": tiny, "t5": tiny,
            **{f"no_{n}": load_config(tiny_path, common + [f"model.ablate=[{n}]"])
               for n in ABLATIONS},
            "transformer": load_config(plain_path, common),
            "transformer_params": load_config(plain_path, common + [
                f"model.ffn_dim={ffn_matching_total(plain_path, common, tiny_total)}"]),
            "transformer_time": load_config(plain_path, common + [
                f"model.n_encoder_layers={layers}", f"model.n_decoder_layers={layers}"])}
    t = tiny.train
    val_batches = list(build_val_loader(tiny.data, rank=0, world_size=1,
                                        batch_size=args.batch_size, seed=t.seed,
                                        num_batches=args.val_batches))
    eval_at = {round(args.steps * (i + 1) / args.eval_points) for i in range(args.eval_points)}

    rows: list[dict[str, Any]] = []
    for index, seed_offset in enumerate(args.seeds):
        arms = [n for n in names if n in HEADLINE or index < args.removal_seeds]
        seed = t.seed + seed_offset
        # the same batches for every variant of a seed: materialised once
        train_batches = take_batches(build_train_loader(
            tiny.data, rank=0, world_size=1, batch_size=args.batch_size, seed=seed), args.steps)
        targets = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in train_batches)
        print(f"seed {seed_offset}: {args.steps} training batches of {args.batch_size} "
              f"({targets:,} target tokens), {len(val_batches)} validation batches, "
              f"arms {arms}", flush=True)
        runs, skipped = build_runs(arms, cfgs, args.t5_d_ff, seed)
        for step, batch in enumerate(train_batches, start=1):
            lr = lr_at(step - 1, lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps,
                       max_steps=args.steps)
            for run in runs:  # interleaved: machine noise hits every variant alike
                train_step(run, batch, lr, t.grad_clip)
            if step in eval_at:
                for run in runs:
                    evaluate_point(run, step, val_batches, tok, shards, tiny.data, tiny.model,
                                   eval_tokens, args.batch_size)
                print(f"seed {seed_offset} step {step}/{args.steps} "
                      f"({time.perf_counter() - started:.0f} s) val CE: "
                      + "  ".join(f"{r.name} {r.curve[-1]['val_ce']:.3f}" for r in runs),
                      flush=True)
        last = max(1, args.steps // 10)
        for run in runs:
            final = run.curve[-1]
            timed = run.step_s[args.warmup:]
            rows.append({
                "variant": run.name, "seed": seed_offset, "status": "ok",
                "description": VARIANTS[run.name], "config": run.config, "params": run.params,
                "time_per_step_s": statistics.fmean(timed),
                "time_per_step_median_s": statistics.median(timed),
                "final_train_ce": statistics.fmean(run.ce[-last:]),
                "final_train_loss": statistics.fmean(run.loss[-last:]),
                "val_ce": final["val_ce"], "bits_per_byte": final["bits_per_byte"],
                "val_targets": final["val_targets"], "heldout": final["heldout"],
                "mean_k": statistics.fmean(run.mean_k) if run.mean_k else None,
                "skipped_updates": run.skipped,
                "train_batches_sha256": run.train_hash.hexdigest(),
                "val_batches_sha256": final["val_batches_sha256"],
                "curve": [{k: v for k, v in point.items() if k != "heldout"}
                          for point in run.curve],
                "train_ce_curve": run.ce,
            })
        for name, note in skipped.items():
            rows.append({"variant": name, "seed": seed_offset, "status": "skipped",
                         "description": VARIANTS[name], "note": note})
    summary = summarize(rows)
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version(),
                    "transformers": transformers_version()},
        "conditions": {"loadavg_start": load_start, "loadavg_end": os.getloadavg(),
                       "order": "per seed, interleaved: one step of each variant in turn",
                       "wall_s": round(time.perf_counter() - started, 1)},
        "settings": {
            "smoke": args.smoke, "steps": args.steps, "warmup_untimed_steps": args.warmup,
            "batch_size": args.batch_size, "seeds": args.seeds,
            "removal_seeds": args.seeds[:args.removal_seeds], "headline": list(HEADLINE),
            "eval_steps": sorted(eval_at), "base_seed": t.seed, "config": "configs/tiny.yaml",
            "data": str(args.data), "vocab_size": tok.vocab_size,
            "objective": tiny.data.objective, "encoder_length": tiny.data.encoder_length,
            "decoder_length": tiny.data.decoder_length, "precision": "fp32",
            "transformer_params_ffn_dim": cfgs["transformer_params"].model.ffn_dim,
            "transformer_time_layers": layers,
            "optimizer": {"name": "AdamW", "lr": t.lr, "min_lr": t.min_lr,
                          "warmup_steps": t.warmup_steps, "schedule": "lr_at (cosine)",
                          "betas": [t.beta1, t.beta2], "weight_decay": t.weight_decay,
                          "weight_decay_on": "liquid_dist.model.utils.param_groups",
                          "grad_clip": t.grad_clip},
            "loss": "project models: CE + aux_loss (as trained); t5: CE",
            "val_batches": len(val_batches),
            "heldout": {"objective": "prefix_lm", "split": "val", "max_tokens": eval_tokens},
        },
        "summary": summary,
        "variants": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if not args.no_plot:
        why = plot(rows, args.plot)
        result["plot"] = why or str(args.plot)
        print(why or f"wrote {args.plot}", flush=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(table(summary, rows))
    print(f"\nwrote {args.output} ({time.perf_counter() - started:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
