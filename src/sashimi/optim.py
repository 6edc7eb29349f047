"""Optimiser and schedule of a run: AdamW parameter groups (S4 parameters apart) and the
learning-rate schedule, every knob read from the run's TrainConfig.

S4 parameters are marked one way: the module that owns them lists their attribute names in a
class attribute `ssm_parameter_names` (S4Kernel: Lambda, P, B, dt). The optimiser gives them
`ssm_lr` and no weight decay, the official S4 recipe's `lr: {dt, A, B}` / `wd: 0.0`.
"""

from __future__ import annotations

import bisect
import math

import torch
from torch import nn

from sashimi.errors import UserError

SCHEDULERS = ("plateau", "cosine", "constant", "step")


def ssm_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters that their owning modules declare as SSM parameters."""
    ids: set[int] = set()
    for module in model.modules():
        for name in getattr(module, "ssm_parameter_names", ()):
            p = module._parameters.get(name)
            if p is not None:
                ids.add(id(p))
    return ids


def param_groups(model: nn.Module, lr: float, weight_decay: float, ssm_lr: float) -> list[dict]:
    """Three groups (empty ones dropped): 'decay' (ndim >= 2: matrices, C, D, embeddings,
    weight-norm g and v; lr, weight_decay), 'no_decay' (ndim < 2: norms, biases, scalars; lr,
    wd 0), 'ssm' (declared SSM parameters; ssm_lr, wd 0)."""
    groups = {
        "decay": {"name": "decay", "params": [], "lr": lr, "weight_decay": weight_decay},
        "no_decay": {"name": "no_decay", "params": [], "lr": lr, "weight_decay": 0.0},
        "ssm": {"name": "ssm", "params": [], "lr": ssm_lr, "weight_decay": 0.0},
    }
    ssm = ssm_parameters(model)
    for p in model.parameters():
        if not p.requires_grad:
            continue
        key = "ssm" if id(p) in ssm else "no_decay" if p.ndim < 2 else "decay"
        groups[key]["params"].append(p)
    return [g for g in groups.values() if g["params"]]


def build_optimizer(model: nn.Module, tc) -> torch.optim.Optimizer:
    """The optimizer over `param_groups`. Adam(W) runs fused (one kernel for all parameters
    instead of ~10 small ones per parameter) when every parameter is a float tensor on a CPU or
    CUDA device; same update, to float rounding."""
    groups = param_groups(model, tc.lr, tc.weight_decay, tc.ssm_lr)
    params = [p for g in groups for p in g["params"]]
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    if tc.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=tc.lr, weight_decay=tc.weight_decay, fused=fused)
    if tc.optimizer == "adam":
        return torch.optim.Adam(groups, lr=tc.lr, weight_decay=tc.weight_decay, fused=fused)
    if tc.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)
    raise UserError(f"train.optimizer: {tc.optimizer!r} is not one of adamw, adam, sgd")


def build_scheduler(opt: torch.optim.Optimizer, tc, where: str = "train"):
    """plateau: stepped with the validation loss; cosine / step / constant: stepped every
    optimiser step (step: the lr is multiplied by `factor` at each of `milestones`)."""
    if tc.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min", factor=tc.factor, patience=tc.patience
        )
    if tc.scheduler == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    if tc.scheduler == "step":
        milestones = sorted(int(m) for m in tc.milestones or ())
        if not milestones:
            raise UserError(f"{where}.milestones: the step schedule needs at least one milestone")
        factor = float(tc.factor)

        def step(s: int) -> float:  # s = optimiser steps taken so far
            return factor ** bisect.bisect_right(milestones, s)

        return torch.optim.lr_scheduler.LambdaLR(opt, step)
    if tc.scheduler == "cosine":
        if not tc.max_steps:
            raise UserError(f"{where}.max_steps: the cosine schedule needs max_steps")
        total, warm = int(tc.max_steps), int(tc.warmup_steps)

        def cosine(s: int) -> float:  # s = optimiser steps taken so far
            if s < warm:
                return (s + 1) / warm
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (s - warm) / max(1, total - warm))))

        return torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    raise UserError(f"{where}.scheduler: {tc.scheduler!r} is not one of {', '.join(SCHEDULERS)}")


def is_plateau(sched) -> bool:
    return isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau)
