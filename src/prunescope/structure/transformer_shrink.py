"""Physically remove transformer units: new smaller Linear/Conv1D weights, fewer blocks, fixed bookkeeping."""

from __future__ import annotations

import copy
from collections import OrderedDict, defaultdict
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import PrunescopeError
from ..layer_kinds import is_conv1d
from .groups import UnitGroup
from .pruned_attention import HeadPrunedAttention
from .transformer_find import block_group, check_head_mode, head_group, neuron_group
from .transformer_layout import (
    Attention,
    FeedForward,
    LayerList,
    find_attention,
    find_feed_forward,
    find_layer_lists,
    in_dim,
    iter_layers,
    out_dim,
    out_features,
)
from .transformer_mask import check_removal, slice_indices

KEPT_BLOCKS_ATTRIBUTE = "prunescope_kept_blocks"
ORIGIN_CONFIG_ATTRIBUTE = "prunescope_origin_config"
"""The dense model's config (a dict), recorded by the first shrink, so a spec can rebuild the origin."""


def shrink_transformer(
    model: nn.Module, removals: Mapping[str, Sequence[int]], *, head_mode: str = "kv_group"
) -> nn.Module:
    """A new, physically smaller copy of ``model`` with the units in ``removals`` taken out.

    Args:
        model: a Hugging Face transformer; it is deep-copied and never changed.
        removals: group name (as from :func:`find_transformer_groups`) -> unit indices to remove.
            Head groups are attention paths, neuron groups feed-forward paths, block groups block
            paths (remove ``[0]``). Groups of different granularities may be mixed, but not a block
            with units inside it.
        head_mode: how head indices are read, ``"kv_group"`` or ``"query"`` (as in the finder).

    The copy gets new, smaller ``nn.Linear``/``Conv1D`` modules (same classes, same
    ``requires_grad``), updated per-module head counts (``num_key_value_groups``, ``num_heads``,
    ``split_size`` ...), and removed blocks deleted from their ``nn.ModuleList`` with
    ``layer_idx``, ``config.num_hidden_layers`` and ``config.layer_types`` renumbered. When every
    layer keeps the same head and neuron counts and the config can say so (``intermediate_size``,
    ``num_attention_heads``/``num_key_value_heads``/``head_dim``), the config is patched too, so
    ``save_pretrained`` output loads in plain transformers; otherwise it keeps the origin's counts.
    ``model.prunescope_kept_blocks`` records, per layer list, (original length, original indices of
    the kept blocks), and ``model.prunescope_origin_config`` the dense config (first shrink only).
    """
    result = copy.deepcopy(model)
    shrink_in_place(result, removals, head_mode=head_mode)
    return result


def shrink_in_place(model: nn.Module, removals: Mapping[str, Sequence[int]], *, head_mode: str = "kv_group") -> None:
    """:func:`shrink_transformer` without the copy: ``model`` itself is shrunk."""
    check_head_mode(head_mode)
    groups, attentions, ffns = _groups_named(model, removals, head_mode)
    plan = {name: check_removal(groups[name], indices) for name, indices in removals.items()}
    blocks = {name for name, indices in plan.items() if groups[name].granularity == "block" and indices}
    inside = [name for name in plan if plan[name] and any(name.startswith(f"{b}.") for b in blocks)]
    if inside:
        raise PrunescopeError(f"removals name units inside removed blocks: {', '.join(inside[:5])}; drop one or the other")
    if hasattr(getattr(model, "config", None), "to_dict") and not hasattr(model, ORIGIN_CONFIG_ATTRIBUTE):
        setattr(model, ORIGIN_CONFIG_ATTRIBUTE, model.config.to_dict())
    for name in plan:
        if name in attentions and plan[name] and attentions[name].layout == "mha":
            _replace_mha(model, name)
    _slice_units(model, [(groups[n], plan[n]) for n in plan if groups[n].granularity != "block" and plan[n]])
    for name in plan:
        if name in attentions and plan[name]:
            _sync_attention(model, attentions[name])
        if name in ffns and plan[name]:
            _sync_feed_forward(model, ffns[name])
    if blocks:
        _drop_blocks(model, blocks)
    patch_uniform_config(model)


