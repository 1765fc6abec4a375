"""Which process this is when `torchrun` / `accelerate launch` started several.

    torchrun --nproc_per_node 2 -m flmm_demo ground photos/ --question "..." --out results/

Started plainly, a program is the one and only process. Started by a launcher, each process
reads its rank from the environment the launcher set; accelerate's `PartialState` does that
and joins the process group (NCCL between GPUs, gloo between CPU processes). The commands
split their work with `split_between_processes` and collect results with accelerate's
`gather_object`, so no code here talks to torch.distributed directly.
"""
from __future__ import annotations

import torch
from accelerate import PartialState


def process_state() -> PartialState:
    """This process's rank, the number of processes and its device (cuda:<local rank> on GPUs).

    Without a GPU the processes run on the CPU and talk over gloo: accelerate only picks the
    CPU backend when asked for the CPU, so the flag must say so (`Accelerator` in `train`
    passes the same flag; the first caller in a process fixes the state for all).
    """
    return PartialState(cpu=not torch.cuda.is_available())
