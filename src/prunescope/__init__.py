"""prunescope: pruning sensitivity analysis and sensitivity-guided pruning for PyTorch models."""

from .allocate import allocate  # noqa: E402
from .apply import apply  # noqa: E402
from .errors import PrunescopeError  # noqa: E402
from .estimate import agreement, estimate  # noqa: E402
from .evaluator import Evaluation, Evaluator, evaluate  # noqa: E402
from .export import save  # noqa: E402
from .levels import NMPattern, parse_level  # noqa: E402
from .loading import load  # noqa: E402
from .masks import keep_mask  # noqa: E402
from .metrics import Metric  # noqa: E402
from .oneshot import prune_oneshot  # noqa: E402
from .plan import Budget, Plan  # noqa: E402
from .profile import Cell, Profile  # noqa: E402
from .scan import scan  # noqa: E402
from .search import search  # noqa: E402
from .shards import merge_profiles  # noqa: E402
from .target import Target  # noqa: E402
from .targets import default_excludes, find_targets  # noqa: E402
from .version import __version__  # noqa: F401
from .weight_masks import load_masked, make_permanent, masks_of, sparsity_of  # noqa: E402

__all__ = [
    "Budget", "Cell", "Evaluation", "Evaluator", "Metric", "NMPattern", "Plan", "Profile", "PrunescopeError",
    "Target", "agreement", "allocate", "apply", "default_excludes", "estimate", "evaluate", "find_targets", "keep_mask", "load", "load_masked",
    "make_permanent", "masks_of", "merge_profiles", "parse_level", "prune_oneshot", "save", "scan", "search", "sparsity_of",
]
