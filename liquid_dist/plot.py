"""Training curves of one or more runs, from their metrics.jsonl, in one image.

    python -m liquid_dist.plot RUN_DIR [RUN_DIR ...] --output FILE.png

Panels (docs/evaluation.md), every run overlaid in its own colour, labelled
by its directory name:

* cross-entropy against step: train ``ce`` (solid), validation ``val_ce``
  (dashed, dots) and each validation source's ``val_ce`` (``data.val_sources``:
  dotted, one marker per source);
* the same against real tokens seen;
* learning rate ``lr``; gradient norm ``grad_norm`` (before clipping);
* throughput: ``real_tokens_per_s`` (solid) and ``target_tokens_per_s`` (dashed);
* one panel per MoE layer: the fraction of routing assignments each expert
  received (``expert_usage/<layer>/e<k>``), one line style per expert.

**Real tokens seen** after a train record: the sum over the train records up to
it of ``real_tokens_per_s x step_time_s x steps in its window``. A record covers
the steps since the previous train record, or since the attempt's ``start`` /
``resume`` event if that is later; ``real_tokens_per_s`` is real encoder tokens +
real decoder targets of every rank over the window's wall time and
``step_time_s`` that wall time per step, so the product is the window's real
tokens (padding excluded). A validation point at a step without a train record
is placed by linear interpolation between its neighbours.

matplotlib is an optional dependency (``pip install 'liquid_dist[plot]'``),
imported only when drawing, and drawn with the Agg canvas (no display, no
global backend change).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from liquid_dist.train.metrics import METRICS_FILE, read_metrics

EXIT_BAD_INPUT = 2
EXPERT_PREFIX = "expert_usage/"
FIXED_PANELS = 5
"""Cross-entropy by step, by tokens, learning rate, grad norm, throughput."""
_EXPERT_STYLES = ("-", "--", ":", "-.")
_SOURCE_MARKERS = ("s", "^", "v", "D", "P", "X")
SHORT_RUN_RECORDS = 30
TOKEN_KEYS = ("step", "real_tokens_per_s", "step_time_s")
"""The keys of a train record that real tokens seen are computed from."""


class PlotError(RuntimeError):
    """A run directory that cannot be plotted, or no matplotlib; the message says which."""


def _num(value: Any) -> float:
    """A metric value as a float: None (e.g. MFU on CPU) -> NaN; "nan"/"inf" strings
    (metrics.jsonl stores non-finite numbers as text) -> their float."""
    return math.nan if value is None else float(value)


def tokens_seen(records: Sequence[dict[str, Any]]) -> list[float]:
    """Cumulative real tokens after each ``train`` record of ``records`` (module docstring)."""
    out: list[float] = []
    total, window_start = 0.0, 0
    for r in records:
        if r.get("kind") == "event" and r.get("event") in ("start", "resume"):
            window_start = int(r["step"])
        elif r.get("kind") == "train":
            steps = int(r["step"]) - window_start
            total += _num(r["real_tokens_per_s"]) * _num(r["step_time_s"]) * steps
            window_start = int(r["step"])
            out.append(total)
    return out


@dataclass
class RunCurves:
    """What the panels draw for one run."""

    name: str
    steps: np.ndarray
    tokens: np.ndarray
    train: dict[str, np.ndarray]
    """``ce``, ``lr``, ``grad_norm``, ``real_tokens_per_s``, ``target_tokens_per_s``."""
    eval_steps: np.ndarray
    eval_tokens: np.ndarray
    val_ce: np.ndarray
    val_sources: dict[str, np.ndarray] = field(default_factory=dict)
    """validation source -> its ``val_ce`` per eval record (NaN where a record lacks it)."""
    experts: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)
    """layer -> expert index -> usage per train record (NaN where a record lacks it)."""


def load_run(run_dir: str | Path, name: str) -> RunCurves:
    """The curves of one run; PlotError when it has no metrics.jsonl or no train records."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise PlotError(f"{run_dir}: no {METRICS_FILE} (expected a training run directory, "
                        "train.run_dir)")
    try:
        records = read_metrics(run_dir)
    except ValueError as exc:  # json.JSONDecodeError
        raise PlotError(f"{path}: not JSON lines ({exc})") from None
    train = [r for r in records if r.get("kind") == "train"]
    if not train:
        raise PlotError(f"{path}: no train records (kind 'train'); nothing to plot")
    for r in train:
        missing = [k for k in TOKEN_KEYS if k not in r]
        if missing:
            raise PlotError(f"{path}: the train record of step {r.get('step')} has no "
                            f"{missing} (real tokens seen need {list(TOKEN_KEYS)})")
    evals = [r for r in records if r.get("kind") == "eval"]
    steps = np.array([int(r["step"]) for r in train], dtype=np.float64)
    tokens = np.array(tokens_seen(records), dtype=np.float64)
    eval_steps = np.array([int(r["step"]) for r in evals], dtype=np.float64)
    layers: dict[str, dict[int, np.ndarray]] = {}
    for key in dict.fromkeys(k for r in train for k in r if k.startswith(EXPERT_PREFIX)):
        layer, expert = key[len(EXPERT_PREFIX):].rsplit("/", 1)
        layers.setdefault(layer, {})[int(expert.lstrip("e"))] = np.array(
            [_num(r.get(key)) for r in train])
    return RunCurves(
        name=name, steps=steps, tokens=tokens,
        train={k: np.array([_num(r.get(k)) for r in train])
               for k in ("ce", "lr", "grad_norm", "real_tokens_per_s", "target_tokens_per_s")},
        eval_steps=eval_steps, eval_tokens=np.interp(eval_steps, steps, tokens),
        val_ce=np.array([_num(r.get("val_ce")) for r in evals]),
        val_sources={name: np.array([_num(r.get("sources", {}).get(name, {}).get("val_ce"))
                                     for r in evals])
                     for name in dict.fromkeys(n for r in evals for n in r.get("sources", {}))},
        experts={layer: dict(sorted(e.items())) for layer, e in layers.items()})


