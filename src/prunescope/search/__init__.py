"""Per-layer levels chosen by measuring whole plans (EvoPress-style), warm-started from a profile.

- :mod:`.space`: the level grid, budget-preserving mutations and the exact warm start;
- :mod:`.state`: the state file saved after every generation (resume);
- :mod:`.evolution`: the (1 + lambda) loop with multi-step selection;
- :mod:`.api`: :func:`search`, which builds the variant bank and runs it all.
"""

from .api import check_search, search

__all__ = ["check_search", "search"]
