"""The SC09 digit classifier behind FID / IS / mIS / AM, and the scoring protocol.

Model (SPEC "SC09 evaluation protocol"): ResNeXt-29 (cardinality 8, base width 64, widen
factor 4; stages 64/256/512/1024, global average pool, Linear(1024 -> 10)) on 1 x 32 x 32
log-mel spectrograms. Front end as librosa's defaults: 1 s at 16 kHz (pad/trim), n_fft 2048,
hop 512, 32 Slaney mel bands with Slaney area normalisation, centred frames with reflect
padding, power 2 -> dB relative to the clip's maximum (amin 1e-10, top_db 80).
16,000 / 512 centred -> 32 frames, so the input is 32 x 32.

`width` scales every channel count (width 0.125 is a CPU-sized model; `feature_dim` scales
with it); `depth` = 9 b + 2 gives b bottleneck blocks per stage (29 -> 3).

Training (`sashimi train --run classifier-sc09`, recipe in params.yaml) lives in
`classifier_train`.

CLI: `sashimi classifier test --run RUN` (or --ckpt CKPT --prepared DIR --out DIR): accuracy
and confusion matrix (csv / md / png).

Library: `DigitClassifier`, `load_classifier`, `score_samples`, `score_real_split`,
`reference_stats`.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio
from torch import nn

from sashimi import metrics
from sashimi.data.datasets import load_split
from sashimi.errors import UserError
from sashimi.io import atomic_write, read_audio, write_json
from sashimi.released_classifier import convert_state_dict, read_released

SAMPLE_RATE = 16000
CLIP_LENGTH = 16000  # 1 s
N_FFT = 2048
HOP_LENGTH = 512
N_MELS = 32
AMIN = 1e-10
TOP_DB = 80.0
N_CLASSES = 10
MODEL_NAME = "resnext"


# ============================================================================ front end
def fix_length(wav: torch.Tensor, length: int = CLIP_LENGTH) -> torch.Tensor:
    """Right-pad with zeros or trim the last dim to `length`."""
    L = wav.shape[-1]
    if L >= length:
        return wav[..., :length]
    return F.pad(wav, (0, length - L))


def power_to_db(S: torch.Tensor, amin: float = AMIN, top_db: float | None = TOP_DB) -> torch.Tensor:
    """librosa.power_to_db(S, ref=np.max) per spectrogram (over the last two dims)."""
    ref = S.amax(dim=(-2, -1), keepdim=True)  # (..., 1, 1)
    db = 10.0 * torch.log10(S.clamp_min(amin)) - 10.0 * torch.log10(ref.clamp_min(amin))
    if top_db is not None:
        db = torch.maximum(db, db.amax(dim=(-2, -1), keepdim=True) - top_db)
    return db


class LogMel(nn.Module):
    """(B, L) waveform at 16 kHz -> (B, n_mels, frames) dB relative to each clip's maximum."""

    def __init__(
        self,
        sample_rate: int = SAMPLE_RATE,
        n_fft: int = N_FFT,
        hop_length: int = HOP_LENGTH,
        n_mels: int = N_MELS,
        top_db: float | None = TOP_DB,
        pad_mode: str = "reflect",
    ):
        super().__init__()
        self.top_db = top_db
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate,
            n_fft=n_fft,
            win_length=n_fft,
            hop_length=hop_length,
            f_min=0.0,
            f_max=sample_rate / 2,
            n_mels=n_mels,
            window_fn=torch.hann_window,  # periodic, as scipy.signal.get_window("hann", fftbins=True)
            power=2.0,
            center=True,
            pad_mode=pad_mode,
            norm="slaney",
            mel_scale="slaney",
        )

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        S = self.mel(wav)  # (B, n_mels, 1 + L // hop)
        return power_to_db(S, top_db=self.top_db)


