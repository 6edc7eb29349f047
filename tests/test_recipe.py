"""The training recipe: every optimiser setting of params.yaml takes effect, the paper runs agree
with the official recipe (or docs/recipes.md says why not), and the paper-scale sashimi-sc09
optimiser reproduces the official 8-step trajectory (fixture sashimi_small_train.pt) in float64."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
import yaml
from torch import nn

from conftest import ROOT  # tests/ is on sys.path
from sashimi.ar_loss import n_targets, nll_sum
from sashimi.config import TrainConfig, load_params
from sashimi.errors import UserError
from sashimi.import_checkpoint import convert_state_dict, load_into_model
from sashimi.optim import build_optimizer, build_scheduler, is_plateau, ssm_parameters
from sashimi.ssm.s4 import S4Block

N_STEPS = 8


# ------------------------------------------------------------------ every setting takes effect


def _block() -> nn.Module:
    """One S4 block: SSM parameters, C and D and a matrix (decay), a bias (no decay)."""
    return S4Block(8, d_state=4).double()


def _one_step(tc: TrainConfig, grad: float = 1.0) -> tuple[nn.Module, dict, dict]:
    """Parameters before and after one optimiser step with every gradient set to `grad`."""
    m = _block()
    opt = build_optimizer(m, tc)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for p in m.parameters():
        p.grad = torch.full_like(p, grad)
    opt.step()
    return m, before, {n: p.detach().clone() for n, p in m.named_parameters()}


def _kind(m: nn.Module, name: str) -> str:
    p = dict(m.named_parameters())[name]
    return "ssm" if id(p) in ssm_parameters(m) else "no_decay" if p.ndim < 2 else "decay"


@pytest.mark.parametrize("lr, ssm_lr", [(1e-3, 1e-3), (4e-3, 1e-3), (2e-4, 3e-3)])
def test_lr_and_ssm_lr_set_the_first_adam_step(lr, ssm_lr):
    """Adam's first step with a constant gradient moves every entry by exactly its lr."""
    tc = TrainConfig(lr=lr, ssm_lr=ssm_lr, weight_decay=0.0)
    m, before, after = _one_step(tc)
    for name in before:
        want = ssm_lr if _kind(m, name) == "ssm" else lr
        moved = (before[name] - after[name]).abs()
        assert torch.allclose(moved, torch.full_like(moved, want), rtol=1e-6), name


@pytest.mark.parametrize("wd", [0.0, 0.01, 0.1])
def test_weight_decay_shrinks_the_decay_group_only(wd):
    """With zero gradients AdamW only decays: p -> p (1 - lr wd) on matrices, C and D."""
    tc = TrainConfig(lr=1e-2, weight_decay=wd)
    m, before, after = _one_step(tc, grad=0.0)
    kinds = {_kind(m, n) for n in before}
    assert kinds == {"ssm", "decay", "no_decay"}
    for name in before:
        f = 1 - 1e-2 * wd if _kind(m, name) == "decay" else 1.0
        assert torch.allclose(after[name], before[name] * f, rtol=0, atol=1e-15), name
    assert ("kernel.C" in before) and _kind(m, "kernel.C") == "decay" and _kind(m, "D") == "decay"


@pytest.mark.parametrize("optimizer, cls", [("adamw", torch.optim.AdamW),
                                            ("adam", torch.optim.Adam),
                                            ("sgd", torch.optim.SGD)])  # fmt: skip
def test_optimizer_choice_and_groups(optimizer, cls):
    tc = TrainConfig(optimizer=optimizer, lr=3e-3, ssm_lr=5e-4, weight_decay=0.05)
    opt = build_optimizer(_block(), tc)
    assert type(opt) is cls
    g = {x["name"]: x for x in opt.param_groups}
    assert (g["decay"]["lr"], g["decay"]["weight_decay"]) == (3e-3, 0.05)
    assert (g["no_decay"]["lr"], g["no_decay"]["weight_decay"]) == (3e-3, 0.0)
    assert (g["ssm"]["lr"], g["ssm"]["weight_decay"]) == (5e-4, 0.0)
    with pytest.raises(UserError, match="optimizer"):
        build_optimizer(_block(), TrainConfig(optimizer="lamb"))


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_sgd_momentum(momentum):
    """Two SGD steps with a constant gradient g move by lr g, then lr g (1 + momentum)."""
    m = _block()
    opt = build_optimizer(m, TrainConfig(optimizer="sgd", lr=0.1, weight_decay=0.0,
                                         momentum=momentum))  # fmt: skip
    p = m.output_linear.weight
    steps = [p.detach().clone()]
    for _ in range(2):
        for q in m.parameters():
            q.grad = torch.ones_like(q)
        opt.step()
        steps.append(p.detach().clone())
    d1, d2 = steps[0] - steps[1], steps[1] - steps[2]
    assert torch.allclose(d1, torch.full_like(d1, 0.1))
    assert torch.allclose(d2, torch.full_like(d2, 0.1 * (1 + momentum)))


