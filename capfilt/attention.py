"""The ViT's self-attention through torch's fused ``scaled_dot_product_attention`` (SDPA).

transformers' BLIP classes (5.23) have only the eager path: ``softmax(Q Kᵀ · d^-½) V`` with the attention
matrix materialised, batch × heads × 577² floats per layer for ViT-B/16 at 384 px. SDPA computes the same
thing (within 1e-5, ``tests/test_attention.py``) without keeping that matrix, and takes flash or
memory-efficient kernels on a GPU. Written here because transformers offers no SDPA for BLIP.
``bench/bench_attention.py`` times the two paths (docs/throughput.md, "What makes the engine fast").
The text side (BERT, 35 tokens or fewer) keeps the eager path.

``use_sdpa(model)`` switches every ``BlipAttention`` in a model in place: same parameters, same state-dict
keys; a deep copy (the MED's momentum encoder) keeps it. ``use_eager(model)`` switches back (benchmarks). The
attention probabilities are not returned (``output_attentions`` gets ``None`` for the ViT); nothing in capfilt
asks for them.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.blip.modeling_blip import BlipAttention


class SdpaBlipAttention(BlipAttention):
    """``BlipAttention`` with the same weights, computed by ``F.scaled_dot_product_attention``."""

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> tuple[torch.Tensor, None]:
        batch, tokens, width = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        context = nn.functional.scaled_dot_product_attention(
            qkv[0], qkv[1], qkv[2], dropout_p=self.dropout.p if self.training else 0.0, scale=self.scale)
        return self.projection(context.transpose(1, 2).reshape(batch, tokens, width)), None


def use_sdpa(model: nn.Module) -> nn.Module:
    """Switch ``model``'s ViT attention layers to SDPA in place; returns ``model``."""
    for module in model.modules():
        if type(module) is BlipAttention:
            module.__class__ = SdpaBlipAttention
    return model


def use_eager(model: nn.Module) -> nn.Module:
    """Switch ``model``'s SDPA attention layers back to transformers' eager ``BlipAttention``; returns ``model``."""
    for module in model.modules():
        if type(module) is SdpaBlipAttention:
            module.__class__ = BlipAttention
    return model
