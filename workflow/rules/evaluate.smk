# Evaluation: test NLL (autoregressive runs) and, on SC09, the classifier metrics
# (FID, IS, mIS, AM) of the run's samples; the real Train / Test rows of the SC09 table; and
# the authors' released SC09 clips, where present. params.yaml `eval.sc09_classifier` picks
# the classifier: ours (the classifier-sc09 run) or the released resnext.pth.


rule evaluate:
    input:
        "results/runs/{run}/train.done",
        "results/runs/{run}/samples",
        lambda wc: classifier_done() if "sc09" in metrics_of(wc.run) else [],
        code("evaluate.py", "ar_loss.py", "batching.py", "score_folder.py", "metrics.py", "classifier.py", "classifier_data.py", "sc09_scoring.py", "data/datasets.py"),
    output:
        "results/runs/{run}/metrics.json",
    params:
        metrics=lambda wc: metrics_of(wc.run),
        classifier=lambda wc: EVAL.get("sc09_classifier", "ours") if "sc09" in metrics_of(wc.run) else "",
    threads: THREADS
    resources:
        gpu=GPU,
    log:
        "results/logs/evaluate/{run}.log",
    benchmark:
        "results/logs/evaluate/{run}.benchmark.tsv",
    wildcard_constraints:
        run=one_of(GENERATIVE),
    shell:
        "sashimi evaluate --run {wildcards.run} --metrics {params.metrics} > {log} 2>&1"


rule evaluate_real:
    """Real SC09 clips scored like generated ones: the paper table's Train / Test rows."""
    input:
        "data/prepared/sc09/manifest.json",
        classifier_done(),
        code("evaluate.py", "ar_loss.py", "batching.py", "score_folder.py", "metrics.py", "classifier.py", "classifier_data.py", "sc09_scoring.py"),
    output:
        "results/runs/real-{split}/metrics.json",
    params:
        classifier=EVAL.get("sc09_classifier", "ours"),
        max_clips=EVAL.get("real_max_clips"),  # a changed subset rescores
    threads: THREADS
    resources:
        gpu=GPU,
    log:
        "results/logs/evaluate_real/{split}.log",
    benchmark:
        "results/logs/evaluate_real/{split}.benchmark.tsv",
    wildcard_constraints:
        split="train|test",
    shell:
        "sashimi evaluate --real sc09 --split {wildcards.split} > {log} 2>&1"


rule evaluate_release:
    """One folder of the authors' released SC09 clips, scored with the released classifier.
    Planned only for folders present under eval.released_samples (see common.smk)."""
    input:
        lambda wc: str(RELEASE_SAMPLES / wc.release),
        RELEASED_CLASSIFIER,
        f"data/prepared/{EVAL.get('reference', 'sc09')}/manifest.json",
        code("evaluate.py", "ar_loss.py", "batching.py", "score_folder.py", "metrics.py", "classifier.py", "classifier_data.py", "sc09_scoring.py"),
    output:
        "results/release/sc09/{release}/metrics.json",
    params:
        model=lambda wc: stable(EVAL["released_models"][wc.release]),
    threads: THREADS
    resources:
        gpu=GPU,
    log:
        "results/logs/evaluate_release/{release}.log",
    benchmark:
        "results/logs/evaluate_release/{release}.benchmark.tsv",
    shell:
        "sashimi evaluate --release {wildcards.release} > {log} 2>&1"


if Path(RELEASED_CLASSIFIER).as_posix().startswith("data/raw/release/"):

    rule download_release_classifier:
        """The authors' classifier (krandiash/sashimi-release), when the DAG needs it and it is
        missing: `eval.sc09_classifier: released`, or released clips to score."""
        output:
            RELEASED_CLASSIFIER,
        log:
            "results/logs/download/release-classifier.log",
        shell:
            "sashimi download --dataset release-classifier --out data/raw/release > {log} 2>&1"


rule release_sc09:
    """Every released SC09 folder present, scored: `snakemake release_sc09`, then
    `sashimi report` (the fastest route to the paper's SC09 numbers; see the README)."""
    input:
        RELEASE_METRICS,