def _lrs(tc: TrainConfig, n: int, val_loss: float | None = None) -> list[float]:
    """The lr after each of n scheduler steps (plateau: with a constant validation loss)."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, tc)
    out = []
    for _ in range(n):
        opt.step()
        sched.step(val_loss) if is_plateau(sched) else sched.step()
        out.append(opt.param_groups[0]["lr"])
    return out


@pytest.mark.parametrize("patience, factor", [(1, 0.5), (3, 0.2)])
def test_plateau_patience_and_factor(patience, factor):
    lrs = _lrs(TrainConfig(scheduler="plateau", patience=patience, factor=factor), 6, 1.0)
    first_cut = patience + 1  # the first value sets the best, then `patience` bad ones are allowed
    assert lrs[:first_cut] == [1.0] * first_cut
    assert lrs[first_cut] == pytest.approx(factor)


def test_step_schedule_milestones_and_factor():
    lrs = _lrs(TrainConfig(scheduler="step", milestones=(3, 5), factor=0.5), 7)
    assert lrs == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.25])
    with pytest.raises(UserError, match="milestones"):
        _lrs(TrainConfig(scheduler="step"), 1)


@pytest.mark.parametrize("warmup, total", [(2, 6), (4, 10)])
def test_cosine_warmup_and_max_steps(warmup, total):
    lrs = _lrs(TrainConfig(scheduler="cosine", warmup_steps=warmup, max_steps=total), total)
    assert lrs[warmup - 1] == pytest.approx(1.0)  # warm-up done after `warmup` steps
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)  # decayed to zero at max_steps


# ------------------------------------------------------------------ the paper runs' recipe


@pytest.fixture(scope="module")
def paper():
    return load_params(ROOT / "params.yaml", scale="paper")


def test_every_paper_run_builds_its_optimizer(paper):
    """Each run's TrainConfig reaches the optimiser unchanged (tiny stand-in model)."""
    for key, run in paper.runs.items():
        if run.kind == "classifier":
            continue  # trained by sashimi.classifier_train (SGD, its own recipe)
        tc = run.train
        g = {x["name"]: x for x in build_optimizer(_block(), tc).param_groups}
        assert (g["decay"]["lr"], g["decay"]["weight_decay"]) == (tc.lr, tc.weight_decay), key
        assert (g["ssm"]["lr"], g["ssm"]["weight_decay"]) == (tc.ssm_lr, 0.0), key
        build_scheduler(build_optimizer(_block(), tc), tc, key)


def _official(fixtures_dir):
    """official_recipes.yaml: beside the fixtures here, or in ../shared/reference."""
    for path in (fixtures_dir / "official_recipes.yaml",
                 fixtures_dir.parent / "reference" / "official_recipes.yaml"):  # fmt: skip
        if path.is_file():
            return yaml.safe_load(path.read_text())
    pytest.fail(f"official_recipes.yaml is neither in {fixtures_dir} nor in ../shared/reference")


def test_autoregressive_paper_runs_follow_the_official_optimiser(paper, fixtures_dir):
    off = _official(fixtures_dir)
    common = off["s4_common"]
    assert common["optimizer"]["weight_decay"][0] == 0.0
    plateau = common["scheduler_plateau"]
    for key, run in paper.runs.items():
        if run.kind != "ar":
            continue
        tc = run.train
        assert tc.optimizer == "adamw" and tc.weight_decay == 0.0, key
        assert tc.ssm_lr == common["per_param"]["A"]["lr"][0], key
        assert tc.scheduler == "plateau" and tc.factor == plateau["factor"][0], key
        assert tc.val_every == "epoch", key  # the plateau steps once per epoch on val loss
        assert tc.amp is False, key  # official precision 32
        spec = off["runs"].get(key)
        if not spec or "lr" not in spec:  # no official config: documented in docs/recipes.md
            continue
        assert tc.lr == spec["lr"][0], key
        assert tc.batch_size == spec["batch_size"][0], key
        assert tc.max_epochs == spec["max_epochs"][0], key
        sched = spec.get("scheduler")
        own = isinstance(sched, dict) and "patience" in sched
        assert tc.patience == (sched if own else plateau)["patience"][0], key
        clip = spec.get("gradient_clip")
        assert tc.clip_grad == (clip["value"][0] if clip else None), key


