"""Posterior fidelity: DPS, MCG, PiGDM and DDRM against exact posteriors (``dps-fast fidelity``).

Real image problems have no known posterior; analytic priors (:mod:`dps_fast.priors`) do. Each
method runs over a small grid of its own hyperparameter and of the number of steps on four
problems with exact posteriors, and each run is scored against the exact posterior:

* ``gaussian-matrix``: a Gaussian prior on d = 20 (correlated, non-zero mean), a random Matrix A
  (m = 8, entries N(0, 1/d)), sigma_n = 0.1;
* ``mixture-2d``: a four-component Gaussian mixture in 2-D observed through its first coordinate
  (sigma_n = 0.1): the posterior is bimodal along the second;
* ``demo-deblur``: the demo's 1-D circular deblurring problem (:func:`dps_fast.problems.demo_problem`);
* ``inpaint-1d``: a two-component mixture of smooth 1-D signals (d = 32) whose components differ
  only where 8 samples are missing, sigma_n = 0.1.

Per run: the relative error of the posterior mean, the relative Frobenius error of the
covariance, the sliced Wasserstein-2 distance to exact posterior samples of the same count, the
mode weights (mixtures: each sample goes to the posterior component of highest responsibility),
NFE and seconds per sample; beside them the *floor*: the same metrics for exact posterior samples
of the same count. Every run uses the same seed, so all methods start from the same Philox
``x_T`` and the table is reproducible; finished runs are appended to ``rows.jsonl`` at once and
reused by a re-run of the same command, so an interrupted run loses nothing.

Example:
    >>> report = run_fidelity("fidelity_out", grid="tiny", problems=["mixture-2d"])   # doctest: +SKIP
    >>> report.markdown_path.read_text()[:40]                                          # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from .chain import NonFiniteError
from .distances import SlicedReference as Reference, sliced_w2
from .methods.registry import METHODS as REGISTRY
from .methods.registry import get_method
from .operators import Inpainting, Matrix
from .operators.base import LinearOperator
from .priors import GaussianMixturePrior, GaussianPrior, Posterior
from .problems import demo_problem
from .schedule import NoiseSchedule

logger = logging.getLogger(__name__)

__all__ = ["Problem", "Row", "Grid", "GRIDS", "PROBLEMS", "METHODS", "build_problems", "make_sampler", "unsupported",
           "Reference", "exact_draws", "floor_row", "sample_metrics", "sliced_w2", "mode_weights", "run_one", "run_fidelity",
           "FidelityReport", "best_rows", "row_markdown", "write_markdown", "write_plot"]

F64 = torch.float64
#: bump when a problem, metric or grid changes: rows of another version are not reused
VERSION = 2
#: exact posterior samples every run is compared with (sliced W2), and the number of independent
#: exact sets of the run's size whose mean metrics make the floor: between two single sets of 1000
#: samples of the bimodal mixture-2d posterior, sliced W2 ranged 0.02-0.14 over seeds (mode weights
#: fluctuate binomially across modes 2.4 apart), too noisy for a floor
REFERENCE = 20_000
FLOOR_SETS = 5
PROBLEMS = ("gaussian-matrix", "mixture-2d", "demo-deblur", "inpaint-1d")
#: the methods compared, from the registry (dps_fast.methods.registry)
METHODS = tuple(spec.name for spec in REGISTRY.values())
#: the hyperparameter each method is scanned over (DPS and MCG: zeta = c / K, see Grid)
PARAM = {spec.name: spec.param for spec in REGISTRY.values()}


@dataclass
class Problem:
    """One exact-posterior problem: ``y [1, 1, m] = A x0 + sigma_n n`` under ``prior``."""

    name: str
    title: str
    prior: GaussianMixturePrior
    operator: LinearOperator
    A: torch.Tensor            # [m, d] dense float64 (for the exact posterior)
    y: torch.Tensor            # [1, 1, m] float64
    sigma_n: float
    posterior: Posterior = field(init=False)

    def __post_init__(self) -> None:
        self.posterior = self.prior.posterior(self.A, self.y, self.sigma_n)

    @property
    def is_mixture(self) -> bool:
        return self.prior.num_components > 1


def _gaussian_matrix() -> Problem:
    g = torch.Generator().manual_seed(0)
    d, m = 20, 8
    q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))[0]
    cov = q @ torch.diag(torch.logspace(-1, 0, d, dtype=F64)) @ q.T
    prior = GaussianPrior(0.5 * torch.randn(d, generator=g, dtype=F64), cov)
    A = torch.randn(m, d, generator=g, dtype=F64) / math.sqrt(d)
    x0 = prior.sample(1, generator=g)
    y = x0 @ A.T + 0.1 * torch.randn(1, 1, m, generator=g, dtype=F64)
    return Problem("gaussian-matrix", "Gaussian prior (d = 20), random Matrix A (m = 8), sigma_n = 0.1",
                   prior, Matrix(A), A, y, 0.1)


def _mixture_2d() -> Problem:
    prior = GaussianMixturePrior(
        torch.tensor([0.15, 0.35, 0.3, 0.2], dtype=F64),
        torch.tensor([[-1.0, -1.0], [-1.0, 1.2], [1.0, -1.2], [1.0, 0.8]], dtype=F64),
        torch.diag(torch.tensor([0.5**2, 0.25**2], dtype=F64)).expand(4, 2, 2))
    A = torch.tensor([[1.0, 0.0]], dtype=F64)
    return Problem("mixture-2d", "4-component Gaussian mixture in 2-D, first coordinate observed (y = -0.35), "
                   "sigma_n = 0.1: bimodal posterior", prior, Matrix(A), A,
                   torch.tensor([[[-0.35]]], dtype=F64), 0.1)


def _demo_deblur() -> Problem:
    p = demo_problem()
    return Problem("demo-deblur", "the demo: 2-component mixture on d = 64, circular Gaussian blur (3 px), "
                   "sigma_n = 0.1", p.prior, p.operator, p.A, p.y, p.sigma_n)


def _inpaint_1d() -> Problem:
    d = 32
    s = torch.arange(d, dtype=F64)
    cov = 0.2 * torch.exp(-0.5 * ((s[:, None] - s[None, :]) / 2.5) ** 2) + 1e-3 * torch.eye(d, dtype=F64)
    base = 0.3 * torch.sin(2 * math.pi * s / d)
    bump = torch.exp(-0.5 * ((s - 16) / 2.5) ** 2)
    prior = GaussianMixturePrior(torch.tensor([0.4, 0.6], dtype=F64),
                                 torch.stack([base + 0.9 * bump, base - 0.9 * bump]), torch.stack([cov, cov]))
    mask = torch.ones(d, dtype=F64)
    mask[12:20] = 0.0
    g = torch.Generator().manual_seed(3)  # a draw whose posterior keeps both modes (0.77 / 0.23)
    x0 = prior.sample(1, generator=g)
    y = x0 * mask + 0.1 * torch.randn(1, 1, d, generator=g, dtype=F64)
    return Problem("inpaint-1d", "2-component mixture of smooth signals (d = 32) differing only in the "
                   "8 missing samples, sigma_n = 0.1", prior, Inpainting(mask), torch.diag(mask), y, 0.1)


_BUILDERS: dict[str, Callable[[], Problem]] = {
    "gaussian-matrix": _gaussian_matrix, "mixture-2d": _mixture_2d, "demo-deblur": _demo_deblur,
    "inpaint-1d": _inpaint_1d,
}


def _check_names(names: Optional[Iterable[str]], allowed: Sequence[str], what: str) -> list[str]:
    if names is None:
        return list(allowed)
    names = list(names)
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise ValueError(f"{what}: expected some of {', '.join(allowed)}, got {', '.join(bad) or 'none'}")
    return names


def build_problems(names: Optional[Iterable[str]] = None) -> dict[str, Problem]:
    """The problems ``names`` (default all of :data:`PROBLEMS`), deterministic, float64."""
    return {n: _BUILDERS[n]() for n in _check_names(names, PROBLEMS, "problems")}


@dataclass(frozen=True)
class Grid:
    """Steps and hyperparameters per method. For DPS and MCG the values are ``c = zeta * K`` (the
    total guidance over the chain stays comparable across step counts); the table shows zeta."""

    samples: int
    steps: dict[str, tuple[int, ...]]
    values: dict[str, tuple[float, ...]]

    def runs(self, method: str) -> list[tuple[int, float]]:
        """``(steps, hyperparameter value)`` pairs of ``method``, in run order."""
        out = []
        for k in self.steps[method]:
            for c in self.values[method]:
                out.append((k, c / k if method in ("DPS", "MCG") and c > 0 else c))
        return out


GRIDS = {
    # ~200 s of CPU at 1 thread (bench/results/fidelity-default.md holds a run)
    "default": Grid(samples=1000,
                    steps={"DPS": (25, 100, 400), "MCG": (25, 100, 400), "PiGDM": (25, 100, 400),
                           "DDRM": (10, 25, 100)},
                    # c = zeta * K brackets each problem's best DPS/MCG guidance (a scan of c in 0.03..3 at
                    # K = 100: DPS best at 0.3-1 and diverging at 3, MCG best at 0.1-1; DPS's best at K = 400
                    # was the top of c <= 1 on two problems, hence 2). PiGDM's best scale was the top of
                    # 0.5..4 on two problems (r_t^2 = 1 - abar overstates Var[x0 | x_t] for priors narrower
                    # than N(0, I)), hence 8; 0.5 and MCG's c = 2 were never best
                    values={"DPS": (0.1, 0.3, 1.0, 2.0), "MCG": (0.0, 0.1, 0.3, 1.0),
                            "PiGDM": (1.0, 2.0, 4.0, 8.0), "DDRM": (0.5, 0.85, 1.0)}),
    # seconds: for tests and a smoke run
    "tiny": Grid(samples=64, steps={"DPS": (8,), "MCG": (8,), "PiGDM": (8,), "DDRM": (5,)},
                 values={"DPS": (0.3,), "MCG": (0.3,), "PiGDM": (1.0,), "DDRM": (0.85,)}),
}


def make_sampler(method: str, problem: Problem, schedule: NoiseSchedule, value: float) -> Any:
    """``method``'s sampler for ``problem`` with hyperparameter ``value`` (torch backend), or a
    TypeError naming the operator when the method does not support it."""
    spec = get_method(method)
    return spec.build(problem.prior.eps_model(schedule), schedule, problem.operator, value,
                      sigma_n=problem.sigma_n, backend="torch")


# ---- metrics ----------------------------------------------------------------------------------
def mode_weights(samples: torch.Tensor, post: Posterior) -> torch.Tensor:
    """Mean responsibility of each posterior component over ``samples [n, d]`` ``[K]``: for exact
    samples its expectation is the exact weight (counting each sample's most responsible component
    instead biases overlapping modes: 0.32/0.67/0.01/0.01 for exact weights 0.28/0.66/0.04/0.03)."""
    k = post.weights.shape[1]
    logp = torch.empty(samples.shape[0], k, dtype=F64)
    for j in range(k):
        mvn = torch.distributions.MultivariateNormal(post.means[0, j], covariance_matrix=post.covs[j])
        logp[:, j] = post.weights[0, j].log() + mvn.log_prob(samples.to(F64))
    return torch.softmax(logp, dim=1).mean(0)


def sample_metrics(samples: torch.Tensor, problem: Problem, exact: "torch.Tensor | Reference") -> dict[str, Any]:
    """Fidelity of ``samples [n, d]`` to ``problem``'s posterior; ``exact`` its reference draws ``[m, d]``."""
    post = problem.posterior
    s = samples.to(F64)
    mean, cov = post.mean[0], post.cov[0]
    out: dict[str, Any] = {
        "mean_rel_err": float((s.mean(0) - mean).norm() / mean.norm()),
        "cov_rel_err": float((torch.cov(s.T).reshape(cov.shape) - cov).norm() / cov.norm()),
        "sw2": sliced_w2(s, exact),
    }
    if problem.is_mixture:
        w = mode_weights(s, post)
        out["mode_weights"] = [round(float(v), 4) for v in w]
        out["mode_tv"] = 0.5 * float((w - post.weights[0]).abs().sum())
    return out


