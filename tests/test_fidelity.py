"""`dps-fast fidelity`: on a tiny grid the table's DPS numbers are those of DPS.sample for the same
seeds (metrics recomputed here), the Markdown shows every run, finished runs are reused, the plot
is written, unsupported operators and bad flags are reported, not raised."""

import json
import math

import torch

from dps_fast import DPS, NoiseSchedule
from dps_fast.cli import main
from dps_fast.fidelity import GRIDS, build_problems, row_markdown, run_fidelity

PROBLEMS = ["mixture-2d", "demo-deblur"]


def test_dps_rows_are_dps_sample_for_the_same_seeds(tmp_path):
    report = run_fidelity(tmp_path, grid="tiny", problems=PROBLEMS, samples=40, seed=3)
    probs = build_problems(PROBLEMS)
    dps_rows = [r for r in report.rows if r.method == "DPS"]
    assert len(dps_rows) == len(PROBLEMS) * len(GRIDS["tiny"].runs("DPS"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the fidelity run (--threads 1): the same reduction order, bit for bit
    try:
        results = {}
        for r in dps_rows:
            p = probs[r.problem]
            sched = NoiseSchedule.linear(1000).respace(r.steps)
            results[r.problem, r.steps, r.value] = DPS(
                p.prior.eps_model(sched), sched, p.operator, zeta=r.value, sigma_n=p.sigma_n,
                backend="torch").sample(p.y, num_samples=40, seed=3)
    finally:
        torch.set_num_threads(threads)
    for r in dps_rows:
        p = probs[r.problem]
        res = results[r.problem, r.steps, r.value]
        s = res.samples[0, :, 0]
        post = p.posterior
        assert r.nfe == res.nfe == 2 * r.steps - 1
        assert r.mean_rel_err == float((s.mean(0) - post.mean[0]).norm() / post.mean[0].norm())
        assert r.cov_rel_err == float((torch.cov(s.T) - post.cov[0]).norm() / post.cov[0].norm())
        # the printed table holds these numbers
        md = report.markdown_path.read_text()
        assert f"| {r.mean_rel_err:.3f} | {r.cov_rel_err:.3f} | {r.sw2:.4f} |" in md
    # every run and the floor of each problem are in the table; MCG cannot run the blur
    md = report.markdown_path.read_text()
    for r in report.rows:
        assert row_markdown(r, with_problem=False) in md
    assert "n/a: MCG does not support GaussianBlur" in md
    floors = [r for r in report.rows if r.method == "exact"]
    assert len(floors) == 2 and all(math.isfinite(r.sw2) and r.sw2 > 0 for r in floors)
    assert report.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_finished_runs_are_reused(tmp_path):
    first = run_fidelity(tmp_path, grid="tiny", problems=["mixture-2d"], methods=["DPS", "DDRM"], samples=16)
    lines = (tmp_path / "rows.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["method"] == "DPS"
    again = run_fidelity(tmp_path, grid="tiny", problems=["mixture-2d"], methods=["DPS", "DDRM"], samples=16)
    assert again.reused == 2 and len((tmp_path / "rows.jsonl").read_text().splitlines()) == 2
    assert [r.sw2 for r in again.rows] == [r.sw2 for r in first.rows]
    # another sample count is another run
    third = run_fidelity(tmp_path, grid="tiny", problems=["mixture-2d"], methods=["DDRM"], samples=17)
    assert third.reused == 0


def test_cli_runs_and_names_bad_flags(tmp_path, capsys):
    out = tmp_path / "fid"
    assert main(["fidelity", "--grid", "tiny", "--problems", "inpaint-1d", "--methods", "PiGDM,MCG",
                 "--samples", "16", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "inpaint-1d       PiGDM" in text and "wrote" in text and (out / "fidelity.png").exists()
    for argv, flag in ((["--samples", "1"], "--samples"), (["--problems", "mri"], "--problems"),
                       (["--methods", "DPS,SDE"], "--methods"), (["--threads", "0"], "--threads")):
        assert main(["fidelity", "--grid", "tiny", "--out", str(out), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"dps-fast fidelity: error: {flag}:") and "Traceback" not in err, err
