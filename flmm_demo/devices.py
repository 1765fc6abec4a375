"""Where and how a frozen LMM is loaded: device, dtype, 4/8-bit quantization, offload.

    options = LoadOptions(device="cuda", quantize="4bit")
    backend = load_backend(path, **options.from_pretrained_kwargs())

- device: "cuda", "mps", "cpu", or "auto" (the default): CUDA when there is a GPU, then
  Apple's MPS, else the CPU.
- dtype: "bf16" | "fp16" | "fp32"; default bf16 on CUDA, fp16 on MPS, fp32 on the CPU.
- quantize: "4bit" (NF4) | "8bit", through transformers' BitsAndBytesConfig; needs CUDA
  and the optional bitsandbytes package (pip install bitsandbytes).
- offload: device_map="auto" (accelerate): the layers that do not fit on the GPU stay in
  CPU memory and are moved in as they run — slower, but a 7B model fits a small GPU.

The attention capture is unchanged by all of these: it reads the attention module's
query and key in whatever dtype the model runs, and computes the softmax rows in float32.
"""
from __future__ import annotations

import argparse
import importlib.util
from dataclasses import dataclass
from typing import Any

import torch

from flmm_demo.backends.dtypes import LMM_DTYPES, lmm_dtype

# The short spellings of the app and `ground`; training and eval spell them out (backends.dtypes).
SHORT_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
QUANTIZE = ("4bit", "8bit")


def pick_device(device: str | None = "auto") -> str:
    """The torch device to load on; ValueError naming what is missing when it is not there."""
    device = (device or "auto").lower()
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if _mps_available() else "cpu"
    kind = device.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device {device}: no CUDA GPU is visible to torch {torch.__version__} "
            f"(built for CUDA {torch.version.cuda or 'none'}); use --device cpu, or install a CUDA build of torch."
        )
    if kind == "mps" and not _mps_available():
        raise ValueError(f"--device {device}: Apple's MPS backend is not available here; use --device cpu.")
    if kind not in ("cuda", "mps", "cpu"):
        raise ValueError(f"--device {device}: choose cuda, mps, cpu or auto")
    return device


def pick_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """The model dtype: the one asked for (bf16 / fp16 / fp32, or the long names), else
    backends.dtypes' choice for the device (bf16 on CUDA, fp32 on the CPU), fp16 on MPS."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = SHORT_DTYPES.get(dtype, dtype) if dtype else "auto"
    if name not in LMM_DTYPES:
        raise ValueError(f"--dtype {dtype}: choose bf16, fp16 or fp32")
    if name == "auto" and device.split(":")[0] == "mps":
        return torch.float16
    return lmm_dtype(name, device)


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


@dataclass(frozen=True)
class LoadOptions:
    """How to load the LMM (see the module docstring); the head and SAM go on `device` too."""

    device: str = "auto"
    dtype: str | None = None
    quantize: str | None = None
    offload: bool = False

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        """device, dtype and (for quantize / offload) device_map and quantization_config for
        `Backend.from_pretrained`; ValueError with what to do when an option cannot work here."""
        device = pick_device(self.device)
        dtype = pick_dtype(self.dtype, device)
        kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
        if self.quantize is not None:
            kwargs["quantization_config"] = quantization_config(self.quantize, device, dtype)
        if self.offload:
            if importlib.util.find_spec("accelerate") is None:
                raise ValueError("--offload needs accelerate: pip install accelerate")
            kwargs["device_map"] = "auto"
        return kwargs

    @property
    def device_name(self) -> str:
        return pick_device(self.device)


def quantization_config(quantize: str, device: str, dtype: torch.dtype) -> Any:
    """transformers' BitsAndBytesConfig for '4bit' (NF4, compute in `dtype`) or '8bit'."""
    if quantize not in QUANTIZE:
        raise ValueError(f"--quantize {quantize}: choose 4bit or 8bit")
    if device.split(":")[0] != "cuda":
        raise ValueError(
            f"--quantize {quantize} needs a CUDA GPU (bitsandbytes); on {device} load the model "
            "unquantized (--dtype bf16 halves the memory of fp32)."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"--quantize {quantize} needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """--device / --dtype / --quantize / --offload, as the app and the CLI take them."""
    parser.add_argument("--device", default="auto", help="cuda, mps, cpu or auto (default: cuda if there is a GPU)")
    parser.add_argument("--dtype", default=None, choices=[*SHORT_DTYPES, *LMM_DTYPES],
                        help="model dtype (default: bf16 on CUDA, fp16 on MPS, fp32 on CPU)")
    parser.add_argument("--quantize", default=None, choices=list(QUANTIZE),
                        help="load the LMM in 4 or 8 bits (CUDA + pip install bitsandbytes)")
    parser.add_argument("--offload", action="store_true",
                        help="device_map='auto': keep what does not fit on the GPU in CPU memory")


def load_options(args: argparse.Namespace) -> LoadOptions:
    return LoadOptions(device=args.device, dtype=args.dtype, quantize=args.quantize, offload=args.offload)
