"""LiquidFoundationModelOptimized as a ``transformers`` model (remote code).

:class:`LiquidFoundationForConditionalGeneration` is a ``PreTrainedModel`` and
``GenerationMixin`` around the project's own
:class:`~.model.LiquidFoundationModelOptimized`, whose modules it registers under
their own names, so that its weights are the converted directory's
``model.safetensors`` as it is. Nothing of the model is written twice: the forward
pass is the project's, and generation steps the project's
:class:`~.generation.IncrementalDecoder` (every causal module keeps its own state:
sliding-window K/V, convolution tails, long-convolution history, LSTM state), held
in a :class:`LiquidDecodingCache` that ``transformers``'s ``generate`` carries from
step to step and reorders for beam search.

The usual keyword names: ``input_ids``, ``attention_mask``, ``decoder_input_ids``,
``decoder_attention_mask``, ``labels`` (decoder inputs are the labels shifted right
behind ``decoder_start_token_id`` when not given, -100 ignored), ``encoder_outputs``,
``cache``, ``use_cache``, ``return_dict``. ``loss`` is the mean cross-entropy over the
labels != -100, as for every ``transformers`` sequence-to-sequence model; the
model's auxiliary training terms (reconstruction, MoE balance) are ``aux_loss``,
which fine-tuning adds to it to train the objective the model was pretrained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

try:
    from transformers import GenerationMixin, PreTrainedModel
    from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput
    from transformers.utils import logging
except ImportError as exc:  # the project's own paths never import this file
    raise ImportError("the transformers classes of a model directory need transformers: "
                      "pip install 'liquid_dist[hf]'") from exc

from .configuration_liquid_foundation import LiquidFoundationConfig
from .generation import IncrementalDecoder
from .model import LiquidFoundationModelOptimized
from .pretrained import tied_aliases

logger = logging.get_logger(__name__)


@dataclass
class LiquidSeq2SeqLMOutput(Seq2SeqLMOutput):
    """``Seq2SeqLMOutput`` and ``aux_loss``: the weighted auxiliary training terms
    (:class:`~.model.ModelOutput`), set when the encoder ran in this call."""

    aux_loss: Optional[torch.Tensor] = None


class LiquidDecodingCache:
    """The decoder's incremental state during ``generate``: the project's
    :class:`~.generation.IncrementalDecoder` and the next decoder position."""

    def __init__(self, decoder: IncrementalDecoder):
        self.decoder = decoder
        self.position = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.position

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Keep the rows ``beam_idx`` (beam search)."""
        self.decoder.reorder(beam_idx)

    def step(self, decoder_input_ids: torch.Tensor) -> torch.Tensor:
        """Feed (B, L) tokens at the next L positions; their logits (B, L, vocab)."""
        logits = []
        for t in range(decoder_input_ids.shape[1]):
            logits.append(self.decoder.step(decoder_input_ids[:, t], self.position))
            self.position += 1
        return torch.stack(logits, dim=1)


class LiquidEncoder(nn.Module):
    """The encoder as ``transformers`` calls it (``get_encoder``): ``input_ids`` and
    ``attention_mask`` in, a ``BaseModelOutput`` out. It holds no weights of its own."""

    def __init__(self, model: LiquidFoundationModelOptimized):
        super().__init__()
        self.__dict__["model"] = model  # not a submodule: the weights are registered once

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                output_attentions: bool = False, output_hidden_states: bool = False,
                return_dict: bool = True, **_: Any) -> BaseModelOutput:
        _refuse_outputs(output_attentions, output_hidden_states)
        memory, _, _, _ = self.model.encode(*left_aligned(input_ids, attention_mask))
        return BaseModelOutput(last_hidden_state=memory)


def left_aligned(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]
                 ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Each row's real tokens first, in order, and its padding after them. The encoder's
    positions count from the first column, so a row padded on the left (as
    lm-evaluation-harness and ``padding_side="left"`` tokenizers batch prompts) would
    otherwise put its text at other positions than alone; right padding is unchanged."""
    if attention_mask is None:
        return input_ids, None
    order = torch.argsort((~attention_mask.bool()).to(torch.int8), dim=1, stable=True)
    return input_ids.gather(1, order), aligned_mask(attention_mask)


def aligned_mask(attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The encoder mask of :func:`left_aligned` rows: the first ``real`` columns of each."""
    if attention_mask is None:
        return None
    columns = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return columns[None, :] < attention_mask.bool().sum(1, keepdim=True)


