"""`sashimi report`: the paper's tables with our numbers beside the published ones, figures,
and a self-contained `results/report.html`. This file imports nothing (registry stays cheap).

    registry.py   table names and result paths (the workflow's targets; no heavy imports)
    cells.py      Cell (ours beside the published value), Table, number formatting
    reference.py  the published numbers and which paper row a run reproduces
    results.py    what one run left in results/runs/<run>/
    tables.py     the paper's tables from params.yaml's runs, the runs table, footnotes
    release.py    the authors' released SC09 clips scored here, beside the published rows
    render.py     one table as Markdown, CSV, LaTeX or HTML
    figures.py    training curves, NLL vs parameters, speed, spectrograms; the audio clips
    html.py       report.html
    main.py       make_report and the CLI verb
"""