# ---- which groups ------------------------------------------------------------------------


def _groups_named(
    model: nn.Module, removals: Mapping[str, Sequence[int]], head_mode: str
) -> tuple[dict[str, UnitGroup], dict[str, Attention], dict[str, FeedForward]]:
    """The groups that ``removals`` names, found block by block (only the blocks it touches)."""
    groups: dict[str, UnitGroup] = {}
    attentions: dict[str, Attention] = {}
    ffns: dict[str, FeedForward] = {}
    block_paths = []
    for _, _, path, layer in iter_layers(model):
        block_paths.append(path)
        if path in removals:
            groups[path] = block_group(path, layer)
        wanted = [name for name in removals if name.startswith(f"{path}.")]
        if not wanted:
            continue
        errors: list[PrunescopeError] = []
        try:
            ffn = find_feed_forward(path, layer)
            if ffn.path in wanted:
                groups[ffn.path], ffns[ffn.path] = neuron_group(model, ffn), ffn
        except PrunescopeError as error:
            errors.append(error)
        try:
            attention = find_attention(path, layer)
            if attention.path in wanted:
                groups[attention.path], attentions[attention.path] = head_group(model, attention, head_mode), attention
        except PrunescopeError as error:
            errors.append(error)
        if any(name not in groups for name in wanted) and errors:
            raise errors[0]
    unknown = [name for name in removals if name not in groups]
    if unknown:
        raise PrunescopeError(
            f"removals name groups this model does not have: {', '.join(unknown[:5])}; groups are block paths "
            f"(e.g. {block_paths[0]!r}) and the attention / feed-forward paths inside them"
        )
    return groups, attentions, ffns


# ---- slicing weights -----------------------------------------------------------------------


def _slice_units(model: nn.Module, removals: list[tuple[UnitGroup, list[int]]]) -> None:
    """Replace the weights of every module a removal touches by its kept rows/columns."""
    removed: dict[tuple[str, int], set[int]] = defaultdict(set)
    for group, indices in removals:
        for s in group.slices:
            removed[(s.tensor, s.dim)].update(slice_indices(s.offset, s.width, indices).tolist())
    modules = dict(model.named_modules())
    touched: dict[str, dict[str, set[int]]] = defaultdict(lambda: {"out": set(), "in": set()})
    for (tensor, dim), indices in removed.items():
        path, _, name = tensor.rpartition(".")
        module = modules[path]
        side = "out" if (name == "bias" or dim == out_dim(module)) else "in"
        touched[path][side] |= indices
    for path, sides in touched.items():
        _slice_module(path, modules[path], sides["out"], sides["in"])


def _kept(size: int, removed: set[int]) -> torch.Tensor | None:
    return torch.tensor([i for i in range(size) if i not in removed], dtype=torch.long) if removed else None


def _replace_mha(model: nn.Module, path: str) -> None:
    """Swap the ``nn.MultiheadAttention`` at ``path`` for an equal :class:`HeadPrunedAttention`."""
    module = model.get_submodule(path)
    if isinstance(module, HeadPrunedAttention):
        return
    parent_path, _, attribute = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, attribute, HeadPrunedAttention.from_mha(module))


def _slice_packed_attention(module: HeadPrunedAttention, remove_out: set[int]) -> None:
    """Keep the rows of ``in_proj_weight``/``in_proj_bias`` that belong to kept heads."""
    keep = _kept(module.in_proj_weight.shape[0], remove_out)
    if keep is None:
        return
    with torch.no_grad():
        for name in ("in_proj_weight", "in_proj_bias"):
            old = getattr(module, name)
            if old is not None:
                setattr(module, name, nn.Parameter(old.detach().index_select(0, keep.to(old.device)).clone(),
                                                   requires_grad=old.requires_grad))


