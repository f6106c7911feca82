"""The metrics stream: one human line on stdout, ``RUN_DIR/metrics.jsonl``, optional wandb.

Only rank 0 writes. Every record is a flat JSON object with ``kind``
(``train``, ``eval``, ``monitor``, ``event``) and ``step``; the same record
goes to wandb when ``train.wandb.mode`` is ``online`` or ``offline``
(wandb is imported only then). The wandb run id is kept in the checkpoint,
so a resumed or requeued job continues the same wandb run (``resume="allow"``).

Across attempts (a requeue, a resubmission) every step is sent to the wandb
run once: metrics.jsonl tells which steps earlier attempts sent
(:func:`wandb_sent_through`). An attempt that died after its last checkpoint
had sent the steps it computed after it; the resumed attempt computes them
again, writes them to metrics.jsonl again (truncated to the checkpoint first,
:func:`truncate_metrics`) but does not send them again (an online wandb
refuses a step below its last one, an offline run would hold it twice): the
wandb run keeps the dead attempt's values there. Steps that were written to
metrics.jsonl but never reached wandb (its service died, or wandb was off) are
sent by the resumed attempt from metrics.jsonl (``replay``).

A wandb failure never costs the run: the wandb service is a separate process
that the job's SIGTERM (``scancel``, a requeue, a preemption) reaches
directly, and it exits at once. The first failing call turns wandb off for the
rest of the attempt with a warning and a ``wandb_lost`` event, and training,
the preemption checkpoint included, goes on. A service killed that way may
lose what it had not written yet (offline: the attempt's whole run file was
empty), so the steps of such an attempt count as not sent, and the next
attempt sends them again from metrics.jsonl (online, wandb drops those it had
already, being below its last step).
"""

from __future__ import annotations

import json
import math
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from liquid_dist.config import WandbConfig

METRICS_FILE = "metrics.jsonl"


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the fact, as text
    return v


