"""Accuracy of a trained digit classifier: `sashimi classifier test`.

    sashimi classifier test --run RUN   (or --ckpt CKPT --prepared DIR --out DIR)

writes out_dir/classifier_metrics.json, confusion.csv, confusion.md and confusion.png (rows:
true digit, columns: predicted). `evaluate_accuracy` is also the training's validation.
Training is `sashimi train --run classifier-sc09` (`classifier_train`).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sashimi.classifier import N_CLASSES, DigitClassifier, load_classifier
from sashimi.classifier_data import labelled_split
from sashimi.errors import UserError
from sashimi.io import atomic_write, write_json


def evaluate_accuracy(
    model: DigitClassifier,
    data: torch.utils.data.Dataset,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> tuple[float, float, np.ndarray, np.ndarray]:
    """(mean loss, accuracy, predictions, targets) over a labelled dataset."""
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    model.eval()
    losses, preds, targets = [], [], []
    with torch.no_grad():
        for x, y in loader:
            logits = model(x.to(device))  # (B, 10)
            losses.append(F.cross_entropy(logits, y.to(device), reduction="sum").item())
            preds.append(logits.argmax(-1).cpu().numpy())
            targets.append(y.numpy())
    preds_a, targets_a = np.concatenate(preds), np.concatenate(targets)
    return sum(losses) / len(targets_a), float((preds_a == targets_a).mean()), preds_a, targets_a


def configure_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="classifier_cmd", metavar="CMD", required=True)
    e = sub.add_parser("test", help="accuracy and confusion matrix of a trained classifier")
    e.add_argument(
        "--run", help="run key in params.yaml: checkpoint, dataset and output folder from there"
    )
    e.add_argument("--ckpt", type=Path, help="classifier checkpoint (file or folder)")
    e.add_argument("--prepared", type=Path, help="prepared dataset folder")
    e.add_argument("--split", default="test", help="split to evaluate (test)")
    e.add_argument("--out", type=Path, help="output folder for metrics/confusion files")
    e.add_argument("--device", help="cpu / cuda (default: cuda if available)")


def run(args: argparse.Namespace) -> int:
    """`sashimi classifier test` (training is `sashimi train --run classifier-sc09`)."""
    ckpt, prepared, out_dir = args.ckpt, args.prepared, args.out
    if args.run:
        from sashimi.config import load_params

        P = load_params(args.params)
        rc = P.run(args.run)
        ckpt = ckpt or rc.run_dir / "checkpoints" / "best.pt"
        prepared = prepared or P.dataset(rc.dataset).prepared_dir
        out_dir = out_dir or rc.run_dir
    if ckpt is None or prepared is None or out_dir is None:
        raise UserError("classifier test: give --run RUN, or --ckpt, --prepared and --out")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_classifier(ckpt, map_location=device)
    res = confusion_report(model, Path(prepared), Path(out_dir), split=args.split)
    print(json.dumps({k: res[k] for k in ("accuracy", "n", "split")}))
    return 0


def confusion_report(
    model: DigitClassifier, prepared: Path, out_dir: Path, split: str = "test"
) -> dict:
    """Accuracy and confusion matrix -> out_dir/classifier_{metrics.json, confusion.csv, .md, .png}."""
    data = labelled_split(prepared, split)
    if len(data) == 0:
        raise UserError(f"{prepared}: split {split!r} is empty")
    dev = next(model.parameters()).device
    loss, acc, preds, targets = evaluate_accuracy(model, data, device=dev)
    cm = np.zeros((N_CLASSES, N_CLASSES), dtype=np.int64)  # rows: true, cols: predicted
    np.add.at(cm, (targets, preds), 1)
    per_class = (np.diag(cm) / np.maximum(cm.sum(1), 1)).tolist()
    out_dir = Path(out_dir)
    res = dict(
        accuracy=acc,
        loss=loss,
        n=int(len(targets)),
        split=split,
        prepared=str(prepared),
        per_class_accuracy=per_class,
        confusion=cm.tolist(),
        checkpoint_sha256=getattr(model, "checkpoint_sha256", None),
    )
    write_json(out_dir / "classifier_metrics.json", res)
    header = ["true \\ predicted"] + [str(c) for c in range(N_CLASSES)]
    with atomic_write(out_dir / "confusion.csv", "w") as f:
        w = csv.writer(f)
        w.writerow(header)
        for c in range(N_CLASSES):
            w.writerow([c, *cm[c].tolist()])
    md = [
        f"Accuracy on `{split}`: {100 * acc:.2f}% ({int(np.trace(cm))}/{len(targets)})",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    md += [
        "| " + " | ".join([f"**{c}**", *map(str, cm[c].tolist())]) + " |" for c in range(N_CLASSES)
    ]
    with atomic_write(out_dir / "confusion.md", "w") as f:
        f.write("\n".join(md) + "\n")
    _plot_confusion(cm, acc, split, out_dir / "confusion.png")
    return res


def _plot_confusion(cm: np.ndarray, acc: float, split: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(6, 5))
    sns.heatmap(cm, annot=True, fmt="d", cmap="Blues", cbar=False, ax=ax, square=True)
    ax.set_xlabel("predicted digit")
    ax.set_ylabel("true digit")
    ax.set_title(f"digit classifier, {split}: accuracy {100 * acc:.2f}%")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    with atomic_write(path, "wb") as f:
        f.write(buf.getvalue())
