"""CUDA code paths: S4 kernel, SaShiMi conv / step (eager and compiled), bf16 training, DiffWave.

Marked `gpu`; every test skips without CUDA (CI has none). Each compares the GPU result with
the CPU result or an official fixture, so a wrong CUDA path fails here rather than in a run.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from sashimi.models import build_model
from sashimi.models.sashimi import SaShiMi
from sashimi.ssm import kernels
from sashimi.ssm.s4 import S4Kernel

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _exact_fp32():
    """TF32 off: the float32 comparisons below are against float32 CPU results."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return float((a - b).abs().max() / b.abs().max())


def _steps(model, x: torch.Tensor) -> torch.Tensor:
    state = model.default_state(x.shape[0], device=x.device)
    out = []
    with torch.no_grad():
        for t in range(x.shape[1]):
            y, state = model.step(x[:, t], state)
            out.append(y)
    return torch.stack(out, 1)  # (B, L, 256)


@pytest.mark.parametrize("compiled", ["never", "always"])
def test_s4_kernel_cuda_matches_naive_cpu(compiled):
    """The fast Cauchy path on CUDA (eager and torch.compile/Triton) == the naive CPU oracle."""
    torch.manual_seed(0)
    ref = S4Kernel(16, N=64, backend="naive").double()
    fast = S4Kernel(16, N=64, backend="torch").double()
    fast.load_state_dict(ref.state_dict())
    fast = fast.to(CUDA)
    kernels.set_compile_mode(fast, compiled)
    k_ref, k_gpu = ref(1024), fast(1024)
    assert k_gpu.is_cuda
    assert _rel(k_gpu, k_ref) < 1e-9
    k32 = fast.float()(1024)
    assert _rel(k32, k_ref) < 1e-4


def test_official_fixture_logits_on_cuda(fixtures_dir):
    from sashimi.import_checkpoint import convert_state_dict, load_into_model

    fx = torch.load(fixtures_dir / "sashimi_small.pt", weights_only=True)
    sd = {k[len("state_dict.") :]: v for k, v in fx.items() if k.startswith("state_dict.")}
    m = load_into_model(*convert_state_dict(sd)).to(CUDA).eval()
    x, T = fx["x"].to(CUDA), int(fx["T_step"])
    with torch.no_grad():
        conv = m(x)
    assert conv.is_cuda and (conv.cpu().double() - fx["logits_conv_fp64"]).abs().max() < 1e-4
    m.setup_step()
    step = _steps(m, x[:, :T])
    assert (step.cpu().double() - fx["logits_step_fp64"]).abs().max() < 1e-4


@pytest.mark.parametrize("compile", [False, True])
def test_step_matches_conv_on_cuda(compile):
    """Recurrent mode on CUDA (float64 modal state on the GPU; compiled with Triton or eager)."""
    torch.manual_seed(1)
    m = SaShiMi(d_model=16, n_layers=2, pool=(4, 4), glu=True).to(CUDA).eval()
    x = torch.randint(0, 256, (3, 256), device=CUDA)
    with torch.no_grad():
        conv = m(x)
    m.setup_step(compile=compile, cuda_graph=False)  # (graphs: the test below)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step = _steps(m, x)
    assert not [w for w in caught if "using eager" in str(w.message)]
    assert (step - conv).abs().max().item() < 1e-3


def _graph_warnings(caught) -> list:
    return [w for w in caught if "eager" in str(w.message) or "without graphs" in str(w.message)]


