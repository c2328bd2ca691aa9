"""``dps-fast explore``: the DPS trajectory figure as one interactive, self-contained HTML page.

``--method`` (:mod:`dps_fast.methods.registry`) picks the sampler: DPS (default), MCG, PiGDM or
DDRM; the slider is over that method's hyperparameter (zeta, or DDRM's eta on a linear grid in
[0, 1]). Below, "zeta" stands for that hyperparameter.

A slider over a log grid of guidance scales zeta, from clearly too small to the largest that
does not diverge (plus the first diverging one, shown as such), starting at the best scale of
the scan. For the selected zeta the page shows x0hat from t = T to 0, the samples and their
mean +- 2 std, the errors, and a curve of the error against zeta with the selection marked.

* 1-D mode (default): the demo's deblurring problem (Gaussian blur 3 px, sigma_n^2 = 0.01,
  Gaussian-mixture prior), where the exact posterior is known: DPS against exact samples,
  errors = relative error of the mean, sliced W2 to exact samples, residual norm.
* Image mode (``--model ... --image face.png``): one image, its simulated measurement, and per
  zeta a strip of x0hat images over t; errors = PSNR/SSIM of the DPS mean, residual norm.

The page is one file: data (JSON, images as PNG data URIs) and the drawing script (a small
canvas plotter, no libraries) are inline, so it opens from disk with no server and no network.
Every scale runs with the same noise (the same sample seeds), so moving the slider changes only
zeta. The template is ``dps_fast/assets/explore.html``.

Example:
    >>> data = explore_1d(steps=20, samples=8, zetas=zeta_grid(1e-3, 0.1, 4))  # doctest: +SKIP
    >>> write_page(data, "explore.html")  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import math
import time
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from ._help import HelpFormatter, check_out_file, count, device_option, positive_float, positive_int
from .demo import ZetaRun, one_thread, record_steps, run_zetas, scan_errors
from .distances import sliced_w2
from .methods.registry import MethodSpec, get_method, method_names
from .problems import demo_problem
from .schedule import NoiseSchedule

logger = logging.getLogger(__name__)

__all__ = ["explore_1d", "explore_image", "zeta_grid", "value_grid", "choose_scales", "write_page", "add_parser",
           "DEFAULT_OUT", "MIN_SCALES", "SCAN_1D"]

DEFAULT_OUT = Path("demo_out") / "explore.html"
#: The default scans give the slider at least this many non-diverging scales (refining if needed).
MIN_SCALES = 16
_ROUND = 5  # significant digits of the floats in the page: far below what a plot shows


def zeta_grid(lo: float, hi: float, n: int) -> list[float]:
    """``n`` log-spaced guidance scales from ``lo`` to ``hi`` (both included).

    >>> [round(z, 6) for z in zeta_grid(0.001, 0.1, 3)]
    [0.001, 0.01, 0.1]
    """
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
        raise ValueError(f"zeta range: expected 0 < min < max, got {lo!r} and {hi!r}")
    if not (isinstance(n, int) and n >= 2):
        raise ValueError(f"zetas: expected an int >= 2, got {n!r}")
    return [lo * (hi / lo) ** (k / (n - 1)) for k in range(n)]


#: The 1-D problem's default scan per method: ``(lo, hi, log)`` (DPS and MCG: squared guidance).
SCAN_1D = {"dps": (1e-4, 0.1, True), "mcg": (1e-4, 0.1, True), "pigdm": (0.03, 30.0, True), "ddrm": (0.0, 1.0, False)}
SYMBOLS = {"zeta": "\u03b6", "eta": "\u03b7"}


def value_grid(lo: float, hi: float, n: int, log: bool = True) -> list[float]:
    """``n`` values from ``lo`` to ``hi``: :func:`zeta_grid` when ``log``, else evenly spaced.

    >>> value_grid(0.0, 1.0, 3, log=False)
    [0.0, 0.5, 1.0]
    """
    if log:
        return zeta_grid(lo, hi, n)
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo < hi):
        raise ValueError(f"value range: expected 0 <= min < max, got {lo!r} and {hi!r}")
    if not (isinstance(n, int) and n >= 2):
        raise ValueError(f"zetas: expected an int >= 2, got {n!r}")
    return [lo + (hi - lo) * k / (n - 1) for k in range(n)]


def _param(spec: MethodSpec) -> dict[str, str]:
    """How the page names the scanned hyperparameter."""
    what = "guidance scale" if spec.param == "zeta" else "noise level"
    return {"name": spec.param, "symbol": SYMBOLS.get(spec.param, spec.param),
            "label": f"{spec.name} {what}"}


def choose_scales(runs: list[ZetaRun]) -> list[ZetaRun]:
    """The scales the slider shows: all up to the largest one that did not diverge, plus the first
    diverging scale above it (the others above it diverge too and add nothing)."""
    runs = sorted(runs, key=lambda r: r.zeta)
    ok = [k for k, r in enumerate(runs) if r.diverged is None]
    if not ok:
        return runs[:1]
    last = ok[-1]
    return runs[:last + 1] + runs[last + 1:last + 2]


def _refine(lo_runs: list[ZetaRun]) -> list[float]:
    """Geometric midpoints between neighbouring scales up to the first diverging one."""
    z = [r.zeta for r in choose_scales(lo_runs)]
    return [math.sqrt(a * b) for a, b in zip(z, z[1:])]


def _scan(run: Callable[[Sequence[float]], list[ZetaRun]], zetas: Sequence[float], min_scales: int,
          say: Callable[[str], None]) -> list[ZetaRun]:
    runs = run(zetas)
    for _ in range(3):  # each pass halves the log spacing below the divergence
        shown = choose_scales(runs)
        if sum(r.diverged is None for r in shown) >= min_scales or len(shown) < 2:
            break
        extra = _refine(runs)
        say(f"{sum(r.diverged is None for r in shown)} scales below the divergence; refining with {len(extra)} more")
        runs = runs + run(extra)
    return choose_scales(runs)


def _r(v: torch.Tensor | float) -> Any:
    """Rounded plain-Python numbers for the JSON."""
    if isinstance(v, torch.Tensor):
        v = v.detach().double().cpu().tolist()
    if isinstance(v, list):
        return [_r(u) for u in v]
    if v is None or not math.isfinite(v):
        return None
    return float(f"{v:.{_ROUND}g}")


def _diverged(r: ZetaRun) -> Optional[dict[str, Any]]:
    if r.diverged is None:
        return None
    return {"step": r.diverged.step, "t": r.diverged.timestep, "kind": r.diverged.kind, "message": str(r.diverged)}


def _pick_best(scales: list[dict[str, Any]], key: str, lower_is_better: bool) -> int:
    vals = [(s["errors"].get(key), k) for k, s in enumerate(scales) if s["diverged"] is None]
    vals = [(v, k) for v, k in vals if v is not None]
    if not vals:
        return 0
    return (min(vals) if lower_is_better else max(vals))[1]


def explore_1d(steps: int = 250, samples: int = 64, seed: int = 0, zetas: Optional[Sequence[float]] = None,
               times: int = 7, min_scales: int = MIN_SCALES, log: Optional[Callable[[str], None]] = None,
               progress: bool = False, method: str = "dps") -> dict:
    """Scan the demo's 1-D problem over ``zetas`` (default: :data:`SCAN_1D` of ``method``, 25
    values; DPS ``zeta_grid(1e-4, 0.1, 25)``) and return the page data. ``min_scales``
    non-diverging scales are guaranteed by refining the grid below the divergence when the first
    pass has fewer (pass 0 to keep the grid as given)."""
    say = log or logger.info
    if not (isinstance(steps, int) and steps >= 2):
        raise ValueError(f"steps: expected an int >= 2, got {steps!r}")
    if not (isinstance(samples, int) and samples >= 2):
        raise ValueError(f"samples: expected an int >= 2, got {samples!r}")
    if not (isinstance(times, int) and times >= 2):
        raise ValueError(f"times: expected an int >= 2, got {times!r}")
    spec = get_method(method)
    zetas = list(zetas) if zetas is not None else value_grid(*SCAN_1D[spec.key][:2], 25, SCAN_1D[spec.key][2])
    with one_thread():
        return _explore_1d(steps, samples, seed, zetas, times, min_scales, say, progress, spec)


def _explore_1d(steps: int, samples: int, seed: int, zetas: list[float], times: int, min_scales: int,
                say: Callable[[str], None], progress: bool, spec: MethodSpec) -> dict:
    t0 = time.perf_counter()
    p = demo_problem(seed=seed)
    sched = NoiseSchedule.linear(1000).respace(steps)
    eps = p.prior.eps_model(sched)
    post = p.prior.posterior(p.A, p.y, p.sigma_n)
    exact = post.sample(2000, generator=torch.Generator().manual_seed(seed + 1))[0, :, 0]
    record = record_steps(steps, times)
    say(f"scanning {len(zetas)} values of {spec.name}'s {spec.param}, {samples} samples x {steps} steps each "
        f"(1-D deblurring)")

    def run(zs: Sequence[float]) -> list[ZetaRun]:
        return run_zetas(eps, sched, p.operator, p.y, p.sigma_n, zs, samples, seed, record, backend="torch",
                         log=say, max_batch=max(1, 4096 // samples), progress=progress, method=spec.key)

    shown = _scan(run, zetas, min_scales, say)
    pm, ps = post.mean[0], post.cov[0].diagonal().sqrt()
    resid = lambda x: (x @ p.A.T - p.y[0, 0]).norm(dim=1)  # noqa: E731
    scales = []
    for r in shown:
        entry: dict[str, Any] = {"zeta": _r(r.zeta), "diverged": _diverged(r), "errors": {}}
        if r.diverged is None:
            s = r.samples[:, 0]
            m, sd = s.mean(0), s.std(0)
            entry.update(traj=[_r(r.trajectory[i][0, 0]) for i in record], samples=_r(s[:8]), mean=_r(m),
                         lo=_r(m - 2 * sd), hi=_r(m + 2 * sd))
            # residual_norm: the sampler's final residual norms, equal to resid(s) up to float64 rounding
            entry["errors"] = {k: _r(v) for k, v in scan_errors(r, pm, exact).items()}
        scales.append(entry)
    data = {
        "mode": "1d", "method": spec.name, "param": _param(spec),
        "title": f"{spec.name} on 1-D Gaussian deblurring: the {_param(spec)['label'].split(' ', 1)[1]}",
        "subtitle": (f"Gaussian-mixture prior on signals of length {p.x0.shape[-1]}, circular Gaussian blur of 3 px, "
                     f"noise sigma_n^2 = {p.sigma_n ** 2:g}; exact posterior known. {steps} steps, {samples} "
                     f"samples per {spec.param}, the same noise for every {spec.param} (seed {seed})."),
        "x": list(range(p.x0.shape[-1])), "truth": _r(p.x0[0, 0]), "measurement": _r(p.y[0, 0]),
        "exact": {"mean": _r(pm), "lo": _r(pm - 2 * ps), "hi": _r(pm + 2 * ps), "samples": _r(exact[:8])},
        "times": [int(sched.timesteps[i]) for i in record],
        "scales": scales,
        "metrics": [
            {"key": "mean_rel_err", "label": "mean error (relative L2 to the exact posterior mean)"},
            {"key": "sliced_w2", "label": "sliced W2 to exact posterior samples"},
        ],
        "residual": {"key": "residual_norm", "label": "mean residual ||A x - y|| of the samples",
                     "noise_level": _r(p.sigma_n * math.sqrt(p.y.numel())),
                     "exact": _r(float(resid(exact).mean()))},
        "reference": {"sliced_w2": _r(sliced_w2(exact[:samples], exact[samples:]))},
        "settings": {"steps": steps, "samples": samples, "seed": seed, "method": spec.key,
                     "guidance": "squared" if spec.guided else None, "sigma_n": p.sigma_n},
    }
    data["default"] = _pick_best(scales, "sliced_w2", lower_is_better=True)
    say(f"best {spec.param} of the scan: {scales[data['default']]['zeta']:.3g} (lowest sliced W2); "
        f"{time.perf_counter() - t0:.1f} s")
    return data


def _png_uri(img: torch.Tensor) -> str:
    """``[C, H, W]`` in [-1, 1] -> a PNG data URI."""
    from PIL import Image

    from .reconstruct.data import to_uint8

    buf = io.BytesIO()
    Image.fromarray(to_uint8(img)).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def explore_image(model: Callable, operator: Any, image: torch.Tensor, sigma_n: float, *, steps: int = 100,
                  samples: int = 2, seed: int = 0, zetas: Optional[Sequence[float]] = None, times: int = 7,
                  guidance: str = "normalized", clip: bool = True, schedule: Optional[NoiseSchedule] = None,
                  device: Optional[torch.device] = None, backend: str = "auto", name: str = "image",
                  min_scales: int = 0, max_batch: int = 16, log: Optional[Callable[[str], None]] = None,
                  progress: bool = False, method: str = "dps", **dps_options: Any) -> dict:
    """Scan one image ``[C, H, W]`` (in [-1, 1]) over ``zetas`` (default: the registry's scan of
    ``method``, 16 values; DPS ``zeta_grid(0.03, 3, 16)``) with the network ``model`` and return
    the page data (x0hat strips over t per value)."""
    from .reconstruct.metrics import psnr, ssim
    from .reconstruct.items import STD_PNG_GAIN, simulate_measurement

    say = log or logger.info
    if not (isinstance(samples, int) and samples >= 1):
        raise ValueError(f"samples: expected an int >= 1, got {samples!r}")
    if image.dim() != 3:
        raise ValueError(f"image: expected [C, H, W], got {tuple(image.shape)}")
    spec = get_method(method)
    zetas = list(zetas) if zetas is not None else value_grid(spec.scan[0], spec.scan[1], 16, spec.scan[2])
    dev = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    sched = schedule if schedule is not None else NoiseSchedule.linear(1000).respace(steps)
    y = simulate_measurement(operator, image, sigma_n, seed, name)[None].to(dev)
    if isinstance(model, torch.nn.Module):
        model = model.to(dev).eval()
    record = record_steps(sched.num_steps, times)
    say(f"scanning {len(zetas)} values of {spec.name}'s {spec.param}, {count(samples, 'sample')} x "
        f"{sched.num_steps} steps each on {dev}")

    def run(zs: Sequence[float]) -> list[ZetaRun]:
        # no torch.compile by default: splitting a diverging batch changes the shape, and every
        # new shape would compile again for a one-off scan
        opts = dict({"compile": False}, **dps_options)
        clip_x0 = (-1.0, 1.0) if clip and "clip_x0" not in spec.cls.unused_options else None
        return run_zetas(model, sched, operator, y, sigma_n, zs, samples, seed, record, guidance=guidance,
                         clip_x0=clip_x0, backend=backend, log=say, max_batch=max(1, max_batch // samples),
                         progress=progress, method=spec.key, **opts)

    shown = _scan(run, zetas, min_scales, say)
    ref01 = ((image.double() + 1) / 2).clamp(0, 1)
    y_cpu = y[0].detach().double().cpu()
    scales = []
    for r in shown:
        entry: dict[str, Any] = {"zeta": _r(r.zeta), "diverged": _diverged(r), "errors": {}}
        if r.diverged is None:
            s = r.samples.double()
            m = s.mean(0)
            sd = s.std(0, unbiased=False) if len(s) > 1 else torch.zeros_like(m)
            m01 = ((m + 1) / 2).clamp(0, 1)
            entry.update(traj=[_png_uri(r.trajectory[i][0]) for i in record], mean=_png_uri(m),
                         std=_png_uri((STD_PNG_GAIN * sd).clamp(0, 1) * 2 - 1),
                         samples=[_png_uri(x) for x in s[:4]])
            entry["errors"] = {"psnr": _r(float(psnr(m01, ref01))), "ssim": _r(float(ssim(m01, ref01))),
                               "residual_norm": _r(float((operator(m[None])[0] - y_cpu).norm()))}
        scales.append(entry)
    show_y = (not y_cpu.is_complex()) and y_cpu.dim() == 3 and y_cpu.shape[0] == image.shape[0]
    how = f", {guidance} guidance" if spec.guided else ""
    clipped = ", x0hat clipped" if clip and "clip_x0" not in spec.cls.unused_options else ""
    data = {
        "mode": "image", "method": spec.name, "param": _param(spec),
        "title": f"{spec.name} on {name}: the {_param(spec)['label'].split(' ', 1)[1]}",
        "subtitle": (f"{operator!r}, noise sigma_n = {sigma_n:g}{how}{clipped}; {sched.num_steps} steps, "
                     f"{count(samples, 'sample')} per {spec.param}, the same noise for every {spec.param} (seed {seed})."),
        "truth_image": _png_uri(image), "measurement_image": _png_uri(y_cpu.float()) if show_y else None,
        "times": [int(sched.timesteps[i]) for i in record],
        "scales": scales,
        # plotted against zeta (SSIM, on another scale, is in the numbers line above the plots)
        "metrics": [{"key": "psnr", "label": f"PSNR of the {spec.name} mean to the image (dB)"}],
        "residual": {"key": "residual_norm", "label": "residual ||A mean - y||",
                     "noise_level": _r(sigma_n * math.sqrt(y_cpu.numel())), "exact": None},
        "reference": {},
        "settings": {"steps": sched.num_steps, "samples": samples, "seed": seed, "method": spec.key,
                     "guidance": guidance if spec.guided else None, "sigma_n": sigma_n, "operator": repr(operator)},
    }
    data["default"] = _pick_best(scales, "psnr", lower_is_better=False)
    say(f"best {spec.param} of the scan: {scales[data['default']]['zeta']:.3g} (highest PSNR of the mean); "
        f"{time.perf_counter() - t0:.1f} s")
    return data


def write_page(data: dict, out: str | Path) -> Path:
    """Write the self-contained page for ``data`` (from :func:`explore_1d`/:func:`explore_image`)."""
    from .reconstruct.data import atomic_write_bytes

    template = resources.files("dps_fast").joinpath("assets/explore.html").read_text(encoding="utf-8")
    # "</" cannot end the inline JSON early; "<\/" is the same string to JSON.parse
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    html = template.replace("__EXPLORE_DATA__", payload).replace("__EXPLORE_TITLE__", _html_escape(data["title"]))
    out = Path(out)
    if out.exists() and out.is_dir():
        raise ValueError(f"--out: {str(out)!r} is a folder; expected an .html file path")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, html.encode("utf-8"), fsync=False)
    return out


def _html_escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# ---- command line -------------------------------------------------------------------------------
def _main(args: argparse.Namespace) -> int:
    say = (lambda m: None) if args.quiet else (lambda m: print(m, flush=True))
    check_out_file(args.out, "--out")  # before the scan, not after it
    image_mode = args.model is not None or args.diffusers is not None
    if args.image is not None and not image_mode:
        raise ValueError("--image: needs a model (--model NAME with --checkpoint FILE or --random-weights, or "
                         "--diffusers FOLDER)")
    if image_mode and args.image is None:
        raise ValueError("--image: required with --model/--diffusers (the image to measure and reconstruct)")
    spec = get_method(args.method)
    if spec.param == "eta" and args.zeta_max is not None and args.zeta_max > 1:
        raise ValueError(f"--zeta-max: {spec.key}'s eta lies in [0, 1], got {args.zeta_max}")
    if image_mode and args.guidance != "normalized" and not spec.guided:
        raise ValueError(f"--guidance: only applies to --method dps / mcg, got --method {spec.key}")
    if args.zeta_min is not None and args.zeta_max is not None and not args.zeta_min < args.zeta_max:
        raise ValueError(f"--zeta-min: expected less than --zeta-max, got {args.zeta_min} and {args.zeta_max}")
    t0 = time.perf_counter()
    if not image_mode:
        # the options the 1-D problem has no use for: refused unless left at their defaults
        changed = [_flag(a) for a in args.image_only if getattr(args, a.dest) != a.default]
        if changed:
            raise ValueError(f"{changed[0]}: only used in image mode (with --model and --image)")
        lo, hi, log_grid = SCAN_1D[spec.key]
        lo, hi = _given(args.zeta_min, lo), _given(args.zeta_max, hi)
        data = explore_1d(steps=args.steps or 250, samples=args.samples or 64, seed=args.seed,
                          zetas=value_grid(lo, hi, args.zetas or 25, log_grid), times=args.times,
                          min_scales=MIN_SCALES if args.refine else 0, log=say, progress=not args.quiet,
                          method=spec.key)
    else:
        from .cli_options import build_operator, load_model, model_geometry, noise_kwargs
        from .reconstruct.data import InputError, read_image

        if noise_kwargs(args):  # also refuses --rate without --noise poisson
            raise ValueError(f"--noise: explore simulates Gaussian measurement noise only (--sigma-n), got --noise "
                             f"{args.noise}; dps-fast reconstruct runs --noise poisson")
        model, schedule, _ = load_model(args)
        channels, size = model_geometry(model, None)
        try:
            image = read_image(args.image, Path(args.image).stem, channels or 3, size, resize=True)
        except InputError as exc:
            raise ValueError(f"--image: {exc}") from None
        operator = build_operator(args, image.shape[0], image.shape[-1])
        steps = args.steps or 100
        if schedule is not None:
            schedule = schedule.respace(steps)
        lo, hi = _given(args.zeta_min, spec.scan[0]), _given(args.zeta_max, spec.scan[1])
        data = explore_image(model, operator, image, args.sigma_n, steps=steps, samples=args.samples or 2,
                             seed=args.seed, zetas=value_grid(lo, hi, args.zetas or 16, spec.scan[2]),
                             times=args.times, method=spec.key,
                             guidance=args.guidance if spec.guided else "normalized", clip=args.clip, schedule=schedule,
                             device=torch.device(args.device) if args.device else None, backend=args.backend,
                             name=Path(args.image).name, min_scales=MIN_SCALES if args.refine else 0, log=say,
                             progress=not args.quiet)
    out = write_page(data, args.out)
    shown = data["scales"]
    ok = sum(s["diverged"] is None for s in shown)
    print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} kB; {ok} scales from {shown[0]['zeta']:.3g} to "
          f"{max(s['zeta'] for s in shown if s['diverged'] is None) if ok else float('nan'):.3g}"
          f"{', plus the diverging ' + format(shown[-1]['zeta'], '.3g') if shown[-1]['diverged'] else ''}; "
          f"default {shown[data['default']]['zeta']:.3g}) in {time.perf_counter() - t0:.1f} s; open it in a browser")
    return 0


def _given(value: Optional[float], default: float) -> float:
    return default if value is None else value


def _flag(action: argparse.Action) -> str:
    return next(o for o in action.option_strings if o.startswith("--"))


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``explore`` on an ``add_subparsers()`` object."""
    from .cli_options import BACKENDS, CHECKPOINTS, add_model_options, add_task_options

    p = subparsers.add_parser(
        "explore", help="interactive page: the DPS trajectory with a zeta slider (one self-contained HTML file)",
        formatter_class=HelpFormatter,
        description="Writes one HTML file (data and script inline: opens from disk, no server, no network) with a\n"
                    "slider over the guidance scale zeta: x0hat from t = T to 0, the samples, mean +- 2 std and\n"
                    "the errors for the selected zeta, and the error against zeta.\n"
                    "Without --model: the demo's 1-D deblurring problem, against its exact posterior.\n"
                    "With --model/--checkpoint (or --random-weights) and --image: x0hat image strips per zeta\n"
                    "(measurements with Gaussian noise --sigma-n; dps-fast reconstruct also runs --noise poisson).",
        epilog=CHECKPOINTS + "\n\nexamples:\n  dps-fast explore\n"
               "  dps-fast explore --model ffhq256 --checkpoint ffhq_10m.pt --image face.png --operator gaussian-blur\n"
               "  dps-fast explore --model tiny32 --random-weights --image face.png --steps 20 --device cpu")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output HTML path")
    p.add_argument("--method", choices=method_names(), default="dps",
                   help="the sampler; the slider is over its hyperparameter (dps, mcg, pigdm: zeta; ddrm: eta), "
                        "which --zeta-min/--zeta-max/--zetas then set")
    scan = p.add_argument_group("scan")
    scan.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: 1-D 250, image 100)")
    scan.add_argument("--samples", type=positive_int, default=None,
                      help="samples per zeta (default: 1-D 64, image 2)")
    scan.add_argument("--zetas", type=positive_int, default=None,
                      help="number of log-spaced guidance scales (default: 1-D 25, image 16)")
    scan.add_argument("--zeta-min", type=positive_float, default=None,
                      help="smallest zeta (default: 1-D 1e-4 with squared guidance, image 0.03 with normalized)")
    scan.add_argument("--zeta-max", type=positive_float, default=None,
                      help="largest zeta tried; scales beyond the first diverging one are dropped "
                           "(default: 1-D 0.1, image 3)")
    scan.add_argument("--no-refine", dest="refine", action="store_false",
                      help=f"keep the grid as given (default: add midpoints below the divergence until at "
                           f"least {MIN_SCALES} scales remain)")
    scan.add_argument("--times", type=positive_int, default=7, help="x0hat snapshots from t = T to 0 (>= 2)")
    scan.add_argument("--seed", type=int, default=0, help="problem (1-D) and sampler seed")
    scan.add_argument("--quiet", action="store_true", help="no progress messages")
    img = p.add_argument_group("image mode")
    img.add_argument("--image", default=None, help="the image to measure and reconstruct (scaled and centre-cropped "
                                                   "to the model's size)")
    img.add_argument("--guidance", choices=("normalized", "squared"), default="normalized",
                     help="normalized: zeta * grad ||r|| (the DPS code); squared: zeta/(2 sigma_n^2) grad ||r||^2")
    img.add_argument("--clip", action=argparse.BooleanOptionalAction, default=True, help="clip x0hat to [-1, 1]")
    img.add_argument("--device", type=device_option, default=None,
                     help="cpu, cuda, cuda:1 (default: cuda if available)")
    img.add_argument("--backend", choices=BACKENDS, default="auto", help="as in dps-fast reconstruct")
    task = add_task_options(p)
    model = add_model_options(p)
    # every option that only image mode reads (--model/--diffusers select it; --image has its own
    # message): the 1-D mode refuses them when they differ from their defaults
    image_only = [a for group in (task, img, model) for a in group._group_actions
                  if a.dest not in ("image", "model", "diffusers")]
    p.set_defaults(func=_main, image_only=tuple(image_only))
    return p

