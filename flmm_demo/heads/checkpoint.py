"""Load the heads released with F-LMM (wusize/F-LMM) into a FlmmHead.

A released file is a torch state dict (.pth, possibly fp16, possibly wrapped in
{'state_dict': ...}) with 193 entries named after F-LMM's model attributes:
mask_head.* (53), sam.model.prompt_encoder.* (17), sam.model.mask_decoder.* (120),
text_proj.weight/bias and text_layer_weights. Our FlmmHead keeps the same names except
that the text projection lives inside the refiner (`sam.text_proj`, `sam.text_layer_weights`).
A head only works with the LMM it was trained on; a mismatch is refused, not guessed around.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from flmm_demo.heads.flmm_head import FlmmHead, FlmmHeadConfig, describe_lmm

# Official name -> our name, for the entries that moved into the refiner.
RENAMES = {
    "text_proj.weight": "sam.text_proj.weight",
    "text_proj.bias": "sam.text_proj.bias",
    "text_layer_weights": "sam.text_layer_weights",
}
FIRST_CONV = "mask_head.encoder.0.0.convs.0.conv.weight"

def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of an F-LMM .pth as float32 on the CPU, unwrapped and without 'module.' prefixes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"F-LMM checkpoint {path} not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} holds more than tensors, so it is not loaded (it could run code). Re-save its "
            "state dict with torch.save(dict(state_dict), ...) in a trusted environment."
        ) from err
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    state = {}
    for name, tensor in obj.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        state[name.removeprefix("module.")] = tensor.float() if tensor.is_floating_point() else tensor
    return state


def check_fits(state: dict[str, torch.Tensor], config: FlmmHeadConfig) -> None:
    """Refuse a checkpoint whose channels, hidden size or layer count differ from the LMM's."""
    if FIRST_CONV not in state:
        raise ValueError(f"not an F-LMM head checkpoint: it has no {FIRST_CONV}")
    channels = state[FIRST_CONV].shape[1]
    layers = state["text_layer_weights"].shape[0] if "text_layer_weights" in state else config.num_layers
    hidden = state["text_proj.weight"].shape[1] if "text_proj.weight" in state else config.hidden_size
    if (channels, layers, hidden) != (config.in_channels, config.num_layers, config.hidden_size):
        expected = describe_lmm(channels, layers, hidden)
        grids = f" x {config.input_grids} grids" if config.input_grids > 1 else ""
        actual = f"{config.in_channels} ({config.num_layers} x {config.num_heads}{grids}, hidden {config.hidden_size})"
        raise ValueError(
            f"this head expects {expected} but the model has {actual}; "
            "use the F-LMM checkpoint released for this LMM"
        )


def load_official_flmm(
    path: str | Path,
    *,
    num_layers: int,
    num_heads: int,
    hidden_size: int,
    sam_checkpoint: str | Path | None = None,
    sam_variant: str = "vit_l",
    use_refiner: bool = True,
    input_grids: int = 1,
) -> FlmmHead:
    """Load F-LMM's released .pth for an LMM with the given shape; every tensor must fit.

    sam_checkpoint: the original SAM checkpoint whose image encoder the refiner expects
    (recorded in the config; build the encoder with SamImageEncoderCache.from_checkpoint).
    input_grids: 2 for the LLaVA-NeXT heads (base + tile grids, FlmmHeadConfig).
    """
    config = FlmmHeadConfig(
        num_layers=num_layers,
        num_heads=num_heads,
        hidden_size=hidden_size,
        sam_variant=sam_variant,
        use_refiner=use_refiner,
        sam_checkpoint=None if sam_checkpoint is None else str(sam_checkpoint),
        input_grids=input_grids,
    )
    official = read_state_dict(path)
    check_fits(official, config)
    # F-LMM's own state_dict drops the SAM image encoder; ignore it if a file kept it.
    state = {RENAMES.get(k, k): v for k, v in official.items() if ".image_encoder." not in k}
    with torch.device("meta"):
        expected = FlmmHead(config).state_dict()
    if not use_refiner:
        state = {k: v for k, v in state.items() if not k.startswith("sam.")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"{path} does not match F-LMM's head layout: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
            f"wrong shapes {wrong_shape[:5]}"
        )
    return FlmmHead.from_state_dict(config, state).eval()
