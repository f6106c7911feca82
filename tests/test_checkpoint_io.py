"""The host buffer of asynchronous saves: torch.save into it gives the bytes of torch.save
into a file, across chunk boundaries, and a later use reuses its chunks."""

from __future__ import annotations

import io

import torch

from liquid_dist.train.checkpoint_io import HostBuffer


def test_the_host_buffer_holds_what_torch_save_writes_and_is_reused() -> None:
    states = [{"w": torch.arange(3000, dtype=torch.float32), "step": 7},
              {"m": torch.ones(100), "v": [torch.zeros(7), 3]}]
    buffer = HostBuffer(chunk=4096)  # many chunk boundaries for a small state
    spans = []
    for state in states:
        start = buffer.size
        torch.save(state, buffer)
        spans.append((start, buffer.size))
    for state, (start, end) in zip(states, spans, strict=True):
        expected = io.BytesIO()
        torch.save(state, expected)
        assert b"".join(buffer.pieces(start, end)) == expected.getvalue()
    grown = buffer.capacity
    assert grown >= buffer.size > grown - 4096
    buffer.reset()
    torch.save(states[1], buffer)
    assert buffer.capacity == grown  # reused, not grown
