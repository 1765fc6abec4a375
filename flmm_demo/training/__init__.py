"""Training and evaluating F-LMM heads on referring-segmentation data.

`refer` reads the datasets, `train` fits a head on a frozen LMM, `evaluate` scores it
(cIoU / gIoU, from `metrics`).
"""
from __future__ import annotations

import dataclasses
from typing import Any


def flag(help: str, default: Any = dataclasses.MISSING, **argparse_kwargs: Any) -> Any:
    """A config field that is also a command-line flag: HfArgumentParser reads its help
    (and e.g. choices) from the metadata. No default: a required flag."""
    return dataclasses.field(default=default, metadata={"help": help, **argparse_kwargs})