def wandb_fields(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of ``record`` under ``KIND/KEY``, a nested mapping's as ``KIND/KEY/SUB``
    (the eval record's ``sources/NAME/val_ce``); other values are left out."""
    out: dict[str, float] = {}

    def add(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                add(f"{prefix}/{k}", v)
        elif isinstance(value, (int, float)):
            out[prefix] = value

    kind = record.get("kind", "train")
    for k, v in record.items():
        if k not in ("kind", "step"):
            add(f"{kind}/{k}", v)
    return out


def read_metrics(run_dir: str | Path, kind: Optional[str] = None) -> list[dict[str, Any]]:
    """The records of ``RUN_DIR/metrics.jsonl`` (of one ``kind`` if given), in order."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if kind is None or r.get("kind") == kind]


def wandb_sent_through(records: list[dict[str, Any]]) -> Optional[int]:
    """The last step the wandb run got, from the metrics.jsonl ``records`` of its attempts.

    Each attempt begins with a ``start``/``resume`` event naming its wandb mode;
    while wandb is on, every record was sent. After a ``wandb_lost`` event none
    of that attempt's records count as sent (the dying service may have lost them)."""
    through: Optional[int] = None
    before_attempt: Optional[int] = None
    sending = False
    for r in records:
        step = int(r.get("step", 0))
        if r.get("kind") == "event" and r.get("event") in ("start", "resume"):
            sending = r.get("wandb", "disabled") != "disabled"
            before_attempt = through
        elif r.get("kind") == "event" and r.get("event") == "wandb_lost":
            sending = False
            through = before_attempt
            continue
        if sending and (through is None or step > through):
            through = step
    return through


def truncate_metrics(run_dir: str | Path, step: int) -> int:
    """Drop records after ``step`` (logged by a run that then died before its next
    checkpoint; the resumed run logs those steps again). Returns how many were dropped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)
    return len(lines) - len(kept)


class MetricsLogger:
    """Writes records on rank 0; a no-op elsewhere.

    ``run_id`` is the wandb id (given when resuming, else a new one), kept
    whether or not wandb is on so that turning it on later still resumes.
    ``sent_through``: the last step that earlier attempts sent to this wandb
    run; records up to it go to metrics.jsonl only. ``replay``: records of
    earlier attempts that wandb never got, sent right after ``wandb.init``.
    """

    def __init__(self, run_dir: str | Path, *, rank: int, wandb_cfg: WandbConfig,
                 config: dict[str, Any], run_id: Optional[str] = None,
                 sent_through: Optional[int] = None,
                 replay: Sequence[dict[str, Any]] = (), printer: Any = None):
        self.rank = rank
        self.sent_through = sent_through
        self.path = Path(run_dir) / METRICS_FILE
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self._print = printer or (lambda line: print(line, file=sys.stdout, flush=True))
        self._wandb = None
        if rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if wandb_cfg.mode != "disabled":
            try:
                import wandb
            except ImportError as exc:
                raise RuntimeError(
                    f"train.wandb.mode={wandb_cfg.mode!r} needs wandb: pip install wandb "
                    "(or set train.wandb.mode=disabled)") from exc
            self._wandb = wandb.init(project=wandb_cfg.project, name=wandb_cfg.name,
                                     id=self.run_id, resume="allow", mode=wandb_cfg.mode,
                                     config=config, dir=str(self.path.parent))
            for record in replay:
                self._send(record)
            if replay:
                self.sent_through = max(self.sent_through or 0,
                                        max(int(r.get("step", 0)) for r in replay))

    def _send(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        if self._wandb is None or (self.sent_through is not None and step <= self.sent_through):
            return
        data = wandb_fields(record)
        try:
            self._wandb.log(data, step=step)
        except Exception as exc:  # any failure of the wandb service
            self._wandb = None
            self.log({"kind": "event", "event": "wandb_lost", "step": step},
                     f"wandb failed at step {step} ({type(exc).__name__}: {exc}): "
                     "continuing without it; metrics.jsonl has every record")
            return

    def log(self, record: dict[str, Any], line: Optional[str] = None) -> None:
        """Append ``record`` to metrics.jsonl (and wandb); print ``line`` if given."""
        if self.rank != 0:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        self._send(record)
        if line is not None:
            self._print(line)

    def info(self, line: str) -> None:
        if self.rank == 0:
            self._print(line)

    def close(self) -> None:
        if self._wandb is not None:
            run, self._wandb = self._wandb, None
            try:
                run.finish()
            except Exception as exc:  # the service may be gone (see the module docstring)
                self._print(f"wandb finish failed ({type(exc).__name__}: {exc})")


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def human_line(r: dict[str, Any], max_steps: int, eta_s: float) -> str:
    """One line of a ``train`` record: the figures a person watches."""
    mfu, mfu_real = r.get("mfu_positions"), r.get("mfu_real_tokens")
    parts = [f"step {r['step']}/{max_steps}", f"loss {r['loss']:.4f}", f"ce {r['ce']:.4f}",
             f"lr {r['lr']:.2e}", f"gnorm {r['grad_norm']:.3f}",
             f"{r['real_tokens_per_s']:,.0f} real tok/s ({r['target_tokens_per_s']:,.0f} "
             f"targets, {r['positions_per_s']:,.0f} positions)",
             f"pad {100 * r['padding_fraction']:.1f}%",
             f"mfu {100 * mfu:.1f}% (real tokens {100 * mfu_real:.1f}%)"
             if mfu is not None else "mfu n/a",
             f"mem {r['memory_gb']:.2f}GB", f"eta {format_duration(eta_s)}"]
    if r.get("nan_skips"):
        parts.append(f"nan-skips {r['nan_skips']}")
    if r.get("bad_samples"):
        parts.append(f"bad samples skipped {r['bad_samples']}")
    return " | ".join(parts)


# ---------------------------------------------------------------- the train record

AUX_KEYS = ("recon_encoder", "recon_decoder", "moe_entropy", "moe_overuse", "moe_mean_k")
"""The auxiliary terms the model reports, per-micro-batch means averaged over a step's
micro-batches and ranks (``aux_loss`` is their weighted sum)."""
LOSS_KEYS = ("loss", "ce", *AUX_KEYS)
"""A step's losses: ``loss`` = ``ce`` (token-weighted) + ``aux_loss``."""
COUNT_KEYS = ("encoder_tokens", "target_tokens", "positions", "flops_positions",
              "flops_real_tokens")
"""Per-step sums over micro-batches and ranks: real encoder tokens, real decoder targets,
positions computed (encoder + decoder, padding included), and the training FLOPs of the
positions computed and of the real tokens (flops.ModelFlops)."""


def peak_memory_gb(device: Any) -> float:
    """Peak memory of this process: allocated on a CUDA ``device``, else its peak RSS."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KiB


class StepWindow:
    """Sums over the steps since the last ``train`` record (the trainer's StepResults); a
    record is due every ``every`` steps and at the last one (:meth:`due`)."""

    def __init__(self, every: int = 1) -> None:
        self.every = every
        self.reset(time.perf_counter())

    def due(self, step: int, *, last: bool) -> bool:
        return last or step % self.every == 0

    def reset(self, now: float) -> None:
        self.start = now
        self.steps = 0
        self.good = 0
        self.losses = dict.fromkeys(LOSS_KEYS, 0.0)
        self.grad_norm = 0.0
        self.counts = dict.fromkeys(COUNT_KEYS, 0.0)
        self.usage: Any = None
        """(MoE layers, experts) routing counts of this rank's micro-batches, or None."""
        self.micro = 0

    def add(self, r: Any, micro_batches: int) -> None:
        """One step (a trainer StepResult) of ``micro_batches`` micro-batches on this rank."""
        self.steps += 1
        self.micro += micro_batches
        for k, v in r.counts.items():
            self.counts[k] += v
        if r.usage is not None:
            self.usage = r.usage if self.usage is None else self.usage + r.usage
        if r.applied:
            self.good += 1
            self.grad_norm += r.grad_norm
            for k, v in r.losses.items():
                self.losses[k] += v

    def record(self, step: int, lr: float, *, max_steps: int, world_size: int,
               peak_flops: Optional[float], data: dict[str, int], usage: Optional[dict],
               memory_gb: float, nan_skips: int, epoch: Optional[int]
               ) -> tuple[dict[str, Any], float]:
        """The ``train`` record of the window at ``step`` and the ETA in seconds: losses and
        gradient norm averaged over the applied steps; throughput in real tokens, target
        tokens and positions computed (padding included) per second; FLOP rates and MFU
        of both; ``data``: the loaders' counters summed over the ranks; ``usage``: each
        MoE layer's routing counts summed over the ranks, by layer name."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        c = self.counts
        real = c["encoder_tokens"] + c["target_tokens"]

        def mfu(flops: float) -> Optional[float]:
            return flops / elapsed / (peak_flops * world_size) if peak_flops else None

        good = max(self.good, 1)
        losses = ({k: v / good for k, v in self.losses.items()} if self.good
                  else dict.fromkeys(LOSS_KEYS, float("nan")))
        bad = {k: n for k, n in data.items() if k.startswith("bad_samples/")}
        record: dict[str, Any] = {"kind": "train", "step": step, **losses,
                                  "lr": lr, "grad_norm": self.grad_norm / good,
                                  "real_tokens_per_s": real / elapsed,
                                  "target_tokens_per_s": c["target_tokens"] / elapsed,
                                  "positions_per_s": c["positions"] / elapsed,
                                  "padding_fraction": 1.0 - real / max(c["positions"], 1.0),
                                  "step_time_s": elapsed / self.steps,
                                  "tflops_per_s_positions": c["flops_positions"] / elapsed / 1e12,
                                  "tflops_per_s_real_tokens":
                                      c["flops_real_tokens"] / elapsed / 1e12,
                                  "mfu_positions": mfu(c["flops_positions"]),
                                  "mfu_real_tokens": mfu(c["flops_real_tokens"]),
                                  "memory_gb": memory_gb, "nan_skips": nan_skips,
                                  "epoch": epoch, **data, "bad_samples": sum(bad.values())}
        for name, row in (usage or {}).items():
            for e, n in enumerate(row.tolist()):
                record[f"expert_usage/{name}/e{e}"] = n / (self.micro * world_size)
        return record, (max_steps - step) * elapsed / self.steps


def open_attempt_metrics(run_dir: Path, *, rank: int, step: int, run_id: Optional[str],
                         wandb_cfg: WandbConfig, config: dict[str, Any],
                         printer: Any = None) -> MetricsLogger:
    """The metrics logger of an attempt that starts at ``step``: metrics.jsonl truncated to
    it; resuming the run ``run_id``, wandb gets what earlier attempts never sent
    (:func:`wandb_sent_through`, ``replay``: the module doc)."""
    sent_through, replay = None, []
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if run_id is not None:  # what this wandb run got from earlier attempts
            sent_through = wandb_sent_through(read_metrics(run_dir))
        truncate_metrics(run_dir, step)
        if run_id is not None:  # up to the checkpoint: what it never got
            replay = [r for r in read_metrics(run_dir)
                      if sent_through is None or r.get("step", 0) > sent_through]
    return MetricsLogger(run_dir, rank=rank, wandb_cfg=wandb_cfg, config=config, run_id=run_id,
                         sent_through=sent_through, replay=replay, printer=printer)


def data_counters(stats: dict[str, Any], world_size: int) -> dict[str, int]:
    """What the training loaders counted (their ``stats()``), summed over the ranks: tokens
    drawn per source (``data_tokens/<source>``), bad samples skipped per reason
    (``bad_samples/<reason>``; docs/data.md). Collective: every rank calls it."""
    mine: dict[str, int] = {f"data_tokens/{name}": n
                            for name, n in stats["tokens_per_source"].items()}
    for reasons in stats["bad_samples"].values():
        for reason, n in reasons.items():
            mine[f"bad_samples/{reason}"] = mine.get(f"bad_samples/{reason}", 0) + n
    everyone = [mine]
    if world_size > 1:  # ranks may count different reasons: gather the dicts
        import torch.distributed as dist

        everyone = [{} for _ in range(world_size)]
        dist.all_gather_object(everyone, mine)
    total: dict[str, int] = {}
    for counts in everyone:
        for k, n in counts.items():
            total[k] = total.get(k, 0) + n
    return dict(sorted(total.items()))

