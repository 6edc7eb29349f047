"""SampleRNN: official fixture, step vs conv, truncated-BPTT state carrying, causality."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sashimi.errors import UserError
from sashimi.models import MODELS, build_model, count_parameters
from sashimi.models.samplernn import SampleRNN, dequantize, from_official_state_dict

SMALL = dict(frame_sizes=[4, 2], n_rnn=1, d_hidden=32, d_model=16)
TINY3 = dict(frame_sizes=(2, 2, 2), n_rnn=2, d_hidden=24, d_model=8)


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
    return torch.load(fixtures_dir / "samplernn_small.pt", weights_only=True)


def _run_steps(model, x, state):
    out = []
    for t in range(x.shape[1]):
        logits, state = model.step(x[:, t], state)
        out.append(logits)
    return torch.stack(out, 1)  # (B, L, 256)


def _padded(model, y):
    """Dataset-style input: shifted right with 128 first, left-padded with `context` 128s."""
    return torch.cat([torch.full((y.shape[0], model.context + 1), 128), y[:, :-1]], 1)


def test_registry_and_sizes():
    assert MODELS["samplernn"] is SampleRNN and SampleRNN.kind == "ar"
    paper = build_model("samplernn")
    assert count_parameters(paper) == 35_034_624
    assert paper.lookback == 32 and paper.context == 31
    two_tier = SampleRNN(frame_sizes=(16, 4), n_rnn=2)
    assert count_parameters(two_tier) == 51_848_704 and two_tier.lookback == 64
    assert count_parameters(SampleRNN(**SMALL)) == 35_616


def test_fixture_conv_and_step(fixture):
    model = SampleRNN(**SMALL).eval()
    sd = from_official_state_dict(fixture)
    assert sd.keys() == model.state_dict().keys()
    model.load_state_dict(sd)
    assert model.lookback == fixture["samplernn_lookback"]
    x, x_step = fixture["samplernn_x"], fixture["samplernn_x_step"]  # (2, 71), (2, 64)
    assert torch.equal(x[:, model.context :], x_step)
    with torch.no_grad():
        conv = model(x)  # learned h0
    torch.testing.assert_close(conv, fixture["samplernn_logits_conv_fp32"], rtol=0, atol=1e-5)
    step = _run_steps(model, x_step, model.default_state(2))
    torch.testing.assert_close(step, fixture["samplernn_logits_step_fp32"], rtol=0, atol=1e-5)
    # float64 (the official code cannot): agrees with the fp32 reference to fp32 noise
    model64 = model.double()
    with torch.no_grad():
        conv64 = model64(x)
    torch.testing.assert_close(
        conv64, fixture["samplernn_logits_conv_fp32"].double(), rtol=0, atol=1e-5
    )
    torch.testing.assert_close(
        _run_steps(model64, x_step, model64.default_state(2)), conv64, rtol=0, atol=1e-12
    )


def test_dequantize_official():
    q = torch.tensor([0, 64, 128, 192, 255])
    lin = dequantize(q, "linear")
    torch.testing.assert_close(lin, q.float() / 128 - 1)
    mu = dequantize(q, "mu-law", torch.float64)
    x = q.double() / 128 - 1
    torch.testing.assert_close(mu, torch.sign(x) * (256 ** x.abs() - 1) / 255)
    assert mu[2] == 0 and mu[0] == -1


@pytest.mark.parametrize("quantization", ["mu-law", "linear"])
def test_step_equals_conv(quantization):
    """Step (window of 128s, consuming each token, x[0] arbitrary) == conv over 128 steps."""
    torch.manual_seed(1)
    model = SampleRNN(**TINY3, quantization=quantization).double().eval()
    for p in model.parameters():  # move h0 and biases off their zero init
        p.data.add_(0.1 * torch.randn_like(p))
    y = torch.randint(0, 256, (3, 128))
    x = torch.cat([torch.full((3, model.context), 128), y], 1)
    with torch.no_grad():
        conv = model(x)
    step = _run_steps(model, y, model.default_state(3))
    torch.testing.assert_close(step, conv, rtol=0, atol=1e-10)


def test_tbptt_chunks_equal_whole():
    """Two chunks (overlapping by lookback - 1 tokens) carrying the state == one pass."""
    torch.manual_seed(2)
    model = SampleRNN(**TINY3).double()
    C, L = model.context, 4 * model.lookback
    x = _padded(model, torch.randint(0, 256, (2, L)))  # (2, C + L)
    whole, h_whole = model(x, return_state=True)
    half = L // 2
    a, h = model(x[:, : C + half], return_state=True)
    b, h2 = model(x[:, half:], state=model.detach_state(h), return_state=True)
    torch.testing.assert_close(torch.cat([a, b], 1), whole, rtol=0, atol=1e-12)
    for u, v in zip(h2, h_whole):
        torch.testing.assert_close(u, v, rtol=0, atol=1e-12)
    assert all(not s.requires_grad for s in model.detach_state(h))


def test_causal():
    torch.manual_seed(3)
    model = SampleRNN(**TINY3).double().eval()
    C, t = model.context, 21
    x = torch.randint(0, 256, (2, C + 64))
    x2 = x.clone()
    x2[:, C + t] = (x2[:, C + t] + 100) % 256  # token x[t]: may affect logits t.. only
    with torch.no_grad():
        a, b = model(x), model(x2)
    assert (a[:, :t] - b[:, :t]).abs().max() == 0 and (a[:, t:] - b[:, t:]).abs().max() > 0


def test_bad_length():
    model = SampleRNN(**SMALL)
    with pytest.raises(UserError, match="lookback"):
        model(torch.full((1, 7 + 12), 128))


def test_options_build_and_run():
    for kw in (dict(weight_norm=False), dict(learn_h0=False)):
        model = SampleRNN(**SMALL, **kw)
        x = torch.full((2, model.context + 16), 128)
        assert model(x).shape == (2, 16, 256)
        names = {n for n, _ in model.named_parameters()}
        assert ("frame_level_rnns.0.rnn.h0" in names) == kw.get("learn_h0", True)
        assert ("sample_level_mlp.input.weight_g" in names) == kw.get("weight_norm", True)
    with pytest.raises(UserError, match="quantization"):
        SampleRNN(quantization="mulaw")


def test_training_lowers_loss():
    torch.manual_seed(4)
    model = SampleRNN(**SMALL)
    y = torch.randint(0, 256, (4, 128))
    x = _padded(model, y)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert model.frame_level_rnns[0].rnn.h0.grad.abs().sum() > 0
    assert losses[-1] < losses[0] - 0.3
    # the no-grad weight-norm cache follows the optimizer's in-place updates
    with torch.no_grad():
        cached = model(x)
    opt.step()
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, model(x).detach(), rtol=0, atol=0)
    assert (after - cached).abs().max() > 0