def run_names(run_dirs: Sequence[str | Path]) -> list[str]:
    """Legend labels: each directory's name, or the path as given where names repeat."""
    names = [Path(d).resolve().name for d in run_dirs]
    return [n if names.count(n) == 1 else str(d) for n, d in zip(names, run_dirs, strict=True)]


def plot_runs(run_dirs: Sequence[str | Path], output: str | Path) -> Any:
    """Draw the panels of ``run_dirs`` into ``output`` (format from its suffix, e.g. .png);
    returns the matplotlib Figure (5 panels + one per MoE layer)."""
    runs = [load_run(d, n) for d, n in zip(run_dirs, run_names(run_dirs), strict=True)]
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as exc:
        raise PlotError("plotting needs matplotlib: pip install 'liquid_dist[plot]'") from exc

    layers = list(dict.fromkeys(layer for run in runs for layer in run.experts))
    panels = FIXED_PANELS + len(layers)
    rows = math.ceil(panels / 2)
    fig = Figure(figsize=(13, 3.4 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, 2, i + 1) for i in range(panels)]
    ce_step, ce_tokens, lr, gnorm, speed = axes[:FIXED_PANELS]
    for i, run in enumerate(runs):
        colour = f"C{i % 10}"
        # a short run's few records stay visible as dots (one record draws no line)
        dot = "." if len(run.steps) < SHORT_RUN_RECORDS else None
        for ax, x, x_eval in ((ce_step, run.steps, run.eval_steps),
                              (ce_tokens, run.tokens, run.eval_tokens)):
            ax.plot(x, run.train["ce"], color=colour, marker=dot, label=f"{run.name} train")
            if len(run.val_ce):
                ax.plot(x_eval, run.val_ce, color=colour, linestyle="--", marker="o",
                        label=f"{run.name} val")
            for k, (source, ce) in enumerate(run.val_sources.items()):
                ax.plot(x_eval, ce, color=colour, linestyle=":",
                        marker=_SOURCE_MARKERS[k % len(_SOURCE_MARKERS)],
                        label=f"{run.name} val {source}")
        lr.plot(run.steps, run.train["lr"], color=colour, marker=dot, label=run.name)
        gnorm.plot(run.steps, run.train["grad_norm"], color=colour, marker=dot, label=run.name)
        speed.plot(run.steps, run.train["real_tokens_per_s"], color=colour, marker=dot,
                   label=f"{run.name} real")
        speed.plot(run.steps, run.train["target_tokens_per_s"], color=colour, linestyle="--",
                   marker=dot, label=f"{run.name} targets")
        for ax, layer in zip(axes[FIXED_PANELS:], layers, strict=True):
            for e, usage in run.experts.get(layer, {}).items():
                ax.plot(run.steps, usage, color=colour, marker=dot,
                        linestyle=_EXPERT_STYLES[e % len(_EXPERT_STYLES)],
                        label=f"{run.name} e{e}")
    titles = [("cross-entropy (nats/target)", "step"),
              ("cross-entropy (nats/target)", "real tokens seen"),
              ("learning rate", "step"), ("gradient norm (before clipping)", "step"),
              ("throughput (tokens/s)", "step")]
    titles += [(f"expert usage: {layer}", "step") for layer in layers]
    for ax, (title, xlabel) in zip(axes, titles, strict=True):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        if xlabel == "step":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="liquid-plot", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="training run directories (with metrics.jsonl)")
    p.add_argument("--output", required=True, help="image file, e.g. loss.png")
    args = p.parse_args(argv)
    try:
        plot_runs(args.runs, args.output)
    except PlotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
