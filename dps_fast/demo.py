"""The ``dps-fast demo``: DPS on a 1-D deblurring problem whose exact posterior is known.

A two-component Gaussian-mixture prior on signals of length 64 (smooth bumps around two
different mean shapes), a circular Gaussian blur of width 3 px and measurement noise
``sigma_n^2 = 0.01``. DPS samples are compared with exact posterior samples for a guidance
scale that is too small, about right and too large: per scale, the DPS mean +- 2 std against
the exact posterior's, the x0hat trajectory from t = T to 0, and the errors, all from the same
number of samples (64 by default). ``dps-fast explore`` shows the same problem with a slider.

The problem itself is :func:`dps_fast.problems.demo_problem`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from ._help import HelpFormatter, check_out_file, count, int_at_least, positive_float, positive_int
from .distances import sliced_w2
from .divergence import NonFiniteError
from .noise import seeds_from
from .operators.base import LinearOperator
from .problems import demo_problem
from .schedule import NoiseSchedule

logger = logging.getLogger(__name__)

__all__ = ["run_demo", "run_zetas", "ZetaRun", "scan_errors", "record_steps", "one_thread", "add_parser",
           "DEFAULT_ZETA", "DEFAULT_OUT", "FIGURE_SUFFIXES", "TOO_LARGE_FACTORS"]

# "About right" for squared guidance on this problem (250 of 1000 steps), from a scan with 500
# samples: relative error of the DPS mean vs the exact posterior mean / sliced W2 to exact samples
# zeta 0.001: 0.29 / 0.142, 0.003: 0.12 / 0.054, 0.005: 0.041 / 0.035, 0.01: 0.12 / 0.074,
# 0.02: 0.22 / 0.114, 0.04: diverges. The figure shows zeta / 10 and a "too large" one beside it.
DEFAULT_ZETA = 0.005
# "Too large": the first of these multiples of zeta that does not diverge. 4x (0.02) is the largest
# tested scale that stays finite for problem seeds 0-2 at 50 and 250 steps (0.025 runs away at
# steps 34-40 of 250), where the mean error is ~5x the tuned one and the samples fit the noise.
TOO_LARGE_FACTORS = (4.0, 3.0, 2.0)
#: Where ``dps-fast demo`` writes its figure (ignored by git; the README says so).
DEFAULT_OUT = Path("demo_out") / "dps_demo.png"
#: What ``--out`` may end in (matplotlib picks the format from the suffix).
FIGURE_SUFFIXES = (".png", ".pdf", ".svg")


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the 1-D problem on one intra-op thread, then restore the count.

    Its tensors are rows of 64 values, where torch's thread pool only adds overhead: measured on the
    2-core CI machine while other jobs ran, ``dps-fast explore --steps 60 --samples 32`` took 16.6 s
    with OMP_NUM_THREADS=1 and 148 s with 2.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def record_steps(steps: int, count: int = 7) -> list[int]:
    """``count`` step indices from the first (``t = T``) to the last (``i = 0``), evenly spaced."""
    return sorted({int(round(k * (steps - 1) / (count - 1))) for k in range(count)}, reverse=True)


@dataclass
class ZetaRun:
    """One guidance scale of a scan: samples ``[S, *x]``, trajectory ``{i: [S, *x]}``, residual
    norms ``[S]``; or, for a scale whose chains diverged, ``diverged`` (the error) and no samples."""

    zeta: float
    samples: Optional[torch.Tensor] = None
    trajectory: dict[int, torch.Tensor] = field(default_factory=dict)
    residual_norm: Optional[torch.Tensor] = None
    diverged: Optional[NonFiniteError] = None


def run_zetas(model: Callable, schedule: NoiseSchedule, operator: LinearOperator, y: torch.Tensor, sigma_n: float,
              zetas: Sequence[float], samples: int, seed: int = 0, record: Sequence[int] = (),
              guidance: str = "squared", clip_x0: Optional[tuple[float, float]] = None, backend: str = "auto",
              log: Optional[Callable[[str], None]] = None, max_batch: int = 64, progress: bool = False,
              method: str = "dps", **dps_options: Any) -> list[ZetaRun]:
    """``method`` (DPS by default; :mod:`dps_fast.methods.registry`) for one measurement
    ``y [1, *out]`` at each value ``zetas`` of its hyperparameter, with the same noise for all.

    Guidance scales run together as rows of one batch (one zeta per row, the same ``samples``
    seeds per row), at most ``max_batch`` rows at a time; a batch in which a chain diverges is
    split in halves until each diverging scale is alone, and that scale gets ``diverged`` set.
    A hyperparameter that is not per measurement (DDRM's eta) runs one value per call.
    ``guidance`` and ``clip_x0`` go to the methods that take them.
    """
    from .methods.registry import get_method

    spec = get_method(method)
    unused = spec.cls.unused_options
    if spec.guided:
        dps_options["guidance"] = guidance
    if "clip_x0" not in unused:
        dps_options["clip_x0"] = clip_x0
    elif clip_x0 is not None:
        raise ValueError(f"clip_x0: {spec.name} does not clip x0hat, got {clip_x0!r}")
    if y.dim() < 2 or y.shape[0] != 1:
        raise ValueError(f"y: expected one measurement [1, ...], got shape {tuple(y.shape)}")
    say = log or logger.info
    seeds = seeds_from(None, samples, seed)
    runs: dict[int, ZetaRun] = {}

    def run(idx: list[int]) -> None:
        if spec.param == "zeta":  # one guidance scale per row
            value: Any = torch.tensor([float(zetas[k]) for k in idx], dtype=torch.float64)
        elif len(idx) > 1:
            for k in idx:
                run([k])
            return
        else:
            value = float(zetas[idx[0]])
        dps = spec.build(model, schedule, operator, value, sigma_n=sigma_n, backend=backend, **dps_options)
        rows = y.expand((len(idx),) + tuple(y.shape[1:]))
        try:
            res = dps.sample(rows, num_samples=samples, seeds=seeds.expand(len(idx), samples).clone(), record=record,
                             progress=progress)
        except NonFiniteError as exc:
            if len(idx) == 1:
                runs[idx[0]] = ZetaRun(float(zetas[idx[0]]), diverged=exc)
                say(f"  {spec.param} {float(zetas[idx[0]]):.3g}: diverged at step i={exc.step} "
                    f"(t={exc.timestep}, {exc.kind})")
                return
            half = len(idx) // 2
            run(idx[:half])
            run(idx[half:])
            return
        for b, k in enumerate(idx):
            runs[k] = ZetaRun(float(zetas[k]), res.samples[b].detach().cpu(),
                              {i: v[b].detach().cpu() for i, v in res.trajectory.items()},
                              res.residual_norm[b].detach().cpu())
        span = f"{float(zetas[idx[0]]):.3g}" + (f" .. {float(zetas[idx[-1]]):.3g}" if len(idx) > 1 else "")
        say(f"  {spec.param} {span}: {count(len(idx), 'value')} x "
            f"{count(samples, 'sample')} x {schedule.num_steps} steps done")

    order = list(range(len(zetas)))
    for start in range(0, len(order), max_batch):
        run(order[start:start + max_batch])
    return [runs[k] for k in order]


def scan_errors(r: ZetaRun, post_mean: torch.Tensor, exact: torch.Tensor) -> dict[str, float]:
    """Errors of one scale's samples: relative L2 error of their mean to the exact posterior mean,
    sliced W2 to the exact samples ``exact [n, d]``, and their mean residual norm (the sampler's)."""
    s = r.samples[:, 0]
    return {"mean_rel_err": float((s.mean(0) - post_mean).norm() / post_mean.norm()),
            "sliced_w2": sliced_w2(s, exact), "residual_norm": float(r.residual_norm.mean())}


def run_demo(out: str | Path = DEFAULT_OUT, seed: int = 0, zeta: float = DEFAULT_ZETA, steps: int = 250,
             samples: int = 64, progress: bool = True, log: Optional[Callable[[str], None]] = None) -> dict:
    """Run the demo and write the figure to ``out``; returns a summary dict (errors, timings).

    Every guidance scale gets ``samples`` DPS samples (the errors of each panel come from them)
    and the same noise. Needs matplotlib (``pip install 'dps-fast[demo]'``).
    """
    if not (isinstance(steps, int) and steps >= 2):
        raise ValueError(f"steps: expected an int >= 2, got {steps!r}")
    if not (isinstance(samples, int) and samples >= 2):
        raise ValueError(f"samples: expected an int >= 2 (the panels show a standard deviation), got {samples!r}")
    if not (math.isfinite(zeta) and zeta > 0):
        raise ValueError(f"zeta: expected a finite number > 0, got {zeta!r}")
    # matplotlib appends ".png" to a name without a suffix: the figure must land where "wrote" says
    out = check_out_file(out, "out", FIGURE_SUFFIXES)
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the demo draws with matplotlib: pip install 'dps-fast[demo]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with one_thread():
        return _run_demo(plt, out, seed, zeta, steps, samples, progress, log or logger.info)


def _run_demo(plt: Any, out: str | Path, seed: int, zeta: float, steps: int, samples: int, progress: bool,
              say: Callable[[str], None]) -> dict:
    t0 = time.perf_counter()
    p = demo_problem(seed=seed)
    sched = NoiseSchedule.linear(1000).respace(steps)
    post = p.prior.posterior(p.A, p.y, p.sigma_n)
    exact = post.sample(2000, generator=torch.Generator().manual_seed(seed + 1))[0, :, 0]
    record = record_steps(steps)
    candidates = [zeta / 10, zeta] + [f * zeta for f in TOO_LARGE_FACTORS]
    say(f"DPS at zeta {', '.join(f'{z:.3g}' for z in candidates)}: {samples} samples x {steps} steps each")
    runs = run_zetas(p.prior.eps_model(sched), sched, p.operator, p.y, p.sigma_n, candidates, samples, seed,
                     record, backend="torch", log=say, progress=progress)
    for r, label in zip(runs[:2], ("too small", "about right")):
        if r.diverged is not None:
            raise NonFiniteError(f"the {label} scale zeta {r.zeta:.3g} diverged: {r.diverged}", step=r.diverged.step,
                                 timestep=r.diverged.timestep, kind=r.diverged.kind)
    large = next((r for r in runs[2:] if r.diverged is None), None)
    if large is None:
        last = runs[-1].diverged
        tried = ", ".join(f"{r.zeta:.3g}" for r in runs[2:])
        raise NonFiniteError(f"every 'too large' scale diverged (zeta {tried}; the smallest at step i={last.step}, "
                             f"t={last.timestep}): even {min(TOO_LARGE_FACTORS):g} x {zeta:g} diverges on this "
                             f"problem; pass a smaller --zeta", step=last.step, timestep=last.timestep, kind=last.kind)
    panels = {"too small": runs[0], "about right": runs[1], "too large": large}
    pm = post.mean[0]
    ps = post.cov[0].diagonal().sqrt()
    floor = sliced_w2(exact[:samples], exact[samples:])  # what `samples` exact samples themselves score
    summary: dict[str, Any] = {"zeta": {k: r.zeta for k, r in panels.items()}, "steps": steps,
                               "samples": {k: int(r.samples.shape[0]) for k, r in panels.items()},
                               "sliced_w2_floor": floor}
    for label, r in panels.items():
        for k, v in scan_errors(r, pm, exact).items():
            summary[f"{k}[{label}]"] = v
    noise_level = p.sigma_n * math.sqrt(p.y.numel())
    exact_rnorm = (exact @ p.A.T - p.y[0, 0]).norm(dim=1)  # [n] residual of each exact sample
    exact_resid = float(exact_rnorm.mean())

    s = torch.arange(p.x0.shape[-1])
    truth = p.x0[0, 0]
    fig, ax = plt.subplots(3, 3, figsize=(17, 13), constrained_layout=True)
    colours = {"too small": "tab:green", "about right": "tab:blue", "too large": "tab:red"}

    def axes(a: Any, title: str, ylabel: str = "signal value", xlabel: str = "position (pixel)") -> None:
        a.set_title(title, fontsize=10)
        a.set_xlabel(xlabel)
        a.set_ylabel(ylabel)
        a.grid(alpha=0.3)

    a = ax[0, 0]
    a.plot(s, truth, "k", lw=2, label="truth x0")
    a.plot(s, p.y[0, 0], ".", color="tab:purple", label="measurement y (blur 3 px + noise, $\\sigma_n^2$ = 0.01)")
    axes(a, "The problem: recover x0 from y")
    a.legend(fontsize=8)
    a = ax[0, 1]
    best = panels["about right"].samples[:, 0]
    for j in range(min(8, len(best))):
        a.plot(s, best[j], color="tab:blue", alpha=0.5, lw=1, label="DPS samples" if j == 0 else None)
        a.plot(s, exact[j], color="tab:orange", alpha=0.6, lw=1, ls="--", label="exact posterior samples" if j == 0 else None)
    a.plot(s, truth, "k", lw=2, label="truth")
    axes(a, f"8 posterior samples at zeta = {zeta:.3g} (about right)")
    a.legend(fontsize=8)
    a = ax[0, 2]
    bins = torch.linspace(0, max(float(r.residual_norm.max()) for r in panels.values()) * 1.05, 40).numpy()
    a.hist(exact_rnorm.numpy(), bins=bins, density=True, color="tab:orange", alpha=0.35,
           label="exact posterior")
    for label, r in panels.items():
        a.hist(r.residual_norm.numpy(), bins=bins, density=True, histtype="step", lw=2, color=colours[label],
               label=f"DPS, zeta {r.zeta:.3g} ({label})")
    a.axvline(noise_level, color="k", ls=":", label=f"noise level $\\sigma_n \\sqrt{{d}}$ = {noise_level:.2f}")
    axes(a, "Residual ||A x - y|| of each sample\n(left of the noise level: fitting the noise)", ylabel="density",
         xlabel="residual norm")
    a.legend(fontsize=7)
    for col, (label, r) in enumerate(panels.items()):
        smp = r.samples[:, 0]
        m, sd = smp.mean(0), smp.std(0)
        a = ax[1, col]
        a.fill_between(s, m - 2 * sd, m + 2 * sd, color=colours[label], alpha=0.3, label="DPS mean $\\pm$ 2 std")
        a.plot(s, m, color=colours[label], lw=2, label="DPS mean")
        a.plot(s, pm, color="tab:orange", lw=2, ls="--", label="exact posterior mean")
        a.plot(s, pm - 2 * ps, color="tab:orange", lw=1.2, ls=":", label="exact mean $\\pm$ 2 std")
        a.plot(s, pm + 2 * ps, color="tab:orange", lw=1.2, ls=":")
        a.plot(s, truth, "k", lw=1, label="truth")
        ratio = float(sd.mean() / ps.mean())
        summary[f"std_ratio[{label}]"] = ratio
        axes(a, f"zeta = {r.zeta:.3g} ({label}), {len(smp)} samples\nmean error {summary[f'mean_rel_err[{label}]']:.2f}, "
                f"sliced W2 {summary[f'sliced_w2[{label}]']:.3f}, DPS std = {ratio:.2f} x exact std")
        a.legend(fontsize=7, loc="upper left")
        a = ax[2, col]
        cmap = plt.get_cmap("viridis")
        for k, i in enumerate(record):
            a.plot(s, r.trajectory[i][0, 0], color=cmap(k / max(1, len(record) - 1)), lw=1.2,
                   label=f"t = {int(sched.timesteps[i])}")
        a.plot(s, truth, "k--", lw=1, label="truth")
        axes(a, f"x0hat of one chain from t = T to 0\nzeta = {r.zeta:.3g} ({label})")
        a.legend(fontsize=7, ncol=2, loc="upper left")
    ymin = min(float(truth.min()), float(pm.min() - 2 * ps.max())) - 0.6
    ymax = max(float(truth.max()), float(pm.max() + 2 * ps.max())) + 0.6
    for a in list(ax[1]) + list(ax[2]):
        a.set_ylim(ymin, ymax)  # one scale: the harm of a too-large zeta is not rescaled away
    fig.suptitle(f"dps_fast demo: DPS on 1-D Gaussian deblurring, Gaussian-mixture prior, exact posterior known "
                 f"({steps} steps)\nfor scale: {samples} exact samples score sliced W2 {floor:.3f}, and a residual of "
                 f"{exact_resid:.2f} on average")
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    summary["out"] = str(out)
    summary["nfe"] = 2 * steps - 1
    summary["seconds"] = time.perf_counter() - t0
    return summary


def _main(args: argparse.Namespace) -> int:
    check_out_file(args.out, "--out", FIGURE_SUFFIXES)  # before the sampling, not after it
    print(f"dps-fast demo: 1-D Gaussian deblurring (sigma_b = 3 px, sigma_n^2 = 0.01), Gaussian-mixture prior, "
          f"{args.steps} steps, {args.samples} samples per zeta, seed {args.seed}", flush=True)
    summary = run_demo(out=args.out, seed=args.seed, zeta=args.zeta, steps=args.steps, samples=args.samples,
                       progress=not args.quiet, log=None if args.quiet else (lambda m: print(m, flush=True)))
    for label, z in summary["zeta"].items():
        print(f"  zeta {z:.3g} ({label}): mean error {summary[f'mean_rel_err[{label}]']:.3f} (relative L2 vs the "
              f"exact posterior mean), sliced W2 {summary[f'sliced_w2[{label}]']:.3f} (exact samples score "
              f"{summary['sliced_w2_floor']:.3f}), residual {summary[f'residual_norm[{label}]']:.2f}")
    print(f"wrote {summary['out']} in {summary['seconds']:.1f} s")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``demo`` on an ``add_subparsers()`` object."""
    p = subparsers.add_parser(
        "demo", help="1-D DPS demo with an exact posterior; writes one PNG", formatter_class=HelpFormatter,
        description="DPS on 1-D Gaussian deblurring with a Gaussian-mixture prior, whose exact posterior is "
                    "known:\nthe DPS mean +- 2 std, x0hat over t and the errors for a guidance scale that is too "
                    "small,\nabout right and too large. 'dps-fast explore' shows the same problem with a slider.")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="the figure's file (.png, .pdf or .svg)")
    p.add_argument("--seed", type=int, default=0, help="problem and sampler seed")
    p.add_argument("--zeta", type=positive_float, default=DEFAULT_ZETA,
                   help="the 'about right' guidance scale; the figure also shows zeta/10 and a too large one "
                        f"(the first of {', '.join(f'{f:g}' for f in TOO_LARGE_FACTORS)} x zeta that does not "
                        f"diverge) (default: %(default)s, tuned on this problem)")
    p.add_argument("--steps", type=positive_int, default=250, help="sampling steps, respaced from 1000")
    p.add_argument("--samples", type=int_at_least(2), default=64,
                   help="posterior samples per guidance scale (>= 2: the panels show a standard deviation)")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.set_defaults(func=_main)
    return p