# ---- runs -------------------------------------------------------------------------------------
@dataclass
class Row:
    """One run (or the floor: ``method == "exact"``). Metrics are NaN when ``note`` says why."""

    problem: str
    method: str
    param: str
    value: float
    steps: int
    nfe: int
    samples: int
    seed: int
    seconds_per_sample: float = float("nan")
    mean_rel_err: float = float("nan")
    cov_rel_err: float = float("nan")
    sw2: float = float("nan")
    mode_weights: Optional[list[float]] = None
    mode_tv: Optional[float] = None
    note: str = ""
    version: int = VERSION

    def key(self) -> str:
        return f"v{self.version}|{self.problem}|{self.method}|{self.value!r}|{self.steps}|{self.samples}|{self.seed}"


def exact_draws(problem: Problem, n: int, seed: int) -> tuple[Reference, list[torch.Tensor]]:
    """The :class:`Reference` of ``REFERENCE`` exact posterior samples and ``FLOOR_SETS`` independent
    sets ``[n, d]`` of exact posterior samples (each from its own seeded generator)."""
    post = problem.posterior

    def draw(m: int, s: int) -> torch.Tensor:
        return post.sample(m, generator=torch.Generator().manual_seed(s))[0, :, 0]

    return Reference(draw(REFERENCE, 10_000 + seed)), [draw(n, 20_000 + 100 * seed + j) for j in range(FLOOR_SETS)]


