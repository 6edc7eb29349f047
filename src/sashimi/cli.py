"""`sashimi <verb>`: the single entry point. Snakemake rules and DVC stages call these verbs.

Each verb lives in its own module, which defines `configure_parser(p)` and `run(args)`.
Modules are imported only when their verb runs, so `sashimi --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from sashimi.errors import UserError

# verb -> (module, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "download": ("sashimi.data.download", "download a dataset archive (resumable, verified)"),
    "prepare": (
        "sashimi.data.prepare",
        "split, resample and store a dataset as memory-mapped arrays",
    ),
    "train": ("sashimi.train", "train a run from params.yaml (resumable, tracked)"),
    "sample": ("sashimi.sample", "generate audio clips from a trained run"),
    "evaluate": ("sashimi.evaluate", "test NLL and SC09 metrics (FID, IS, mIS, AM)"),
    "classifier": ("sashimi.classifier_accuracy", "test the SC09 digit classifier's accuracy"),
    "report": ("sashimi.report.main", "render tables, figures and report.html into results/"),
    "bench": ("sashimi.bench", "benchmarks (JSON out): train, generate, sample"),
    "import-checkpoint": ("sashimi.import_checkpoint", "convert a released official checkpoint"),
    "rehearse": ("sashimi.rehearse", "every paper run for 2 steps: memory, speed, GPU cost"),
    "stability": ("sashimi.stability", "S4 stability ablation: ours vs unconstrained S4"),
    "speed": ("sashimi.speed", "train / generation speed of a model kind (JSON)"),
}


def _load(verb: str):
    module_name, _ = VERBS[verb]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            return None
        raise
    if not (hasattr(module, "configure_parser") and hasattr(module, "run")):
        return None
    return module


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sashimi", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="path to params.yaml")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, (_, help_) in VERBS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == verb:
            module = _load(name)
            if module is not None:
                module.configure_parser(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = next((a for a in argv if a in VERBS), None)
    parser = build_parser(verb)
    if verb is not None and _load(verb) is None:
        args, _ = parser.parse_known_args(argv)  # an unbuilt verb: say so below, whatever its args
    else:
        args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 0
    module = _load(args.verb)
    if module is None:
        print(f"error: `sashimi {args.verb}` is not built yet", file=sys.stderr)
        return 3
    try:
        return int(module.run(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
