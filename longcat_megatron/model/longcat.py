"""The LongCat-Flash language model on megatron-core (one pipeline chunk).

Follows GPTModel's contract: ``forward(input_ids, position_ids, attention_mask, labels=None,
loss_mask=None)`` returns the per-token LM loss ``[b, s]`` on the last stage when labels are given,
logits ``[b, s, V]`` otherwise, and hidden states ``[s(/tp), b, H]`` on other stages
(``set_input_tensor`` feeds a non-first stage). Auxiliary losses (MTP, hidden z-loss, device-level
LB loss) enter the backward inside the model. Hooks for the training loop:
``on_train_step_end(iteration)`` (budget controller) and ``training_metrics()``.

Input embedding: megatron's ``LanguageModelEmbedding`` (no position embedding; RoPE is in the
attention), or with ``model.ngram`` the vocab-sharded ``NgramEmbedding`` (LongCat-Flash-Lite), whose
``word_embeddings`` is the base token table (HF ``model.embed_tokens``). Both map ``input_ids [b, s]``
to ``[s, b, H]`` (sequence shards under SP). The n-gram hash resets after ``ngram.eos_token_id``
(documents packed by the data tools end with EOS). The MTP head keeps its own plain embedding
(HF ``model.mtp.embed_tokens``), as in the released checkpoints.

Per-layer embeddings (``model.per_layer_embedding``: ple | plne): the dense MLPs multiply their gate
by an embedding of the tokens (model/per_layer_embedding.py); ``forward`` hands ``input_ids`` to
the decoder, which hashes them once for all its layers (every pipeline stage gets the tokens).

Full activation recompute (``train.recompute: full``): ``LongcatBlock`` runs each of the first
``recompute_num_layers`` shortcut layers of the chunk through megatron's ``tensor_parallel.checkpoint``
(RNG states restored, so dropout matches). With the "sdpa" attention backend a dense attention mask
is turned into one additive float mask per forward, shared by every layer. ``attention_mask`` may
also be a :class:`~longcat_megatron.model.document_mask.DocumentMask` (packed documents, no dense
mask), which every attention block reads as is.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from longcat_megatron import collectives
from longcat_megatron.model import aux_losses
from longcat_megatron.model.attention import (
    additive_mask,
    context_parallel_size,
    cp_global_positions,
)
from longcat_megatron.model.config import ModelConfig, ModelConfigError
from longcat_megatron.model.document_mask import DocumentMask
from longcat_megatron.model.layer import ShortcutLayer, layer_norm
from longcat_megatron.model.mtp import MTPHead, shift_left
from longcat_megatron.model.ngram_embedding import NgramEmbedding
from longcat_megatron.model.parallel_info import sequence_parallel_size
from longcat_megatron.model.per_layer_embedding import per_layer_inputs
from longcat_megatron.model.rotary import InterleavedRotary


class LayersByGlobalIndex(torch.nn.ModuleDict):
    """Layers keyed by their global index (so state-dict keys do not depend on the pipeline
    layout); iterating yields the layers, as megatron's schedules expect of ``decoder.layers``."""

    def __iter__(self):
        return iter(self.values())


def _run_layer(layer, documents: Optional[DocumentMask] = None, per_layer=None):
    """``layer`` as a function of tensors only (what ``tensor_parallel.checkpoint`` takes); a
    ``DocumentMask`` (not a tensor) and the per-layer embeddings' token ids are bound here."""

    def run(x, cos, sin, attention_mask):
        return layer(x, (cos, sin), documents if documents is not None else attention_mask,
                     per_layer)

    return run


class LongcatBlock(MegatronModule):
    """The shortcut layers of one pipeline chunk, keyed by their global index."""

    def __init__(self, cfg: ModelConfig, tf_config, vp_stage: Optional[int] = None):
        super().__init__(config=tf_config)
        num = get_num_layers_to_build(tf_config, vp_stage=vp_stage)
        offset = get_transformer_layer_offset(tf_config, vp_stage=vp_stage)
        self.layers = LayersByGlobalIndex(
            {str(offset + i): ShortcutLayer(cfg, tf_config, offset + i) for i in range(num)})
        self.input_tensor = None

    def forward(self, x, rotary, attention_mask=None, input_ids=None):
        """``input_ids`` (this rank's tokens) feed the per-layer embeddings, if any."""
        per_layer = per_layer_inputs(self.layers, input_ids)
        recompute = self._layers_to_recompute()
        cos, sin = rotary
        documents = attention_mask if isinstance(attention_mask, DocumentMask) else None
        tensor_mask = None if documents is not None else attention_mask
        for i, layer in enumerate(self.layers.values()):
            if i < recompute:
                # Full recompute: keep only the layer input; megatron's checkpoint restores the
                # CPU/CUDA and model-parallel RNG states, so dropout draws the same masks again.
                x = tensor_parallel.checkpoint(
                    _run_layer(layer, documents, per_layer),
                    self.config.distribute_saved_activations, x, cos, sin, tensor_mask)
            else:
                x = layer(x, rotary, attention_mask, per_layer)
        return x

    def _layers_to_recompute(self) -> int:
        """How many of this chunk's first layers run under full recompute (megatron's "block"
        method: ``recompute_num_layers`` per pipeline chunk, all of them when unset)."""
        config = self.config
        if config.recompute_granularity != "full" or not (self.training and torch.is_grad_enabled()):
            return 0
        if config.recompute_num_layers is None:
            return len(self.layers)
        return min(config.recompute_num_layers, len(self.layers))

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        out = {}
        for key, layer in self.layers.items():
            out.update(layer.sharded_state_dict(f"{prefix}layers.{key}.", sharded_offsets, metadata))
        return out


