"""Find the structured units of transformer models: attention heads, FFN neurons and blocks, as
:class:`~.groups.UnitGroup` values over the layouts :mod:`.transformer_layout` recognises."""

from __future__ import annotations

from torch import nn

from ..errors import PrunescopeError
from .groups import Slice, UnitGroup
from .transformer_layout import (
    HEAD_MODES,
    TRANSFORMER_GRANULARITIES,
    Attention,
    FeedForward,
    find_attention,
    find_feed_forward,
    in_dim,
    iter_layers,
    join_path,
    out_dim,
)

# ---- unit groups ---------------------------------------------------------------------------


def _tensor_slices(model_modules: dict[str, nn.Module], path: str, side: str, offset: int, width: int) -> list[Slice]:
    """Slices of module ``path``'s weight (and bias for ``side="out"``) along its output or input axis."""
    module = model_modules[path]
    if side == "in":
        return [Slice(f"{path}.weight", in_dim(module), offset, width, "in")]
    slices = [Slice(f"{path}.weight", out_dim(module), offset, width, "out")]
    if getattr(module, "bias", None) is not None:
        slices.append(Slice(f"{path}.bias", 0, offset, width, "bias"))
    return slices


def _params_per_unit(model: nn.Module, slices: list[Slice]) -> int:
    state = dict(model.named_parameters(remove_duplicate=False))
    total = 0
    for s in slices:
        tensor = state[s.tensor]
        total += s.width * tensor.numel() // tensor.shape[s.dim]
    return total


def head_group(model: nn.Module, attention: Attention, head_mode: str = "kv_group") -> UnitGroup:
    """The head units of one attention module (see :func:`find_transformer_groups` for the modes)."""
    modules = dict(model.named_modules())
    a, d = attention, attention.head_dim
    slices: list[Slice] = []
    if a.layout in ("fused", "mha"):
        split = a.heads * d
        if head_mode == "query" and a.heads == a.kv_heads:
            _no_query_mode(a, modules)
        for part in range(3):
            if a.layout == "fused":
                slices += _tensor_slices(modules, a.q, "out", part * split, d)
            else:
                slices.append(Slice(f"{a.q}.in_proj_weight", 0, part * split, d, "out"))
                if modules[a.q].in_proj_bias is not None:
                    slices.append(Slice(f"{a.q}.in_proj_bias", 0, part * split, d, "bias"))
        slices += _tensor_slices(modules, a.out, "in", 0, d)
        units = a.heads
    elif head_mode == "kv_group":
        group_width = a.queries_per_group * d
        slices += _tensor_slices(modules, a.q, "out", 0, group_width)
        slices += _tensor_slices(modules, a.k, "out", 0, d)
        slices += _tensor_slices(modules, a.v, "out", 0, d)
        slices += _tensor_slices(modules, a.out, "in", 0, group_width)
        units = a.kv_heads
    else:
        if a.queries_per_group == 1:
            _no_query_mode(a, modules)
        group_width = a.queries_per_group * d
        for g in range(a.kv_heads):
            slices += _tensor_slices(modules, a.q, "out", g * group_width, d)
        for g in range(a.kv_heads):
            slices += _tensor_slices(modules, a.out, "in", g * group_width, d)
        units = a.queries_per_group
    return UnitGroup(a.path, "head", units, _params_per_unit(model, slices), tuple(slices))


def _no_query_mode(attention: Attention, modules: dict[str, nn.Module]) -> None:
    raise PrunescopeError(
        f"head_mode='query' needs grouped-query attention, but {attention.path!r} "
        f"({type(modules[attention.path]).__name__}) has {attention.heads} query heads and {attention.kv_heads} KV heads; "
        "use head_mode='kv_group' (every head is its own KV group here)"
    )


def neuron_group(model: nn.Module, ffn: FeedForward) -> UnitGroup:
    """The neuron units of one feed-forward network: producer rows (and biases) plus consumer columns."""
    modules = dict(model.named_modules())
    slices: list[Slice] = []
    for producer in ffn.producers:
        slices += _tensor_slices(modules, producer, "out", 0, 1)
    slices += _tensor_slices(modules, ffn.consumer, "in", 0, 1)
    return UnitGroup(ffn.path, "neuron", ffn.neurons, _params_per_unit(model, slices), tuple(slices))


def block_group(layer_path: str, layer: nn.Module) -> UnitGroup:
    """A whole block as one unit (``min_units=0``): removing it makes the block the identity."""
    slices = tuple(
        Slice(join_path(layer_path, name), 0, 0, p.shape[0] if p.dim() else 1, "block")
        for name, p in layer.named_parameters()
    )
    params = sum(p.numel() for p in layer.parameters())
    return UnitGroup(layer_path, "block", 1, params, slices, min_units=0)


def check_head_mode(head_mode: str) -> str:
    if head_mode not in HEAD_MODES:
        raise PrunescopeError(f"unknown head_mode {head_mode!r}; accepted: {', '.join(HEAD_MODES)}")
    return head_mode


def find_transformer_groups(model: nn.Module, granularity: str, *, head_mode: str = "kv_group") -> list[UnitGroup]:
    """The removable units of a Hugging Face transformer, one :class:`UnitGroup` per block.

    Args:
        model: a transformer (causal LM, encoder ...); it is only read.
        granularity: ``"head"`` (one group per attention module, named by its path),
            ``"neuron"`` (one group per feed-forward network, units = intermediate neurons) or
            ``"block"`` (one single-unit group per block, named by its path, ``min_units=0``).
        head_mode: how heads are counted under grouped-query attention (GQA).
            ``"kv_group"`` (default): a unit is one KV head together with the query heads that read
            it. This is the default because it is the only mode that also removes key/value
            projections and shrinks the KV cache, it keeps every layer a valid GQA layout, and on
            models without GQA it is simply "one head". ``"query"``: a unit is one query head in
            *every* KV group at once (unit ``j`` = the ``j``-th query head of each group), so the
            heads per group stay equal; K/V and the cache are untouched. Needs GQA.

    Returns:
        Groups in layer order. Each slice names a state_dict tensor; ``role="in"`` slices are the
        output-projection columns (heads) or down-projection columns (neurons) that masking zeroes.
    """
    if granularity not in TRANSFORMER_GRANULARITIES:
        raise PrunescopeError(f"unknown granularity {granularity!r}; accepted: {', '.join(TRANSFORMER_GRANULARITIES)}")
    check_head_mode(head_mode)
    groups = []
    for _, _, path, layer in iter_layers(model):
        if granularity == "head":
            groups.append(head_group(model, find_attention(path, layer), head_mode))
        elif granularity == "neuron":
            groups.append(neuron_group(model, find_feed_forward(path, layer)))
        else:
            groups.append(block_group(path, layer))
    return groups