@pytest.mark.parametrize("compile", [True, False])
def test_cuda_graph_steps_match_conv_and_restart_cleanly(compile):
    """Steps replayed from CUDA graphs (compiled fused stages with in-place states, or the
    eager per-block step whose states are new tensors each step) == conv mode; a second
    generation from a new default_state repeats the first exactly; a stale state raises."""
    torch.manual_seed(5)
    m = SaShiMi(d_model=16, n_layers=2, pool=(4, 4), glu=True).to(CUDA).eval()
    x = torch.randint(0, 256, (3, 200), device=CUDA)
    with torch.no_grad():
        conv = m(x)
    m.setup_step(compile=compile, cuda_graph=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = _steps(m, x)
        assert "graphed" in m.default_state(3)  # the graphs were captured and are used
    assert not _graph_warnings(caught)
    assert (first - conv).abs().max().item() < 1e-3
    torch.testing.assert_close(_steps(m, x), first, rtol=0, atol=1e-6)
    old, new = m.default_state(3), m.default_state(3)
    with pytest.raises(RuntimeError, match="newer default_state"):
        m.step(x[:, 0], old)
    m.step(x[:, 0], new)


def test_generate_with_cuda_graphs_equals_without():
    from sashimi.sample import generate_ar

    torch.manual_seed(6)
    m = SaShiMi(d_model=16, n_layers=2, pool=(4, 4), glu=True).to(CUDA).eval()
    out = {}
    for graphs in (True, False):
        m.setup_step(compile=True, cuda_graph=graphs)
        g = torch.Generator(device=CUDA).manual_seed(7)
        out[graphs] = generate_ar(m, 2, 300, generator=g, setup=False)
    assert torch.equal(out[True][0], out[False][0])
    torch.testing.assert_close(out[True][1], out[False][1])


def test_paper_model_forward_cuda_equals_cpu_and_bf16_is_close():
    torch.manual_seed(2)
    m = SaShiMi(d_model=64, n_layers=8, glu=True).eval()
    x = torch.randint(0, 256, (2, 4096))
    with torch.no_grad():
        cpu = m(x)
        g = m.to(CUDA)(x.to(CUDA))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf = m(x.to(CUDA))
    assert _rel(g, cpu) < 1e-4
    assert bf.dtype == torch.bfloat16  # the output linear ran in bf16
    assert torch.isfinite(bf).all() and _rel(bf.float(), cpu) < 0.1
    # the bf16 model predicts nearly the same distribution
    p, q = F.log_softmax(cpu, -1), F.log_softmax(bf.float().cpu(), -1)
    assert F.kl_div(q, p, log_target=True, reduction="batchmean").item() / x.shape[1] < 1e-2


@pytest.mark.parametrize("compiled", ["never", "always"])
def test_bf16_training_steps_reduce_the_loss_on_cuda(compiled):
    """The trainer's (fused) AdamW under bf16 autocast on a fixed batch, with the S4 kernel, norm
    and S4 tail eager or compiled: gradients finite, loss goes down."""
    from sashimi.config import TrainConfig
    from sashimi.optim import build_optimizer

    torch.manual_seed(3)
    m = build_model("sashimi", d_model=32, n_layers=2, glu=True).to(CUDA).train()
    opt = build_optimizer(m, TrainConfig(lr=3e-3, ssm_lr=3e-3))
    assert all(g["fused"] for g in opt.param_groups)
    x = torch.randint(0, 256, (4, 2048), device=CUDA)
    y = torch.roll(x, -1, 1)
    losses = []
    kernels.set_compile_mode(m, compiled)
    for _ in range(12):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = m(x)
        loss = F.cross_entropy(logits.float().reshape(-1, 256), y.reshape(-1))
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert not kernels._compile_broken
    assert losses[-1] < losses[0] - 0.2, losses


def test_diffwave_sashimi_backbone_cuda_equals_cpu():
    torch.manual_seed(4)
    m = build_model("diffwave", backbone="sashimi", d_model=16, n_layers=2).eval()
    with torch.no_grad():  # the output conv starts at zero (DiffWave's init): move every weight
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 1024)
    t = torch.tensor([3, 40])
    with torch.no_grad():
        cpu = m(x, t)
        gpu = m.to(CUDA)(x.to(CUDA), t.to(CUDA))
    assert _rel(gpu, cpu) < 1e-4