class LongcatModel(LanguageModule):
    """LongCat-Flash: embedding -> shortcut layers -> final norm -> LM head (+ MTP head)."""

    reads_document_masks = True   # attention_mask may be a DocumentMask (training loop checks)

    def __init__(self, cfg: ModelConfig, tf_config, *, pre_process: bool = True,
                 post_process: bool = True, vp_stage: Optional[int] = None):
        super().__init__(config=tf_config)
        self.cfg = cfg
        self.model_type = ModelType.encoder_or_decoder
        self.pre_process, self.post_process = pre_process, post_process
        self.vp_stage = vp_stage
        self.share_embeddings_and_output_weights = False
        self.rotary = InterleavedRotary(cfg)
        if pre_process:
            self.embedding = self._input_embedding(cfg, tf_config)
            self.embedding.word_embeddings.weight.is_embedding_or_output_parameter = True
        self.decoder = LongcatBlock(cfg, tf_config, vp_stage)
        if post_process:
            self.final_layernorm = layer_norm(cfg, tf_config)
            self.output_layer = ColumnParallelLinear(
                cfg.hidden_size, cfg.vocab_size, config=tf_config,
                init_method=tf_config.init_method, bias=False, skip_bias_add=False,
                gather_output=False)
            self.output_layer.weight.is_embedding_or_output_parameter = True
            self.mtp_head = MTPHead(cfg, tf_config) if cfg.mtp_num_layers else None
        self._metrics: dict[str, float] = {}
        self._last_aux: dict[str, torch.Tensor] = {}

    @staticmethod
    def _input_embedding(cfg: ModelConfig, tf_config):
        """Plain token embedding, or the N-gram Embedding when ``cfg.ngram`` is set."""
        if cfg.ngram is not None:
            return NgramEmbedding(tf_config, cfg.vocab_size, cfg.ngram,
                                  max_sequence_length=cfg.max_position_embeddings)
        return LanguageModelEmbedding(
            tf_config, vocab_size=cfg.vocab_size,
            max_sequence_length=cfg.max_position_embeddings, position_embedding_type="none")

    # ---- pipeline -------------------------------------------------------------------------
    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0] if input_tensor else None
        self.decoder.input_tensor = input_tensor

    def _rotary(self, position_ids, hidden):
        """(cos, sin) for this rank's sequence (whole under SP, its CP chunks under CP); when a
        stage gets no position_ids, the tokens' global indices (0..s-1 without CP)."""
        if position_ids is None:
            s = hidden.shape[0] * sequence_parallel_size(self.config)
            position_ids = cp_global_positions(s, device=hidden.device)[None].expand(
                hidden.shape[1], -1)
        return self.rotary.angles(position_ids, hidden.dtype)

    # ---- forward --------------------------------------------------------------------------
    def forward(self, input_ids, position_ids, attention_mask, labels=None, loss_mask=None,
                **unused):
        if self.pre_process:
            hidden = self.embedding(input_ids=input_ids, position_ids=None)
        else:
            hidden = self.decoder.input_tensor
        rotary = self._rotary(position_ids, hidden)
        if self.cfg.attention_backend == "sdpa":
            # One additive float mask shared by every attention (SDPA would convert per call).
            attention_mask = additive_mask(attention_mask, hidden.dtype)
        hidden = self.decoder(hidden, rotary, attention_mask, input_ids)
        if not self.post_process:
            return hidden
        if self.cfg.z_loss_coeff > 0 and self.training:
            hidden = self._attach_z_loss(hidden, loss_mask)
        hidden = self.final_layernorm(hidden)
        if self.mtp_head is not None and labels is not None and self.training:
            hidden = self._attach_mtp_loss(input_ids, hidden, rotary, attention_mask, labels,
                                           loss_mask)
        logits, _ = self.output_layer(hidden)                          # [s, b, V/tp]
        if labels is None:
            logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
            return logits.transpose(0, 1).contiguous()
        return self.compute_language_model_loss(labels, logits)

    def _attach_z_loss(self, hidden, loss_mask):
        """Hidden z-loss over the loss-masked tokens (the LM loss's tokens): a token sum with
        ``calculate_per_token_loss`` (divided by the global batch's loss tokens like the LM loss),
        else this shard's part of the micro-batch mean."""
        s, b = hidden.shape[:2]
        if loss_mask is None:
            mask = hidden.new_ones(s, b, dtype=torch.float32)
        else:
            mask = loss_mask.transpose(0, 1)                        # [s (CP chunk), b]
            if sequence_parallel_size(self.config) > 1:             # this rank's sequence shard
                r = ps.get_tensor_model_parallel_rank()
                mask = mask[r * s:(r + 1) * s]
        z_sum, tokens = aux_losses.hidden_z_loss(hidden, self.cfg.z_loss_coeff, mask)
        self._last_aux["z_loss"] = (z_sum / tokens.clamp_min(1.0)).detach()
        if getattr(self.config, "calculate_per_token_loss", False):
            units = z_sum
        else:
            units = z_sum * self._token_scale() / tokens.clamp_min(1.0)
        return aux_losses.attach(hidden, units)

    def _token_scale(self) -> float:
        """Local / global tokens of a sequence-sharded activation (SP shards x CP chunks)."""
        return 1.0 / (sequence_parallel_size(self.config) * context_parallel_size())

    def _attach_mtp_loss(self, input_ids, hidden, rotary, attention_mask, labels, loss_mask):
        if input_ids is None:
            raise ValueError("model.mtp_num_layers=1 needs input_ids on the last pipeline stage "
                             "(the MTP head embeds token t+1)")
        z = self.mtp_head(input_ids, hidden, rotary, attention_mask)
        logits, _ = self.output_layer(z)
        per_token = self.compute_language_model_loss(shift_left(labels), logits)
        mask = torch.ones_like(per_token) if loss_mask is None else loss_mask.float()
        mask = shift_left(mask, 0.0)
        loss_sum = (per_token * mask).sum()
        if context_parallel_size() > 1:
            # Mean over the whole sequence's tokens: this rank's share of it (sums to the mean
            # over CP, like the SP convention of the other aux losses).
            totals = torch.stack([loss_sum.detach().float(), mask.sum().float()])
            collectives.all_reduce(totals, group=ps.get_context_parallel_group())
            tokens = totals[1].clamp_min(1.0)
            self._last_aux["mtp_loss"] = totals[0] / tokens
            loss = loss_sum / tokens
        else:
            tokens = mask.sum().clamp_min(1.0)
            loss = loss_sum / tokens
            self._last_aux["mtp_loss"] = loss.detach()
        weighted = aux_losses.in_loss_units(self.cfg.mtp_loss_scaling_factor * loss, tokens, self.config)
        return aux_losses.attach(hidden, weighted)

    # ---- training-loop hooks ---------------------------------------------------------------
    def routers(self):
        """(global layer index, router) of this chunk."""
        return [(int(k), layer.mlp.router) for k, layer in self.decoder.layers.items()]

    def on_train_step_end(self, iteration: int) -> None:
        """Update the FFN-expert biases from this step's global token counts; refresh metrics."""
        metrics: dict[str, float] = {}
        for index, router in self.routers():
            for name, value in router.end_step().items():
                metrics[f"moe/layer{index}/{name}"] = value
            if router.last_lb_loss is not None:
                metrics[f"moe/layer{index}/lb_loss"] = float(router.last_lb_loss)
        for name, value in self._last_aux.items():
            metrics[name] = float(value)
        # What the progress line shows (router collapse shows there first).
        experts = [v for k, v in metrics.items() if k.endswith("/ffn_experts_per_token")]
        loads = [v for k, v in metrics.items() if k.endswith("/load_max_over_mean")]
        if experts:
            metrics["progress/experts/tok"] = sum(experts) / len(experts)
        if loads:
            metrics["progress/max-load"] = max(loads)
        if "mtp_loss" in metrics:
            metrics["progress/mtp-loss"] = metrics["mtp_loss"]
        self._metrics = metrics

    def training_metrics(self) -> dict[str, float]:
        """Per layer: FFN experts per token, min/max load over mean, router entropy; MTP loss,
        z-loss (values of the last finished step on this rank's pipeline stage)."""
        return dict(self._metrics)


def build_longcat_chunk(cfg: ModelConfig, tf_config, *, pre_process: bool, post_process: bool,
                        vp_stage: Optional[int] = None) -> LongcatModel:
    """The factory's entry point (``model.arch: longcat``)."""
    cfg.validate()
    if tf_config.context_parallel_size > 1 and cfg.device_lb_loss_coeff > 0:
        raise ModelConfigError(
            f"parallel.context={tf_config.context_parallel_size} with model.device_lb_loss_coeff="
            f"{cfg.device_lb_loss_coeff}: the device-level load-balance loss is computed per "
            "sequence shard and does not reduce over the context-parallel group yet; set "
            "model.device_lb_loss_coeff=0 or parallel.context=1")
    if tf_config.num_moe_experts != cfg.num_experts:
        raise ValueError("transformer config num_moe_experts must equal model.num_experts "
                         "(the FFN experts); build it with factory.transformer_config(cfg)")
    return LongcatModel(cfg, tf_config, pre_process=pre_process, post_process=post_process,
                        vp_stage=vp_stage)
