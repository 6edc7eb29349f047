"""The SC09 digit classifier behind FID / IS / mIS / AM: log-mel front end and ResNeXt.

Model (SPEC "SC09 evaluation protocol"): ResNeXt-29 (cardinality 8, base width 64, widen
factor 4; stages 64/256/512/1024, global average pool, Linear(1024 -> 10)) on 1 x 32 x 32
log-mel spectrograms. Front end as librosa's defaults: 1 s at 16 kHz (pad/trim), n_fft 2048,
hop 512, 32 Slaney mel bands with Slaney area normalisation, centred frames with reflect
padding, power 2 -> dB relative to the clip's maximum (amin 1e-10, top_db 80).
16,000 / 512 centred -> 32 frames, so the input is 32 x 32.

`width` scales every channel count (width 0.125 is a CPU-sized model; `feature_dim` scales
with it); `depth` = 9 b + 2 gives b bottleneck blocks per stage (29 -> 3). `load_classifier`
reads our checkpoints and the authors' released `resnext.pth`.
Labelled clips: `classifier_data`; training: `classifier_train`; accuracy and the
`sashimi classifier test` verb: `classifier_accuracy`; SC09 metrics: `sc09_scoring`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn

from sashimi.errors import UserError
from sashimi.io import SAMPLE_RATE
from sashimi.released_classifier import convert_state_dict, read_released

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
