# The reproduction's DAG: download -> prepare -> train -> sample -> evaluate -> report.
#
#   snakemake --cores 2 all                        # demo scale (params.yaml `scale: demo`)
#   SASHIMI_SCALE=paper snakemake --cores 8 --resources gpu=1 all
#   SASHIMI_SCALE=paper snakemake --workflow-profile profiles/slurm all   # SLURM
#
# Run from the repository root: Snakemake finds this file and the workflow profile
# profiles/default/ (beside it) by itself. The rules live in workflow/rules/.
#
# Every rule is a thin wrapper around one `sashimi <verb>` command that carries only a
# selector (a run or dataset key); the numbers live in params.yaml, read ONLY through
# `sashimi.config.load_params` (which validates it against the packaged schema and resolves
# the demo/paper scale). dvc.yaml runs the same commands; tests/test_workflow.py keeps the
# two in step.
#
# Rerun rules: each rule's `params:` holds the resolved configuration its command reads, so
# Snakemake (rerun trigger "params") reruns exactly the jobs whose configuration changed,
# plus everything downstream of them; a rerun with nothing changed does nothing.

from snakemake.utils import min_version

from sashimi.config import load_params

min_version("9.0")

P = load_params("params.yaml", check_models=False)  # schema-validated; honours SASHIMI_SCALE
GPU = 1 if P.scale == "paper" else 0  # `resources: gpu=` of the jobs that want a GPU
THREADS = 4 if P.scale == "paper" else 1  # CPU threads of those jobs (Snakemake sets OMP_NUM_THREADS)


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/ablation.smk"
include: "workflow/rules/speed.smk"
include: "workflow/rules/report.smk"


rule all:
    """The paper's tables (Markdown, CSV, LaTeX) and the HTML report; every dataset prepared."""
    input:
        TABLE_FILES,
        "results/report.html",
        "results/listening_test.html",
        STABILITY_FILES + SPEED_FILES,  # the stability and speed tables' inputs
        expand("data/prepared/{dataset}/manifest.json", dataset=list(P.datasets)),
    default_target: True


rule download_all:
    """Only the downloads the active scale needs (none at demo scale): `snakemake download_all`."""
    input:
        [m for d in P.datasets for m in raw_marker(d)],
