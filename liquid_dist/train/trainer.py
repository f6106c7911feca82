"""The training loop: DeepSpeed engine, data, logging, evaluation, checkpoints, preemption.

One optimizer step (:meth:`Trainer.train_step`) = ``train.grad_accum``
micro-batches of ``train.micro_batch_size`` on every rank. The cross-entropy
is token-weighted over the whole step: before the first forward all ranks sum
the step's real target tokens N (one all-reduce of a scalar, left on the
device), and each micro-batch back-propagates ``ce_sum * (grad_accum *
world_size / N) + aux_loss``; DeepSpeed's division by ``grad_accum`` and its
averaging over the ranks then leave exactly ``sum of per-token CE / N`` plus
the mean auxiliary loss, whatever the number of targets of each micro-batch.
Losses, counts and expert usage accumulate on the device. After the last
backward all ranks sum one vector of named values (the step's loss sums and
token counts, a non-finite flag and the stop flag: :meth:`Trainer.sum_over_ranks`)
in a single all-reduce, read once on the host, so they all take the same
decisions:

* non-finite loss on any rank, or a non-finite activation that a block had to
  replace (``nonfinite_activations`` > 0): the optimizer update is skipped (the
  step still counts and its batches are consumed), the skip is counted, and more
  than ``train.max_nan_skips`` skips in a row raise :class:`NonFiniteLossError`;
* a stop signal on any rank: the step completes, every rank saves a
  checkpoint, and :meth:`Trainer.run` returns :data:`EXIT_PREEMPTED`.

The step returns a :class:`StepResult`; the loop (:meth:`Trainer._loop`) asks
the components the rest: the heartbeat (hang allowances), the spike guard
(liquid_dist.train.spikes), the metrics window, evaluation, preemption,
checkpoints. The engine is built outside (liquid_dist.parallel.engine); the
learning rate is a function of the step (schedule.py), set on the optimizer
before each update. What a checkpoint keeps of the trainer is a
:class:`~liquid_dist.train.state.TrainerState`.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from liquid_dist.parallel.distributed import DistEnv
from liquid_dist.parallel.ds_compat import pending_grad_norm
from liquid_dist.parallel.engine import autocast, build_engine, plain_grad_norm, to_device
from liquid_dist.train.checkpoint import (
    CheckpointManager,
    Saved,
    find_damage_together,
    load_weights,
    seed_everything,
)
from liquid_dist.train.exit_status import EXIT_OK, EXIT_PREEMPTED
from liquid_dist.train.faults import NO_FAULTS, Faults
from liquid_dist.train.flops import ModelFlops, peak_flops_per_device
from liquid_dist.train.heartbeat import Heartbeat
from liquid_dist.train.metrics import (
    AUX_KEYS,
    COUNT_KEYS,
    StepWindow,
    data_counters,
    human_line,
    open_attempt_metrics,
    peak_memory_gb,
)
from liquid_dist.train.monitor import BlockMonitor
from liquid_dist.train.prepare import RunPlan, StartPoint
from liquid_dist.train.schedule import lr_at
from liquid_dist.train.signals import StopFlag
from liquid_dist.train.spikes import SpikeGuard
from liquid_dist.train.state import TrainerState
from liquid_dist.train.validate import Validator


class NonFiniteLossError(RuntimeError):
    """The loss was non-finite on more than ``train.max_nan_skips`` consecutive steps."""


@dataclass
class StepResult:
    """One optimizer step, summed over the ranks (the expert usage and monitor: this rank)."""

    losses: dict[str, float]
    """:data:`LOSS_KEYS`"""
    counts: dict[str, float]
    """:data:`COUNT_KEYS`"""
    lr: float
    grad_norm: float
    skipped: bool
    """The update was not applied: non-finite loss, gradient or activation."""
    replaced: int
    """Non-finite activations the blocks replaced (on any rank)."""
    stop: bool
    """A rank asked to stop (signal) during the step."""
    usage: Optional[torch.Tensor]
    """(MoE layers, experts) routing counts of this rank's micro-batches, or None."""
    monitor: Optional[dict[str, Any]]
    outlier: Optional[str] = None
    """Why the update was not applied as a loss spike (train.spike), or None."""

    @property
    def applied(self) -> bool:
        return not self.skipped and self.outlier is None


