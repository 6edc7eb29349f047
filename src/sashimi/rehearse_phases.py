"""The phases of `sashimi rehearse`, each in a fresh process so that its peak memory is its own.

- train: `sashimi.train.Trainer` for spec["steps"] optimiser steps in total (validation on one
  batch, a checkpoint every step), resuming from last.pt when spec["resume"]. The classifier's
  trainer has no per-step hook: its time per step is the whole fit over its steps (validation
  included), an upper bound.
- sample: autoregressive runs: SAMPLE_STEPS recurrent steps at the run's sampling batch through
  `sashimi.sample.sample_run`; diffusion runs: DIFFUSION_STEPS denoising steps of the fast
  sampler at spec["length"], DIFFUSION_CLIPS clips.
- evaluate: autoregressive runs: NLL of about EVAL_TOKENS test samples; SC09 runs: FID / IS /
  mIS / AM of their samples with the rehearsal's own classifier; classifier: test accuracy.
Each result holds the phase's peak RSS (ru_maxrss of its process and children); a failure
becomes {"error": one line}.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import resource
import time
from pathlib import Path

from sashimi.errors import UserError
from sashimi.io import SAMPLE_RATE

SAMPLE_STEPS = 256  # recurrent sampling steps of an autoregressive run
DIFFUSION_STEPS = 2  # denoising steps of a diffusion run (fast sampler)
DIFFUSION_CLIPS = 2  # clips per diffusion sampling rehearsal (FID needs two)
EVAL_TOKENS = 64000  # NLL on about this many test samples (4 SC09 clips; 1 music chunk)


# ============================================================================ one phase, one process
def run_phase(phase: str, spec: dict, timeout_s: float) -> dict:
    """Run `phase` of spec["run"] in a fresh process; its result, or {"error": one line}."""
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(phase, spec, send))
    t0 = time.monotonic()
    proc.start()
    send.close()
    try:
        if not recv.poll(timeout_s):
            proc.kill()
            proc.join()
            return {"error": f"{phase} timed out after {timeout_s:.0f} s"}
        try:
            out = recv.recv()
        except EOFError:
            proc.join()
            code = proc.exitcode
            why = "killed (out of memory?)" if code is not None and code < 0 else f"exit {code}"
            return {"error": f"{phase} process died: {why}"}
    except BaseException:  # interrupted: the child goes too
        proc.kill()
        proc.join()
        raise
    finally:
        recv.close()
    proc.join(30)
    out["phase_s"] = round(time.monotonic() - t0, 1)
    return out


def _child(phase: str, spec: dict, conn) -> None:
    os.environ["SASHIMI_TRACKING"] = "0"  # a rehearsal is not a run: nothing goes to MLflow
    os.environ["SASHIMI_PROGRESS"] = "0"
    if spec.get("memory_gb"):
        limit = int(spec["memory_gb"] * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        import torch

        torch.set_num_threads(int(spec["threads"]))
        os.chdir(spec["workdir"])
        out = PHASES[phase](spec)
        out["peak_rss_mb"] = _peak_rss_mb()
        if torch.cuda.is_available() and spec["device"] == "cuda":
            out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    except BaseException as e:  # every failure becomes one line in the table
        out = {"error": f"{phase} failed: {type(e).__name__}: {_first_line(e)}"}
    conn.send(out)
    conn.close()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else "")[:200]


def _peak_rss_mb() -> float:
    """Peak resident set of this process and of its largest finished child (ru_maxrss, KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own, kids) / 1024, 1)


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _load(spec: dict):
    """(params at paper scale, the run with the rehearsal's training overrides)."""
    from sashimi.config import load_params

    P = load_params(spec["params"], scale="paper")
    run = P.run(spec["run"])
    tc = dataclasses.replace(
        run.train, batch_size=spec["batch"], max_steps=spec["steps"], max_minutes=None,
        val_batches=1, log_every=1, ckpt_every=1, num_workers=0,
    )  # fmt: skip
    return P, dataclasses.replace(run, train=tc)


# ============================================================================ the phases
def _train(spec: dict) -> dict:
    """`sashimi train` for spec["steps"] steps in total (resuming from last.pt when asked)."""
    import torch

    from sashimi.distributed import init_distributed
    from sashimi.train import Trainer

    P, run = _load(spec)
    device = torch.device(spec["device"])
    if run.kind == "classifier":
        return _train_classifier(P, run, spec, device)

    class TimedTrainer(Trainer):
        """The trainer, timing each optimiser step and noting the RSS before the first."""

        times: list[float] = []
        first_step: int | None = None
        rss_before: float | None = None

        def _train_step(self, x, y):
            if self.first_step is None:
                self.first_step, self.rss_before = self.step, _current_rss_mb()
            t0 = time.perf_counter()
            out = super()._train_step(x, y)
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - t0)
            return out

    trainer = TimedTrainer(
        P, run, device=device, dist=init_distributed(device), resume=spec["resume"],
        root=Path.cwd(), progress=False,
    )  # fmt: skip
    summary = trainer.fit()
    if spec["resume"] and trainer.first_step != spec["steps"] - 1:
        raise UserError(f"resumed at step {trainer.first_step}, expected {spec['steps'] - 1}")
    return {
        "params": trainer.n_params,
        "step": summary["step"],
        "step_s": trainer.times,
        "rss_before_step_mb": trainer.rss_before,
    }


