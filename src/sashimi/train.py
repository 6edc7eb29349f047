"""`sashimi train --run RUN`: one entry point that trains every run in params.yaml.

    sashimi train --run sashimi-sc09 [--resume/--no-resume] [--max-steps N] [--max-minutes M]
                  [--device auto|cpu|cuda]
    torchrun --nproc_per_node 4 -m sashimi train --key sashimi-sc09      # DDP, same code path
    (under torchrun write --key: torchrun's own parser takes --run as its --run-path)

Autoregressive and diffusion runs train with `trainer.Trainer`; classifier runs with
`classifier_train` (its own epoch loop, the same run configuration, checkpoints and resume
rule). Everything a run does is in its params.yaml block; the command line only selects the
run, the device, whether to resume, and (optionally) a budget for this invocation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import torch

from sashimi.distributed import init_distributed, pick_device
from sashimi.errors import UserError
from sashimi.trainer import Trainer

__all__ = ["Trainer", "configure_parser", "run"]


# ============================================================================ CLI
def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--run",
        "--key",
        dest="run",
        required=True,
        help="run key in params.yaml (e.g. sashimi-sc09); spell it --key under torchrun, "
        "whose own parser claims --run",
    )
    p.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="continue from checkpoints/last.pt (default: when it exists and was trained with "
        "the same configuration, budget and logging keys aside; else start over)",
    )
    p.add_argument("--max-steps", type=int, help="override train.max_steps (total, over resumes)")
    p.add_argument(
        "--max-minutes", type=float, help="override train.max_minutes (total, over resumes)"
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-progress", action="store_true", help="no progress bar / progress lines")


def _with_budget(run_cfg, args: argparse.Namespace):
    """The run with the command line's budget overrides (budgets are not part of the recipe:
    changing them continues a run)."""
    overrides = {}
    if args.max_steps is not None:
        if args.max_steps < 0:
            raise UserError(f"--max-steps: {args.max_steps} is negative")
        if run_cfg.train.scheduler == "cosine":  # there max_steps is the recipe, not a budget
            raise UserError(
                f"--max-steps: runs.{run_cfg.key} decays its lr over train.max_steps (cosine); "
                "change it in params.yaml"
            )
        overrides["max_steps"] = args.max_steps
    if args.max_minutes is not None:
        overrides["max_minutes"] = args.max_minutes
    if not overrides:
        return run_cfg
    return dataclasses.replace(run_cfg, train=dataclasses.replace(run_cfg.train, **overrides))


def run(args: argparse.Namespace) -> int:
    from sashimi.config import load_params

    P = load_params(args.params)
    run_cfg = _with_budget(P.run(args.run), args)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(args.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if run_cfg.kind == "classifier":
        from sashimi.classifier_train import train_classifier_run

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError(f"runs.{run_cfg.key}: classifier runs train in one process")

        print(json.dumps(train_classifier_run(P, run_cfg, device=device, resume=args.resume)))
        return 0
    dist = init_distributed(device)
    try:
        trainer = Trainer(
            P,
            run_cfg,
            device=device,
            dist=dist,
            resume=args.resume,
            root=Path(args.params).resolve().parent,
            progress=False if args.no_progress else None,
        )
        summary = trainer.fit()
    finally:
        if dist.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if dist.is_main:
        print(json.dumps(summary))
    return 0