def floor_row(problem: Problem, n: int, seed: int, reference: Reference, sets: Sequence[torch.Tensor]) -> Row:
    """The metrics of exact samples of size ``n``: the mean over ``sets``; mode weights are the exact ones."""
    ms = [sample_metrics(s, problem, reference) for s in sets]
    row = Row(problem.name, "exact", "-", float("nan"), 0, 0, n, seed, 0.0,
              **{k: sum(m[k] for m in ms) / len(ms) for k in ("mean_rel_err", "cov_rel_err", "sw2")})
    if problem.is_mixture:
        row.mode_weights = [round(float(w), 4) for w in problem.posterior.weights[0]]
        row.mode_tv = sum(m["mode_tv"] for m in ms) / len(ms)
    return row


def unsupported(method: str, problem: Problem) -> str:
    """Why ``method`` cannot run ``problem`` ("" when it can): its operator is not supported."""
    try:
        make_sampler(method, problem, NoiseSchedule.linear(1000).respace(2), 1.0 if method != "DDRM" else 0.5)
    except TypeError as exc:
        if str(exc).startswith("operator:"):
            return f"n/a: {method} does not support {type(problem.operator).__name__}"
        raise
    return ""


def run_one(method: str, problem: Problem, steps: int, value: float, samples: int, seed: int,
            exact: Reference) -> Row:
    """One sampler run scored against the exact posterior (``NonFiniteError`` becomes a note)."""
    row = Row(problem.name, method, PARAM[method], float(value), steps, 0, samples, seed)
    sched = NoiseSchedule.linear(1000).respace(steps)
    sampler = make_sampler(method, problem, sched, value)
    t0 = time.perf_counter()
    try:
        res = sampler.sample(problem.y, num_samples=samples, seed=seed)
    except NonFiniteError as exc:
        row.note = f"diverged ({str(exc).split(':')[0]})"
        return row
    row.seconds_per_sample = (time.perf_counter() - t0) / samples
    row.nfe = res.nfe
    for k, v in sample_metrics(res.samples[0, :, 0], problem, exact).items():
        setattr(row, k, v)
    if not math.isfinite(row.sw2):
        row.note = "non-finite samples"
    return row


