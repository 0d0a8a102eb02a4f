"""Model hyper-parameters (the ``model:`` section of a run config).

``arch: gpt`` builds megatron-core's GPTModel with the local layer spec (the baseline the training
loop was proven on); ``arch: longcat`` builds the LongCat-Flash model (``longcat_megatron.model``).
Fields that only one architecture reads say so.

LongCat naming follows the HF ``LongcatFlashConfig`` where a field exists there:
``num_layers`` counts *shortcut layers* (each holds two attention blocks, two dense MLPs and one
MoE), ``num_experts`` is ``n_routed_experts`` (FFN experts only), ``moe_router_topk`` is ``moe_topk``
(over FFN + zero experts), ``moe_ffn_hidden_size`` is ``expert_ffn_hidden_size`` and
``ffn_hidden_size`` is the dense MLP width.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Optional

from longcat_megatron.errors import UserInputError
from longcat_megatron.model.ngram_config import NgramConfig, check_ngram_rules


ATTENTION_BACKENDS = ("sdpa", "eager")
# Local FFN expert implementations (model/experts.py), one checkpoint layout for all.
EXPERT_IMPLS = ("grouped", "sequential", "te")
# model.per_layer_embedding (the dense MLPs' up projection replaced by a per-layer embedding).
PER_LAYER_EMBEDDINGS = ("none", "ple", "plne")


class ModelConfigError(UserInputError):
    """Invalid model hyper-parameters; the message names the field."""


class NgramRuleWarning(UserWarning):
    """A sizing rule of the N-gram Embedding paper is not met (``model.ngram.silence`` mutes it)."""


@dataclass
class ModelConfig:
    arch: str = "gpt"
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    ffn_hidden_size: int = 256
    vocab_size: int = 1024
    max_position_embeddings: int = 4096
    normalization: str = "RMSNorm"
    norm_epsilon: float = 1e-5
    rotary_base: float = 10000.0
    init_method_std: float = 0.02
    untie_embeddings_and_output_weights: bool = True
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    # Core attention of arch longcat: "sdpa" (torch scaled_dot_product_attention: flash /
    # memory-efficient / cuDNN kernels on CUDA, the flash kernel on CPU; no s x s score tensor) or
    # "eager" (the reference: explicit fp32 scores and softmax, memory quadratic in s).
    attention_backend: str = "sdpa"
    # MoE (gpt: megatron-core MoE on every layer; longcat: the FFN experts of the shortcut MoE).
    num_experts: Optional[int] = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: Optional[int] = None
    moe_token_dispatcher_type: str = "allgather"
    moe_aux_loss_coeff: float = 0.0
    # Local FFN experts (longcat): "grouped" (grouped GEMMs), "sequential" (megatron SequentialMLP,
    # the reference) or "te" (TransformerEngine grouped linear, GPU). Same checkpoint layout for all.
    expert_impl: str = "grouped"
    # ScMoE overlap (longcat): dispatch all-to-all in flight during MLP0 + Attn1, combine during MLP1.
    scmoe_overlap: bool = True

    # ---- LongCat only (arch: longcat) -------------------------------------------------------
    # Zero-computation (identity) experts next to the ``num_experts`` FFN experts.
    zero_expert_num: int = 0
    # Routing weights = softmax score x this factor (no renormalisation).
    routed_scaling_factor: float = 1.0
    # MLA (always with q-LoRA).
    q_lora_rank: int = 32
    kv_lora_rank: int = 16
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    # LongCat scale correction: q x sqrt(H/q_lora_rank), normed kv latent x sqrt(H/kv_lora_rank).
    mla_scale_q_lora: bool = True
    mla_scale_kv_lora: bool = True
    # eps of the q/kv latent RMSNorms (HF builds them with its 1e-6 default).
    mla_norm_epsilon: float = 1e-6
    # RoPE on the qk_rope_head_dim dims (DeepSeek interleaved pairs): "rope" or "yarn".
    rope_type: str = "rope"
    yarn_factor: float = 1.0
    yarn_original_max_position_embeddings: int = 4096
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: float = 1.0
    yarn_mscale_all_dim: float = 0.0
    # Multi-token prediction: 0 (off) or 1 dense MTP layer; loss weight.
    mtp_num_layers: int = 0
    mtp_loss_scaling_factor: float = 0.1
    # Budget controller of the FFN-expert bias: target mean FFN experts per token (K_e; None = off),
    # rate mu, P/I/D gains (I=1, P=D=0 is the paper's rule) and a per-step multiplicative rate decay.
    budget_target_ffn_experts: Optional[float] = None
    budget_rate: float = 1e-3
    budget_kp: float = 0.0
    budget_ki: float = 1.0
    budget_kd: float = 0.0
    budget_rate_decay: float = 1.0
    # Hidden z-loss on the last decoder hidden state (0 = off).
    z_loss_coeff: float = 0.0
    # Device-level load-balance loss: FFN experts in ``device_lb_groups`` groups + 1 zero group.
    device_lb_loss_coeff: float = 0.0
    device_lb_groups: int = 1
    # N-gram Embedding (LongCat-Flash-Lite) as the input embedding; None = plain token embedding.
    # See longcat_megatron/model/ngram_config.py and docs/ngram.md.
    ngram: Optional[NgramConfig] = None
    # Per-layer embeddings in the dense MLPs (arch longcat; docs/ngram.md "Per-layer embeddings"):
    # "none", "ple" (SwiGLU up projection -> a per-layer token table [V, ffn_hidden_size]) or "plne"
    # (-> a per-layer N-gram Embedding of width ffn_hidden_size, shaped by ``per_layer_ngram``).
    per_layer_embedding: str = "none"
    # The n-gram shape of "plne"; None: model.ngram's fields (amplification none).
    per_layer_ngram: Optional[NgramConfig] = None

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def validate(self) -> None:
        """Shape checks that need no process group."""
        if self.arch not in ("gpt", "longcat"):
            raise ModelConfigError(f"model.arch={self.arch!r}: use 'gpt' or 'longcat'")
        if self.hidden_size % self.num_attention_heads:
            raise ModelConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}"
            )
        routable = (self.num_experts or 0) + (self.zero_expert_num if self.arch == "longcat" else 0)
        if self.num_experts is not None and self.moe_router_topk > routable:
            raise ModelConfigError(
                f"model.moe_router_topk={self.moe_router_topk} > model.num_experts={self.num_experts}"
                + (f" + model.zero_expert_num={self.zero_expert_num}" if self.arch == "longcat" else "")
            )
        if self.moe_token_dispatcher_type not in ("allgather", "alltoall"):
            raise ModelConfigError(
                f"model.moe_token_dispatcher_type={self.moe_token_dispatcher_type!r}: "
                "use allgather or alltoall"
            )
        if self.expert_impl not in EXPERT_IMPLS:
            raise ModelConfigError(f"model.expert_impl={self.expert_impl!r}: use "
                                   f"{', '.join(EXPERT_IMPLS[:-1])} or {EXPERT_IMPLS[-1]}")
        if self.arch == "longcat":
            self._validate_longcat()
        if self.ngram is not None:
            self._validate_ngram()
        self._validate_per_layer_embedding()

    def layer_ngram(self) -> Optional[NgramConfig]:
        """The per-layer N-gram Embedding's config with ``per_layer_embedding: plne`` (the
        ``per_layer_ngram`` section, else ``ngram``'s fields with amplification none); else None."""
        if self.per_layer_embedding != "plne":
            return None
        if self.per_layer_ngram is not None:
            return self.per_layer_ngram
        if self.ngram is not None:
            return dataclasses.replace(self.ngram, amplification="none")
        return None

    def _validate_per_layer_embedding(self) -> None:
        kind = self.per_layer_embedding
        if kind not in PER_LAYER_EMBEDDINGS:
            raise ModelConfigError(f"model.per_layer_embedding={kind!r}: use one of "
                                   f"{', '.join(PER_LAYER_EMBEDDINGS)}")
        if kind == "none":
            if self.per_layer_ngram is not None:
                raise ModelConfigError("model.per_layer_ngram is set but model.per_layer_embedding="
                                       "none: set model.per_layer_embedding=plne or remove "
                                       "model.per_layer_ngram")
            return
        if self.arch != "longcat":
            raise ModelConfigError(f"model.per_layer_embedding={kind!r} but model.arch={self.arch!r}: "
                                   "per-layer embeddings are only wired into arch: longcat (set "
                                   "model.per_layer_embedding=none)")
        if kind == "ple" and self.per_layer_ngram is not None:
            raise ModelConfigError("model.per_layer_ngram is set but model.per_layer_embedding=ple "
                                   "(a plain token table): use plne or remove model.per_layer_ngram")
        if kind == "plne":
            layer_ngram = self.layer_ngram()
            if layer_ngram is None:
                raise ModelConfigError(
                    "model.per_layer_embedding=plne needs the n-gram shape: add a "
                    "model.per_layer_ngram section (ngram_vocab_size_ratio, emb_neighbor_num, "
                    "emb_split_num, eos_token_id, partition) or a model.ngram section to inherit from")
            for message in check_ngram_rules(layer_ngram, _Width(self.vocab_size, self.ffn_hidden_size),
                                             section="model.per_layer_ngram",
                                             width_field="model.ffn_hidden_size"):
                warnings.warn(message, NgramRuleWarning, stacklevel=3)

    def _validate_ngram(self) -> None:
        """The paper's rules (``check_ngram_rules``): errors raise, warnings go to ``warnings.warn``
        (muted per rule by ``ngram.silence``); the 50% budget rule uses the analytic total."""
        if self.arch != "longcat":
            raise ModelConfigError(f"model.ngram is set but model.arch={self.arch!r}: the N-gram "
                                   "Embedding is only wired into arch: longcat (remove model.ngram)")
        from longcat_megatron.model.param_count import total_parameters

        for message in check_ngram_rules(self.ngram, self, total_parameters(self)):
            warnings.warn(message, NgramRuleWarning, stacklevel=2)

    def _validate_longcat(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ModelConfigError(msg)

        need(bool(self.num_experts), "model.num_experts (FFN experts) must be >= 1 for arch: longcat")
        need(self.zero_expert_num >= 0, f"model.zero_expert_num={self.zero_expert_num} must be >= 0")
        need(self.normalization == "RMSNorm",
             f"model.normalization={self.normalization!r}: arch longcat uses RMSNorm")
        for name in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
            need(getattr(self, name) > 0, f"model.{name}={getattr(self, name)} must be > 0")
        need(self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0,
             f"model.qk_rope_head_dim={self.qk_rope_head_dim} must be a positive even number")
        need(self.attention_backend in ATTENTION_BACKENDS,
             f"model.attention_backend={self.attention_backend!r}: use "
             + " or ".join(ATTENTION_BACKENDS))
        need(self.rope_type in ("rope", "yarn"), f"model.rope_type={self.rope_type!r}: use rope or yarn")
        if self.rope_type == "yarn":
            need(self.yarn_factor >= 1.0, f"model.yarn_factor={self.yarn_factor} must be >= 1")
        need(self.mtp_num_layers in (0, 1), f"model.mtp_num_layers={self.mtp_num_layers}: use 0 or 1")
        if self.budget_target_ffn_experts is not None:
            need(0 < self.budget_target_ffn_experts <= self.moe_router_topk,
                 f"model.budget_target_ffn_experts={self.budget_target_ffn_experts} must lie in "
                 f"(0, moe_router_topk={self.moe_router_topk}]")
            need(self.budget_rate > 0, f"model.budget_rate={self.budget_rate} must be > 0")
            need(0 < self.budget_rate_decay <= 1,
                 f"model.budget_rate_decay={self.budget_rate_decay} must lie in (0, 1]")
        if self.device_lb_loss_coeff > 0:
            need(self.num_experts % self.device_lb_groups == 0,
                 f"model.device_lb_groups={self.device_lb_groups} must divide "
                 f"model.num_experts={self.num_experts}")
            need(self.budget_target_ffn_experts is not None,
                 "model.device_lb_loss_coeff > 0 needs model.budget_target_ffn_experts (K_e)")
        need(self.z_loss_coeff >= 0, f"model.z_loss_coeff={self.z_loss_coeff} must be >= 0")


@dataclass
class _Width:
    """(vocab_size, output width) for check_ngram_rules on the per-layer N-gram Embedding."""

    vocab_size: int
    hidden_size: int