def _refuse_outputs(output_attentions: Optional[bool],
                    output_hidden_states: Optional[bool]) -> None:
    if output_attentions or output_hidden_states:
        raise ValueError("LiquidFoundationForConditionalGeneration returns neither attentions "
                         "nor hidden states (output_attentions / output_hidden_states)")


class LiquidFoundationPreTrainedModel(PreTrainedModel):
    config_class = LiquidFoundationConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ImprovedTransformerBlock", "EnhancedLiquidEmbedding", "EnhancedLSTM"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The buffers a module derives from the config (``derived_buffers``), which
        ``transformers``'s loading leaves empty. Weights are not touched: the project's
        modules draw their own initial values when built (liquid_dist.model.init), and a
        loaded model takes every weight from its files (``from_pretrained`` refuses a
        directory that lacks one)."""
        derived = getattr(module, "derived_buffers", None)
        if derived is not None:
            for name, value in derived().items():
                getattr(module, name).copy_(value)


class LiquidFoundationForConditionalGeneration(LiquidFoundationPreTrainedModel, GenerationMixin):
    """The encoder-decoder language model for ``AutoModelForSeq2SeqLM``."""

    def __init__(self, config: LiquidFoundationConfig):
        super().__init__(config)
        model = LiquidFoundationModelOptimized(config.to_model_config())
        self.__dict__["liquid"] = model  # its modules are registered on this model instead
        for name, child in model.named_children():
            self.add_module(name, child)
        self.encoder.main_input_name = self.main_input_name  # generate reads it there
        # every parameter registered under several names -> its stored name: the embedding
        # the encoder, the decoder (and with tie_embeddings the output layer) share
        self._tied_weights_keys = tied_aliases(model)
        self.post_init()

    @property
    def liquid(self) -> LiquidFoundationModelOptimized:
        return self.__dict__["liquid"]

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the decoder's state is LiquidDecodingCache, made by forward

    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict[str, str]:
        """The shared parameters, whatever ``tie_word_embeddings`` says (the encoder and
        the decoder always share the token embedding)."""
        return dict(self._tied_weights_keys)

    def _set_gradient_checkpointing(self, enable: bool = True,
                                    gradient_checkpointing_func: Any = None,
                                    every_n_layers: int = 1) -> None:
        """``activation_checkpointing_enable`` / ``_disable`` switch the model's own
        activation checkpointing (``ModelConfig.activation_checkpointing``: every block
        recomputed in the backward, non-reentrant) instead of ``transformers``'s checkpoint
        function (so its kwargs and ``offload`` do not apply); ``every_n_layers`` other
        than 1 is refused."""
        if enable and every_n_layers != 1:
            raise ValueError("activation checkpointing covers every block (every_n_layers=1)")
        self.liquid.cfg.activation_checkpointing = enable
        self.gradient_checkpointing = enable

    def get_encoder(self, modality: Optional[str] = None) -> LiquidEncoder:
        return LiquidEncoder(self.liquid)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.liquid.token_embedding

    def get_output_embeddings(self) -> nn.Linear:
        return self.liquid.lm_head

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        """``PreTrainedModel.from_pretrained``, refusing files whose weights do not cover
        the model exactly (a weight left out would keep no value)."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        wrong = {k: sorted(info[k]) for k in ("missing_keys", "unexpected_keys",
                                              "mismatched_keys") if info.get(k)}
        if wrong:
            raise ValueError(f"{args[0] if args else kwargs}: the weights do not match the "
                             f"model: {wrong}")
        # transformers may leave a tensor as a view of the memory-mapped file, at the 8-byte
        # alignment of the safetensors layout; the CPU kernels (grouped GEMM, oneDNN) get
        # operands at the allocator's alignment, as the project's own loader gives them
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                if t.device.type == "cpu" and t.data_ptr() % 64:
                    t.data = t.data.clone()
        return (model, info) if want_info else model

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """The labels shifted right behind ``decoder_start_token_id`` (-100 -> pad)."""
        cfg = self.liquid.cfg
        shifted = labels.new_full(labels.shape, cfg.decoder_start_token_id)
        shifted[:, 1:] = labels[:, :-1]
        return shifted.masked_fill(shifted == -100, cfg.pad_token_id)

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        decoder_input_ids: Optional[torch.Tensor] = None,
        decoder_attention_mask: Optional[torch.Tensor] = None,
        encoder_outputs: Optional[Any] = None,
        labels: Optional[torch.Tensor] = None,
        cache: Optional[LiquidDecodingCache] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        num_items_in_batch: Optional[Union[int, torch.Tensor]] = None,
        **kwargs: Any,
    ):
        """Teacher-forced (``use_cache`` false or ``labels`` given) or one step of
        incremental decoding (``use_cache``: the first call makes the cache, each later
        call feeds the new decoder tokens). ``num_items_in_batch`` (``Trainer``'s, under
        gradient accumulation) makes ``loss`` the summed cross-entropy over it."""
        _refuse_outputs(output_attentions, output_hidden_states)
        unknown = sorted(k for k, v in kwargs.items() if v is not None)
        if unknown:
            raise TypeError(f"forward() got unsupported argument(s) {unknown}")
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("forward() needs decoder_input_ids or labels")
            decoder_input_ids = self.prepare_decoder_input_ids_from_labels(labels)
        if labels is not None or not use_cache:
            out = self._teacher_forced(input_ids, attention_mask, decoder_input_ids,
                                       decoder_attention_mask, encoder_outputs, labels,
                                       num_items_in_batch)
        else:
            out = self._incremental(input_ids, attention_mask, decoder_input_ids,
                                    decoder_attention_mask, encoder_outputs, cache)
        return out if return_dict else out.to_tuple()

    def _teacher_forced(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask,
                        encoder_outputs, labels, num_items_in_batch) -> LiquidSeq2SeqLMOutput:
        model = self.liquid
        if encoder_outputs is None:
            input_ids, attention_mask = left_aligned(input_ids, attention_mask)
            out = model(input_ids=input_ids, decoder_input_ids=decoder_input_ids,
                        attention_mask=attention_mask, labels=labels,
                        decoder_attention_mask=decoder_attention_mask)
            loss = None
            if labels is not None:
                loss = (out.aux["ce"] if num_items_in_batch is None
                        else out.ce_sum / num_items_in_batch)
            return LiquidSeq2SeqLMOutput(loss=loss, logits=out.logits, aux_loss=out.aux_loss)
        if labels is not None:
            raise ValueError("labels with encoder_outputs: pass input_ids instead, so that the "
                             "loss holds the encoder's terms too")
        memory = _memory(encoder_outputs)
        mask = aligned_mask(attention_mask)
        dec_mask = None if decoder_attention_mask is None else decoder_attention_mask.bool()
        logits, _, _ = model.decode(decoder_input_ids, memory, mask, dec_mask)
        return LiquidSeq2SeqLMOutput(logits=logits, encoder_last_hidden_state=memory)

    def _incremental(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask,
                     encoder_outputs, cache) -> LiquidSeq2SeqLMOutput:
        if decoder_attention_mask is not None and not bool(decoder_attention_mask.all()):
            raise ValueError("incremental decoding (use_cache) takes no padding in the decoder "
                             "input: pass use_cache=False with a decoder_attention_mask")
        if cache is None:
            if encoder_outputs is None:
                if input_ids is None:
                    raise ValueError("the first decoding step needs input_ids or encoder_outputs")
                encoder_outputs = self.get_encoder()(input_ids, attention_mask)
            decoder = IncrementalDecoder(self.liquid)
            decoder.start_from_memory(_memory(encoder_outputs), aligned_mask(attention_mask))
            cache = LiquidDecodingCache(decoder)
        return LiquidSeq2SeqLMOutput(logits=cache.step(decoder_input_ids), cache=cache)

    def generate(self, *args: Any, **kwargs: Any):
        """``GenerationMixin.generate``. A ``max_length`` passed here counts the decoder's
        tokens (its start token included) and wins over the ``max_new_tokens`` of
        ``generation_config.json``; the decoder's length is capped at
        ``max_decoder_length`` (the most positions it takes), with a warning."""
        prompt = kwargs.get("decoder_input_ids")
        start = 1 if prompt is None else prompt.shape[1]
        if "max_new_tokens" not in kwargs and kwargs.get("max_length") is not None:
            kwargs["max_new_tokens"] = kwargs.pop("max_length") - start
        gen = kwargs.get("generation_config") or self.generation_config
        wanted = kwargs.get("max_new_tokens", gen.max_new_tokens)
        # the last token generated is never fed: start + new - 1 positions
        most = self.liquid.cfg.max_decoder_length - start + 1
        if wanted is not None and wanted > most:
            logger.warning_once(f"generate: more new tokens asked for than the decoder's "
                                f"max_decoder_length={self.liquid.cfg.max_decoder_length} "
                                f"positions allow; capped at {most}")
            kwargs["max_new_tokens"] = most
        return super().generate(*args, **kwargs)


def _memory(encoder_outputs: Any) -> torch.Tensor:
    """The encoder output of ``encoder_outputs`` (a ModelOutput or a tuple)."""
    if isinstance(encoder_outputs, (tuple, list)):
        return encoder_outputs[0]
    return encoder_outputs.last_hidden_state
