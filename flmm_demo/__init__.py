"""flmm-demo: ground the answers of a frozen vision-language model (F-LMM).

    from flmm_demo import Grounder
    session = Grounder.from_preset().new_session("photo.jpg")
"""
from __future__ import annotations

from typing import Any

__all__ = ["Grounder", "Session", "VisualCoT"]


def __getattr__(name: str) -> Any:
    # Lazy, so light imports (e.g. flmm_demo.images) skip torch/transformers start-up.
    if name in __all__:
        from . import grounder

        return getattr(grounder, name)
    raise AttributeError(f"module 'flmm_demo' has no attribute {name!r}")
