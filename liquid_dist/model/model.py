"""BidirectionalEncoder, LiquidDecoder and LiquidFoundationModelOptimized (seed 3.9–3.10)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import AttentionMaskPlan
from .block import AuxDict, ImprovedTransformerBlock
from .config import ConfigError, ModelConfig, validate_model
from .embedding import EnhancedLiquidEmbedding
from .generation import GenerationConfig
from .init import Constant, Normal, XavierNormal, initialised, set_init
from .memory import EnhancedLSTM
from .utils import check_finite


@dataclass
class ModelOutput:
    """What :meth:`LiquidFoundationModelOptimized.forward` returns.

    * ``logits`` (B, L_dec, vocab);
    * ``loss``: the total training loss ``ce + aux_loss`` (None without labels);
    * ``aux``: named unweighted scalar tensors ``ce`` (with labels),
      ``recon_encoder``, ``recon_decoder``, ``moe_entropy``, ``moe_overuse``
      (the last two summed over layers; a term whose component ``model.ablate``
      removes is 0), ``moe_mean_k`` (the experts a real token used, averaged over
      the MoE layers: dynamic k's cost; not a loss term, 0 without MoE layers),
      and ``nonfinite_activations``: int64,
      the number of NaN/±Inf activation values the blocks replaced by 0 in
      this forward (summed over blocks; 0 in a healthy pass; not a loss term,
      no host sync) — a step where it is > 0 trained on repaired activations;
    * ``expert_usage``: one (experts,) tensor of hard assignment fractions per
      MoE layer, encoder layers first (empty without MoE layers);
    * ``ce_sum``: fp32 scalar, the sum of the per-token cross-entropy over the
      real targets (labels != -100), differentiable; None without labels;
    * ``num_targets``: int64 scalar tensor, the number of labels != -100; None
      without labels. ``ce = ce_sum / max(num_targets, 1)``;
    * ``aux_loss``: fp32 scalar, differentiable, always set: the weighted sum
      ``recon_loss_weight * (recon_encoder + recon_decoder) +
      entropy_loss_weight * moe_entropy + overuse_loss_weight * moe_overuse``.

    ``ce_sum`` and ``num_targets`` let a trainer weight the cross-entropy by
    tokens across micro-batches and ranks, with ``aux_loss`` added per batch.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    expert_usage: list[torch.Tensor] = field(default_factory=list)
    ce_sum: torch.Tensor | None = None
    num_targets: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


def _one_of(fn: str, own: str, own_value, alias: str, alias_value, required: bool = False):
    """The value of an argument that may also be passed under its Hugging Face name."""
    if own_value is not None and alias_value is not None:
        raise TypeError(f"{fn}() got both {own} and {alias}, its Hugging Face alias: pass one")
    value = own_value if own_value is not None else alias_value
    if value is None and required:
        raise TypeError(f"{fn}() missing {own} (or its Hugging Face alias {alias})")
    return value


def _run_blocks(
    blocks: nn.ModuleList, x: torch.Tensor, use_checkpoint: bool, **kwargs
) -> tuple[torch.Tensor, list[AuxDict]]:
    auxes = []
    for block in blocks:
        if use_checkpoint and torch.is_grad_enabled():
            x, aux = checkpoint(block, x, use_reentrant=False, **kwargs)
        else:
            x, aux = block(x, **kwargs)
        auxes.append(aux)
    return x, auxes


class BidirectionalEncoder(nn.Module):
    """Embedding → dropout → non-causal blocks → LayerNorm.

    ``forward(input_ids (B, L), mask (B, L) bool)`` returns the encoder output
    (B, L, d), its reconstruction loss and the blocks' MoE auxiliary dicts.
    All blocks of one forward share one self-attention
    :class:`~liquid_dist.model.attention.AttentionMaskPlan` of ``mask``
    (validating flash's precondition in strict mode only).
    """

    @initialised
    def __init__(self, cfg: ModelConfig, token_embedding: nn.Embedding):
        super().__init__()
        self.cfg = cfg
        self.embedding = EnhancedLiquidEmbedding(cfg, token_embedding, causal=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            ImprovedTransformerBlock(cfg, causal=False, name=f"encoder.blocks.{i}")
            for i in range(cfg.n_encoder_layers)
        )
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(
        self, input_ids: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[AuxDict]]:
        x, recon = self.embedding(input_ids, mask)
        x = self.dropout(x)
        plan = AttentionMaskPlan(mask, validate=self.cfg.check_finite)
        x, auxes = _run_blocks(self.blocks, x, self.cfg.activation_checkpointing,
                               mask=mask, plan=plan)
        return self.norm(x), recon, auxes


class LiquidDecoder(nn.Module):
    """Causal embedding → dropout → cross-attending causal blocks → EnhancedLSTM → LayerNorm.

    The seed writes y_t = Decoder(y_<t, H_e) without naming the module; the
    LSTM is the decoder's external memory and runs once after the stack
    (``memory`` is None when ``model.ablate`` removes it: identity).
    """

    @initialised
    def __init__(self, cfg: ModelConfig, token_embedding: nn.Embedding):
        super().__init__()
        self.cfg = cfg
        self.embedding = EnhancedLiquidEmbedding(cfg, token_embedding, causal=True)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            ImprovedTransformerBlock(cfg, causal=True, name=f"decoder.blocks.{i}")
            for i in range(cfg.n_decoder_layers)
        )
        self.memory = EnhancedLSTM(cfg) if cfg.keeps("lstm") else None
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(
        self,
        input_ids: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[AuxDict]]:
        """input_ids (B, L), memory (B, Le, d) with memory_mask (B, Le), mask (B, L).

        Masks are bool, True = real token, or None (all real). Returns the
        hidden states (B, L, d), the reconstruction loss over real positions
        and the blocks' MoE auxiliary dicts. All blocks share one
        self-attention :class:`~liquid_dist.model.attention.AttentionMaskPlan`
        of ``mask`` (validating flash's precondition in strict mode only).
        """
        x, recon = self.embedding(input_ids, mask)
        x = self.dropout(x)
        x, auxes = _run_blocks(
            self.blocks, x, self.cfg.activation_checkpointing,
            mask=mask, memory=memory, memory_mask=memory_mask,
            plan=AttentionMaskPlan(mask, validate=self.cfg.check_finite),
        )
        if self.memory is not None:
            x = self.memory(x)
        return self.norm(x), recon, auxes


