"""EnhancedLSTM, the decoder's external memory (seed 3.7; docs/model.md, "EnhancedLSTM").

It runs once after the decoder stack. Being a left-to-right recurrence it is
causal by construction, and during generation its (h, c) state is carried from
token to token, so each new token costs O(1).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .init import Chunks, Constant, Orthogonal, XavierNormal, initialised, set_init
from .utils import check_finite, xavier_linear


class Float32LSTM(nn.LSTM):
    """One batch-first, one-direction ``nn.LSTM`` layer whose recurrence runs in float32.

    ``forward(x (B, L, d_in), hx=None or (h0, c0) each (1, B, d))`` returns
    ``(output (B, L, d), (h, c) each (1, B, d))``, all float32, whatever the
    parameters' dtype (DeepSpeed's bf16 casts every parameter to bf16, and
    cuDNN's RNNs take bf16 only from cuDNN 9.13 / torch 2.10) and with any
    ambient autocast off (oneDNN's CPU LSTM has no kernel for autocast's mixed
    bf16 call). ``hx=None`` is the zero state. The weights are upcast inside
    this module's own forward, where ZeRO-3 has gathered them; gradients reach
    the parameters in their own dtype. Parameter names are ``nn.LSTM``'s.
    """

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__(input_size, hidden_size, batch_first=True)

    def forward(
        self, x: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if hx is None:
            zeros = x.new_zeros(1, x.shape[0], self.hidden_size, dtype=torch.float32)
            hx = (zeros, zeros)
        weights = [w.float() for layer in self.all_weights for w in layer]
        with torch.autocast(x.device.type, enabled=False):
            # nn.LSTM's own call: has_biases, num_layers, dropout, train,
            # bidirectional, batch_first
            out, h, c = torch.lstm(x.float(), (hx[0].float(), hx[1].float()), weights,
                                   True, 1, 0.0, self.training, False, True)
        return out, (h, c)


class EnhancedLSTM(nn.Module):
    """``cfg.lstm_layers`` stacked layers, each (seed 3.7.1)

        h = LSTM(LayerNorm(x));  y = Linear(GELU(Linear(h))) (d -> d -> d);  x = Dropout(y + x)

    The dropout acts on the residual sum, in the seed's order. The LayerNorm
    before the recurrence is the pre-norm every other residual branch has: the
    decoder's residual stream is not normalised, and its scale would saturate
    the gates. The MLP's output Linear starts at zero, so the memory starts
    as the identity and learns what to add.

    The recurrence runs in float32 whatever the parameters' dtype
    (:class:`Float32LSTM`): a long recurrence accumulates rounding in bf16.
    Its output is cast back to the activation dtype (the input's) before the
    MLPs, which run in the parameters' dtype under the ambient autocast.

    Init: Xavier-normal for the first Linear of each MLP (seed §4), zero for its
    output. LSTM: Xavier-normal for each gate's input-to-hidden block, orthogonal for each gate's
    hidden-to-hidden block (keeps the recurrence norm-preserving at the
    start), zero biases except the forget gate's input bias = 1 so the cell
    remembers by default early in training.
    """

    @initialised
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.d_model = d
        self.num_layers = cfg.lstm_layers
        self.check = cfg.check_finite
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(self.num_layers))
        self.lstms = nn.ModuleList(Float32LSTM(d, d) for _ in range(self.num_layers))
        self.mlps = nn.ModuleList(
            nn.Sequential(xavier_linear(d, d), nn.GELU(), xavier_linear(d, d, scale=0.0))
            for _ in range(self.num_layers)
        )
        self.dropout = nn.Dropout(cfg.dropout)
        for lstm in self.lstms:
            # nn.LSTM stacks the gates (input, forget, cell, output) along dim 0:
            # Xavier input weights and orthogonal recurrent weights per gate, biases
            # 0 but the forget gate's 1.
            set_init(lstm, "weight_ih_l0", Chunks((XavierNormal(),) * 4))
            set_init(lstm, "weight_hh_l0", Chunks((Orthogonal(),) * 4))
            set_init(lstm, "bias_ih_l0", Chunks((Constant(0.0), Constant(1.0),
                                              Constant(0.0), Constant(0.0))))
            set_init(lstm, "bias_hh_l0", Constant(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, d) -> (B, L, d), starting from a zero state; causal."""
        for norm, lstm, mlp in zip(self.norms, self.lstms, self.mlps, strict=True):
            h, _ = lstm(norm(x))
            x = self.dropout(mlp(h.to(x.dtype)) + x)
        return check_finite("EnhancedLSTM", x, self.check)

    def init_state(
        self, batch_size: int, device: torch.device | str | None, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        """Zero state {'h': (B, layers, d), 'c': (B, layers, d)}, batch first.

        Float32 whatever ``dtype`` is, as the recurrence is.
        """
        shape = (batch_size, self.num_layers, self.d_model)
        return {"h": torch.zeros(shape, device=device, dtype=torch.float32),
                "c": torch.zeros(shape, device=device, dtype=torch.float32)}

    def step(
        self, x_t: torch.Tensor, state: dict[str, torch.Tensor], pos: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x_t (B, 1, d) at position ``pos`` -> (y_t (B, 1, d), new state).

        ``pos`` is not needed by a recurrence; it is accepted for the common
        step interface. Equals ``forward`` at ``pos`` when fed positions 0..pos.
        """
        hs, cs = [], []
        x = x_t
        for i, (norm, lstm, mlp) in enumerate(zip(self.norms, self.lstms, self.mlps,
                                                  strict=True)):
            # nn.LSTM wants (layers=1, B, d); the state is kept batch first so
            # beam search can reorder it with index_select(0, ...).
            h0 = state["h"][:, i].unsqueeze(0).contiguous()
            c0 = state["c"][:, i].unsqueeze(0).contiguous()
            h, (h1, c1) = lstm(norm(x), (h0, c0))
            hs.append(h1[0])
            cs.append(c1[0])
            x = self.dropout(mlp(h.to(x.dtype)) + x)
        x = check_finite("EnhancedLSTM", x, self.check)
        return x, {"h": torch.stack(hs, dim=1), "c": torch.stack(cs, dim=1)}