# ============================================================================ ResNeXt
class Bottleneck(nn.Module):
    """ResNeXt bottleneck: 1x1 (C_in -> D), grouped 3x3 (D, `cardinality` groups), 1x1 (D -> C_out)."""

    def __init__(self, c_in: int, c_out: int, stride: int, cardinality: int, group_width: int):
        super().__init__()
        D = cardinality * group_width
        self.reduce = nn.Conv2d(c_in, D, 1, bias=False)
        self.bn_reduce = nn.BatchNorm2d(D)
        self.grouped = nn.Conv2d(D, D, 3, stride=stride, padding=1, groups=cardinality, bias=False)
        self.bn_grouped = nn.BatchNorm2d(D)
        self.expand = nn.Conv2d(D, c_out, 1, bias=False)
        self.bn_expand = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn_reduce(self.reduce(x)))  # (B, D, H, W)
        h = F.relu(self.bn_grouped(self.grouped(h)))  # (B, D, H/s, W/s)
        h = self.bn_expand(self.expand(h))  # (B, C_out, H/s, W/s)
        return F.relu(self.shortcut(x) + h)


class DigitClassifier(nn.Module):
    """ResNeXt-29 (8 x 64d, widen 4) on 1 x 32 x 32 log-mel; `width` scales all channels.

    features(wav) -> (B, feature_dim) pooled input of the final linear (FID features);
    logits(wav) -> (B, 10); probs(wav) -> softmax (B, 10). wav: (B, L) at 16 kHz, any L
    (padded / trimmed to 1 s).
    """

    kind = "classifier"

    def __init__(
        self,
        width: float = 1.0,
        depth: int = 29,
        cardinality: int = 8,
        base_width: int = 64,
        widen_factor: int = 4,
        n_classes: int = N_CLASSES,
        pad_mode: str = "reflect",
    ):
        super().__init__()
        if (depth - 2) % 9 != 0 or depth < 11:
            raise UserError(
                f"classifier depth={depth}: must be 9 b + 2 with b >= 1 (e.g. 11, 20, 29)"
            )
        if width <= 0:
            raise UserError(f"classifier width={width}: must be positive")
        self.config = dict(
            width=width,
            depth=depth,
            cardinality=cardinality,
            base_width=base_width,
            widen_factor=widen_factor,
            n_classes=n_classes,
            pad_mode=pad_mode,
        )
        blocks = (depth - 2) // 9
        full = [64, 64 * widen_factor, 128 * widen_factor, 256 * widen_factor]  # 64/256/512/1024

        def scale(c: int) -> int:
            return max(1, int(round(c * width)))

        self.frontend = LogMel(pad_mode=pad_mode)
        self.stem = nn.Sequential(
            nn.Conv2d(1, scale(full[0]), 3, padding=1, bias=False),
            nn.BatchNorm2d(scale(full[0])),
            nn.ReLU(inplace=True),
        )
        stages, c_in = [], scale(full[0])
        for s, c_full in enumerate(full[1:]):
            # per-group width: base_width * (stage width / (widen * 64)) -> 64, 128, 256 at width 1
            group_width = max(1, int(round(base_width * c_full / (widen_factor * 64) * width)))
            c_out = scale(c_full)
            layers = []
            for b in range(blocks):
                stride = 2 if (b == 0 and s > 0) else 1
                layers.append(Bottleneck(c_in, c_out, stride, cardinality, group_width))
                c_in = c_out
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.feature_dim = c_in
        self.fc = nn.Linear(c_in, n_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.checkpoint_sha256: str | None = None  # set by load_classifier

    def spectrogram(self, wav: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, 1, 32, 32) log-mel input."""
        wav = fix_length(wav.float(), CLIP_LENGTH)  # (B, 16000)
        return self.frontend(wav).unsqueeze(1)  # (B, 1, n_mels, frames)

    def embed(self, spec: torch.Tensor) -> torch.Tensor:
        """(B, 1, 32, 32) log-mel -> (B, feature_dim) pooled features."""
        h = self.stages(self.stem(spec))  # (B, C, 8, 8)
        return h.mean(dim=(-2, -1))  # (B, C) global average pool

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(self.spectrogram(wav)))  # (B, 10)

    def features_and_logits(self, wav: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.embed(self.spectrogram(wav))  # (B, feature_dim)
        return feats, self.fc(feats)  # (B, feature_dim), (B, 10)

    def features(self, wav: torch.Tensor) -> torch.Tensor:
        return self.embed(self.spectrogram(wav))

    def logits(self, wav: torch.Tensor) -> torch.Tensor:
        return self.forward(wav)

    def probs(self, wav: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.forward(wav), dim=-1)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _from_released(path: Path) -> tuple[DigitClassifier, dict]:
    """(DigitClassifier in eval mode with the released weights, its kwargs)."""
    our, kwargs = convert_state_dict(read_released(path), str(path))
    model = DigitClassifier(**kwargs)
    own = model.state_dict()  # the front end's fixed buffers (window, mel filters) are ours
    our = {k: v for k, v in own.items() if k.startswith("frontend.")} | our
    try:
        model.load_state_dict(our, strict=True)
    except RuntimeError as e:
        raise UserError(
            f"{path}: weights do not fit DigitClassifier({kwargs}) ({str(e).splitlines()[0][:200]})"
        ) from None
    return model.eval(), kwargs


def load_classifier(path: str | Path, map_location: str | torch.device = "cpu") -> DigitClassifier:
    """A DigitClassifier from a checkpoint file, or a folder holding best.pt, last.pt or
    imported.pt: ours (torch.load weights_only, nothing more) or the authors' released
    `resnext.pth` (DataParallel-wrapped or bare; inert stand-ins, see released_classifier)."""
    from sashimi.released_classifier import is_released_file
    from sashimi.safe_load import load_weights

    path = Path(path)
    if path.is_dir():
        for cand in (
            path / "best.pt",
            path / "checkpoints" / "best.pt",
            path / "last.pt",
            path / "checkpoints" / "last.pt",
            path / "imported.pt",
            path / "checkpoints" / "imported.pt",
        ):
            if cand.is_file():
                path = cand
                break
        else:
            raise UserError(f"{path}: no best.pt, last.pt or imported.pt in this folder")
    if not path.is_file():
        raise UserError(f"{path}: classifier checkpoint not found")
    if is_released_file(path):
        model, _ = _from_released(path)
    else:
        ckpt = load_weights(path, map_location)
        if not isinstance(ckpt, dict) or ckpt.get("model_name") != MODEL_NAME:
            raise UserError(
                f"{path}: not a digit-classifier checkpoint (model_name != {MODEL_NAME!r})"
            )
        model = DigitClassifier(**ckpt["model_kwargs"])
        model.load_state_dict(ckpt["model"])
    model.checkpoint_sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    return model.to(map_location).eval()


# ============================================================================ data
def split_exists(prepared_dir: str | Path, split: str) -> bool:
    return (Path(prepared_dir) / f"{split}.offsets.npy").is_file()


class LabelledWaves(torch.utils.data.Dataset):
    """(waveform FloatTensor[length], label) pairs from an AudioSplit or a (N, L) array."""

    def __init__(
        self,
        source: Any,
        labels: np.ndarray,
        length: int = CLIP_LENGTH,
        indices: np.ndarray | None = None,
    ):
        self.source, self.length = source, length
        self.labels = np.asarray(labels, dtype=np.int64)
        self.indices = np.arange(len(self.labels)) if indices is None else np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int]:
        i = int(self.indices[k])
        x = self.source[i] if isinstance(self.source, np.ndarray) else self.source.clip(i)
        x = fix_length(torch.as_tensor(np.asarray(x, dtype=np.float32)), self.length)  # (length,)
        return x, int(self.labels[i])

    def targets(self) -> np.ndarray:
        return self.labels[self.indices]


def read_clips(paths: Sequence[str | Path], length: int = CLIP_LENGTH) -> np.ndarray:
    """Read audio files (any rate; resampled to 16 kHz), pad/trim to `length` -> (N, length) float32."""
    out = np.zeros((len(paths), length), dtype=np.float32)
    for k, p in enumerate(paths):
        x, sr = read_audio(p)
        t = torch.from_numpy(x)
        if sr != SAMPLE_RATE:
            t = torchaudio.functional.resample(t, sr, SAMPLE_RATE)  # (L',)
        out[k] = fix_length(t, length).numpy()
    return out


# ============================================================================ training
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


def labelled_split(prepared_dir: str | Path, split: str) -> LabelledWaves:
    s = load_split(prepared_dir, split)
    labels = np.asarray(s.labels, dtype=np.int64)
    if len(labels) and np.any(labels < 0):
        raise UserError(
            f"{prepared_dir}/{split}.labels.npy: the classifier needs digit labels 0-9 "
            f"(found {int((labels < 0).sum())} unknown)"
        )
    return LabelledWaves(s, labels)


# ============================================================================ scoring
def classify(
    classifier: DigitClassifier, waves: np.ndarray | torch.utils.data.Dataset, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, feature_dim), probs (N, 10)) as float64; softmax in float64."""
    dev = next(classifier.parameters()).device
    classifier.eval()
    feats, logits = [], []
    if isinstance(waves, np.ndarray):
        batches = (
            torch.from_numpy(np.ascontiguousarray(waves[i : i + batch_size], dtype=np.float32))
            for i in range(0, len(waves), batch_size)
        )
    else:
        batches = (x for x, _ in torch.utils.data.DataLoader(waves, batch_size=batch_size))
    with torch.no_grad():
        for x in batches:
            if not torch.isfinite(x).all():
                raise UserError("audio to classify contains NaN or inf samples")
            f, z = classifier.features_and_logits(x.to(dev))
            feats.append(f.double().cpu().numpy())
            logits.append(z.double().cpu().numpy())
    if not feats:
        raise UserError("no clips to classify")
    z = np.concatenate(logits)  # (N, 10)
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return np.concatenate(feats), p / p.sum(axis=1, keepdims=True)


def classifier_fingerprint(classifier: DigitClassifier) -> str:
    """sha256 of the checkpoint file it was loaded from, else of its state_dict tensors."""
    if getattr(classifier, "checkpoint_sha256", None):
        return classifier.checkpoint_sha256
    h = hashlib.sha256()
    for k, v in classifier.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def dataset_checksum(prepared_dir: str | Path, split: str = "train") -> str:
    """sha256 of the prepared folder's manifest.json (else of the split's offsets + audio size)."""
    d = Path(prepared_dir)
    h = hashlib.sha256()
    if (d / "manifest.json").is_file():
        h.update((d / "manifest.json").read_bytes())
    else:
        offsets = d / f"{split}.offsets.npy"
        if not offsets.is_file():
            raise UserError(f"{offsets}: not found (is {d} a prepared dataset folder?)")
        h.update(offsets.read_bytes())
        h.update(str((d / f"{split}.audio.npy").stat().st_size).encode())
    return h.hexdigest()


def reference_stats(
    classifier: DigitClassifier,
    reference_dir: str | Path,
    split: str = "train",
    cache_dir: str | Path | None = None,
    batch_size: int = 256,
) -> dict[str, np.ndarray]:
    """Feature mean (d,), covariance (d, d) and probabilities (N, 10) of a real split.

    Cached as cache_dir/ref_stats_<sha>.npz, sha over the classifier checkpoint's sha256, the
    reference manifest's checksum and the split name.
    """
    key = hashlib.sha256(
        f"{classifier_fingerprint(classifier)}|{dataset_checksum(reference_dir, split)}|{split}".encode()
    ).hexdigest()[:32]
    cache = Path(cache_dir) / f"ref_stats_{key}.npz" if cache_dir is not None else None
    if cache is not None and cache.is_file():
        with np.load(cache) as z:
            return {k: z[k] for k in z.files}
    data = labelled_split(reference_dir, split) if split_exists(reference_dir, split) else None
    if data is None or len(data) < 2:
        raise UserError(f"{reference_dir}: split {split!r} is missing or has fewer than 2 clips")
    feats, probs = classify(classifier, data, batch_size)
    stats = dict(
        mu=feats.mean(axis=0),
        cov=np.atleast_2d(np.cov(feats, rowvar=False)),
        probs=probs,
        n=np.array(len(feats)),
    )
    if cache is not None:
        with atomic_write(cache, "wb") as f:
            np.savez(f, **stats)
    return stats


def _scores(feats: np.ndarray, probs: np.ndarray, ref: dict[str, np.ndarray]) -> dict[str, float]:
    return metrics.sc09_scores(feats, probs, ref["mu"], ref["cov"], ref["probs"])


def score_samples(
    wav_paths: Sequence[str | Path] | np.ndarray,
    classifier: DigitClassifier,
    reference_dir: str | Path,
    loglik: np.ndarray | None = None,
    autoregressive: bool = True,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[str, float | int]:
    """SC09 metrics of generated clips (paths to audio files, or an (N, L) array at 16 kHz).

    Autoregressive runs: only the clips `metrics.select_paper_subset(loglik, seed)` picks are
    scored (10,240 -> 2,816); diffusion runs: all. Reference: the TRAIN split of the prepared
    `reference_dir`, statistics cached in `cache_dir`. Returns fid, is (paper), is_textbook,
    mis, am, n_scored, n_generated.
    """
    n_generated = len(wav_paths)
    if autoregressive:
        if loglik is None:
            raise UserError(
                "autoregressive samples need their log-likelihoods (samples/loglik.csv) "
                "for the paper's selection; pass autoregressive=False to score all"
            )
        loglik = np.asarray(loglik, dtype=np.float64).reshape(-1)
        if len(loglik) != n_generated:
            raise UserError(f"{len(loglik)} log-likelihoods for {n_generated} samples")
        idx = metrics.select_paper_subset(loglik, seed=seed)
    else:
        idx = np.arange(n_generated)
    if isinstance(wav_paths, np.ndarray):
        waves = np.asarray(wav_paths, dtype=np.float32)[idx]  # (n, L)
        if waves.ndim != 2:
            raise UserError(f"samples: expected an (N, L) array, got shape {np.shape(wav_paths)}")
        if waves.shape[1] != CLIP_LENGTH:
            waves = fix_length(torch.from_numpy(waves), CLIP_LENGTH).numpy()
    else:
        waves = read_clips([wav_paths[i] for i in idx])
    feats, probs = classify(classifier, waves, batch_size)
    ref = reference_stats(classifier, reference_dir, "train", cache_dir, batch_size)
    return dict(_scores(feats, probs, ref), n_scored=int(len(idx)), n_generated=int(n_generated))


def score_real_split(
    prepared_dir: str | Path,
    split: str,
    classifier: DigitClassifier,
    reference_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    max_clips: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[str, float | int]:
    """The paper table's "Train" / "Test" rows: real clips of `split` scored against the train
    split of `reference_dir` (default: the same folder). `max_clips` takes a seeded subset."""
    reference_dir = prepared_dir if reference_dir is None else reference_dir
    data = labelled_split(prepared_dir, split)
    n = len(data)
    if max_clips is not None and n > max_clips:
        data = LabelledWaves(
            data.source,
            data.labels,
            indices=np.sort(np.random.RandomState(seed).permutation(n)[:max_clips]),
        )
    feats, probs = classify(classifier, data, batch_size)
    ref = reference_stats(classifier, reference_dir, "train", cache_dir, batch_size)
    return dict(_scores(feats, probs, ref), n_scored=int(len(data)), n_generated=int(n))


# ============================================================================ CLI
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
