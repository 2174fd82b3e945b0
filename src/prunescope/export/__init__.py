"""Export: pruned models as files other tools load (Hugging Face folders, compressed-tensors, ONNX,
prunescope's own spec folders). See :func:`save`."""

from .api import FORMATS, check_format, default_format, save
from .folder import MANIFEST, read_manifest

__all__ = ["FORMATS", "MANIFEST", "check_format", "default_format", "read_manifest", "save"]
