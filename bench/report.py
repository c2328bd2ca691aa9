"""Turn one results folder into ``report.json`` + ``report.md``: device, versions, commit, the
status of each phase, the smoke checks, the headline figures and every benchmark row.

Reads, in ``--results``: ``bench.jsonl`` (one line per finished benchmark, streamed by
bench/conftest.py), ``smoke.txt`` (PASS/FAIL lines of bench/gpu_smoke.py), ``status.txt``
(``phase=status`` lines written by bench/gpu_suite.sh) and ``env.json`` (device and versions).
Standard library only and fast, so the suite can rewrite the report after every phase.

The headline (:func:`headline`) is computed from the rows themselves, so it is there even when the
case that computes it in the run (bench/test_step.py::test_headline) was cut by a time limit.

Example:
    python bench/report.py --results bench/results/run-20260101T000000Z-abc1234 --commit abc1234
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from pathlib import Path
from typing import Any, Optional

#: the headline target of the GPU issue: our best images/s over the original DPS code's best
TARGET_SPEEDUP = 15.0

# extra_info keys worth a column, in this order, when a row of a section has them
KEYS = ["variant", "impl", "op", "dtype", "batch", "gbps", "pct_of_copy", "speedup_vs_torch", "speedup_vs_four_ffts",
        "ratio_to_two_bare_ffts", "overhead_over_floor_pct", "overhead_ci95_pct", "speedup_vs_original",
        "images_per_s", "floor_images_per_s", "seconds_per_image_1000_steps", "tflops", "pct_of_bf16_matmul",
        "bf16_matmul_tflops", "speedup_torch_vs_reference", "speedup_vs_batch1", "auto_vs_best_fixed",
        "max_batch_ours", "max_batch_original", "max_batch_ratio", "rows"]

SECTIONS = [("test_step.py", "Step variants (phase b)"), ("test_kernels.py", "Kernels (phase c)"),
            ("test_max_batch.py", "Max batch (phase d)"),
            ("test_reconstruct_throughput.py", "Reconstruct throughput (phase e)"),
            ("test_sampler_cpu.py", "Fast path vs autograd reference (CPU)"),
            ("test_operators_cpu.py", "Operators: boundaries and the generic path"),
            ("test_chain.py", "Shared chain loop"), ("test_dps2022.py", "DPS2022 drop-in vs their loop"),
            ("test_fidelity.py", "Methods against exact posteriors")]
#: other scalar extra_info keys that name a ratio get a column too (as in bench/conftest.py's summary)
RATIO_WORDS = ("ratio", "speedup", "_over_", "_vs_", "pct")


def _num(v: Any) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items())
    return str(v)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The benchmark rows of a ``bench.jsonl`` (a line cut by a time limit is skipped)."""
    rows: list[dict[str, Any]] = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def headline(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Our best step against the original code's best, from step rows (``extra_info`` with
    ``kind`` "ours" / "original"): images/s, the speed-up and the target, seconds per image for
    1000 steps, TFLOP/s and % of the bf16 matmul rate of the best, the network floor per batch.
    An "ours" row that timed the original interleaved (CPU) contributes that original too."""
    ours, orig = [], []
    for r in rows:
        info = r.get("extra_info", {})
        ips = _num(info.get("images_per_s"))
        if ips is None:
            continue
        if info.get("kind") == "ours":
            ours.append((ips, r["name"], info))
            t_orig = _num((info.get("median_s") or {}).get("original")) if isinstance(info.get("median_s"), dict) else None
            if t_orig:
                orig.append((info["batch"] / t_orig, r["name"] + " (original, interleaved)", info))
        elif info.get("kind") == "original":
            orig.append((ips, r["name"], info))
    if not ours:
        return {}
    ips, name, info = max(ours, key=lambda o: o[0])
    out: dict[str, Any] = {
        "best_ours": name, "best_ours_variant": info.get("variant"), "best_ours_batch": info.get("batch"),
        "best_ours_images_per_s": ips, "seconds_per_image_1000_steps": 1000.0 / ips,
        "best_ours_tflops": info.get("tflops"), "best_ours_pct_of_bf16_matmul": info.get("pct_of_bf16_matmul"),
        "bf16_matmul_tflops": info.get("bf16_matmul_tflops"),
        "best_ours_overhead_over_floor_pct": info.get("overhead_over_floor_pct"),
        "best_ours_overhead_ci95_pct": info.get("overhead_ci95_pct"),
    }
    floors: dict[str, float] = {}
    for _, _, i in ours:
        f = _num(i.get("floor_images_per_s"))
        if f is not None:
            key = f"b{i.get('batch')}"
            floors[key] = max(floors.get(key, 0.0), f)
    out["floor_images_per_s"] = floors
    if orig:
        o_ips, o_name, o_info = max(orig, key=lambda o: o[0])
        out.update(best_original=o_name, best_original_batch=o_info.get("batch"),
                   best_original_images_per_s=o_ips, speedup_vs_original_best=ips / o_ips)
        if info.get("device", "cpu") != "cpu":  # the target is the GPU issue's (bf16 against float32)
            out.update(target_speedup=TARGET_SPEEDUP, meets_target=ips / o_ips >= TARGET_SPEEDUP)
        mb = [i.get("max_batch_original") for _, _, i in orig if i.get("max_batch_original")]
        if mb:
            out["max_batch_original"] = mb[0]
    return out


def auto_vs_best_fixed(rows: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """``--batch-size auto`` against the best fixed batch of the reconstruct rows (GPU)."""
    fixed, auto = [], None
    for r in rows:
        info = r.get("extra_info", {})
        if not r.get("file", "").endswith("test_reconstruct_throughput.py"):
            continue
        ips = _num(info.get("images_per_s"))
        if ips is None or info.get("device_used") == "cpu":
            continue
        if info.get("batch") == "auto":
            auto = (ips, info)
        else:
            fixed.append((ips, info.get("batch")))
    if auto is None or not fixed:
        return None
    best_ips, best_batch = max(fixed)
    return {"auto_images_per_s": auto[0], "best_fixed_batch": best_batch, "best_fixed_images_per_s": best_ips,
            "auto_vs_best_fixed": auto[0] / best_ips, "auto_rows": auto[1].get("rows")}


def _table(rows: list[dict[str, Any]]) -> list[str]:
    extra = sorted({k for r in rows for k, v in r.get("extra_info", {}).items()
                    if k not in KEYS and any(w in k for w in RATIO_WORDS) and _num(v) is not None})
    keys = KEYS + extra
    cols = ["name", "median_ms"] + [k for k in keys if any(r.get("extra_info", {}).get(k) is not None for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        info = r.get("extra_info", {})
        vals = {"name": r["name"], "median_ms": 1e3 * r["median_s"] if _num(r.get("median_s")) is not None else None}
        vals.update({k: info.get(k) for k in keys})
        lines.append("| " + " | ".join(_fmt(vals.get(c)) if vals.get(c) is not None else "" for c in cols) + " |")
    return lines


def build(results: Path, commit: str) -> dict[str, Any]:
    """Write ``report.json`` and ``report.md`` into ``results``; returns the report."""
    rows = read_rows(results / "bench.jsonl")
    status: dict[str, str] = {}
    if (results / "status.txt").is_file():
        for line in (results / "status.txt").read_text().splitlines():
            if "=" in line:
                k, v = line.split("=", 1)
                status[k.strip()] = v.strip()
    smoke = (results / "smoke.txt").read_text().splitlines() if (results / "smoke.txt").is_file() else []
    env: dict[str, Any] = {"python": platform.python_version()}
    if (results / "env.json").is_file():
        try:
            env.update(json.loads((results / "env.json").read_text()))
        except json.JSONDecodeError:
            pass
    head = headline(rows)
    recon = auto_vs_best_fixed(rows)
    report = {"commit": commit, "env": env, "status": status, "headline": head, "reconstruct": recon,
              "smoke": smoke, "benchmarks": rows}
    (results / "report.json").write_text(json.dumps(report, indent=1, default=str))

    lines = [f"# dps_fast benchmark report, commit {commit}", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    if status:
        lines += ["", "| phase | status |", "|---|---|"] + [f"| {k} | {v} |" for k, v in status.items()]
    lines += ["", "## Headline"]
    if head:
        lines.append(f"- our best step: {head['best_ours']}: {head['best_ours_images_per_s']:.4g} images/s, "
                     f"{head['seconds_per_image_1000_steps']:.4g} s per image for 1000 steps")
        if head.get("best_ours_tflops") is not None:
            pct = head.get("best_ours_pct_of_bf16_matmul")
            lines.append(f"- {head['best_ours_tflops']:.4g} TFLOP/s" + (
                f" = {pct:.3g}% of the bf16 matmul rate measured in this run "
                f"({head['bf16_matmul_tflops']:.4g} TFLOP/s)" if pct is not None else ""))
        if head.get("best_ours_overhead_over_floor_pct") is not None:
            lines.append(f"- overhead over the network floor: {_fmt(head['best_ours_overhead_over_floor_pct'])}% "
                         f"(95% CI {_fmt(head.get('best_ours_overhead_ci95_pct'))}%)")
        if head.get("floor_images_per_s"):
            lines.append("- network floor (forward + input VJP), images/s: " + ", ".join(
                f"{k}: {v:.4g}" for k, v in head["floor_images_per_s"].items()))
        if "speedup_vs_original_best" in head:
            target = (f"target >= {TARGET_SPEEDUP:g}x: {'met' if head['meets_target'] else 'NOT met'}"
                      if "meets_target" in head else f"the {TARGET_SPEEDUP:g}x target is a GPU figure")
            lines.append(f"- original DPS code, best: {head['best_original']}: "
                         f"{head['best_original_images_per_s']:.4g} images/s -> ours/original = "
                         f"{head['speedup_vs_original_best']:.3g}x ({target})")
        else:
            lines.append("- original DPS code: not measured in this run")
    else:
        lines.append("- no step case finished")
    if recon:
        lines.append(f"- reconstruct --batch-size auto: {recon['auto_images_per_s']:.4g} images/s = "
                     f"{recon['auto_vs_best_fixed']:.3g}x the best fixed batch ({recon['best_fixed_batch']}: "
                     f"{recon['best_fixed_images_per_s']:.4g} images/s)")
    if smoke:
        n_fail = sum(1 for s in smoke if s.startswith("FAIL"))
        lines += ["", f"## Smoke ({len(smoke)} lines, {n_fail} FAIL)", "", "```"] + smoke + ["```"]
    seen: set[int] = set()
    for suffix, title in SECTIONS + [("", "Other benchmarks")]:
        sec = [r for i, r in enumerate(rows) if i not in seen and (r.get("file", "") + "::" + r["name"]).find(suffix) >= 0]
        seen.update(i for i, r in enumerate(rows) if r in sec)
        if sec:
            lines += ["", f"## {title}", ""] + _table(sec)
    if not rows:
        lines += ["", "(no benchmark finished)"]
    (results / "report.md").write_text("\n".join(lines) + "\n")
    return report


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", required=True, type=Path, help="the results folder of one run")
    ap.add_argument("--commit", default="unknown")
    args = ap.parse_args(argv)
    if not args.results.is_dir():
        ap.error(f"--results: expected an existing folder, got {str(args.results)!r}")
    build(args.results, args.commit)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
