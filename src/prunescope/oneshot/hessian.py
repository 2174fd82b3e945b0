"""Statistics of a Linear layer's inputs over calibration tokens: H = X^T X and column norms.

A Linear computes ``y = x W^T`` on the last axis, so its inputs are rows ``x_t`` of length
``in_features``, one per token (any leading dimensions are flattened). The squared reconstruction
error of a changed weight is ``||(W - W') X^T||^2 = sum over rows of dW H dW^T`` with
``H = sum_t x_t x_t^T``: SparseGPT needs H, Wanda only its diagonal (the squared column norms).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..batches import run_model
from ..errors import PrunescopeError, forward_failed
from .layers import in_features


class InputStats:
    """Running sums over the calibration tokens one layer saw.

    Attributes:
        hessian: ``H = sum_t x_t x_t^T``, float64 [in, in] (None when only norms are gathered).
        sq_norms: ``sum_t x_t^2`` per input feature, float64 [in] (= the diagonal of H).
        tokens: input rows seen (tokens, or samples for 2-D inputs).

    Each call's product is formed in the input's precision (float32 for float32/16 inputs: a
    call holds one batch, a few thousand tokens at most) and summed into the float64 totals.
    """

    def __init__(self, features: int, hessian: bool) -> None:
        self.features = features
        self.hessian: torch.Tensor | None = torch.zeros(features, features, dtype=torch.float64) if hessian else None
        self.sq_norms = torch.zeros(features, dtype=torch.float64)
        self.tokens = 0

    @property
    def norms(self) -> torch.Tensor:
        """Euclidean norm ``||x_j||_2`` of each input feature over all tokens, float64 [in]."""
        return self.sq_norms.sqrt()

    @property
    def nbytes(self) -> int:
        """Memory held, in bytes."""
        return self.sq_norms.numel() * 8 + (0 if self.hessian is None else self.hessian.numel() * 8)

    def add(self, x: torch.Tensor, product: torch.Tensor | None = None) -> None:
        """Add the rows of ``x`` [..., in]; ``product`` is ``x^T x`` when already computed."""
        rows = _rows(x, self.features)
        if self.hessian is not None:
            if product is None:
                product = rows.t() @ rows
            self.hessian.add_(product.to(device=self.hessian.device, dtype=torch.float64))
            self.sq_norms.add_(product.diagonal().to(device=self.sq_norms.device, dtype=torch.float64))
        else:
            self.sq_norms.add_(rows.pow(2).sum(dim=0).to(device=self.sq_norms.device, dtype=torch.float64))
        self.tokens += rows.shape[0]


def _rows(x: torch.Tensor, features: int) -> torch.Tensor:
    if x.shape[-1] != features:
        raise PrunescopeError(f"a layer input has {x.shape[-1]} features on its last axis; its weight expects {features}")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.detach().reshape(-1, features).to(dtype)


class StatsCollector:
    """Forward hooks that feed each named layer's inputs into an :class:`InputStats`.

    Layers that receive the very same input tensor in a row (q/k/v projections, gate/up) share
    one ``x^T x`` product. Use as a context manager; the hooks are removed on exit.
    """

    def __init__(self, modules: Mapping[str, nn.Module], hessian: bool) -> None:
        self.modules = dict(modules)
        self.stats = {name: InputStats(in_features(m), hessian) for name, m in self.modules.items()}
        self._hessian = hessian
        self._handles: list[Any] = []
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def __enter__(self) -> StatsCollector:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._last = None

    def _hook(self, name: str):
        def hook(_module: nn.Module, inputs: tuple, _output: Any) -> None:
            if not inputs or not isinstance(inputs[0], torch.Tensor):
                raise PrunescopeError(f"layer {name!r} was called without a tensor as its first input")
            x = inputs[0]
            stats = self.stats[name]
            product = None
            if self._hessian:
                if self._last is not None and self._last[0] is x:
                    product = self._last[1]
                else:
                    rows = _rows(x, stats.features)
                    product = rows.t() @ rows
                    self._last = (x, product)
            stats.add(x, product)

        return hook

    def forget_last(self) -> None:
        """Drop the cached product (call between batches so no activation is kept alive)."""
        self._last = None


def collect_input_stats(
    model: nn.Module, modules: Mapping[str, nn.Module], batches: Iterable[Any], hessian: bool
) -> dict[str, InputStats]:
    """Run ``model`` over ``batches`` (eval mode, no gradients) and gather the inputs of ``modules``.

    Train/eval flags are restored afterwards; nothing else of the model is touched.
    """
    from ..modes import eval_mode

    with StatsCollector(modules, hessian) as collector, eval_mode(model), torch.no_grad():
        for index, batch in enumerate(batches):
            try:
                run_model(model, batch)
            except PrunescopeError:
                raise
            except Exception as error:
                raise forward_failed(error, f"calibration batch {index}") from error
            collector.forget_last()
    return collector.stats
