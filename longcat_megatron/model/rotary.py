"""RoPE on MLA's rope dims in DeepSeek's interleaved-pair layout, with optional YaRN.

The frequencies come from megatron-core's YaRN helpers (correction range, linear ramp, mscale);
positions are taken from ``position_ids`` so packed/reset positions work. The output layout equals
HF ``apply_rotary_pos_emb_interleave``: ``cat[x_even*cos - x_odd*sin, x_odd*cos + x_even*sin]``.
"""

from __future__ import annotations

import math

import torch
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_find_correction_range,
    _yarn_get_mscale,
    _yarn_linear_ramp_mask,
)

from longcat_megatron.model.config import ModelConfig
from longcat_megatron.model.full_precision import KeepsFullPrecision


def inverse_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Per-pair inverse frequencies ``[qk_rope_head_dim / 2]`` (fp32) for ``cfg.rope_type``."""
    dim = cfg.qk_rope_head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim
    extrapolation = 1.0 / (cfg.rotary_base ** exponents)
    if cfg.rope_type != "yarn":
        return extrapolation
    interpolation = 1.0 / (cfg.yarn_factor * cfg.rotary_base ** exponents)
    low, high = _yarn_find_correction_range(
        cfg.yarn_beta_fast, cfg.yarn_beta_slow, dim, cfg.rotary_base,
        cfg.yarn_original_max_position_embeddings, True,
    )
    keep = 1.0 - _yarn_linear_ramp_mask(low, high, dim // 2, device="cpu")
    return interpolation * (1 - keep) + extrapolation * keep


def rotary_amplitude(cfg: ModelConfig) -> float:
    """YaRN's factor on cos/sin (``attention_factor``; 1 for plain RoPE), HF's rule."""
    if cfg.rope_type != "yarn":
        return 1.0
    if cfg.yarn_mscale and cfg.yarn_mscale_all_dim:
        return _yarn_get_mscale(cfg.yarn_factor, cfg.yarn_mscale) / _yarn_get_mscale(
            cfg.yarn_factor, cfg.yarn_mscale_all_dim)
    return _yarn_get_mscale(cfg.yarn_factor)


def softmax_scale(cfg: ModelConfig) -> float:
    """``qk_head_dim^-1/2``, times ``mscale(factor, mscale_all_dim)^2`` under YaRN."""
    scale = 1.0 / math.sqrt(cfg.qk_head_dim)
    if cfg.rope_type == "yarn" and cfg.yarn_mscale_all_dim:
        m = _yarn_get_mscale(cfg.yarn_factor, cfg.yarn_mscale_all_dim)
        scale *= m * m
    return scale


class InterleavedRotary(KeepsFullPrecision, torch.nn.Module):
    """Produces (cos, sin) ``[s, b, 1, d/2]`` for positions and rotates ``[s, b, heads, d]``.

    ``inv_freq`` stays fp32 through bf16 casts (:mod:`longcat_megatron.model.full_precision`): in
    bf16 the angles at position p would be off by up to p * 2^-8 * inv_freq (~4 rad at 8k,
    ~60 rad at 128k), and YaRN's tuned frequencies lost. Angles, cos and sin are computed in fp32;
    only the results are cast to the activations' dtype."""

    full_precision_names = ("inv_freq",)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.register_buffer("inv_freq", inverse_frequencies(cfg), persistent=False)
        self.amplitude = rotary_amplitude(cfg)

    def angles(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """position_ids ``[b, s]`` -> (cos, sin) ``[s, b, 1, d/2]``."""
        inv = self.inv_freq.to(position_ids.device)
        freqs = position_ids.transpose(0, 1).float()[..., None] * inv  # [s, b, d/2]
        cos = (freqs.cos() * self.amplitude).to(dtype)[:, :, None, :]
        sin = (freqs.sin() * self.amplitude).to(dtype)[:, :, None, :]
        return cos, sin

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        even, odd = x[..., 0::2], x[..., 1::2]
        return torch.cat([even * cos - odd * sin, odd * cos + even * sin], dim=-1)
