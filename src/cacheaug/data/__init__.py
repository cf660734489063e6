"""Training and evaluation data: sources, packing, the document format and the embedded arithmetic corpus."""

from ..config import DataArgs
from ..errors import DataError
from .documents import gsm8k_document, read_gsm8k, read_jsonl, read_mc_items, render_document
from .sources import iter_documents

__all__ = [
    "DataArgs", "DataError", "PackedDataset", "build_training_data", "gsm8k_document", "iter_documents",
    "read_gsm8k", "read_jsonl", "read_mc_items", "render_document", "validation_batches",
]
_PACKING = ("PackedDataset", "build_training_data", "validation_batches")


def __getattr__(name: str):
    # packing needs torch; sources and documents do not, so the CLI can check files before loading it
    if name in _PACKING:
        from . import packing

        return getattr(packing, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
