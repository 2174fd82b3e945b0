"""The one exception type prunescope raises for bad input."""


class PrunescopeError(ValueError):
    """Bad input or an impossible request; the message names the problem and what is accepted."""


def describe(error: BaseException) -> str:
    """``Type: first line`` of an exception, short enough for an error message."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:300] if text else ''}".rstrip(": ")


def forward_failed(error: BaseException, where: str) -> PrunescopeError:
    """A short error for a user's model whose forward raised: the type and first line only."""
    return PrunescopeError(f"the model's forward failed on {where}: {describe(error)}")