def _slice_module(path: str, module: nn.Module, remove_out: set[int], remove_in: set[int]) -> None:
    if isinstance(module, HeadPrunedAttention) and not remove_in:
        _slice_packed_attention(module, remove_out)
        return
    if not (isinstance(module, nn.Linear) or is_conv1d(module)):
        raise PrunescopeError(f"cannot shrink {path!r} ({type(module).__name__}): only Linear and Conv1D are sliced")
    if parametrize.is_parametrized(module):
        raise PrunescopeError(f"{path!r} carries a parametrization (a mask); call make_permanent first")
    weight = module.weight
    keep_out = _kept(weight.shape[out_dim(module)], remove_out)
    keep_in = _kept(weight.shape[in_dim(module)], remove_in)
    with torch.no_grad():
        new = weight.detach()
        if keep_out is not None:
            new = new.index_select(out_dim(module), keep_out.to(new.device))
        if keep_in is not None:
            new = new.index_select(in_dim(module), keep_in.to(new.device))
        module.weight = nn.Parameter(new.clone(), requires_grad=weight.requires_grad)
        bias = getattr(module, "bias", None)
        if bias is not None and keep_out is not None:
            module.bias = nn.Parameter(bias.detach().index_select(0, keep_out.to(bias.device)).clone(),
                                       requires_grad=bias.requires_grad)
    if is_conv1d(module):
        module.nx, module.nf = module.weight.shape
    else:
        module.out_features, module.in_features = module.weight.shape


# ---- per-module bookkeeping ----------------------------------------------------------------


def _sync_attention(model: nn.Module, attention: Attention) -> None:
    """Set the head counts the attention forward reads from the new projection widths."""
    module = model.get_submodule(attention.path)
    d = attention.head_dim
    if attention.layout == "qkvo":
        heads, kv_heads = module.q_proj.out_features // d, module.k_proj.out_features // d
        module.num_key_value_groups = heads // kv_heads
        for name, value in (("num_heads", heads), ("num_attention_heads", heads), ("num_key_value_heads", kv_heads)):
            if isinstance(getattr(module, name, None), int):
                setattr(module, name, value)
    elif attention.layout == "mha":
        module.num_heads = module.in_proj_weight.shape[0] // (3 * d)
    elif attention.layout == "bert":
        inner = module.self
        inner.num_attention_heads = inner.query.out_features // d
        inner.all_head_size = inner.num_attention_heads * d
    else:
        module.split_size = module.c_attn.nf // 3
        module.num_heads = module.split_size // d


def _sync_feed_forward(model: nn.Module, ffn: FeedForward) -> None:
    module = model.get_submodule(ffn.path)
    if isinstance(getattr(module, "intermediate_size", None), int):
        module.intermediate_size = out_features(model.get_submodule(ffn.producers[0]))


# ---- blocks --------------------------------------------------------------------------------


def _drop_blocks(model: nn.Module, blocks: set[str]) -> None:
    """Delete blocks from their ModuleList, renumber ``layer_idx`` and the config's layer bookkeeping."""
    lists = find_layer_lists(model)
    touched = [layers for layers in lists if any(layers.layer(i) in blocks for i in range(layers.length))]
    config = getattr(model, "config", None)
    if config is not None and len(lists) > 1:
        raise PrunescopeError(
            f"removing blocks of a model with several layer lists ({', '.join(x.path for x in lists)}) is not "
            "supported: the config's layer count cannot say which list shrank"
        )
    record = dict(getattr(model, KEPT_BLOCKS_ATTRIBUTE, {}) or {})
    for layers in touched:
        container = model.get_submodule(layers.path)
        keep = [i for i in range(layers.length) if layers.layer(i) not in blocks]
        children = list(container.named_children())
        # in place, so a top-level container works too; a Sequential keeps its children's names
        # (torchvision's "encoder_layer_2"), a ModuleList is renumbered 0..n-1 as it must be
        container._modules = OrderedDict(
            (children[i][0] if isinstance(container, nn.Sequential) else str(slot), children[i][1]) for slot, i in enumerate(keep)
        )
        for new_index, i in enumerate(keep):
            for module in children[i][1].modules():
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.layer_idx = new_index
        origin_length, previous = record.get(layers.path, (layers.length, list(range(layers.length))))
        record[layers.path] = (origin_length, [previous[i] for i in keep])
        _renumber_config(config, layers, keep)
    setattr(model, KEPT_BLOCKS_ATTRIBUTE, record)


