"""Weight precisions by name, as the command line spells them."""
from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# "auto" picks by device (see lmm_dtype).
LMM_DTYPES = ("auto", *DTYPES)


def lmm_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """'auto' is bfloat16 on a GPU and float32 on a CPU; else float32, bfloat16 or float16."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return DTYPES[name]
