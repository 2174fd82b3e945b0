"""The one exception type prunescope raises for bad input."""


class PrunescopeError(ValueError):
    """Bad input or an impossible request; the message names the problem and what is accepted."""


def forward_failed(error: BaseException, where: str) -> PrunescopeError:
    """A short error for a user's model whose forward raised: the type and first line only."""
    text = str(error).strip()
    first_line = text.splitlines()[0] if text else ""
    return PrunescopeError(f"the model's forward failed on {where}: {type(error).__name__}: {first_line[:300]}")
