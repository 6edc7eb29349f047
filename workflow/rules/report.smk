# The report: tables (Markdown, CSV, LaTeX), figures, audio clips and report.html.


rule report:
    input:
        expand("results/runs/{run}/metrics.json", run=GENERATIVE),
        expand("results/runs/real-{split}/metrics.json", split=REAL_SPLITS),
        expand("results/runs/{run}/train.done", run=CLASSIFIERS),
        RELEASE_METRICS,
        STABILITY_FILES,
        SPEED_FILES,
        code("report", "speed.py", "stability.py", "listening.py", "reference/paper_results.yaml"),
    output:
        TABLE_FILES,
        "results/report.html",
        "results/listening_test.html",
        "results/listening_test_key.csv",
    params:
        layout=stable(
            {
                "scale": P.scale,
                "rows": {k: [r.table, r.label] for k, r in P.runs.items()},
                "eval": EVAL,
            }
        ),
    log:
        "results/logs/report/report.log",
    benchmark:
        "results/logs/report/report.benchmark.tsv",
    shell:
        "sashimi report > {log} 2>&1"