def test_recipes_table_has_one_row_per_paper_run(paper):
    text = (ROOT / "docs" / "recipes.md").read_text()
    rows = re.findall(r"^\| `([a-z0-9-]+)` \|", text, flags=re.M)
    assert sorted(rows) == sorted(paper.runs), "docs/recipes.md: one row per run of params.yaml"


# ------------------------------------------------------------------ the official trajectory


def _sd(fx: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in fx.items() if k.startswith(prefix)}


def _trajectory(fx: dict, tc: TrainConfig, n_steps: int) -> tuple[list, list, nn.Module]:
    """n_steps of the trainer's update in float64 from the official initial weights: loss
    (ar_loss.nll_sum / n_targets, the trainer's loss), backward, clipping if configured,
    optimizer step, scheduler step. Returns the losses, gradient norms and the model."""
    model = load_into_model(*convert_state_dict(_sd(fx, "state_dict_init."))).double().train()
    opt = build_optimizer(model, tc)
    sched = build_scheduler(opt, tc)
    losses, norms = [], []
    for s in range(n_steps):
        x, y = fx["x"][s], fx["y"][s]  # (2, 2048) each
        loss = nll_sum(model(x), y, dtype=torch.float64) / n_targets(y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.cat(grads))))
        losses.append(float(loss.detach()))
        if tc.clip_grad:
            nn.utils.clip_grad_norm_(model.parameters(), tc.clip_grad)
        opt.step()
        if not is_plateau(sched):
            sched.step()
    return losses, norms, model


@pytest.fixture(scope="module")
def train_fx(fixtures_dir):
    return torch.load(fixtures_dir / "sashimi_small_train.pt", weights_only=True)


@pytest.fixture(scope="module")
def sc09_tc(paper):
    tc = paper.run("sashimi-sc09").train
    assert tc.clip_grad is None and tc.optimizer == "adamw"  # official: no clipping, AdamW
    return tc


@pytest.fixture(scope="module")
def official_run(train_fx, sc09_tc):
    return _trajectory(train_fx, sc09_tc, N_STEPS)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def test_trajectory_losses_and_grad_norms_match_official_fp64(train_fx, official_run):
    losses, norms, _ = official_run
    ref_loss, ref_norm = train_fx["loss_fp64"].tolist(), train_fx["grad_norm_fp64"].tolist()
    assert len(losses) == len(ref_loss) == int(train_fx["n_steps"])
    assert max(_rel(a, b) for a, b in zip(losses, ref_loss)) < 1e-9
    assert max(_rel(a, b) for a, b in zip(norms, ref_norm)) < 1e-9


def test_trajectory_final_weights_match_official_fp64(train_fx, official_run):
    _, _, model = official_run
    want, _ = convert_state_dict(_sd(train_fx, "state_dict_final_fp64."))
    got = model.state_dict()
    assert set(got) == set(want)
    for k, w in want.items():
        g = got[k]
        if not w.is_floating_point():  # l_kernel: the C~ lengths 128 / 512 / 2048
            assert torch.equal(g, w), k
            continue
        scale = w.double().abs().max().clamp_min(1e-12)
        assert (g.double() - w.double()).abs().max() / scale < 1e-9, k


def test_weight_decay_0_01_would_fail_the_trajectory(train_fx, sc09_tc):
    """The test is sensitive: the old weight decay 0.01 leaves the trajectory at step 1."""
    losses, _, model = _trajectory(train_fx, dataclasses.replace(sc09_tc, weight_decay=0.01), 1)
    x, y = train_fx["x"][1], train_fx["y"][1]
    with torch.no_grad():
        loss1 = float(nll_sum(model(x), y, dtype=torch.float64) / n_targets(y))
    ref = train_fx["loss_fp64"].tolist()
    assert _rel(losses[0], ref[0]) < 1e-9  # same start
    assert _rel(loss1, ref[1]) > 1e-8  # measured 5.8e-7


def test_nll_sum_keeps_the_logits_precision_and_never_sums_below_float32():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, 256, generator=g, dtype=torch.float64)
    y = torch.randint(0, 256, (3, 50), generator=g)
    y[0, :7] = -100  # padding is not counted
    want = -logits.log_softmax(-1).gather(-1, y.clamp(min=0)[..., None])[..., 0][y >= 0].sum()
    got = nll_sum(logits, y)
    assert got.dtype == torch.float64 and abs(float(got - want)) < 1e-10 * float(want)
    assert nll_sum(logits.float(), y).dtype == torch.float32
    assert nll_sum(logits.bfloat16(), y).dtype == torch.float32