class Trainer:
    """Trains a run plan (prepare.resolve_run) from its start point (prepare.resolve_start)
    on the current process group.

    ``train_loader`` replaces the loader of the plan's training stream (tests use
    it to feed one process the union of several ranks' batches); it must yield
    the same batch dicts and offer ``state_dict`` / ``load_state_dict`` (returning
    the mixture's changes, as PretrainingLoader's) / ``stats``. ``faults``: the
    run's fault injection (liquid_dist.train.faults; none by default).
    ``heartbeat``: where the rank reports its progress to the node's watchdog
    (liquid_dist.train.heartbeat; none by default).
    """

    def __init__(self, plan: RunPlan, start: StartPoint, dist_env: DistEnv,
                 device: torch.device, *, train_loader: Any = None,
                 faults: Faults = NO_FAULTS, heartbeat: Optional[Heartbeat] = None):
        if (dist_env.world_size, device.type) != (plan.build.world_size,
                                                  plan.build.device_type):
            raise ValueError(f"the plan is for {plan.build.world_size} rank(s) of "
                             f"{plan.build.device_type}, the process group has "
                             f"{dist_env.world_size} of {device.type}")
        self.plan, self.start, self.cfg = plan, start, plan.config
        self.env, self.device, self.precision = dist_env, device, plan.build.precision
        self.run_dir = Path(self.cfg.train.run_dir)
        self._train_loader, self.faults = train_loader, faults
        self.heartbeat = heartbeat or Heartbeat(None)
        self.state = TrainerState()
        self.spikes = SpikeGuard(self.cfg.train.spike, lambda: self.state.spike)
        self.resharded_from: Optional[tuple[int, int]] = None  # (world size, ep_size)
        self._last_saved_step = -1

    # ------------------------------------------------------------------ build

    def _build(self) -> None:
        from liquid_dist.data.loader import open_loader

        cfg, t, plan = self.cfg, self.cfg.train, self.plan
        built = build_engine(plan.build, self.device, init_from=self.start.init_from_pretrained)
        self.engine, self.optimizer = built.engine, built.optimizer
        self.model, self.parameter_counts = built.model, built.parameter_counts
        self.expert_layout = built.expert_layout
        seed_everything(t.seed + self.env.rank)  # per-rank dropout streams
        if self._train_loader is None:
            self._train_loader = open_loader(cfg.data, plan.train_data, self.env.rank)
        self.validator = None
        if plan.val_data is not None or plan.val_sources:
            from liquid_dist.data import Tokenizer

            tok = Tokenizer(cfg.data.tokenizer)
            self.validator = Validator(
                None if plan.val_data is None else open_loader(cfg.data, plan.val_data,
                                                               self.env.rank),
                {name: open_loader(cfg.data, spec, self.env.rank)
                 for name, spec in plan.val_sources.items()},
                every=t.eval_every, device=self.device, precision=self.precision,
                world_size=self.env.world_size,
                piece_bytes=tok.piece_bytes, sentinel_ids=tok.sentinel_ids)
        self.ckpt = CheckpointManager(self.run_dir, keep_last=t.keep_last, every=t.ckpt_every,
                                      asynchronous=t.async_checkpoint,
                                      rank=self.env.rank, world_size=self.env.world_size,
                                      expert_layout=self.expert_layout, seed=t.seed,
                                      faults=self.faults)
        self.monitor = BlockMonitor(self.model, cfg.parallel.zero_stage)
        self.flops = ModelFlops(cfg.model)
        self.peak_flops = peak_flops_per_device(self.device, self.precision)

    def _restore(self) -> None:
        """Resume (``--resume``: the trainer state too) or initialise from
        ``train.init_from``."""
        self.ckpt.remove_incomplete()
        ref = self.start.resume
        self.resumed_from = None
        self.mixture_changes: list[str] = []
        if ref is not None:
            loaded = self.ckpt.load(self.engine, ref)
            self.state = loaded.trainer
            self._last_saved_step = self.state.step
            self.mixture_changes = self._train_loader.load_state_dict(loaded.loader)
            self.resumed_from = str(ref.path)
            self.resharded_from = loaded.resharded_from
        elif self.start.init_from_checkpoint is not None:
            load_weights(self.engine, self.start.init_from_checkpoint, self.expert_layout)

    # ------------------------------------------------------------------- loop

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Training batches on the host, endlessly (the loader starts each epoch itself)."""
        while True:
            yield from self._train_loader

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks, on the device; the result stays there."""
        t = t.to(self.device)
        if self.env.world_size > 1:
            dist.all_reduce(t)
        return t

    def run(self, stop: Optional[StopFlag] = None) -> int:
        """Train to ``train.max_steps``; returns EXIT_OK, or EXIT_PREEMPTED after a stop signal.

        ``stop``: the caller's installed stop flag (the entry point installs one
        before anything else); without, the handlers are installed here.
        Raises NonFiniteLossError after too many non-finite steps in a row.
        """
        from tqdm import tqdm

        self._build()
        self._restore()
        t = self.cfg.train
        rank0 = self.env.rank == 0
        bar = tqdm(total=t.max_steps, initial=self.state.step, unit="step", dynamic_ncols=True,
                   disable=not (rank0 and sys.stderr.isatty()))
        self.logger = open_attempt_metrics(
            self.run_dir, rank=self.env.rank, step=self.state.step,
            run_id=self.state.run_id if self.resumed_from else None, wandb_cfg=t.wandb,
            config=self.cfg.to_dict(), printer=bar.write if not bar.disable else None)
        self.state.run_id = self.logger.run_id
        own = stop is None
        if stop is None:
            stop = StopFlag().install()
        try:
            for message in self.start.resume_skipped:
                self.logger.log({"kind": "event", "event": "checkpoint_skipped",
                                 "step": self.state.step, "reason": message},
                                f"passed over a damaged checkpoint: {message}")
            self._log_start()
            code = self._loop(stop, bar)
        finally:
            if own:
                stop.restore()
            bar.close()
            self.logger.close()
        return code

    def _log_start(self) -> None:
        counts = self.parameter_counts
        event = "resume" if self.resumed_from else "start"
        hb = self.heartbeat.directory
        self.logger.log({"kind": "event", "event": event, "step": self.state.step,
                         "wandb": self.cfg.train.wandb.mode, "world_size": self.env.world_size,
                         "precision": self.precision,
                         "deterministic": torch.are_deterministic_algorithms_enabled(),
                         "zero_stage": self.cfg.parallel.zero_stage,
                         "parameters": counts["total"], "device": str(self.device),
                         "checkpoint": self.resumed_from,
                         "resharded_from": self.resharded_from,
                         "heartbeat_dir": hb and str(hb),
                         "token_plan": self.plan.token_plan.to_dict(),
                         "mixture_changes": self.mixture_changes},
                        f"{event} at step {self.state.step}: {counts['total']:,} parameters, "
                        f"{self.env.world_size} rank(s) on {self.device.type}, "
                        f"{self.precision}, ZeRO-{self.cfg.parallel.zero_stage}"
                        + (f", from {self.resumed_from}" if self.resumed_from else "")
                        + (" (resharded from {} ranks, ep_size {})".format(*self.resharded_from)
                           if self.resharded_from else "")
                        + (f"; hang detection: heartbeats in {hb}, watched by local rank 0's "
                           "watchdog" if hb else "; hang detection off (train.hang_detection)")
                        + "\n" + self.plan.token_plan.table()
                        + "".join(f"\nmixture changed {c}" for c in self.mixture_changes))

    def _loop(self, stop: StopFlag, bar: Any) -> int:
        t, st, rank = self.cfg.train, self.state, self.env.rank
        batches = self._batches()
        window = StepWindow(every=t.log_every)
        self.heartbeat.enter("first_step")
        while st.step < t.max_steps:
            began = time.perf_counter()
            result = self.train_step([next(batches) for _ in range(t.grad_accum)], stop)
            st.step += 1
            self.heartbeat.step_done(st.step, time.perf_counter() - began)
            bar.update(1)
            if self.ckpt.in_flight is not None:
                self._log_saved(self.ckpt.poll())
            self._count_nan(result)
            self._judge_spike(result)
            window.add(result, t.grad_accum)
            if result.monitor is not None:
                self.logger.log({"kind": "monitor", "step": st.step, **result.monitor})
            last = st.step == t.max_steps
            if window.due(st.step, last=last):
                self._log_train(window, result.lr)
            if self.validator is not None and self.validator.should_validate(st.step, last=last):
                self._evaluate()
            if result.stop and not last:  # at the last step: just finish
                return self._preempt(stop)
            if self.ckpt.due(st.step, last=last):
                self._save()
            self.faults.after_step(st.step, rank, self.run_dir, stop, self.heartbeat)
        if self._last_saved_step != st.step:
            self._save()
        self._finish_save()
        self.logger.log({"kind": "event", "event": "done", "step": st.step,
                         "nan_skips_total": st.nan_skips_total},
                        f"done at step {st.step}")
        return EXIT_OK

    def train_step(self, host: list[dict[str, torch.Tensor]], stop: StopFlag) -> StepResult:
        """One optimizer step on this step's micro-batches (host tensors); see the module doc.
        Collective: every rank calls it."""
        t, rank = self.cfg.train, self.env.rank
        step = self.state.step + 1  # 1-based: the step this call takes
        monitoring = t.monitor_every > 0 and step % t.monitor_every == 0
        if monitoring:
            self.monitor.arm()
        counts = torch.tensor([self.flops.batch_counts(b) for b in host],
                              dtype=torch.float64).sum(0)
        sums, usage = self._forward_backward(host, step, counts, monitoring)
        # a non-finite loss term, or an activation the blocks had to replace: skip
        bad = ~torch.isfinite(torch.stack([v for k, v in sums.items()
                                           if k != "nonfinite_activations"])).all()
        bad = bad | (sums["nonfinite_activations"] > 0)
        if self.faults.stop_after(step, rank):
            stop.request("LIQUID_TEST_STOP_AT_STEP")
        # the step's one host read: every rank's sums and decisions, after the last backward
        total = self.sum_over_ranks({**sums, "bad": bad, "stop": float(stop.requested),
                                     **dict(zip(COUNT_KEYS, counts.to(self.device),
                                                strict=True))})
        micro_batches = t.grad_accum * self.env.world_size
        ce = total["ce_sum"] / max(total["target_tokens"], 1.0)
        losses = {"loss": ce + total["aux_loss"] / micro_batches, "ce": ce,
                  **{k: total[k] / micro_batches for k in AUX_KEYS}}
        lr = lr_at(self.state.step, lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps,
                   max_steps=t.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        monitor = self.monitor.collect(self.device) if monitoring else None
        grad_norm, skipped, outlier = self._update(losses["loss"], total["bad"] > 0)
        return StepResult(losses=losses, counts={k: total[k] for k in COUNT_KEYS}, lr=lr,
                          grad_norm=grad_norm, skipped=skipped,
                          replaced=int(total["nonfinite_activations"]),
                          stop=total["stop"] > 0, usage=usage, monitor=monitor,
                          outlier=outlier)

    def _forward_backward(self, host: list[dict[str, torch.Tensor]], step: int,
                          counts: torch.Tensor, monitoring: bool
                          ) -> tuple[dict[str, torch.Tensor], Optional[torch.Tensor]]:
        """Forward and backward of each micro-batch (the token-weighted cross-entropy of the
        module doc); returns this rank's loss sums (on the device) and expert usage."""
        t = self.cfg.train
        targets = self._all_reduce(counts[COUNT_KEYS.index("target_tokens")].clone())
        ce_scale = (t.grad_accum * self.env.world_size) / targets.clamp(min=1.0)
        sums = {k: torch.zeros((), dtype=torch.float64, device=self.device)
                for k in ("ce_sum", "aux_loss", *AUX_KEYS, "nonfinite_activations")}
        usage = None
        factor = self.faults.loss_factor(step, self.env.rank)
        for micro, batch in enumerate(host):
            if monitoring:
                self.monitor.resume()
            with autocast(self.device, self.precision):
                out = self.engine(**to_device(batch, self.device))
            if monitoring:
                self.monitor.pause()
            ce_sum = out["ce_sum"] if factor is None else out["ce_sum"] * factor
            for k in sums:
                sums[k] += (ce_sum if k == "ce_sum" else out[k]).detach().double()
            if "expert_usage" in out:
                u = out["expert_usage"].detach().double()
                usage = u if usage is None else usage + u
            self.engine.backward(ce_sum * ce_scale + out["aux_loss"])
            if micro < t.grad_accum - 1:
                self.engine.step()
        return sums, usage

    def _update(self, loss: float, nonfinite: bool) -> tuple[float, bool, Optional[str]]:
        """The optimizer update, skipped for a non-finite step or a loss spike (judged by the
        loss now, by the gradient norm inside the optimizer's step, where DeepSpeed has it);
        returns the gradient norm, whether the step was skipped as non-finite, and why it
        was an outlier (None: it was not, or was not judged)."""
        # without ZeRO, DeepSpeed (fp32) computes no norm: take it before the update
        own_norm = plain_grad_norm(self.engine) if self.cfg.parallel.zero_stage == 0 else None
        guard = self.spikes
        judging = guard.judges(nonfinite)
        loss_spike = guard.loss_outlier(loss) if judging else None
        self.optimizer.skip = nonfinite or loss_spike is not None
        if judging:
            self.optimizer.skip_if = lambda: guard.norm_outlier(
                own_norm if own_norm is not None else pending_grad_norm(self.engine)) is not None
        self.engine.step()
        self.optimizer.skip, self.optimizer.skip_if = False, None
        ds_norm = self.engine.get_global_grad_norm()
        grad_norm = float(ds_norm if ds_norm is not None else (own_norm or 0.0))
        # DeepSpeed's ZeRO-3 also skips an update whose gradient norm is not finite
        skipped = nonfinite or not math.isfinite(grad_norm)
        outlier = None if skipped or not judging else (loss_spike
                                                       or guard.norm_outlier(grad_norm))
        return grad_norm, skipped, outlier

    def sum_over_ranks(self, named: dict[str, Any]) -> dict[str, float]:
        """Each named scalar (a 0-d tensor or a number) summed over the ranks, in one
        all-reduce and one host read."""
        vector = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device)
                              .reshape(()) for v in named.values()])
        return dict(zip(named, self._all_reduce(vector).cpu().tolist(), strict=True))

    def _count_nan(self, r: StepResult) -> None:
        st, limit = self.state, self.cfg.train.max_nan_skips
        if not r.skipped:
            st.nan_skips_in_row = 0
            return
        st.nan_skips_total += 1
        st.nan_skips_in_row += 1
        self.logger.log({"kind": "event", "event": "nan_skip", "step": st.step,
                         "loss": r.losses["loss"], "nonfinite_activations": r.replaced,
                         "nan_skips_in_row": st.nan_skips_in_row,
                         "nan_skips_total": st.nan_skips_total},
                        f"step {st.step}: non-finite loss or gradient"
                        + (f", {r.replaced} non-finite activations replaced" if r.replaced
                           else "")
                        + f", update skipped ({st.nan_skips_in_row} in a row, "
                        f"{st.nan_skips_total} in all)")
        if st.nan_skips_in_row > limit:
            raise NonFiniteLossError(
                f"non-finite loss or gradients on {st.nan_skips_in_row} consecutive steps "
                f"(up to step {st.step}; train.max_nan_skips={limit}): stopping. The last "
                f"checkpoint is in {self.run_dir / 'checkpoints'}; lower train.lr, check the "
                "data, or set model.check_finite=true to name the first non-finite module")

    def _judge_spike(self, r: StepResult) -> None:
        """Record the step in the spike window (train.spike); log an outlier; rewind after
        ``rewind_after`` in a row (liquid_dist.train.spikes)."""
        st = self.state
        if not self.spikes.judges(r.skipped):
            return
        rewind = self.spikes.record(st.step, loss=r.losses["loss"], grad_norm=r.grad_norm,
                                    reason=r.outlier)
        if r.outlier is None:
            return
        self.logger.log({"kind": "event", "event": "spike_skip", "step": st.step,
                         "reason": r.outlier, "loss": r.losses["loss"],
                         "grad_norm": r.grad_norm, "in_row": st.spike.in_row},
                        f"step {st.step}: loss spike, {r.outlier}: update skipped "
                        f"({st.spike.in_row} in a row)")
        if rewind:
            self._rewind()

    def _rewind(self) -> None:
        """Reload the newest valid checkpoint before the spike's first step (weights,
        optimizer, RNG, the spike window as it was) and go on from this step with the data
        that follows; checkpoint at once, so that a requeue goes on from here too."""
        self._finish_save()  # the newest checkpoint may be the one in flight
        with self.heartbeat.within("rewind"):
            st = self.state
            ref, spike = self.spikes.rewind_target(self.run_dir, st.step, find_damage_together)
            rewinds = st.spike.rewinds
            st.spike = self.ckpt.load(self.engine, ref).trainer.spike
            st.spike.rewinds = [*rewinds, (ref.step, st.step)]
            self.logger.log({"kind": "event", "event": "spike_rewind", "step": st.step,
                             "checkpoint": ref.step, "skipped_steps": [ref.step + 1, st.step]},
                            f"{spike}: rewound to the checkpoint of step {ref.step}; the batches "
                            f"of steps {ref.step + 1}-{st.step} are not trained on")
            self._save()

    def _log_train(self, w: StepWindow, lr: float) -> None:
        t, step = self.cfg.train, self.state.step
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        usage = self._all_reduce(w.usage).cpu() if w.usage is not None else None
        names = ([f"encoder.blocks.{i}" for i in range(self.cfg.model.n_encoder_layers)]
                 + [f"decoder.blocks.{i}" for i in range(self.cfg.model.n_decoder_layers)])
        by_layer = None if usage is None else dict(zip(names, usage, strict=True))
        data = data_counters(self._train_loader.stats(), self.env.world_size)
        record, eta = w.record(step, lr, max_steps=t.max_steps, world_size=self.env.world_size,
                               peak_flops=self.peak_flops, data=data, usage=by_layer,
                               memory_gb=peak_memory_gb(self.device),
                               nan_skips=self.state.nan_skips_total,
                               epoch=getattr(self._train_loader, "epoch", None))
        self.logger.log(record, human_line(record, t.max_steps, eta))
        w.reset(time.perf_counter())

    def _evaluate(self) -> None:
        with self.heartbeat.within("eval"):
            self.logger.log(*self.validator.validate(self.engine, self.state.step))

    def _save(self) -> None:
        """Checkpoint this step: at once, or captured and written in the background
        (train.async_checkpoint; a save still in flight completes first)."""
        self._finish_save()
        with self.heartbeat.within("save"):
            step = self.state.step
            saved = self.ckpt.save(self.engine, self.state,
                                   rank_state={"loader": self._train_loader.state_dict()},
                                   config=self.cfg.to_dict(),
                                   tokenizer_path=self.cfg.data.tokenizer)
            self._last_saved_step = step
        self._log_saved(saved)

    def _finish_save(self) -> None:
        """Wait for the checkpoint being written in the background, if any, and complete
        it."""
        if self.ckpt.in_flight is not None:
            with self.heartbeat.within("save"):
                saved = self.ckpt.finish()
            self._log_saved(saved)

    def _log_saved(self, saved: Optional[Saved]) -> None:
        if saved is None:
            return
        mode = "async" if self.ckpt.asynchronous else "sync"
        self.logger.log({"kind": "event", "event": "checkpoint", "step": saved.step,
                         "blocked_s": round(saved.blocked_s, 4),
                         "total_s": round(saved.total_s, 4), "mode": mode},
                        f"checkpoint step {saved.step} -> {self.run_dir / 'checkpoints'} "
                        f"({mode}: the loop waited {saved.blocked_s:.2f} s of "
                        f"{saved.total_s:.2f} s)")

    def _preempt(self, stop: StopFlag) -> int:
        step = self.state.step
        if self._last_saved_step != step:
            self._save()
        self._finish_save()
        reason = stop.describe()
        self.logger.log({"kind": "event", "event": "preempted", "step": step,
                         "reason": reason},
                        f"preempted at step {step} ({reason}): checkpoint saved, "
                        f"exiting with {EXIT_PREEMPTED}")
        return EXIT_PREEMPTED
