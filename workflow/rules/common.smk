# Shared helpers: the run groups and the stable, resolved configuration each job depends on.
import dataclasses
import json
import re
from pathlib import Path

from sashimi.report.registry import release_metrics_path, table_paths

TABLE_FILES = [str(p) for p in table_paths("results")]
RUNS = list(P.runs)
CLASSIFIERS = [k for k, r in P.runs.items() if r.kind == "classifier"]
GENERATIVE = [k for k, r in P.runs.items() if r.kind != "classifier"]
# SC09 runs are scored by the digit classifier too (FID, IS, mIS, AM); diffusion runs have no NLL.
SC09_RUNS = [k for k in GENERATIVE if P.runs[k].dataset == "sc09"]
EVAL = P.raw.get("eval") or {}
RELEASED_CLASSIFIER = EVAL.get("released_classifier", "data/raw/release/sc09_classifier/resnext.pth")
USE_RELEASED = EVAL.get("sc09_classifier", "ours") == "released"
REAL_SPLITS = ["train", "test"] if SC09_RUNS and (CLASSIFIERS or USE_RELEASED) else []
# The authors' released SC09 clips: a folder is scored when it is present (never downloaded
# by `all`, so the demo needs neither the files nor a network).
RELEASE_SAMPLES = Path(EVAL.get("released_samples", "data/raw/release/samples/sc09"))
RELEASED = [m for m in EVAL.get("released_models", {}) if any((RELEASE_SAMPLES / m).glob("*.wav"))]
RELEASE_METRICS = [str(release_metrics_path(m)) for m in RELEASED]
SRC = "src/sashimi"


def stable(obj) -> str:
    """A canonical JSON string: Snakemake's params trigger compares it between runs."""
    return json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))


def one_of(keys) -> str:
    """Wildcard constraint: exactly one of `keys`."""
    return "|".join(re.escape(k) for k in keys) or "^$"


def metrics_of(run_key: str) -> str:
    run = P.runs[run_key]
    if run.dataset == "sc09":
        return "nll,sc09" if run.kind == "ar" else "sc09"
    return "nll"


def run_dataset(wc) -> str:
    return P.runs[wc.run].dataset


def classifier_done(wc=None) -> list[str]:
    """What the SC09 scoring needs: our trained classifier, or the released file
    (`eval.sc09_classifier`)."""
    if USE_RELEASED:
        return [RELEASED_CLASSIFIER]
    return [f"results/runs/{k}/train.done" for k in CLASSIFIERS[:1]]


def code(*paths: str) -> list[str]:
    """Source files a job depends on: `models` -> every src/sashimi/models/*.py. dvc.yaml lists
    the same folders as deps (hashed by content; .dvcignore drops __pycache__)."""
    out = []
    for p in paths:
        full = Path(SRC) / p
        out += sorted(str(f) for f in full.glob("*.py")) if full.is_dir() else [str(full)]
    return out


wildcard_constraints:
    run=one_of(RUNS),
    dataset=one_of(P.datasets),
    release=one_of(EVAL.get("released_models", {})),


# ---- used by data.smk
def raw_marker(dataset: str) -> list[str]:
    """The finished download a dataset is prepared from; none for generated (demo) data or
    a `source_dir` of your own."""
    ds = P.datasets[dataset]
    if ds.download is None or ds.source_dir:
        return []
    return [f"data/raw/{ds.download}/.sashimi-download.json"]


# ---- used by train.smk
TRAIN_CODE = (
    "train.py", "trainer.py", "train_data.py", "train_log.py", "resume.py", "rng.py",
    "ar_loss.py", "batching.py", "checkpoints.py", "optim.py", "distributed.py",
    "classifier.py", "classifier_data.py", "classifier_accuracy.py", "classifier_train.py",
    "models", "ssm", "data/datasets.py", "data/quantize.py",
)


def train_config(wc) -> str:
    run = P.runs[wc.run]
    return stable({"scale": P.scale, "kind": run.kind, "dataset": run.dataset, "model": run.model_name,
                   "kwargs": run.model, "train": dataclasses.asdict(run.train)})


# ---- used by sample.smk
def sample_config(wc) -> str:
    run = P.runs[wc.run]
    return stable({"scale": P.scale, "sample": dataclasses.asdict(run.sample), "seed": run.train.seed})


# ---- used by ablation.smk
STABILITY_RUNS = [k for k, r in P.runs.items() if r.raw.get("stability")]
STABILITY_FILES = expand("results/runs/{run}/stability.json", run=STABILITY_RUNS)


def stability_baseline(wc) -> str:
    return P.runs[wc.run].raw["stability"]["baseline"]


# ---- used by speed.smk
SPEED = P.raw.get("speed") or {}
SPEED_KINDS = list(SPEED.get("runs") or {})
SPEED_FILES = expand("results/bench/{kind}.json", kind=SPEED_KINDS)


def speed_config(wc) -> str:
    run = P.runs[SPEED["runs"][wc.kind]]
    return stable({"scale": P.scale, "speed": {k: v for k, v in SPEED.items() if k != "runs"},
                   "model": run.model_name, "kwargs": run.model,
                   "compile": run.compile})
