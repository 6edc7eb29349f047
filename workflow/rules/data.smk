# Data: download (paper scale only: demo datasets are generated) -> prepare.


rule download:
    """Fetch and unpack one archive (resumable, checksummed). Gated datasets need HF_TOKEN."""
    output:
        "data/raw/{name}/.sashimi-download.json",
    log:
        "results/logs/download/{name}.log",
    benchmark:
        "results/logs/download/{name}.benchmark.tsv",
    shell:
        "sashimi download --dataset {wildcards.name} --out data/raw/{wildcards.name} > {log} 2>&1"


rule prepare:
    """Split, resample and store one dataset as memory-mapped arrays (demo: synthesise it)."""
    input:
        lambda wc: raw_marker(wc.dataset),
        code("data/prepare.py", "data/synthetic.py", "io.py"),
    output:
        "data/prepared/{dataset}/manifest.json",
    params:
        config=lambda wc: stable(dataclasses.asdict(P.datasets[wc.dataset])),
    log:
        "results/logs/prepare/{dataset}.log",
    benchmark:
        "results/logs/prepare/{dataset}.benchmark.tsv",
    shell:
        "sashimi prepare --key {wildcards.dataset} > {log} 2>&1"
