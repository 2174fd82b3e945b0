"""Channel groups as prunescope offers them: found on the traced graph with a bounded search, then
checked by running them.

Torch-Pruning's coupling can be wrong in ways no op list shows: a ``chunk`` or ``split`` whose
piece sizes follow the channel count, a constant computed from ``x.shape[1]``. So every group
is checked before it is offered: a few of its units are removed both as masks (the way a scan
removes them) and by shrinking a copy of the model, and the two outputs must agree within
``TOLERANCE``; a group that fails, or whose shrunk model does not run, is refused by name. All
groups are checked at once on the copy the discovery traced (one prune and two forward passes);
only when that fails are the groups bisected, each half on a freshly traced copy.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections import deque
from typing import Any

from torch import nn

from ..errors import PrunescopeError
from .channel_graph import ChannelTrace, trace_channels
from .channel_search import SEARCH_SECONDS, SEARCH_STEPS, SearchBudget
from .channel_shrink import TOLERANCE, _output, masked_output, prune_traced, relative_difference
from .channels import CoupledGroup, coupled_groups
from .groups import UnitGroup


def probe_units(model: nn.Module, group: UnitGroup) -> list[int]:
    """Units the check removes: the first and the last two (fewer in a small group), a count and
    placement that no even split of the channels absorbs; with GroupNorms in the group, a multiple
    of their number of groups (the first ones). Empty when nothing can be removed."""
    modules = dict(model.named_modules())
    step = 1
    for s in group.slices:
        module = modules.get(s.tensor.rsplit(".", 1)[0])
        if s.role == "norm" and isinstance(module, nn.GroupNorm):
            step = math.lcm(step, module.num_groups)
    removable = group.units - max(group.min_units, step)
    count = min(3 if step == 1 else step, max(removable, 0)) // step * step
    if count >= 3 and step == 1:
        return [0, *range(group.units - count + 1, group.units)]
    return list(range(count))


def _disagreement(model: nn.Module, example: Any, trace: ChannelTrace, chosen: dict[str, tuple[CoupledGroup, list[int]]]) -> str | None:
    """Why the traced copy shrunk by ``chosen`` does not compute as ``model`` masked the same way, or None.
    The copy is pruned in place (it is used up)."""
    removals = {name: units for name, (_, units) in chosen.items()}
    try:
        masked = masked_output(model, [c.group for c, _ in chosen.values()], removals, example)
    except PrunescopeError as error:
        return f"its mask cannot be applied: {error}"
    try:
        prune_traced(trace, chosen)
        shrunk = _output(trace.model, example)
        difference = relative_difference(masked, shrunk)
    except Exception as error:  # any failure to shrink or run counts against the groups
        first = (str(error).strip().splitlines() or [""])[0][:200]
        return f"shrinking fails or the shrunk model does not run ({type(error).__name__}: {first})"
    if not difference <= TOLERANCE:
        return (f"the shrunk model's output differs from the masked model's by {difference:.3g} of the output scale "
                f"(tolerance {TOLERANCE})")
    return None


def failing_groups(
    model: nn.Module, example: Any, groups: list[CoupledGroup], trace: ChannelTrace, budget: SearchBudget
) -> dict[str, str]:
    """Groups whose removal by shrinking disagrees with their masks, each with the reason.

    ``groups`` come from ``trace``, a trace of a copy of ``model`` that this uses up. Groups with
    output rows, or with no unit to spare, are not checked (they cannot be masked).
    """
    probes = {c.group.name: probe_units(model, c.group) for c in groups
              if not any(s.role == "output" for s in c.group.slices)}
    probes = {name: units for name, units in probes.items() if units}
    refused: dict[str, str] = {}
    first: tuple[dict[str, CoupledGroup], ChannelTrace] | None = ({c.group.name: c for c in groups}, trace)
    pending = deque([list(probes)] if probes else [])
    while pending:
        names = pending.popleft()
        if first is not None:  # all groups at once, on the discovery's own copy
            found, traced = first
            first = None
        else:  # a half, on a fresh copy (made only now, so that one copy exists at a time)
            traced = trace_channels(copy.deepcopy(model), example)
            regrouped, lost = coupled_groups(traced, budget=budget, roots=set(names))
            found = {c.group.name: c for c in regrouped}
            refused.update({n: lost.get(n, "not found again on a second trace") for n in names if n not in found})
            names = [n for n in names if n in found]
            if not names:
                continue
        why = _disagreement(model, example, traced, {n: (found[n], probes[n]) for n in names})
        units = {n: found[n].group.units for n in names}
        del traced, found
        if why is None:
            continue
        if len(names) == 1:
            name = names[0]
            refused[name] = (f"removing its units {probes[name]} of {units[name]}: {why}; the coupling Torch-Pruning "
                             "found is wrong here (e.g. a chunk or split sized by the channel count, a per-channel buffer)")
        else:
            pending.extend((names[: len(names) // 2], names[len(names) // 2:]))
    return refused


def discover_channel_groups(
    model: nn.Module, example_inputs: Any, *, exclude_output: bool = True, budget: SearchBudget | None = None,
    check: bool = True,
) -> tuple[list[UnitGroup], dict[str, str]]:
    """The channel groups of ``model`` and the refused ones with their reasons (see
    :func:`find_channel_groups`); ``model`` is left as it was (a copy is traced when checking)."""
    budget = budget or SearchBudget()
    trace = trace_channels(copy.deepcopy(model) if check else model, example_inputs)
    groups, refused = coupled_groups(trace, exclude_output=exclude_output, budget=budget)
    if check and groups:
        refused.update(failing_groups(model, example_inputs, groups, trace, budget))
    return [g.group for g in groups if g.group.name not in refused], refused


def find_channel_groups(
    model: nn.Module, example_inputs: Any, *, exclude_output: bool = True, strict: bool = False,
    search_steps: int = SEARCH_STEPS, search_seconds: float = SEARCH_SECONDS, check: bool = True,
) -> list[UnitGroup]:
    """Every independently removable set of channels of a CNN or MLP, as ``"channel"`` UnitGroups.

    Args:
        model: the model; left exactly as it was (a copy of it is traced, in eval mode, with grad).
        example_inputs: one batch as the model takes it (a tensor, ``(inputs, labels)``, or a dict
            of keyword arguments); a small spatial size is enough unless the model needs a fixed one.
        exclude_output: leave out groups that would change the model's output (the classifier's
            output features). With ``False`` they are included, their output rows have role
            ``"output"``, and only shrinking (not masking) can remove them.
        strict: raise instead of warning when a group cannot be removed exactly (the error names
            the op and the module, the exhausted search bound, or the failed check).
        search_steps: bound on the dependencies one group's coupling search may reach; a group
            over it is refused (``x[:, :c] + shortcut`` streams make the search explode).
        search_seconds: bound on one group's coupling search, in seconds of wall-clock time.
        check: remove a few units of every group as masks and by shrinking, and refuse a group
            whose two results disagree or whose shrunk model does not run (costs one prune and
            two forward passes when every group passes).

    Returns:
        One group per coupled channel set, named by its first producer (a Conv or Linear module
        name); ``units`` are channels (slots of ``g`` channels for grouped convs),
        ``params_per_unit`` counts parameters in every coupled slice, ``flops_per_unit`` is
        2 x multiply-accumulates per sample on ``example_inputs`` in the Conv/Linear weights.
    """
    budget = SearchBudget(search_steps, search_seconds)
    groups, refused = discover_channel_groups(model, example_inputs, exclude_output=exclude_output, budget=budget, check=check)
    if refused:
        detail = "; ".join(f"{name}: {why}" for name, why in list(refused.items())[:3])
        more = f" (and {len(refused) - 3} more)" if len(refused) > 3 else ""
        if strict:
            raise PrunescopeError(f"{len(refused)} channel group(s) cannot be pruned exactly: {detail}{more}")
        warnings.warn(f"prunescope leaves {len(refused)} channel group(s) unpruned: {detail}{more}", stacklevel=2)
    if not groups:
        raise PrunescopeError(f"{type(model).__name__} has no prunable channel group")
    return groups


def refused_channel_groups(
    model: nn.Module, example_inputs: Any, *, search_steps: int = SEARCH_STEPS, search_seconds: float = SEARCH_SECONDS,
    check: bool = True,
) -> dict[str, str]:
    """Groups :func:`find_channel_groups` leaves out (other than the output), each with its reason."""
    return discover_channel_groups(model, example_inputs, budget=SearchBudget(search_steps, search_seconds), check=check)[1]
