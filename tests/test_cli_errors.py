"""The rough edges a new user hit on the command line (issue 19): one-line usage errors, -v after the
sub-command, --out checked before any work and OS errors named by their option, --device on a CPU
build, finite numbers, which demo scale diverged, the explore console's step and t, and counts that
agree with their nouns."""

from __future__ import annotations

import argparse
import os

import pytest
import torch

from dps_fast import NoiseSchedule
from dps_fast._help import check_out_dir, check_out_file, count, device_option, int_at_least, os_error_message
from dps_fast.cli import build_parser, main
from dps_fast.demo import ZetaRun, run_zetas
from dps_fast.divergence import NonFiniteError
from dps_fast.problems import demo_problem

pytestmark = pytest.mark.usefixtures("one_thread")


def _err_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def _never(*args, **kwargs):
    raise AssertionError("the work started before --out was checked")


# ---- argparse: one line, exit 2 -----------------------------------------------------------------
@pytest.mark.parametrize("argv, flag", [
    (["demo", "--steps", "x"], "--steps"),
    (["demo", "--samples", "1"], "--samples"),             # the panels need two samples for a std
    (["reconstruct", "in", "--out", "o", "--sigma-n", "inf"], "--sigma-n"),
    (["explore", "--zeta-min", "nan"], "--zeta-min"),
    (["demo", "--no-such-option"], "--no-such-option"),
    ([], "COMMAND"),
])
def test_usage_errors_are_one_line_with_a_pointer_to_help(argv, flag, capsys):
    assert main(argv) == 2
    line = _err_line(capsys)
    assert flag in line and "--help" in line, line
    assert capsys.readouterr().out == ""  # nothing ran: no header was printed


def test_numbers_must_be_finite_and_the_message_says_so(capsys):
    assert main(["reconstruct", "in", "--out", "o", "--sigma-n", "inf"]) == 2
    assert "expected a finite number >= 0, got 'inf'" in _err_line(capsys)
    assert main(["demo", "--samples", "1"]) == 2
    assert "expected an integer >= 2, got '1'" in _err_line(capsys)
    assert int_at_least(2)("2") == 2


def test_verbose_is_accepted_before_and_after_the_sub_command():
    parser = build_parser()
    assert parser.parse_args(["-v", "demo"]).verbose is True
    assert parser.parse_args(["demo", "-v"]).verbose is True
    assert parser.parse_args(["demo", "--verbose"]).verbose is True
    assert parser.parse_args(["demo"]).verbose is False
    required = {"reconstruct": ["x", "--out", "o"],
                "dps2022": ["--model_config", "m", "--diffusion_config", "d", "--task_config", "t"]}
    for command in ("explore", "reconstruct", "fidelity", "dps2022"):
        assert parser.parse_args([command, "-v"] + required.get(command, [])).verbose is True


