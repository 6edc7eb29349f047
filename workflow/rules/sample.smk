# Sampling: clips + their log-likelihoods into results/runs/RUN/samples/.
#
# The whole folder is the output, so any rerun (new checkpoint, new sample settings) starts
# from an empty folder; `sashimi sample` refuses to resume a folder made with other settings.


rule sample:
    input:
        "results/runs/{run}/train.done",
        code("sample.py", "ar_sampling.py", "models", "ssm", "data/quantize.py"),
    output:
        directory("results/runs/{run}/samples"),
    params:
        config=sample_config,
    threads: THREADS
    resources:
        gpu=GPU,
    log:
        "results/logs/sample/{run}.log",
    benchmark:
        "results/logs/sample/{run}.benchmark.tsv",
    wildcard_constraints:
        run=one_of(GENERATIVE),
    shell:
        "sashimi sample --run {wildcards.run} > {log} 2>&1"
