"""The refer toolkit's `refs(<split_by>).p` files, read without running code.

A refs file is a pickle of a list of refs, each a dict of plain values: ref_id, ann_id,
image_id, split, category_id, sent_ids, file_name and sentences, a list of dicts (sent,
raw, tokens, sent_id). Pickle can build any Python object and call any function on
loading, so a hostile `.p` file could run code. `read_refs` uses an unpickler that
builds only what that format holds (lists, dicts, tuples, strings, bytes, numbers,
booleans, None) and refuses every class or function a file asks for.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any


class RefsFileError(ValueError):
    """A refs file that is not a plain list of refs (damaged, or asking to run code)."""


class _PlainDataUnpickler(pickle.Unpickler):
    """Builds lists, dicts, tuples, strings, numbers, booleans and None; nothing else.

    Those come from pickle's own opcodes; anything else (a class, a function such as
    os.system) comes through find_class, which refuses it.
    """

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(
            f"it asks for {module}.{name}, and a refs file holds only lists, dicts, strings and numbers"
        )


def read_refs(path: str | Path) -> list[dict[str, Any]]:
    """The refs of a refs(<split_by>).p file, read safely (see the module docstring).

    Python 2 pickles (the released RefCOCO files) are read with latin1 for their byte
    strings. Raises RefsFileError naming the file when it is damaged, is not a list of
    ref dicts, or asks for any class or function.
    """
    path = Path(path)
    try:
        refs = _PlainDataUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            MemoryError, RecursionError) as err:
        raise RefsFileError(f"{path} is not a readable refs file ({err or type(err).__name__}); it was not loaded") from None
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise RefsFileError(f"{path} does not hold a list of refs (dicts); found {type(refs).__name__}")
    missing = next((r for r in refs if not {"ref_id", "ann_id", "image_id", "split", "sentences"} <= r.keys()), None)
    if missing is not None:
        raise RefsFileError(
            f"{path}: a ref lacks {sorted({'ref_id', 'ann_id', 'image_id', 'split', 'sentences'} - missing.keys())}"
        )
    return refs