@dataclass
class FidelityReport:
    rows: list[Row]
    out_dir: Path
    markdown_path: Path
    plot_path: Path
    seconds: float
    reused: int


def _load_rows(path: Path) -> dict[str, Row]:
    rows: dict[str, Row] = {}
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            row = Row(**json.loads(line))
        except (ValueError, TypeError):
            logger.warning("fidelity: skipping an unreadable line of %s", path)
            continue
        if row.version == VERSION:
            rows[row.key()] = row
    return rows


def run_fidelity(
    out: str | Path = "fidelity_out", grid: str = "default", problems: Optional[Sequence[str]] = None,
    methods: Optional[Sequence[str]] = None, seed: int = 0, samples: Optional[int] = None, fresh: bool = False,
    threads: int = 1, log: Optional[Callable[[str], None]] = None,
) -> FidelityReport:
    """Run the grid ``grid`` ("default" or "tiny") and write ``rows.jsonl``, ``fidelity.md`` and
    ``fidelity.png`` to ``out``.

    ``samples`` overrides the grid's sample count; ``fresh`` ignores rows of earlier runs;
    ``threads`` is torch's intra-op thread count during the runs (restored afterwards): with 2
    threads on a 2-core machine shared with other work, one d = 64, 1000-sample step took 1.9 s
    instead of 8 ms at 1 thread (OpenMP threads waiting on busy cores), so 1 is the default.
    """
    if grid not in GRIDS:
        raise ValueError(f"grid: expected one of {', '.join(GRIDS)}, got {grid!r}")
    spec = GRIDS[grid]
    n = spec.samples if samples is None else samples
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"samples: expected an int >= 2 (a covariance needs two samples), got {n!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads: expected a positive int, got {threads!r}")
    method_names = _check_names(methods, METHODS, "methods")
    probs = build_problems(problems)
    say = log or logger.info
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows_path = out_dir / "rows.jsonl"
    if fresh and rows_path.exists():
        rows_path.unlink()
    done = _load_rows(rows_path)
    rows: list[Row] = []
    reused = 0
    t_start = time.perf_counter()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with rows_path.open("a") as sink:
            for prob in probs.values():
                exact, sets = exact_draws(prob, n, seed)
                rows.append(floor_row(prob, n, seed, exact, sets))
                for method in method_names:
                    why = unsupported(method, prob)
                    if why:
                        rows.append(Row(prob.name, method, PARAM[method], float("nan"), 0, 0, n, seed, note=why))
                        say(f"{prob.name:16s} {method:6s} {why}")
                        continue
                    for steps, value in spec.runs(method):
                        key = Row(prob.name, method, PARAM[method], float(value), steps, 0, n, seed).key()
                        if key in done:
                            rows.append(done[key])
                            reused += 1
                            continue
                        row = run_one(method, prob, steps, value, n, seed, exact)
                        rows.append(row)
                        sink.write(json.dumps(asdict(row)) + "\n")
                        sink.flush()
                        say(f"{prob.name:16s} {method:6s} {row.param}={row.value:<8.4g} K={steps:<4d} "
                            f"SW2={row.sw2:.4f} mean={row.mean_rel_err:.3f} {row.note}")
    finally:
        torch.set_num_threads(old_threads)
    seconds = time.perf_counter() - t_start
    md = write_markdown(rows, probs, out_dir / "fidelity.md", grid=grid, seconds=seconds, threads=threads)
    png = write_plot(rows, probs, out_dir / "fidelity.png")
    return FidelityReport(rows, out_dir, md, png, seconds, reused)


