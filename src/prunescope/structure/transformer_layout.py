"""Recognise the layout of transformer models: their layer lists, attention and feed-forward modules.

Models are recognised by their module structure, not by their class names: the layer list is an
``nn.ModuleList`` of same-class blocks that contain attention, and inside each block the attention
and the feed-forward network are matched against the layouts below. Anything else is refused with
an error naming the module, never guessed at.

Attention layouts:
    ``"qkvo"``   separate ``q_proj``/``k_proj``/``v_proj``/``o_proj`` Linears and a ``head_dim``
                 attribute, grouped-query attention allowed (Llama, Mistral, Qwen2, SmolLM2).
    ``"bert"``   ``attention.self.{query,key,value}`` and ``attention.output.dense`` (BERT, MiniLM).
    ``"fused"``  one ``c_attn`` Conv1D producing q|k|v and a ``c_proj`` Conv1D (GPT-2).
    ``"mha"``    ``nn.MultiheadAttention`` with packed ``in_proj_weight`` (torchvision ViT); shrinking
                 replaces it by :class:`~.pruned_attention.HeadPrunedAttention`.

Feed-forward layouts:
    ``"gated"``  ``gate_proj`` and ``up_proj`` rows with the matching ``down_proj`` columns (Llama ...).
    ``"bert"``   ``intermediate.dense`` rows with ``output.dense`` columns.
    ``"fused"``  ``mlp.c_fc`` columns with ``mlp.c_proj`` rows (GPT-2's Conv1D stores [in, out]).
    ``"sequential"`` an ``nn.Sequential`` of Linear, activations/dropout, Linear (torchvision ViT's MLPBlock).

Layer lists are ``nn.ModuleList`` (Hugging Face) or ``nn.Sequential`` (torchvision) containers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from ..errors import PrunescopeError
from ..layer_kinds import is_conv1d

TRANSFORMER_GRANULARITIES = ("head", "neuron", "block")
HEAD_MODES = ("kv_group", "query")

_ATTENTION_LAYOUTS = (
    "q_proj/k_proj/v_proj/o_proj with head_dim (Llama, Mistral, Qwen2), "
    "attention.self.query/key/value + attention.output.dense (BERT), c_attn/c_proj Conv1D (GPT-2), "
    "nn.MultiheadAttention with packed in_proj_weight (torchvision ViT)"
)
_MLP_LAYOUTS = (
    "gate_proj/up_proj/down_proj (Llama, Mistral, Qwen2), intermediate.dense + output.dense (BERT), mlp.c_fc/c_proj (GPT-2), "
    "nn.Sequential Linear-activation-Linear (torchvision ViT)"
)
_ELEMENTWISE = (nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Hardswish, nn.Mish, nn.Dropout, nn.Identity)


def _is_projection(module: object) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Module) and is_conv1d(module))


def out_dim(module: nn.Module) -> int:
    """Axis of the weight that indexes output features (1 for Conv1D, 0 for Linear)."""
    return 1 if is_conv1d(module) else 0


def in_dim(module: nn.Module) -> int:
    """Axis of the weight that indexes input features (0 for Conv1D, 1 for Linear)."""
    return 0 if is_conv1d(module) else 1


def out_features(module: nn.Module) -> int:
    return module.weight.shape[out_dim(module)]


def join_path(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _parameterised_children(module: nn.Module) -> dict[str, nn.Module]:
    return {name: child for name, child in module.named_children() if any(True for _ in child.parameters())}


# ---- what was found ------------------------------------------------------------------------


@dataclass(frozen=True)
class Attention:
    """One attention module. Paths are module names in the model; ``q``/``k``/``v`` are the same
    module for the fused layout, whose q, k and v column blocks start at 0, H*d and 2*H*d."""

    path: str
    layout: str
    head_dim: int
    heads: int
    kv_heads: int
    q: str
    k: str
    v: str
    out: str

    @property
    def queries_per_group(self) -> int:
        return self.heads // self.kv_heads


@dataclass(frozen=True)
class FeedForward:
    """One feed-forward network: ``producers`` output the neurons, ``consumer`` reads them."""

    path: str
    layout: str
    neurons: int
    producers: tuple[str, ...]
    consumer: str


@dataclass(frozen=True)
class LayerList:
    """An ``nn.ModuleList`` or ``nn.Sequential`` of transformer blocks, by path, with its length and
    its children's names (``"0"``, ``"1"`` ... or torchvision's ``"encoder_layer_0"`` ...)."""

    path: str
    length: int
    names: tuple[str, ...] = ()

    def layer(self, index: int) -> str:
        return join_path(self.path, self.names[index] if self.names else str(index))


# ---- layer lists ---------------------------------------------------------------------------


def _mentions_attention(module: nn.Module) -> bool:
    for name, sub in module.named_modules():
        leaf = name.rsplit(".", 1)[-1].lower()
        kind = type(sub).__name__.lower()
        if "attention" in kind or "attn" in kind or leaf in ("attn", "attention", "self_attn", "self_attention"):
            return True
    return False


def find_layer_lists(model: nn.Module) -> list[LayerList]:
    """Every ``nn.ModuleList`` of same-class blocks that contain attention (outermost ones only)."""
    found: list[LayerList] = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) == 0:
            continue
        if any(name.startswith(f"{other.path}.") for other in found):
            continue
        classes = {type(child) for child in module}
        if len(classes) == 1 and all(_mentions_attention(child) for child in module):
            found.append(LayerList(name, len(module), tuple(child for child, _ in module.named_children())))
    if not found:
        raise PrunescopeError(
            f"found no transformer layers in {type(model).__name__}: expected an nn.ModuleList of blocks "
            "that contain attention (model.layers, encoder.layer, transformer.h ...)"
        )
    return found


def has_transformer_layers(model: nn.Module) -> bool:
    """Whether :func:`find_layer_lists` finds any transformer layer list in ``model``."""
    try:
        return bool(find_layer_lists(model))
    except PrunescopeError:
        return False


def iter_layers(model: nn.Module) -> Iterator[tuple[LayerList, int, str, nn.Module]]:
    """(layer list, index, path, block) for every transformer block, in order."""
    for layers in find_layer_lists(model):
        container = model.get_submodule(layers.path)
        for index, block in enumerate(container):
            yield layers, index, layers.layer(index), block


# ---- attention -----------------------------------------------------------------------------


def _qkvo(path: str, module: nn.Module) -> Attention | None:
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    if not all(isinstance(getattr(module, n, None), nn.Linear) for n in names):
        return None
    head_dim = getattr(module, "head_dim", None)
    if not isinstance(head_dim, int):
        return None
    extra = [
        n for n, child in _parameterised_children(module).items()
        if n not in names and not all(p.shape == (head_dim,) for p in child.parameters())
    ]
    if extra:
        raise PrunescopeError(
            f"attention module {path!r} ({type(module).__name__}) has parameterised submodule(s) "
            f"{', '.join(extra)} besides q/k/v/o_proj whose shape is not per-head; prunescope cannot remove its heads exactly"
        )
    q, k, v = module.q_proj, module.k_proj, module.v_proj
    heads, rem_q = divmod(q.out_features, head_dim)
    kv_heads, rem_k = divmod(k.out_features, head_dim)
    if rem_q or rem_k or v.out_features != k.out_features or kv_heads == 0 or heads % kv_heads:
        raise PrunescopeError(
            f"attention module {path!r} ({type(module).__name__}): q_proj/k_proj/v_proj widths "
            f"{q.out_features}/{k.out_features}/{v.out_features} do not split into heads of head_dim {head_dim}"
        )
    return Attention(path, "qkvo", head_dim, heads, kv_heads, *(join_path(path, n) for n in names))


def _bert(path: str, module: nn.Module) -> Attention | None:
    inner, output = getattr(module, "self", None), getattr(module, "output", None)
    if inner is None or output is None or not isinstance(getattr(output, "dense", None), nn.Linear):
        return None
    names = ("query", "key", "value")
    if not all(isinstance(getattr(inner, n, None), nn.Linear) for n in names):
        return None
    head_dim = getattr(inner, "attention_head_size", None)
    extra = sorted(set(_parameterised_children(inner)) - set(names))
    if not isinstance(head_dim, int) or extra:
        raise PrunescopeError(
            f"attention module {join_path(path, 'self')!r} ({type(inner).__name__}) is not plain multi-head attention "
            f"(extra parameters: {', '.join(extra) or 'none'}; attention_head_size: {head_dim!r})"
        )
    heads = inner.query.out_features // head_dim
    q, k, v = (join_path(path, f"self.{n}") for n in names)
    return Attention(path, "bert", head_dim, heads, heads, q, k, v, join_path(path, "output.dense"))


def _fused(path: str, module: nn.Module) -> Attention | None:
    c_attn, c_proj = getattr(module, "c_attn", None), getattr(module, "c_proj", None)
    if not (isinstance(c_attn, nn.Module) and is_conv1d(c_attn) and isinstance(c_proj, nn.Module) and is_conv1d(c_proj)):
        return None
    head_dim, split = getattr(module, "head_dim", None), getattr(module, "split_size", None)
    if getattr(module, "is_cross_attention", False) or hasattr(module, "q_attn"):
        raise PrunescopeError(f"attention module {path!r} ({type(module).__name__}) is cross-attention; not supported")
    if not isinstance(head_dim, int) or not isinstance(split, int) or c_attn.nf != 3 * split or split % head_dim:
        raise PrunescopeError(
            f"attention module {path!r} ({type(module).__name__}): c_attn width {c_attn.nf} is not q|k|v of "
            f"split_size {split!r} in heads of head_dim {head_dim!r}"
        )
    heads = split // head_dim
    fused = join_path(path, "c_attn")
    return Attention(path, "fused", head_dim, heads, heads, fused, fused, fused, join_path(path, "c_proj"))


def _mha(path: str, module: nn.Module) -> Attention | None:
    from .pruned_attention import HeadPrunedAttention, is_plain_mha

    if isinstance(module, HeadPrunedAttention):
        heads, head_dim = module.num_heads, module.head_dim
    elif isinstance(module, nn.MultiheadAttention):
        if not is_plain_mha(module):
            raise PrunescopeError(
                f"attention module {path!r} (nn.MultiheadAttention) has separate kdim/vdim projections, bias_k/bias_v "
                "or add_zero_attn; head pruning handles packed in_proj_weight only"
            )
        heads, head_dim = module.num_heads, module.head_dim
    else:
        return None
    return Attention(path, "mha", head_dim, heads, heads, path, path, path, join_path(path, "out_proj"))


def find_attention(layer_path: str, layer: nn.Module) -> Attention:
    """The self-attention of one block, or a PrunescopeError naming the module it cannot handle."""
    for name, module in layer.named_modules():
        path = join_path(layer_path, name)
        for recognise in (_qkvo, _bert, _fused, _mha):
            found = recognise(path, module)
            if found is not None:
                return found
    for name, module in layer.named_modules():
        kind = type(module).__name__
        if name and ("attention" in kind.lower() or "attn" in name.rsplit(".", 1)[-1].lower()):
            raise PrunescopeError(
                f"unsupported attention module {join_path(layer_path, name)!r} ({kind}); head pruning handles: {_ATTENTION_LAYOUTS}"
            )
    raise PrunescopeError(f"block {layer_path!r} ({type(layer).__name__}) has no attention prunescope recognises")


# ---- feed-forward --------------------------------------------------------------------------


def find_feed_forward(layer_path: str, layer: nn.Module) -> FeedForward:
    """The feed-forward network of one block, or a PrunescopeError naming the block."""
    for name, module in layer.named_modules():
        path = join_path(layer_path, name)
        gate, up, down = (getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
        if all(isinstance(m, nn.Linear) for m in (gate, up, down)):
            extra = sorted(set(_parameterised_children(module)) - {"gate_proj", "up_proj", "down_proj"})
            if extra or gate.out_features != up.out_features or up.out_features != down.in_features:
                raise PrunescopeError(f"feed-forward {path!r} ({type(module).__name__}) is not a plain gated MLP")
            return FeedForward(path, "gated", gate.out_features, (join_path(path, "gate_proj"), join_path(path, "up_proj")),
                               join_path(path, "down_proj"))
        c_fc, c_proj = getattr(module, "c_fc", None), getattr(module, "c_proj", None)
        if isinstance(c_fc, nn.Module) and is_conv1d(c_fc) and isinstance(c_proj, nn.Module) and is_conv1d(c_proj) \
                and not hasattr(module, "c_attn"):
            if c_fc.nf != c_proj.nx or set(_parameterised_children(module)) != {"c_fc", "c_proj"}:
                raise PrunescopeError(f"feed-forward {path!r} ({type(module).__name__}) is not a plain c_fc/c_proj MLP")
            return FeedForward(path, "fused", c_fc.nf, (join_path(path, "c_fc"),), join_path(path, "c_proj"))
    for name, module in layer.named_modules():
        found = _sequential_mlp(join_path(layer_path, name), module)
        if found is not None:
            return found
    intermediate, output = getattr(layer, "intermediate", None), getattr(layer, "output", None)
    dense_in, dense_out = getattr(intermediate, "dense", None), getattr(output, "dense", None)
    if isinstance(dense_in, nn.Linear) and isinstance(dense_out, nn.Linear) and dense_in.out_features == dense_out.in_features:
        path = join_path(layer_path, "intermediate")
        return FeedForward(path, "bert", dense_in.out_features, (join_path(path, "dense"),), join_path(layer_path, "output.dense"))
    raise PrunescopeError(
        f"block {layer_path!r} ({type(layer).__name__}) has no feed-forward network prunescope recognises; "
        f"neuron pruning handles: {_MLP_LAYOUTS}"
    )


def _sequential_mlp(path: str, module: nn.Module) -> FeedForward | None:
    """``nn.Sequential(Linear, elementwise..., Linear, elementwise...)`` whose Linears meet in width."""
    if not isinstance(module, nn.Sequential):
        return None
    children = list(module.named_children())
    linears = [(n, c) for n, c in children if isinstance(c, nn.Linear)]
    if len(linears) != 2 or not isinstance(children[0][1], nn.Linear):
        return None
    others = [c for _, c in children if not isinstance(c, nn.Linear)]
    (first, producer), (second, consumer) = linears
    if any(not isinstance(c, _ELEMENTWISE) for c in others) or producer.out_features != consumer.in_features:
        return None
    return FeedForward(path, "sequential", producer.out_features, (join_path(path, first),), join_path(path, second))