def _renumber_config(config: object, layers: LayerList, keep: list[int]) -> None:
    if config is None or getattr(config, "num_hidden_layers", None) != layers.length:
        return
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == layers.length:
        config.layer_types = [layer_types[i] for i in keep]
    config.num_hidden_layers = len(keep)


# ---- the config, when it can describe the shrunk model -------------------------------------


def layer_counts(model: nn.Module) -> list[tuple[LayerList, list[tuple[tuple[int, int] | None, int | None]]]]:
    """Per layer list, per block: ((query heads, KV heads) or None, neurons or None).

    None means the block's attention / feed-forward is not one prunescope recognises.
    """
    result = []
    for layers in find_layer_lists(model):
        container = model.get_submodule(layers.path)
        counts = []
        for index, layer in enumerate(container):
            path = layers.layer(index)
            try:
                attention = find_attention(path, layer)
                heads: tuple[int, int] | None = (attention.heads, attention.kv_heads)
            except PrunescopeError:
                heads = None
            try:
                neurons: int | None = find_feed_forward(path, layer).neurons
            except PrunescopeError:
                neurons = None
            counts.append((heads, neurons))
        result.append((layers, counts))
    return result


def config_describes(model: nn.Module, config: object | None = None) -> bool:
    """Whether building ``type(model)`` from ``config`` (default: ``model.config``) gives exactly
    the parameter shapes of ``model`` and the same attention ``scaling``: then plain
    ``transformers`` can load ``model`` from ``save_pretrained`` output. Built on the meta device."""
    config = model.config if config is None else config
    try:
        with torch.device("meta"):
            reference = type(model)(copy.deepcopy(config))
    except Exception:  # noqa: BLE001 - any failure to build means "no"
        return False
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    if ours != theirs:
        return False
    mine = dict(model.named_modules())
    for name, module in reference.named_modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, float) and getattr(mine.get(name), "scaling", None) != scaling:
            return False
    return True


def patch_uniform_config(model: nn.Module) -> bool:
    """Write uniform head / neuron counts into ``model.config`` if the config then describes the model.

    Returns True when ``model.config`` describes ``model`` afterwards (plain-transformers loadable).
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return False
    counts = [c for _, layer in layer_counts(model) for c in layer]
    changes: dict[str, int] = {}
    heads = {c[0] for c in counts}
    if len(heads) == 1 and None not in heads:
        ((q, kv),) = heads
        changes["num_attention_heads"] = q
        if hasattr(config, "num_key_value_heads"):
            changes["num_key_value_heads"] = kv
        attention = next(find_attention(path, layer) for _, _, path, layer in iter_layers(model))
        if attention.layout == "qkvo":
            changes["head_dim"] = attention.head_dim
    neurons = {c[1] for c in counts}
    if len(neurons) == 1 and None not in neurons:
        (n,) = neurons
        key = "intermediate_size" if hasattr(config, "intermediate_size") else "n_inner" if hasattr(config, "n_inner") else None
        if key is not None:
            changes[key] = n
    changes = {k: v for k, v in changes.items() if getattr(config, k, None) != v}
    if changes:
        candidate = copy.deepcopy(config)
        for key, value in changes.items():
            setattr(candidate, key, value)
        if config_describes(model, candidate):
            for key, value in changes.items():
                setattr(config, key, value)
            return True
    return config_describes(model)
