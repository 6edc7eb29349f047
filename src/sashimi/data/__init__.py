"""Datasets: download, prepare, quantise, synthesise, and the released audio."""
