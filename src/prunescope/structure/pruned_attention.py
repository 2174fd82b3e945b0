"""A multi-head attention whose heads are narrower in total than its embedding: what
``nn.MultiheadAttention`` becomes once heads are removed.

``nn.MultiheadAttention`` ties the width of every head to ``embed_dim / num_heads``, so a layer
with heads removed cannot be one. :class:`HeadPrunedAttention` keeps its parameter names
(``in_proj_weight`` [3*H*d, E], ``in_proj_bias`` [3*H*d], ``out_proj`` Linear(H*d -> E)) and its
call signature, so the blocks that call it (torchvision's ViT ``EncoderBlock``) run unchanged and
state_dict keys stay the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PrunescopeError


def is_plain_mha(module: nn.Module) -> bool:
    """An ``nn.MultiheadAttention`` whose heads can be removed exactly: packed q/k/v input
    projection, no ``bias_k``/``bias_v``, no ``add_zero_attn``."""
    return (
        isinstance(module, nn.MultiheadAttention)
        and module._qkv_same_embed_dim
        and module.in_proj_weight is not None
        and module.bias_k is None
        and not module.add_zero_attn
    )


class HeadPrunedAttention(nn.Module):
    """Multi-head attention with ``num_heads`` heads of ``head_dim`` over an ``embed_dim`` stream.

    Computes what ``nn.MultiheadAttention`` computes (same projections, scaling 1/sqrt(head_dim),
    attention dropout in training, masks), for any ``num_heads * head_dim``.
    """

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, *, bias: bool = True, dropout: float = 0.0,
                 batch_first: bool = False) -> None:
        super().__init__()
        if num_heads < 1 or head_dim < 1:
            raise PrunescopeError(f"HeadPrunedAttention needs at least one head of positive width; got {num_heads} x {head_dim}")
        inner = num_heads * head_dim
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.dropout, self.batch_first = dropout, batch_first
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner)) if bias else None
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)
        nn.init.xavier_uniform_(self.in_proj_weight)

    @classmethod
    def from_mha(cls, module: nn.MultiheadAttention) -> HeadPrunedAttention:
        """The same attention as ``module`` (shares no storage with it), ready to lose heads."""
        if not is_plain_mha(module):
            raise PrunescopeError(
                "only nn.MultiheadAttention with packed q/k/v (kdim = vdim = embed_dim), no bias_k/bias_v and no "
                "add_zero_attn can lose heads"
            )
        result = cls(module.embed_dim, module.num_heads, module.head_dim, bias=module.in_proj_bias is not None,
                     dropout=module.dropout, batch_first=module.batch_first)
        result.to(device=module.in_proj_weight.device, dtype=module.in_proj_weight.dtype)
        with torch.no_grad():
            result.in_proj_weight.copy_(module.in_proj_weight)
            result.out_proj.weight.copy_(module.out_proj.weight)
            if result.in_proj_bias is not None:
                result.in_proj_bias.copy_(module.in_proj_bias)
                result.out_proj.bias.copy_(module.out_proj.bias)
        for mine, theirs in ((result.in_proj_weight, module.in_proj_weight), (result.out_proj.weight, module.out_proj.weight)):
            mine.requires_grad_(theirs.requires_grad)
        result.train(module.training)
        return result

    def _heads(self, x: torch.Tensor, part: int) -> torch.Tensor:
        """Project ``x`` [batch, length, E] with q (0), k (1) or v (2) into [batch, heads, length, d]."""
        inner = self.num_heads * self.head_dim
        weight = self.in_proj_weight[part * inner:(part + 1) * inner]
        bias = None if self.in_proj_bias is None else self.in_proj_bias[part * inner:(part + 1) * inner]
        projected = F.linear(x, weight, bias)
        return projected.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Same arguments and returns as ``nn.MultiheadAttention.forward``."""
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        q, k, v = self._heads(query, 0), self._heads(key, 1), self._heads(value, 2)
        bias = self._attention_bias(attn_mask, key_padding_mask, q, k, is_causal)
        weights = torch.softmax(q @ k.transpose(-2, -1) / self.head_dim ** 0.5 + bias, dim=-1)
        attended = F.dropout(weights, self.dropout, self.training) @ v
        output = self.out_proj(attended.transpose(1, 2).flatten(2))
        if not self.batch_first:
            output = output.transpose(0, 1)
        if not batched:
            output = output.squeeze(1)
        if not need_weights:
            return output, None
        if average_attn_weights:
            weights = weights.mean(1)
        return output, weights if batched else weights.squeeze(0)

    def _attention_bias(self, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, q: torch.Tensor,
                        k: torch.Tensor, is_causal: bool) -> torch.Tensor:
        """Additive bias [batch or 1, heads or 1, Lq, Lk]: -inf where a boolean mask is True."""
        batch, length_q, length_k = q.shape[0], q.shape[2], k.shape[2]
        bias = q.new_zeros(1, 1, length_q, length_k)
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(length_q, length_k, dtype=torch.bool, device=q.device).triu(1)
        for mask, shape in ((attn_mask, None), (key_padding_mask, (batch, 1, 1, length_k))):
            if mask is None:
                continue
            if mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(mask, float("-inf"))
            if shape is not None:
                mask = mask.reshape(shape)
            elif mask.dim() == 3:
                mask = mask.reshape(batch, self.num_heads, length_q, length_k)
            bias = bias + mask.to(q.dtype)
        return bias
