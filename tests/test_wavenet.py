"""WaveNet: official fixture, fast queue step vs convolution and the naive oracle, causality."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sashimi.errors import UserError
from sashimi.models import MODELS, build_model, count_parameters
from sashimi.models.wavenet import WaveNet, from_official_state_dict

SMALL = dict(
    layers=3, blocks=2, dilation_channels=8, residual_channels=8, skip_channels=16, end_channels=16
)
TINY = dict(
    layers=4,
    blocks=2,
    dilation_channels=16,
    residual_channels=16,
    skip_channels=32,
    end_channels=32,
)


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
    return torch.load(fixtures_dir / "wavenet_small.pt", weights_only=True)


def _official_model(fx) -> WaveNet:
    model = WaveNet(**SMALL)
    model.load_state_dict(from_official_state_dict(fx))
    return model.eval()


def _run_steps(model, x, state, step=None):
    step = step or model.step
    out = []
    for t in range(x.shape[1]):
        logits, state = step(x[:, t], state)
        out.append(logits)
    return torch.stack(out, 1)  # (B, L, 256)


def test_registry_and_sizes():
    assert MODELS["wavenet"] is WaveNet and WaveNet.kind == "ar"
    paper = build_model("wavenet")
    assert count_parameters(paper) == 4_244_480
    assert paper.context == paper.receptive_field == 4093
    assert count_parameters(WaveNet(skip_channels=512)) == 2_671_616
    small = WaveNet(**SMALL)
    assert count_parameters(small) == 140_688 and small.context == 15


@pytest.mark.parametrize(
    "prec,dtype,tol", [("fp32", torch.float32, 2e-6), ("fp64", torch.float64, 1e-12)]
)
def test_fixture_conv_and_step(fixture, prec, dtype, tol):
    model = _official_model(fixture).to(dtype)
    x = fixture["wavenet_x"]  # (2, 143): 15 x 128, then a sequence starting with 128
    assert model.context == fixture["wavenet_receptive_field"]
    assert count_parameters(model) == fixture["wavenet_params_total_small"]
    with torch.no_grad():
        conv = model(x)  # (2, 128, 256)
        causal = model.forward_causal(x)  # (2, 143, 256)
    ref_conv, ref_step = (
        fixture[f"wavenet_logits_conv_{prec}"],
        fixture[f"wavenet_logits_step_{prec}"],
    )
    assert conv.dtype == dtype
    torch.testing.assert_close(conv, ref_conv, rtol=0, atol=tol)
    step = _run_steps(model, x, model.default_state(2))  # zero queues, as generate.py
    torch.testing.assert_close(step, ref_step, rtol=0, atol=tol)
    torch.testing.assert_close(causal, ref_step, rtol=0, atol=tol)
    naive = _run_steps(model, x, model.default_state_naive(2), model.step_naive)
    torch.testing.assert_close(naive, ref_step, rtol=0, atol=tol)


def test_v2_key_mapping(fixture):
    sd = from_official_state_dict(fixture)
    v2 = {
        ("state_dict.model." + k if not k.startswith(("embedding", "decoder")) else k): v
        for k, v in sd.items()
    }
    v2["encoder.weight"] = v2.pop("embedding.weight")
    v2["decoder.output_transform.weight"] = v2.pop("decoder.weight")
    v2["decoder.output_transform.bias"] = v2.pop("decoder.bias")
    assert from_official_state_dict(v2).keys() == sd.keys()


def test_step_equals_conv_long():
    """>= 1024 queue steps (state primed with `context` 128s) == one convolution pass."""
    torch.manual_seed(1)
    model = WaveNet(**TINY).eval()
    RF, L = model.context, 1024
    y = torch.randint(0, 256, (2, L))
    x = torch.cat([torch.full((2, RF), 128), y], 1)  # dataset-style 128 left padding
    with torch.no_grad():
        conv = model(x)  # (2, L, 256)
    step = _run_steps(model, y, model.default_state(2, prime_token=128))
    torch.testing.assert_close(step, conv, rtol=1e-4, atol=1e-4)
    # from zero queues the step equals the zero-padded causal convolution
    with torch.no_grad():
        causal = model.forward_causal(y)
    torch.testing.assert_close(
        _run_steps(model, y, model.default_state(2)), causal, rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("kw", [dict(TINY), dict(TINY, kernel_size=3, bias=True)])
def test_queue_step_equals_naive(kw):
    torch.manual_seed(2)
    model = WaveNet(**kw).double().eval()
    x = torch.randint(0, 256, (3, model.context + 40))
    fast = _run_steps(model, x, model.default_state(3))
    naive = _run_steps(model, x, model.default_state_naive(3), model.step_naive)
    torch.testing.assert_close(fast, naive, rtol=0, atol=1e-10)


def test_causal():
    torch.manual_seed(3)
    model = WaveNet(**TINY).double().eval()
    RF, t = model.context, 50
    x = torch.randint(0, 256, (2, RF + 100))
    x2 = x.clone()
    x2[:, RF + t] = (x2[:, RF + t] + 77) % 256
    with torch.no_grad():
        a, b = model(x), model(x2)  # logits[:, j] is for input position RF + j
        ca, cb = model.forward_causal(x), model.forward_causal(x2)
    assert (a[:, :t] - b[:, :t]).abs().max() == 0 and (a[:, t] - b[:, t]).abs().max() > 0
    assert (ca[:, : RF + t] - cb[:, : RF + t]).abs().max() == 0


def test_bad_length():
    model = WaveNet(**SMALL)
    with pytest.raises(UserError, match="receptive field"):
        model(torch.full((1, 15), 128))


def test_training_lowers_loss():
    torch.manual_seed(4)
    model = WaveNet(**TINY)
    RF = model.context
    y = torch.randint(0, 256, (4, 256))
    x = torch.cat([torch.full((4, RF + 1), 128), y[:, :-1]], 1)  # shifted right, 128 first
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
