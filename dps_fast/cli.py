"""The ``dps-fast`` command: ``demo`` (the main job, on an embedded problem) and ``reconstruct``.

Run ``dps-fast demo`` with no arguments for the 1-D deblurring demo (one PNG), or
``torchrun --nproc-per-node N -m dps_fast.cli reconstruct ...`` for datasets.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Optional, Sequence

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from .demo import DEFAULT_ZETA, run_demo

    t0 = time.perf_counter()
    print(f"dps-fast demo: 1-D Gaussian deblurring (sigma_b = 3 px, sigma_n^2 = 0.01), "
          f"Gaussian-mixture prior, {args.steps} steps, seed {args.seed}", flush=True)
    summary = run_demo(out=args.out, seed=args.seed, zeta=args.zeta if args.zeta is not None else DEFAULT_ZETA,
                       steps=args.steps, samples=args.samples, progress=not args.quiet,
                       log=lambda m: print(m, flush=True))
    for k, v in summary.items():
        if k.startswith("mean_rel_err"):
            print(f"  {k}: {v:.3f} (relative L2 error of the DPS mean vs the exact posterior mean)")
    print(f"wrote {summary['out']} in {time.perf_counter() - t0:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dps-fast", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="1-D DPS demo with an exact posterior; writes one PNG")
    demo.add_argument("--out", default="dps_demo.png", help="output PNG path (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="problem and sampler seed (default: %(default)s)")
    demo.add_argument("--zeta", type=float, default=None,
                      help="the 'about right' guidance scale; the figure also shows zeta/10 and 3*zeta "
                           "(default: the tuned value in dps_fast.demo.DEFAULT_ZETA)")
    demo.add_argument("--steps", type=int, default=250, help="sampling steps, respaced from 1000 (default: %(default)s)")
    demo.add_argument("--samples", type=int, default=64, help="posterior samples (default: %(default)s)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)
    from .reconstruct.cli import add_parser, run

    add_parser(sub).set_defaults(func=run)
    from .compat.dps2022.cli import add_parser as add_dps2022

    add_dps2022(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"dps-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