def test_verbose_after_the_sub_command_prints_the_traceback(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "-v"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "is a folder" in err


# ---- --out: where the message says, checked before the work --------------------------------------
def test_demo_refuses_a_folder_or_a_name_matplotlib_would_change_before_sampling(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("dps_fast.demo.run_zetas", _never)
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert f"--out: {str(tmp_path)!r} is a folder; expected a file path ending in .png" in _err_line(capsys)
    assert main(["demo", "--out", str(tmp_path / "figure")]) == 2  # matplotlib would write figure.png
    assert "expected a file name ending in .png or .pdf or .svg" in _err_line(capsys)
    assert not (tmp_path / "figure.png").exists() and list(tmp_path.iterdir()) == []


def test_demo_writes_exactly_where_it_says(tmp_path, capsys):
    out = tmp_path / "new" / "fig.png"
    assert main(["demo", "--out", str(out), "--steps", "20", "--samples", "4", "--quiet"]) == 0
    assert f"wrote {out} " in capsys.readouterr().out
    assert out.read_bytes()[:4] == b"\x89PNG" and os.listdir(out.parent) == ["fig.png"]


@pytest.mark.parametrize("command", ["demo", "explore"])
def test_out_problems_are_found_before_the_work(command, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(f"dps_fast.{command}.{'run_zetas' if command == 'demo' else 'explore_1d'}", _never)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    suffix = ".png" if command == "demo" else ".html"
    assert main([command, "--out", str(blocker / f"page{suffix}")]) == 2
    assert f"--out: cannot write {str(blocker / f'page{suffix}')!r}: {str(blocker)!r} is a file" in _err_line(capsys)
    assert main([command, "--out", f"/proc/no-such-dir/page{suffix}"]) == 2
    assert "--out: cannot create the folder '/proc/no-such-dir'" in _err_line(capsys)


def test_fidelity_out_that_is_a_file_is_named_before_the_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("dps_fast.fidelity.run_fidelity", _never)
    blocker = tmp_path / "rows"
    blocker.write_text("x")
    assert main(["fidelity", "--out", str(blocker), "--grid", "tiny"]) == 2
    line = _err_line(capsys)
    assert f"--out: {str(blocker)!r} is a file; expected a folder" in line and "Errno" not in line
    assert main(["fidelity", "--out", "/proc/nope", "--grid", "tiny"]) == 2
    line = _err_line(capsys)
    assert "--out: cannot create the folder '/proc/nope'" in line and "Errno" not in line


def test_out_checks_pass_for_good_paths(tmp_path, monkeypatch):
    assert check_out_file(tmp_path / "a" / "b.png", "--out", (".png",)) == tmp_path / "a" / "b.png"
    assert (tmp_path / "a").is_dir() and list((tmp_path / "a").iterdir()) == []  # the probe file is gone
    assert check_out_dir(tmp_path / "run", "--out").is_dir()
    (tmp_path / "x").write_text("")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="--save_dir: 'x' is a file"):
        check_out_dir("x", "--save_dir")


def test_os_errors_name_the_option_not_an_internal_file():
    exc = PermissionError(13, "Permission denied", "/runs/blur/.metrics.csv.tmp-8f3a")
    line = os_error_message(exc, {"out": "/runs/blur", "steps": 4}, ["reconstruct", "in", "--out", "/runs/blur"])
    assert line == "--out: '/runs/blur': Permission denied"
    # the flag as the user spelled it (the dps2022 command keeps their --save_dir)
    exc = FileExistsError(17, "File exists", "results")
    assert os_error_message(exc, {"save_dir": "results"}, ["dps2022", "--save_dir=results"]) == \
        "--save_dir: 'results': File exists"
    # a default value, not on the command line: the option named from its dest
    assert os_error_message(exc, {"save_dir": "results"}, []) == "--save-dir: 'results': File exists"
    # a file no option names: the reason and the file
    assert os_error_message(FileNotFoundError(2, "No such file or directory", "/etc/x"), {"out": "o"}) == \
        "No such file or directory: '/etc/x'"


def test_an_os_error_of_a_command_is_reported_with_its_option(tmp_path, capsys, monkeypatch):
    from dps_fast.reconstruct.data import TMP_MARK

    def unwritable(args: argparse.Namespace) -> int:  # what an atomic write into a read-only folder raises
        raise PermissionError(13, "Permission denied", os.path.join(tmp_path, f".page.html{TMP_MARK}123"))

    monkeypatch.setattr("dps_fast.explore._main", unwritable)
    out = str(tmp_path / "page.html")
    assert main(["explore", "--out", out]) == 2
    assert _err_line(capsys) == f"dps-fast explore: error: --out: {out!r}: Permission denied"


# ---- --device ------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has CUDA")
@pytest.mark.parametrize("command", ["explore", "reconstruct"])
def test_cuda_on_a_cpu_build_is_a_usage_error_with_one_message(command, tmp_path, capsys):
    argv = [command, "--device", "cuda"] + (["in", "--out", str(tmp_path)] if command == "reconstruct" else
                                            ["--model", "tiny32", "--random-weights", "--image", "x.png"])
    assert main(argv) == 2
    line = _err_line(capsys)
    assert f"argument --device: 'cuda' requested but CUDA is not available (torch {torch.__version__})" in line


def test_device_option_names_a_bad_device():
    assert device_option("cpu") == "cpu"
    with pytest.raises(argparse.ArgumentTypeError, match="expected cpu, cuda or cuda:N, got 'gpu'"):
        device_option("gpu")


# ---- divergence messages -------------------------------------------------------------------------
def test_the_demo_says_which_scale_diverged(monkeypatch, tmp_path):
    from dps_fast.demo import run_demo

    def fake(model, schedule, operator, y, sigma_n, zetas, *args, **kwargs):
        bad = NonFiniteError("x_t ran away at step i=7 (network timestep t=321): ...", step=7, timestep=321,
                             kind="runaway")
        return [ZetaRun(z, diverged=bad if k == 1 else None, samples=None) for k, z in enumerate(zetas)]

    monkeypatch.setattr("dps_fast.demo.run_zetas", fake)
    with pytest.raises(NonFiniteError, match=r"the about right scale zeta 0.005 diverged: x_t ran away at step i=7"):
        run_demo(out=tmp_path / "f.png", progress=False)

    def all_large_diverge(model, schedule, operator, y, sigma_n, zetas, *args, **kwargs):
        bad = NonFiniteError("...", step=3, timestep=100, kind="non-finite")
        return [ZetaRun(z, diverged=bad if k >= 2 else None) for k, z in enumerate(zetas)]

    monkeypatch.setattr("dps_fast.demo.run_zetas", all_large_diverge)
    with pytest.raises(NonFiniteError, match=r"every 'too large' scale diverged \(zeta 0.02, 0.015, 0.01; .* "
                                             r"step i=3, t=100\)"):
        run_demo(out=tmp_path / "f.png", progress=False)


def test_the_scan_console_names_step_and_t_and_counts_agree():
    p = demo_problem()
    sched = NoiseSchedule.linear(1000).respace(10)
    lines: list[str] = []
    runs = run_zetas(p.prior.eps_model(sched), sched, p.operator, p.y, p.sigma_n, [1e-3, 1e3], samples=1,
                     log=lines.append, backend="torch")
    assert runs[0].diverged is None and runs[1].diverged is not None
    bad = runs[1].diverged
    assert f"  zeta 1e+03: diverged at step i={bad.step} (t={bad.timestep}, {bad.kind})" in lines
    assert "  zeta 0.001: 1 value x 1 sample x 10 steps done" in lines


def test_count_agrees_with_its_noun():
    assert [count(n, "input") for n in (0, 1, 2)] == ["0 inputs", "1 input", "2 inputs"]
    assert count(1, "matrix", "matrices") == "1 matrix" and count(3, "matrix", "matrices") == "3 matrices"
