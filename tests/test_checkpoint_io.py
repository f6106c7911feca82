"""The host snapshot of asynchronous saves: a state staged into host memory and written
later gives the bytes ``torch.save`` gives for the state at the moment it was staged
(views of one storage, dtypes, parameters, empty tensors, plain values), and a later
save reuses the staged copies."""

from __future__ import annotations

import io

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from liquid_dist.train.checkpoint_io import HostCapture, HostStage


def _state() -> dict:
    flat = torch.arange(64, dtype=torch.float32)
    return {"module": {"w": torch.nn.Parameter(torch.randn(3, 4), requires_grad=False),
                       "half": torch.ones(5, dtype=torch.bfloat16),
                       "empty": torch.zeros(0)},
            # views of one flat buffer, as ZeRO-3's partitions are: saved as one storage
            "flat": flat, "views": [flat[:16], flat[16:].view(6, 8)],
            "step": 7, "lr": 1e-3, "name": "adamw", "shape": torch.Size([2, 3]),
            "ids": (torch.tensor([1, 2, 3]), None)}


def _saved(state) -> bytes:
    out = io.BytesIO()
    torch.save(state, out)
    return out.getvalue()


def _engine() -> TorchCheckpointEngine:
    engine = TorchCheckpointEngine()
    engine.zipfile_serialization = True  # DeepSpeed's default for a configured engine
    return engine


def _written(captured: HostCapture, index: int) -> bytes:
    out = io.BytesIO()
    captured._serialise(captured.files[index].state(), out)
    return out.getvalue()


def test_a_staged_state_is_written_as_torch_save_writes_it_when_staged() -> None:
    stage = HostStage()
    states = [_state(), {"optimizer": {"exp_avg": torch.randn(100), "step": 3}}]
    expected = [_saved(s) for s in states]
    captured = HostCapture(_engine(), stage)
    stage.reset()
    for i, s in enumerate(states):
        captured.save(s, f"/ckpt/file{i}.pt")
    stage.copied()
    # the step goes on: the live tensors change after the capture
    states[0]["flat"].add_(1.0)
    states[0]["module"]["w"].data.mul_(2.0)
    states[1]["optimizer"]["exp_avg"].zero_()
    stage.wait()
    assert [f.path for f in captured.files] == ["/ckpt/file0.pt", "/ckpt/file1.pt"]
    assert [_written(captured, i) for i in range(2)] == expected
    # one staged copy per storage: the flat buffer once for itself and its views
    assert len(captured.files[0].storages) == 5
    staged_bytes = stage.nbytes

    # the next save stages the same storages into the same memory
    slots = sorted(s.data_ptr() for f in captured.files for s in f.storages.values()
                   if s.nbytes())
    again = HostCapture(_engine(), stage)
    stage.reset()
    for i, s in enumerate(states):
        again.save(s, f"/ckpt/file{i}.pt")
    stage.copied()
    stage.wait()
    assert sorted(s.data_ptr() for f in again.files for s in f.storages.values()
                  if s.nbytes()) == slots
    assert stage.nbytes == staged_bytes
    assert [_written(again, i) for i in range(2)] == [_saved(s) for s in states]