# ---- report -----------------------------------------------------------------------------------
def best_rows(rows: Sequence[Row]) -> list[Row]:
    """Per problem and method, the run with the lowest sliced W2 (finite runs only)."""
    best: dict[tuple[str, str], Row] = {}
    for r in rows:
        if r.method == "exact" or not math.isfinite(r.sw2):
            continue
        k = (r.problem, r.method)
        if k not in best or r.sw2 < best[k].sw2:
            best[k] = r
    return list(best.values())


def _fmt(v: Optional[float], digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{digits}f}" if abs(v) >= 10 ** (-digits) or v == 0 else f"{v:.1e}"


def _value(r: Row) -> str:
    if r.method == "exact":
        return "-"
    return f"{r.param} = {r.value:.4g}"


def _modes(r: Row) -> str:
    if r.mode_weights is None:
        return "-"
    return "/".join(f"{w:.2f}" for w in r.mode_weights) + f" (TV {r.mode_tv:.3f})"


HEADER = ("| problem | method | setting | steps | NFE | mean err | cov err | sliced W2 | mode weights (TV) | "
          "s/sample |\n|---|---|---|---:|---:|---:|---:|---:|---|---:|")


def row_markdown(r: Row, with_problem: bool = True) -> str:
    """One Markdown table row (the format of :data:`HEADER`)."""
    name = "exact samples (floor)" if r.method == "exact" else r.method
    cells = [r.problem if with_problem else "", name, _value(r) + (f" ({r.note})" if r.note else ""),
             str(r.steps) if r.steps else "-", str(r.nfe) if r.nfe else "-", _fmt(r.mean_rel_err),
             _fmt(r.cov_rel_err), _fmt(r.sw2, 4), _modes(r),
             _fmt(r.seconds_per_sample, 5) if r.method != "exact" else "-"]
    return "| " + " | ".join(cells) + " |"