class LiquidFoundationModelOptimized(nn.Module):
    """The encoder-decoder language model of the seed.

    ``forward(encoder_input_ids, decoder_input_ids, encoder_attention_mask=None,
    labels=None, decoder_attention_mask=None)`` returns a :class:`ModelOutput`
    (Hugging Face names: ``input_ids`` and ``attention_mask`` are aliases of the
    encoder's). Labels equal to -100 are ignored. ``generate`` decodes
    incrementally (see generation.py) with the defaults of ``generation_config``;
    ``save_pretrained`` / ``from_pretrained`` write and read a model directory.

    Initial weights: every parameter's value is drawn from a generator keyed by
    ``seed`` and its name (liquid_dist.model.init), so it is the same whatever
    the layout the model is trained on; ``seed=None`` takes one from torch's
    global generator. Built under ``torch.device("meta")`` the model holds no
    values until :func:`~liquid_dist.model.init.init_parameters` gives them.
    """

    @initialised
    def __init__(self, cfg: ModelConfig, seed: int | None = None):
        super().__init__()
        if not isinstance(cfg.vocab_size, int):
            raise ConfigError("model.vocab_size", cfg.vocab_size,
                              "an integer (resolve 'auto' from the tokenizer before building)")
        validate_model(cfg)
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        set_init(self.token_embedding, "weight", Normal(cfg.d_model ** -0.5))
        self.encoder = BidirectionalEncoder(cfg, self.token_embedding)
        self.decoder = LiquidDecoder(cfg, self.token_embedding)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=True)
        set_init(self.lm_head, "bias", Constant(0.0))
        if cfg.tie_embeddings:
            self.lm_head.weight = self.token_embedding.weight
        else:
            set_init(self.lm_head, "weight", XavierNormal())
        self.generation_config = GenerationConfig.from_model_config(cfg)

    def _check_ids(self, name: str, ids: torch.Tensor, max_len: int) -> None:
        if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
            hint = (": a bool tensor is an attention mask (forward's positional order is "
                    "encoder_input_ids, decoder_input_ids, encoder_attention_mask, labels, "
                    "decoder_attention_mask; pass masks by keyword)"
                    if ids.dtype == torch.bool else "")
            raise TypeError(f"{name} must be an integer tensor of token ids, got {ids.dtype}"
                            + hint)
        if ids.dim() != 2:
            raise ValueError(f"{name} must be (batch, length), got shape {tuple(ids.shape)}")
        if ids.shape[1] > max_len:
            raise ValueError(f"{name} has length {ids.shape[1]} > the configured maximum {max_len}")

    @staticmethod
    def _mask(name: str, mask: torch.Tensor | None, ids_name: str,
              ids: torch.Tensor) -> torch.Tensor | None:
        """``mask`` as bool (True = real), after checking it is shaped like ``ids``."""
        if mask is None:
            return None
        if mask.shape != ids.shape:
            raise ValueError(f"{name} shape {tuple(mask.shape)} != {ids_name} "
                             f"shape {tuple(ids.shape)}")
        return mask.bool()

    def _refuse_mask_as_decoder_ids(self, decoder_input_ids: torch.Tensor,
                                    encoder_input_ids: torch.Tensor,
                                    encoder_attention_mask: torch.Tensor | None) -> None:
        """ValueError when ``decoder_input_ids`` is an integer attention mask passed in its
        place: no encoder mask is given, the tensor is shaped like the encoder ids, and it
        holds only 0 and 1 with at least one 1 — as ``model(input_ids, attention_mask)``
        (the Hugging Face positional habit) gives. A real decoder input with those
        properties would consist of pad / start and EOS tokens only. The value check
        reads one boolean on the host, only when the cheap conditions hold (never in
        training, whose batches carry an encoder mask).
        """
        if encoder_attention_mask is not None or decoder_input_ids.shape != encoder_input_ids.shape:
            return
        ones = decoder_input_ids == 1
        if bool(((decoder_input_ids == 0) | ones).all() & ones.any()):
            raise ValueError(
                "decoder_input_ids looks like an attention mask: only 0/1 values, shaped like "
                f"encoder_input_ids {tuple(encoder_input_ids.shape)}, and no "
                "encoder_attention_mask given. forward's positional order is "
                "(encoder_input_ids, decoder_input_ids, encoder_attention_mask, labels, "
                "decoder_attention_mask): pass the mask as attention_mask= (or "
                "encoder_attention_mask=); if these are decoder token ids, pass "
                "encoder_attention_mask explicitly")

    def encode(
        self, encoder_input_ids: torch.Tensor, encoder_attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, list[AuxDict]]:
        """Run the encoder: returns (memory (B, Le, d), bool mask or None, recon, aux list)."""
        self._check_ids("encoder_input_ids", encoder_input_ids, self.cfg.max_encoder_length)
        mask = self._mask("encoder_attention_mask", encoder_attention_mask,
                          "encoder_input_ids", encoder_input_ids)
        memory, recon, auxes = self.encoder(encoder_input_ids, mask)
        return memory, mask, recon, auxes

    def decode(
        self, decoder_input_ids: torch.Tensor, memory: torch.Tensor,
        memory_mask: torch.Tensor | None = None, decoder_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[AuxDict]]:
        """Run the decoder, teacher-forced, over an encoder output (:meth:`encode`'s memory
        and bool mask; ``decoder_mask`` bool or None): returns (logits (B, L, vocab),
        recon, aux list)."""
        hidden, recon, auxes = self.decoder(decoder_input_ids, memory, memory_mask, decoder_mask)
        return check_finite("lm_head", self.lm_head(hidden), self.cfg.check_finite), recon, auxes

    def forward(
        self,
        encoder_input_ids: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        *,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Teacher-forced forward pass; see :class:`ModelOutput`.

        ``input_ids`` / ``attention_mask`` (keyword only) are the Hugging Face names
        of ``encoder_input_ids`` / ``encoder_attention_mask``; giving both spellings
        of one is a TypeError. Token ids must be integer tensors (a bool tensor is a
        TypeError), and an integer 0/1 mask passed as ``decoder_input_ids`` is a
        ValueError (see :meth:`_refuse_mask_as_decoder_ids`).

        Masks are (B, L) bool or int, True / 1 = real token. Without
        ``decoder_attention_mask``, decoder position i is real iff
        ``labels[:, i] != -100`` (all real without labels); pass it when -100
        also marks real tokens that are not scored. Padding, on either side,
        is zeroed before every sequence-mixing operation of the embeddings and
        blocks and gets no expert: no logit, loss term or expert statistic
        depends on what padding holds, and the loss terms count real
        positions only.
        """
        encoder_input_ids = _one_of("forward", "encoder_input_ids", encoder_input_ids,
                                    "input_ids", input_ids, required=True)
        encoder_attention_mask = _one_of("forward", "encoder_attention_mask",
                                         encoder_attention_mask, "attention_mask", attention_mask)
        if decoder_input_ids is None:
            raise TypeError("forward() missing decoder_input_ids (the teacher-forced decoder "
                            "input: decoder_start_token_id followed by the targets but the last)")
        self._check_ids("decoder_input_ids", decoder_input_ids, self.cfg.max_decoder_length)
        self._refuse_mask_as_decoder_ids(decoder_input_ids, encoder_input_ids,
                                         encoder_attention_mask)
        if labels is not None and labels.shape != decoder_input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} != decoder_input_ids "
                             f"shape {tuple(decoder_input_ids.shape)}")
        dec_mask = self._mask("decoder_attention_mask", decoder_attention_mask,
                              "decoder_input_ids", decoder_input_ids)
        if dec_mask is None and labels is not None:
            dec_mask = labels != -100
        memory, enc_mask, recon_enc, enc_aux = self.encode(
            encoder_input_ids, encoder_attention_mask)
        logits, recon_dec, dec_aux = self.decode(decoder_input_ids, memory, enc_mask, dec_mask)

        auxes = enc_aux + dec_aux
        moe_auxes = [a for a in auxes if "expert_usage" in a]  # blocks that have a MoE
        zero = logits.new_zeros((), dtype=torch.float32)
        aux = {
            "recon_encoder": recon_enc.float(),
            "recon_decoder": recon_dec.float(),
            "moe_entropy": sum((a["moe_entropy"].float() for a in moe_auxes), zero),
            "moe_overuse": sum((a["moe_overuse"].float() for a in moe_auxes), zero),
            "moe_mean_k": (sum((a["mean_k"].float() for a in moe_auxes), zero)
                           / max(len(moe_auxes), 1)),
            "nonfinite_activations": sum((a["nonfinite"] for a in auxes),
                                         zero.to(torch.int64)),
        }
        m = self.cfg.moe
        aux_loss = (
            self.cfg.recon_loss_weight * (aux["recon_encoder"] + aux["recon_decoder"])
            + m.entropy_loss_weight * aux["moe_entropy"]
            + m.overuse_loss_weight * aux["moe_overuse"]
        )
        out = ModelOutput(logits=logits, aux=aux, aux_loss=aux_loss,
                          expert_usage=[a["expert_usage"] for a in moe_auxes])
        if labels is not None:
            out.ce_sum = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                ignore_index=-100, reduction="sum",
            )
            out.num_targets = (labels != -100).sum()
            aux["ce"] = out.ce_sum / out.num_targets.clamp(min=1)
            out.loss = aux["ce"] + aux_loss
        return out

    @torch.no_grad()
    def generate(
        self,
        encoder_input_ids: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        *,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        generator: torch.Generator | None = None,
        **settings,
    ) -> torch.Tensor:
        """Decode up to ``max_new_tokens`` tokens; returns (B, 1 + generated) ids.

        ``settings``: any field of :class:`~liquid_dist.model.generation.GenerationConfig`
        (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``,
        ``num_beams``, ``eos_token_id``, ``decoder_start_token_id``, ``pad_token_id``);
        those not passed come from ``generation_config`` (default:
        ``self.generation_config``, i.e. the model config's token ids or the model
        directory's ``generation_config.json``). A passed None counts:
        ``eos_token_id=None`` never stops early. ``input_ids`` / ``attention_mask``
        are the Hugging Face names of the encoder arguments.

        The first column is the decoder start token. Sequences that reached
        ``eos_token_id`` are filled with the pad id afterwards; decoding stops
        early once every sequence has finished.
        """
        from .generation import generate

        encoder_input_ids = _one_of("generate", "encoder_input_ids", encoder_input_ids,
                                    "input_ids", input_ids, required=True)
        encoder_attention_mask = _one_of("generate", "encoder_attention_mask",
                                         encoder_attention_mask, "attention_mask", attention_mask)
        gen = (generation_config or self.generation_config).updated(**settings)
        return generate(self, encoder_input_ids, encoder_attention_mask, gen, generator)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write the model directory that :meth:`from_pretrained` reads: ``config.json``,
        ``model.safetensors`` (each tensor once, in its current dtype),
        ``generation_config.json`` (``self.generation_config``) and the model package's
        modules, its ``transformers`` remote code. The tokenizer saves itself beside them
        (``liquid_dist.data.Tokenizer.save_pretrained``). Returns ``path``."""
        from .pretrained import save_pretrained

        return save_pretrained(self, path)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> LiquidFoundationModelOptimized:
        """Load a model directory (``python -m liquid_dist.convert``, :meth:`save_pretrained`),
        in eval mode, with its ``generation_config.json`` as ``generation_config``.

        Safetensors only (no pickle, no DeepSpeed); tied weights are re-tied
        from the config. ``dtype`` None keeps the stored precision.
        """
        from .pretrained import load_pretrained

        return load_pretrained(cls, path, device=device, dtype=dtype)
