# Evaluation: test NLL (autoregressive runs) and, on SC09, the classifier metrics
# (FID, IS, mIS, AM) of the run's samples; plus the real Train / Test rows of the SC09 table.


rule evaluate:
    input:
        "results/runs/{run}/train.done",
        "results/runs/{run}/samples",
        lambda wc: classifier_done() if "sc09" in metrics_of(wc.run) else [],
        code("evaluate.py", "metrics.py", "classifier.py", "data/datasets.py"),
    output:
        "results/runs/{run}/metrics.json",
    params:
        metrics=lambda wc: metrics_of(wc.run),
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
        code("evaluate.py", "metrics.py", "classifier.py"),
    output:
        "results/runs/real-{split}/metrics.json",
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
