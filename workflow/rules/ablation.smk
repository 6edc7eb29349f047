# The S4 stability ablation (paper section 3.2): every run with a `stability:` block (trained
# with the unconstrained S4 by rule train) generates recurrently beside its `baseline` (ours).
# `sashimi.stability.write_stability_table` turns the JSON files into the table and figure.

rule stability:
    input:
        "results/runs/{run}/train.done",
        lambda wc: f"results/runs/{stability_baseline(wc)}/train.done",
        code("stability.py", "ssm", "models", "generation", "checkpoints.py"),
    output:
        "results/runs/{run}/stability.json",
    params:
        config=lambda wc: stable({"scale": P.scale, "stability": P.runs[wc.run].raw["stability"]}),
    threads: THREADS
    resources:
        gpu=GPU,
    log:
        "results/logs/stability/{run}.log",
    benchmark:
        "results/logs/stability/{run}.benchmark.tsv",
    wildcard_constraints:
        run=one_of(STABILITY_RUNS),
    shell:
        "sashimi stability --run {wildcards.run} > {log} 2>&1"
