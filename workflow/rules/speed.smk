# The speed table's measurements: one job per model kind times training and generation on the
# machine the DAG runs on, beside the naive / official-style reference (`sashimi bench`).
# `sashimi.speed.write_speed_table` turns results/bench/*.json into the table and figure.

rule speed:
    input:
        code("speed.py", "bench.py", "models", "ssm", "generation", "optim.py"),
    output:
        "results/bench/{kind}.json",
    params:
        config=speed_config,
    threads: THREADS
    resources:
        gpu=GPU,
    log:
        "results/logs/speed/{kind}.log",
    benchmark:
        "results/logs/speed/{kind}.benchmark.tsv",
    wildcard_constraints:
        kind=one_of(SPEED_KINDS),
    shell:
        "sashimi speed --kind {wildcards.kind} > {log} 2>&1"
