# Training: one job per run, the digit classifier included (`sashimi train --run RUN` trains
# every kind of run from its params.yaml block).
#
# The output is a marker Snakemake touches when the command succeeds, not a checkpoint: the
# trainer resumes from checkpoints/last.pt, so a killed job (rerun with --rerun-incomplete)
# continues where it stopped instead of Snakemake deleting the checkpoints first.


# the trainer's modules (dvc.yaml's train stage lists the same files)
rule train:
    input:
        lambda wc: f"data/prepared/{run_dataset(wc)}/manifest.json",
        code(*TRAIN_CODE),
    output:
        touch("results/runs/{run}/train.done"),
    params:
        config=train_config,
    threads: THREADS
    resources:
        gpu=GPU,
    log:
        "results/logs/train/{run}.log",
    benchmark:
        "results/logs/train/{run}.benchmark.tsv",
    shell:
        "sashimi train --run {wildcards.run} > {log} 2>&1"
