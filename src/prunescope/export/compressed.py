"""Format ``compressed-tensors``: the sparse checkpoint llm-compressor writes (bitmask-compressed
Linear weights, ``sparsity_config`` in config.json), written and read by the compressed-tensors package.

Only compressed-tensors <= 0.14 has the sparse compressors (0.15 removed them, and transformers >= 5
needs 0.15), so such a folder loads through :func:`load_compressed` (``prunescope.load``), not through
``from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import PrunescopeError
from .baking import check_same_weights

FORMAT = "compressed-tensors"
PIN = "pip install --no-deps compressed-tensors==0.14.0.1"
MIN_SPARSITY = 0.1
"""A Linear is compressed when at least this fraction of its weight is zeros; below it the bitmask
(1 bit per entry) and row offsets would save too little."""
COMPRESSIBLE = ("Linear", "Conv1D")


def check_package() -> None:
    """Refuse early when compressed-tensors with its sparse compressors is not installed."""
    try:
        import compressed_tensors
    except ImportError:
        raise PrunescopeError(f"format {FORMAT!r} needs the compressed-tensors package: {PIN}") from None
    try:
        from compressed_tensors.compressors import sparse_compressors  # noqa: F401
    except ImportError:
        raise PrunescopeError(
            f"compressed-tensors {compressed_tensors.__version__} has no sparse compressors (removed in 0.15): {PIN}"
        ) from None


def _is_24(weight: torch.Tensor) -> bool:
    """At most 2 non-zeros in each group of 4 along the last dimension (the layout 2:4 kernels read)."""
    if weight.dim() != 2 or weight.shape[-1] % 4:
        return False
    return bool(((weight.reshape(-1, 4) != 0).sum(dim=1) <= 2).all())


def sparsity_config(model: nn.Module) -> Any:
    """The ``SparsityCompressionConfig`` of ``model``: its sparse Linear (and GPT-2 Conv1D) layers as
    targets by class, the others of those classes ignored, ``sparse-24-bitmask`` when every target is 2:4."""
    from compressed_tensors.config import SparsityCompressionConfig

    candidates = {name: m for name, m in model.named_modules()
                  if type(m).__name__ in COMPRESSIBLE and getattr(m, "weight", None) is not None and m.weight.dim() == 2}
    sparse = {name: m for name, m in candidates.items() if float((m.weight == 0).float().mean()) >= MIN_SPARSITY}
    if not sparse:
        raise PrunescopeError(
            f"format {FORMAT!r} stores sparse Linear weights, but no Linear layer of this model is at least "
            f"{MIN_SPARSITY:.0%} zeros; use format 'hf'"
        )
    classes = sorted({type(m).__name__ for m in sparse.values()})
    ignore = [name for name, m in model.named_modules()
              if name not in sparse and any(c.__name__ in classes for c in type(m).__mro__)]
    zeros = sum(int((m.weight == 0).sum()) for m in sparse.values())
    total = sum(m.weight.numel() for m in sparse.values())
    two_four = all(_is_24(m.weight) for m in sparse.values())
    return SparsityCompressionConfig.load_from_registry(
        "sparse-24-bitmask" if two_four else "sparse-bitmask", targets=classes, ignore=ignore,
        global_sparsity=zeros / total, sparsity_structure="2:4" if two_four else "unstructured",
    )


def write_compressed(baked: nn.Module, folder: Path) -> dict[str, Any]:
    """Write ``baked`` (a transformers model, masks baked) compressed into ``folder``; check it decompresses exactly."""
    from compressed_tensors.compressors import ModelCompressor

    from ..structure.transformer_shrink import config_describes

    if not config_describes(baked):
        raise PrunescopeError(
            f"format {FORMAT!r} needs a stock config, but this shrunk model keeps different head or neuron counts "
            "in different blocks; use format 'prunescope'"
        )
    config = sparsity_config(baked)
    compressor = ModelCompressor(sparsity_config=config)
    baked.save_pretrained(folder, state_dict=compressor.compress(baked))
    compressor.update_config(str(folder))
    check_same_weights(baked, load_compressed(folder), f"the {FORMAT} folder")
    dense = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in baked.state_dict().values()}.values())
    written = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return {
        "loader": "prunescope.load (decompresses with compressed-tensors)",
        "notes": [f"{config.format}: {len(config.ignore)} layer(s) of {', '.join(config.targets)} left dense"],
        "check": {"sparsity_format": config.format, "global_sparsity": round(config.global_sparsity, 6),
                  "weights_bytes": written, "dense_bytes": dense, "ratio": round(written / dense, 4)},
    }


def is_compressed(folder: Path) -> bool:
    """Whether ``folder``'s config.json carries a compressed-tensors ``sparsity_config``."""
    import json

    config_file = folder / "config.json"
    if not config_file.exists():
        return False
    quantization = json.loads(config_file.read_text()).get("quantization_config") or {}
    return quantization.get("quant_method") == FORMAT and bool(quantization.get("sparsity_config"))


def load_compressed(folder: str | Path) -> nn.Module:
    """The dense model of a compressed-tensors sparse folder, decompressed by the package (eval mode).

    Every tensor the architecture has must come from the file (tied weights aside).
    """
    check_package()
    import transformers
    from compressed_tensors.compressors import ModelCompressor

    folder = Path(folder)
    config = transformers.AutoConfig.from_pretrained(folder)
    compressor = ModelCompressor.from_pretrained(str(folder))
    if compressor is None or compressor.sparsity_compressor is None:
        raise PrunescopeError(f"{folder} has no compressed-tensors sparsity_config in its config.json")
    architectures = getattr(config, "architectures", None) or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if not isinstance(cls, type):
        raise PrunescopeError(f"{folder}/config.json names no transformers model class (architectures: {architectures})")
    del config.quantization_config
    model = cls(config)
    dense = dict(compressor.sparsity_compressor.decompress(str(folder)))
    state = model.state_dict()
    unknown = [k for k in dense if k not in state or tuple(state[k].shape) != tuple(dense[k].shape)]
    if unknown:
        raise PrunescopeError(f"{folder} holds tensor {unknown[0]!r}, which {cls.__name__} built from its config does not have in that shape")
    model.load_state_dict(dense, strict=False)
    loaded = {state[k].data_ptr() for k in dense}
    missing = [k for k in state if k not in dense and state[k].data_ptr() not in loaded]
    if missing:
        raise PrunescopeError(f"{folder} lacks {len(missing)} tensor(s) of {cls.__name__}, e.g. {missing[0]}")
    return model.eval()
