"""The one exception type prunescope raises for bad input."""


class PrunescopeError(ValueError):
    """Bad input or an impossible request; the message names the problem and what is accepted."""
