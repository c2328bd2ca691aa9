"""Turn one GPU-suite run folder into report.json + report.md (device, versions, commit, phases,
every benchmark with its median and the ratios the issues set targets for)."""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any

# extra_info keys worth a column, in this order, when a benchmark has them
KEYS = ["variant", "impl", "batch", "gbps", "pct_of_copy", "speedup_vs_torch", "speedup_vs_four_ffts",
        "ratio_to_two_bare_ffts", "overhead_over_floor_pct", "speedup_vs_original", "tflops",
        "pct_of_bf16_matmul", "seconds_per_image_1000_steps", "speedup_torch_vs_reference",
        "images_per_s", "auto_vs_best", "max_batch_ours_bf16", "max_batch_original", "ratio"]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _env() -> dict[str, Any]:
    env: dict[str, Any] = {"python": platform.python_version()}
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda"] = torch.version.cuda
        env["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception as exc:  # the report must be written whatever failed before it
        env["torch"] = f"unavailable: {exc}"
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--results", required=True, type=Path)
    ap.add_argument("--status", nargs="*", default=[])
    ap.add_argument("--commit", default="unknown")
    args = ap.parse_args()
    status = dict(s.split("=", 1) for s in args.status)
    rows: list[dict[str, Any]] = []
    stream = args.results / "bench.jsonl"
    if stream.is_file():
        for line in stream.read_text().splitlines():
            try:
                b = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a time limit
                continue
            rows.append({"name": b["name"], "median_ms": 1e3 * b["median_s"],
                         **{k: b.get("extra_info", {}).get(k) for k in KEYS}})
    report = {"commit": args.commit, "env": _env(), "status": status, "benchmarks": rows}
    (args.results / "report.json").write_text(json.dumps(report, indent=1, default=str))
    cols = ["name", "median_ms"] + [k for k in KEYS if any(r.get(k) is not None for r in rows)]
    lines = [f"# dps_fast GPU suite, commit {args.commit}", ""]
    lines += [f"- {k}: {v}" for k, v in report["env"].items()]
    lines += [f"- phase {k}: {v}" for k, v in status.items()]
    lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) if r.get(c) is not None else "" for c in cols) + " |")
    if not rows:
        lines.append("| (no benchmark ran) |" + " |" * (len(cols) - 1))
    (args.results / "report.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
