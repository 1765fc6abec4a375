"""Run `python -m flmm_demo` commands in every process torchrun starts, and record `train`.

    torchrun --nproc_per_node 2 tests/multiprocess_probe.py RECORDS train --model ... + eval ... + ground ...

The commands run one after another in the same processes ("+" separates them), so the
start-up (imports, process group) is paid once per launch. `eval` and `ground` run exactly as
`python -m flmm_demo` runs them. `train` runs `flmm_demo.training.train.train` on its flags with
an `on_step` hook: after every optimizer step each process appends
{"step", "loss", "fingerprint"} to RECORDS/train-rank<r>.jsonl, and at the end writes its
TrainResult's counts to RECORDS/train-rank<r>-result.json. The fingerprint stands for the
head's weights: per tensor of its state dict, the sum, the sum of squares and the dot product
with a fixed random vector (float64), so weights that differ anywhere differ in it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import HfArgumentParser

from flmm_demo.cli import main as cli_main
from flmm_demo.distributed import process_state
from flmm_demo.heads import FlmmHead
from flmm_demo.training import train


def fingerprint(head: FlmmHead) -> list[float]:
    values = []
    generator = torch.Generator().manual_seed(0)
    for _, tensor in sorted(head.state_dict().items()):
        flat = tensor.detach().double().flatten().cpu()
        direction = torch.randn(flat.numel(), generator=generator, dtype=torch.float64)
        values += [flat.sum().item(), flat.square().sum().item(), flat.dot(direction).item()]
    return values


def run_train(argv: list[str], records: Path) -> None:
    (config,) = HfArgumentParser(train.TrainConfig).parse_args_into_dataclasses(argv)
    rank = process_state().process_index
    log = records / f"train-rank{rank}.jsonl"

    def record(step: int, loss: float, head: FlmmHead) -> None:
        with open(log, "a") as f:
            f.write(json.dumps({"step": step, "loss": loss, "fingerprint": fingerprint(head)}) + "\n")

    result = train.train(config, on_step=record)
    summary = {"step": result.step, "cache_computed": result.cache_computed, "cache_read": result.cache_read}
    (records / f"train-rank{rank}-result.json").write_text(json.dumps(summary))


def main(argv: list[str]) -> int:
    records = Path(argv[0])
    records.mkdir(parents=True, exist_ok=True)
    commands, current = [], []
    for arg in argv[1:]:
        if arg == "+":
            commands.append(current)
            current = []
        else:
            current.append(arg)
    commands.append(current)
    for command in commands:
        if command[0] == "train":
            run_train(command[1:], records)
        elif cli_main(command) != 0:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