def write_markdown(rows: Sequence[Row], problems: dict[str, Problem], path: Path, grid: str = "default",
                   seconds: float = float("nan"), threads: int = 1) -> Path:
    """The fidelity table as Markdown: the best row per method, then every run per problem."""
    from . import __version__

    n = next((r.samples for r in rows), 0)
    seed = next((r.seed for r in rows), 0)
    lines = [
        "# Posterior fidelity against exact posteriors", "",
        f"`dps-fast fidelity --grid {grid}`: {n} samples per run, seed {seed} for every run (all methods start "
        f"from the same Philox x_T), `NoiseSchedule.linear(1000).respace(K)`, float64, torch backend, "
        f"{threads} CPU thread(s); dps_fast {__version__}, torch {torch.__version__}; {seconds:.0f} s in all.", "",
        "mean err = |m_hat - m| / |m|; cov err = |C_hat - C|_F / |C|_F; sliced W2 = sliced Wasserstein-2 "
        f"(256 directions) to {REFERENCE} exact posterior samples; mode weights = mean posterior responsibility "
        "of each mixture component over the samples (the floor row shows the exact weights) and its total "
        "variation distance (TV) to the exact weights; NFE = network evaluations per sample (forward passes + VJPs); "
        "s/sample = wall seconds of the run / samples. DPS and MCG: squared guidance, zeta = c / K for c in the "
        "grid; PiGDM: guidance scale zeta (1 = the paper's); DDRM: eta with eta_b = 1. The floor row is the mean of "
        f"the same metrics over {FLOOR_SETS} independent sets of exact posterior samples of the run's size: "
        "what sampling error alone costs.", "",
        "## Best row per method (lowest sliced W2)", "", HEADER,
    ]
    best = best_rows(rows)
    for prob in problems:
        floor = [r for r in rows if r.problem == prob and r.method == "exact"]
        lines += [row_markdown(r) for r in floor]
        lines += [row_markdown(r) for r in best if r.problem == prob]
    for name, prob in problems.items():
        post = prob.posterior
        lines += ["", f"## {name}: {prob.title}", "",
                  f"Exact posterior: |mean| = {float(post.mean[0].norm()):.3f}, |cov|_F = {float(post.cov[0].norm()):.3f}"
                  + (", component weights " + "/".join(f"{w:.3f}" for w in post.weights[0].tolist())
                     if prob.is_mixture else "") + ".", "", HEADER]
        lines += [row_markdown(r, with_problem=False) for r in rows if r.problem == name]
    path.write_text("\n".join(lines) + "\n")
    return path


COLORS = {"DPS": "tab:blue", "MCG": "tab:green", "PiGDM": "tab:red", "DDRM": "tab:purple"}


def write_plot(rows: Sequence[Row], problems: dict[str, Problem], path: Path) -> Path:
    """Sliced W2 against NFE per sample, one panel per problem: per method and step count the best
    hyperparameter, and the exact-sample floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(problems)
    cols = 2 if len(names) > 1 else 1
    nrows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.4 * cols, 4.6 * nrows), squeeze=False, constrained_layout=True)
    for ax, name in zip(axes.flat, names):
        for method in METHODS:
            pts: dict[int, float] = {}
            for r in rows:
                if r.problem == name and r.method == method and math.isfinite(r.sw2) and r.nfe:
                    pts[r.nfe] = min(pts.get(r.nfe, math.inf), r.sw2)
            if pts:
                xs = sorted(pts)
                ax.plot(xs, [pts[x] for x in xs], "o-", color=COLORS[method], label=f"{method} (best setting per K)")
        floor = [r.sw2 for r in rows if r.problem == name and r.method == "exact"]
        if floor:
            ax.axhline(floor[0], color="gray", ls="--", label="exact samples (floor)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("NFE per sample (network forward passes + VJPs)")
        ax.set_ylabel("sliced W2 to exact posterior samples")
        ax.set_title(name, fontsize=11)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle("Posterior fidelity against exact posteriors (lower is better)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