def _train_classifier(P, run, spec: dict, device) -> dict:
    """`sashimi train` of the classifier run; its trainer has no per-step hook, so the time per
    step is the whole fit (validation included) over the steps it ran: an upper bound."""
    from sashimi.classifier_train import train_classifier_run

    done = 0
    last = Path(run.run_dir) / "checkpoints" / "last.pt"
    if spec["resume"] and last.is_file():
        from sashimi.checkpoints import load_checkpoint

        done = int(load_checkpoint(last).get("step", 0))
    t0 = time.perf_counter()
    res = train_classifier_run(P, run, device=device, resume=spec["resume"])
    elapsed = time.perf_counter() - t0
    ran = max(1, res["step"] - done)
    return {
        "params": res["n_params"],
        "step": res["step"],
        "step_s": [elapsed / ran] * ran,
        "rss_before_step_mb": None,  # unknown: memory is not scaled to the paper batch
        "upper_bound": True,
    }


def _sample(spec: dict) -> dict:
    import torch

    from sashimi.sample import sample_run

    P, run = _load(spec)
    if run.kind == "classifier":
        return {"shape": "n/a"}
    device = torch.device(spec["device"])
    common = dict(checkpoint=None, out=None, device=device, progress=False, root=Path.cwd(),
                  temperature=run.sample.temperature, top_p=run.sample.top_p)  # fmt: skip
    if run.kind == "ar":
        b = run.sample.batch_size
        res = sample_run(P, run, n=b, seconds=SAMPLE_STEPS / SAMPLE_RATE, batch_size=b, **common)
        speed = _read_json(res["summary"])
        return {"shape": f"{b} x {SAMPLE_STEPS} steps", "s_per_step": speed["seconds_per_step"]}
    length = spec["length"]
    res = sample_run(P, run, n=DIFFUSION_CLIPS, seconds=length / SAMPLE_RATE,
                     batch_size=DIFFUSION_CLIPS, sampler="fast", fast_steps=DIFFUSION_STEPS,
                     **common)  # fmt: skip
    speed = _read_json(res["summary"])
    return {
        "shape": f"{DIFFUSION_CLIPS} x {length} x {DIFFUSION_STEPS} denoising steps",
        "s_per_step": speed["generation_seconds"] / DIFFUSION_STEPS,
    }


def _evaluate(spec: dict) -> dict:
    import torch

    from sashimi import evaluate

    P, run = _load(spec)
    device = torch.device(spec["device"])
    if run.kind == "classifier":
        from sashimi.classifier import load_classifier
        from sashimi.classifier_accuracy import confusion_report

        model = load_classifier(run.run_dir / "checkpoints", map_location=device)
        res = confusion_report(model, P.dataset_of(run.key).prepared_dir, run.run_dir)
        return {"eval": f"test accuracy {res['accuracy']:.3f} on {res['n']} clips"}
    parts = []
    if run.kind == "ar":
        parts.append(_nll(P, run, device, spec["length"]))
    clf = evaluate.default_classifier_path(P)
    if run.dataset.startswith("sc09") and clf.is_file():
        res = evaluate.evaluate_sc09(P, run, classifier_path=clf, samples=None, device=device)
        parts.append(f"FID {res['fid']:.3g} on {res['n_scored']} of {res['n_generated']} clips")
    return {"eval": "; ".join(parts) or "nothing to evaluate"}


def _nll(P, run, device, length: int) -> str:
    """NLL of the first test items, about EVAL_TOKENS samples (items of `length` samples)."""
    import torch

    from sashimi.checkpoints import load_model
    from sashimi.data.datasets import AutoregressiveDataset, load_split
    from sashimi.evaluate import nll_bits

    model, _ = load_model(run.run_dir, map_location=device)
    ds = P.dataset_of(run.key)
    split = load_split(ds.prepared_dir, "test")
    data = AutoregressiveDataset(split, ds.quantization, ds.chunk_length,
                                 context=int(getattr(model, "context", 0)))  # fmt: skip
    n = max(1, min(len(data), EVAL_TOKENS // length))
    with torch.inference_mode():
        bits, count = nll_bits(model, torch.utils.data.Subset(data, range(n)), n, device)
    return f"NLL {bits:.3f} bits on {n} test items"


def _read_json(path) -> dict:
    from sashimi.io import read_json

    return read_json(path)


PHASES = {"train": _train, "sample": _sample, "evaluate": _evaluate}
