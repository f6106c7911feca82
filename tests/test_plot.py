"""liquid_dist.plot: training curves from metrics.jsonl (docs/evaluation.md).

The real-run tests share one 2-step single-process run (:func:`two_step_run`,
cached per pytest process; tests/test_evaluate.py evaluates its checkpoint).
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import train_fixtures as tf

from liquid_dist.plot import load_run, main, plot_runs, tokens_seen
from liquid_dist.train.metrics import read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@functools.cache
def two_step_run() -> Path:
    """A real 2-step run of the micro model (one process, ZeRO-3 on CPU): metrics.jsonl
    with 2 train records, 1 eval record, expert usage of 2 MoE layers, a checkpoint."""
    run_dir = tf.TMP / "two_step_run"
    proc = tf.launch(1, tf.base_overrides(run_dir, steps=2), launcher="python", resume="none")
    assert proc.returncode == 0, tf.tail(proc)
    return run_dir


def write_metrics(run_dir: Path, records: list[dict]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def train_record(step: int, real_per_s: float, step_time_s: float, ce: float) -> dict:
    return {"kind": "train", "step": step, "loss": ce, "ce": ce, "lr": 1e-3, "grad_norm": 1.0,
            "real_tokens_per_s": real_per_s, "target_tokens_per_s": real_per_s / 3,
            "step_time_s": step_time_s, "expert_usage/encoder.blocks.0/e0": 0.25,
            "expert_usage/encoder.blocks.0/e1": 0.75}


def legend_labels(ax) -> list[str]:
    return ax.get_legend_handles_labels()[1]


def test_tokens_seen_sums_each_window_and_restarts_at_a_resume(tmp_path):
    # log_every 2; the attempt that logged step 4 died, metrics were truncated to the
    # step-3 checkpoint, and the resumed attempt's first window is 1 step long
    records = [{"kind": "event", "event": "start", "step": 0},
               train_record(2, 100.0, 0.5, 5.0),            # 2 steps x 0.5 s x 100/s
               {"kind": "eval", "step": 3, "val_ce": 4.5,
                "sources": {"web": {"val_ce": 4.25, "bits_per_byte": 1.5}}},
               {"kind": "event", "event": "resume", "step": 3},
               train_record(4, 300.0, 1.0, "nan"),          # 1 step x 1.0 s x 300/s
               train_record(6, 50.0, 2.0, 4.0)]             # 2 steps x 2.0 s x 50/s
    assert tokens_seen(records) == [100.0, 400.0, 600.0]
    run = load_run(write_metrics(tmp_path / "r", records), "r")
    assert run.tokens.tolist() == [100.0, 400.0, 600.0]
    assert run.eval_tokens.tolist() == [250.0]  # step 3: halfway between steps 2 and 4
    assert {k: v.tolist() for k, v in run.val_sources.items()} == {"web": [4.25]}
    assert math.isnan(run.train["ce"][1])       # a window without a good step stays a gap
    assert sorted(run.experts["encoder.blocks.0"]) == [0, 1]


@pytest.mark.slow
def test_plot_of_a_real_run_writes_a_png_with_every_panel(tmp_path):
    run = two_step_run()
    out = tmp_path / "plots" / "loss.png"
    assert main([str(run), "--output", str(out)]) == 0
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    fig = plot_runs([run], tmp_path / "again.png")
    # ce by step, ce by tokens, lr, grad norm, throughput + encoder and decoder MoE layers
    titles = [ax.get_title() for ax in fig.axes]
    assert len(fig.axes) == 7, titles
    assert titles[-2:] == ["expert usage: encoder.blocks.0", "expert usage: decoder.blocks.0"]
    name = run.name
    assert legend_labels(fig.axes[0]) == [f"{name} train", f"{name} val"]
    assert legend_labels(fig.axes[4]) == [f"{name} real", f"{name} targets"]
    assert legend_labels(fig.axes[5]) == [f"{name} e0", f"{name} e1"]
    ce_by_tokens = fig.axes[1].get_lines()[0].get_xdata()
    assert list(ce_by_tokens) == tokens_seen(read_metrics(run))
    assert ce_by_tokens[-1] > ce_by_tokens[0] > 0


@pytest.mark.slow
def test_two_runs_are_overlaid_with_their_names(tmp_path):
    other = tmp_path / "second_run"
    other.mkdir()
    shutil.copy(two_step_run() / "metrics.jsonl", other / "metrics.jsonl")
    fig = plot_runs([two_step_run(), other], tmp_path / "both.png")
    assert (tmp_path / "both.png").read_bytes().startswith(PNG_SIGNATURE)
    for ax in fig.axes:
        labels = " ".join(legend_labels(ax))
        assert two_step_run().name in labels and "second_run" in labels, ax.get_title()
    assert len(fig.axes[2].get_lines()) == 2  # one learning-rate line per run


def test_same_named_runs_are_labelled_by_path(tmp_path):
    records = [train_record(1, 10.0, 1.0, 3.0)]
    a = write_metrics(tmp_path / "a" / "run", records)
    b = write_metrics(tmp_path / "b" / "run", records)
    fig = plot_runs([a, b], tmp_path / "ab.png")
    assert legend_labels(fig.axes[2]) == [str(a), str(b)]
    assert len(fig.axes) == 6  # no eval records, one MoE layer


@pytest.mark.parametrize("case, message", [
    ("missing", "no metrics.jsonl"),
    ("empty_dir", "no metrics.jsonl"),
    ("events_only", "no train records"),
    ("not_json", "not JSON lines"),
    ("no_rates", "the train record of step 1 has no ['real_tokens_per_s', 'step_time_s']"),
])
def test_refuses_a_run_it_cannot_plot(tmp_path, capsys, case, message):
    run = tmp_path / case
    if case == "empty_dir":
        run.mkdir()
    elif case == "events_only":
        write_metrics(run, [{"kind": "event", "event": "start", "step": 0}])
    elif case == "no_rates":
        write_metrics(run, [{"kind": "train", "step": 1, "ce": 3.0}])
    elif case == "not_json":
        run.mkdir()
        (run / "metrics.jsonl").write_text("{not json\n")
    out = tmp_path / "x.png"
    assert main([str(run), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(run) in err
    assert not out.exists()


def test_without_matplotlib_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    run = write_metrics(tmp_path / "r", [train_record(1, 10.0, 1.0, 3.0)])
    # matplotlib absent: None in sys.modules makes every import of it fail
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main([str(run), "--output", str(tmp_path / "x.png")]) == 2
    assert "pip install 'liquid_dist[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
