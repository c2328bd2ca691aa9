"""``dps-fast dps2022``: their YAML keys parse, their folders are written, batches and resumes give
the same images, and options that cannot be honoured fail before any work."""

from __future__ import annotations

import csv
import json
import re
import textwrap

import numpy as np
import pytest
import torch

from dps_fast.cli import main
from dps_fast.compat.dps2022 import create_sampler
from dps_fast.compat.dps2022.tasks import ConfigError, MaskGenerator, gaussian_kernel, load_yaml, parse_task
from tests.compat.conftest import needs_fixture

pytest.importorskip("yaml")

# Their configs/*.yaml, key for key (values of the FFHQ 256 set-up).
DIFFUSION_YAML = """\
sampler: ddpm
steps: 1000
noise_schedule: linear
model_mean_type: epsilon 
model_var_type: learned_range
dynamic_threshold: False
clip_denoised: True
rescale_timesteps: False
timestep_respacing: 1000
"""
MODEL_YAML = """\
# Defaults for image training.

image_size: 256
num_channels: 128
num_res_blocks: 1
channel_mult: ""
learn_sigma: True
class_cond: False
use_checkpoint: False
attention_resolutions: 16
num_heads: 4
num_head_channels: 64
num_heads_upsample: -1
use_scale_shift_norm: True
dropout: 0.0
resblock_updown: True
use_fp16: False
use_new_attention_order: False

model_path: models/ffhq_10m.pt
"""
TASKS = {
    "gaussian_deblur": """\
conditioning:
  method: ps
  params:
    scale: 0.3

data:
  name: ffhq
  root: ./data/samples/

measurement:
  operator:
    name: gaussian_blur
    kernel_size: 61
    intensity: 3.0

  noise:
    name: gaussian
    sigma: 0.05
""",
    "inpainting": """\
conditioning:
  method: ps
  params:
    scale: 0.5

data:
  name: ffhq
  root: ./data/samples/

measurement:
  operator:
    name: inpainting
  mask_opt:
    mask_type: random
    # mask_len_range: !!python/tuple [128, 129]  # for box
    mask_prob_range: !!python/tuple [0.3, 0.7]  # for random
    image_size: 256


  noise:
    name: gaussian
    sigma: 0.05
""",
    "super_resolution": """\
conditioning:
  method: ps
  params:
    scale: 0.3

data:
  name: ffhq
  root: ./data/samples/

measurement:
  operator:
    name: super_resolution
    in_shape: !!python/tuple [1, 3, 256, 256]
    scale_factor: 4

  noise:
    name: gaussian
    sigma: 0.05
""",
    "phase_retrieval": """\
conditioning:
  method: ps
  params:
    scale: 1.0

data:
  name: ffhq
  root: ./data/samples/

measurement:
  operator:
    name: phase_retrieval
    oversample: 2.0

  noise:
    name: gaussian
    sigma: 0.05
""",
}


def test_their_yaml_keys_parse(tmp_path):
    (tmp_path / "d.yaml").write_text(DIFFUSION_YAML)
    (tmp_path / "m.yaml").write_text(MODEL_YAML)
    sampler = create_sampler(**load_yaml(tmp_path / "d.yaml", "--diffusion_config"))
    assert sampler.num_timesteps == 1000 and sampler.model_mean_type == "epsilon"
    model_cfg = load_yaml(tmp_path / "m.yaml", "--model_config")
    assert model_cfg["attention_resolutions"] == 16 and model_cfg["channel_mult"] == ""
    for name, text in TASKS.items():
        (tmp_path / f"{name}.yaml").write_text(text)
        task = parse_task(load_yaml(tmp_path / f"{name}.yaml", "--task_config"))
        assert task.method in ("ps",) and task.noise == "gaussian" and task.sigma == 0.05
    inp = parse_task(load_yaml(tmp_path / "inpainting.yaml", "--task_config"))
    assert inp.mask.prob_range == (0.3, 0.7)  # !!python/tuple read as a tuple
    sr = parse_task(load_yaml(tmp_path / "super_resolution.yaml", "--task_config"))
    assert sr.operator_args["in_shape"] == (1, 3, 256, 256)


def test_yaml_loader_refuses_other_python_tags(tmp_path):
    (tmp_path / "bad.yaml").write_text("x: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="--task_config: .* is not valid YAML"):
        load_yaml(tmp_path / "bad.yaml", "--task_config")


def test_gaussian_kernel_is_their_scipy_kernel():
    from scipy import ndimage  # a test dependency (pyproject [test]): an independent reference
    for k, std in ((61, 3.0), (61, 10.0), (9, 0.7)):  # 10.0: taps reach the edge and fold back (reflect)
        delta = np.zeros((k, k))
        delta[k // 2, k // 2] = 1
        np.testing.assert_allclose(gaussian_kernel(k, std).numpy(), ndimage.gaussian_filter(delta, sigma=std),
                                   rtol=0, atol=1e-15)


@pytest.mark.parametrize("kind, opts", [("random", {"mask_prob_range": (0.3, 0.7)}),
                                        ("box", {"mask_len_range": (8, 12)}),
                                        ("extreme", {"mask_len_range": (8, 12)})])
def test_mask_generator_follows_their_rules(kind, opts):
    gen = MaskGenerator(kind, image_size=32, margin=(4, 4), **opts)
    masks = torch.cat([gen(np.random.default_rng(s)) for s in range(20)])
    assert masks.shape == (20, 1, 32, 32) and set(masks.unique().tolist()) <= {0.0, 1.0}
    missing = (1 - masks).flatten(1).sum(1)
    if kind == "random":  # int(S^2 p) pixels, p ~ U(0.3, 0.7)
        assert ((missing >= int(1024 * 0.3)) & (missing <= int(1024 * 0.7))).all()
    else:  # a box of sides in [8, 12) inside the 4-pixel margin (extreme keeps only the box)
        area = missing if kind == "box" else 1024 - missing
        assert ((area >= 64) & (area <= 121)).all()
        inside = masks[:, 0, 4:-4, 4:-4] if kind == "box" else 1 - masks[:, 0, 4:-4, 4:-4]
        assert ((1 - inside).flatten(1).sum(1) == (missing if kind == "box" else 1024 - missing)).all()
    np.random.seed(3)  # their global numpy draws give the same masks as a seeded legacy generator
    torch.testing.assert_close(gen(np.random), gen(np.random.RandomState(3)))


# ---- the command ---------------------------------------------------------------------------------
def _write_setup(tmp_path, tiny32, task_extra: str = "", n_images: int = 3, method: str = "ps",
                 operator: str = "inpainting", respacing: int = 12):
    torch.save(tiny32["state_dict"], tmp_path / "tiny32.pt")
    cfg = tiny32["config"]
    (tmp_path / "model.yaml").write_text(textwrap.dedent(f"""\
        image_size: {cfg['image_size']}
        num_channels: {cfg['num_channels']}
        num_res_blocks: {cfg['num_res_blocks']}
        channel_mult: "{cfg['channel_mult']}"
        learn_sigma: True
        class_cond: False
        use_checkpoint: False
        attention_resolutions: "{cfg['attention_resolutions']}"
        num_heads: {cfg['num_heads']}
        num_head_channels: {cfg['num_head_channels']}
        num_heads_upsample: -1
        use_scale_shift_norm: True
        dropout: 0.0
        resblock_updown: True
        use_fp16: False
        use_new_attention_order: False
        model_path: {tmp_path / 'tiny32.pt'}
        """))
    (tmp_path / "diffusion.yaml").write_text(DIFFUSION_YAML.replace("timestep_respacing: 1000",
                                                                    f"timestep_respacing: {respacing}"))
    op_block = "    name: inpainting\n  mask_opt:\n    mask_type: random\n    mask_prob_range: !!python/tuple [0.3, 0.7]\n" \
               "    image_size: 32\n" if operator == "inpainting" else f"    name: {operator}\n{task_extra}"
    (tmp_path / "task.yaml").write_text(
        f"conditioning:\n  method: {method}\n  params:\n    scale: 0.5\n\ndata:\n  name: ffhq\n  root: {tmp_path / 'data'}\n\n"
        f"measurement:\n  operator:\n{op_block}\n  noise:\n    name: gaussian\n    sigma: 0.05\n")
    from PIL import Image

    (tmp_path / "data" / "sub").mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(0)
    for i in range(n_images):
        folder = tmp_path / "data" / ("sub" if i == 1 else "")
        Image.fromarray(g.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return ["dps2022", "--model_config", str(tmp_path / "model.yaml"), "--diffusion_config",
            str(tmp_path / "diffusion.yaml"), "--task_config", str(tmp_path / "task.yaml"),
            "--save_dir", str(tmp_path / "results"), "--quiet"]


@needs_fixture
def test_cli_writes_their_folders_and_resumes_with_the_same_images(tmp_path, tiny32, capsys):
    argv = _write_setup(tmp_path, tiny32)
    assert main(argv + ["--batch-size", "3"]) == 0, capsys.readouterr().err
    out = tmp_path / "results" / "inpainting"
    for sub in ("input", "label", "recon"):
        assert sorted(p.name for p in (out / sub).iterdir()) == ["00000.png", "00001.png", "00002.png"]
    assert sorted(p.name for p in (out / "progress" / "00001").iterdir()) == ["x_0000.png", "x_0010.png"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["plan"]["path"] == "fused"
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == ["00000", "00001", "00002"] and all(float(r["psnr"]) > 0 for r in rows)
    first = {n: torch.load(out / "items" / n / "tensors.pt", weights_only=True)["recon"] for n in ("00000", "00001")}

    # re-running the same command skips the finished images
    assert main(argv + ["--batch-size", "3"]) == 0
    assert "(0 now, 3 before" in capsys.readouterr().out
    # an image redone alone (batch padded to the same 3 rows) is the same image
    (out / "items" / "00001" / "done.json").unlink()
    assert main(argv + ["--batch-size", "3"]) == 0
    assert "(1 now, 2 before" in capsys.readouterr().out
    again = torch.load(out / "items" / "00001" / "tensors.pt", weights_only=True)["recon"]
    torch.testing.assert_close(again, first["00001"], rtol=0, atol=0)
    # and in a batch of one: other shapes round differently in float32, and a guided, clipped
    # chain amplifies rounding (their own loop moved by 2.3e-3 relative when x_start moved by one
    # ulp in a 10-step tiny32 chain; batch 1 vs 3 here measured 9.9e-5), while another image
    # differs by O(1). In float64 batched rows equal single runs to 1e-12 (test_dps2022.py).
    (out / "items" / "00000" / "done.json").unlink()
    assert main(argv + ["--batch-size", "1"]) == 0
    alone = torch.load(out / "items" / "00000" / "tensors.pt", weights_only=True)["recon"]
    assert float((alone - first["00000"]).norm() / first["00000"].norm()) < 2e-2
    assert float((first["00001"] - first["00000"]).norm() / first["00000"].norm()) > 0.3


@needs_fixture
@pytest.mark.parametrize("operator, extra, method, y_shape, op_repr", [
    ("gaussian_blur", "    kernel_size: 9\n    intensity: 1.0\n", "ps", (3, 32, 32), "Blur(kernel=(9, 9), boundary='reflect')"),
    ("motion_blur", "    kernel_size: 9\n    intensity: 0.5\n", "mcg", (3, 32, 32), "Blur(kernel=(9, 9), boundary='reflect')"),
    ("super_resolution", "    in_shape: !!python/tuple [1, 3, 32, 32]\n    scale_factor: 2\n", "ps", (3, 16, 16),
     "SuperResolution(factor=2, filter='bicubic')"),
    ("phase_retrieval", "    oversample: 0.25\n", "ps", (3, 48, 48), "PhaseRetrieval(oversample=0.25, pad=8)"),
    ("noise", "", "ps+", (3, 32, 32), "Identity()"),
], ids=["gaussian_blur", "motion_blur-mcg", "super_resolution", "phase_retrieval", "denoise-ps+"])
def test_cli_runs_their_operators(tmp_path, tiny32, capsys, operator, extra, method, y_shape, op_repr):
    argv = _write_setup(tmp_path, tiny32, task_extra=extra, n_images=1, method=method, operator=operator,
                        respacing=2)
    assert main(argv) == 0, capsys.readouterr().err
    out = tmp_path / "results" / operator
    item = torch.load(out / "items" / "00000" / "tensors.pt", weights_only=True)
    assert tuple(item["measurement"].shape) == y_shape and torch.isfinite(item["recon"]).all()
    plan = json.loads((out / "manifest.json").read_text())["plan"]
    assert plan["operator"] == op_repr and plan["path"] == ("fused" if method in ("ps", "mcg") else "formula")
    assert (out / "input" / "00000.png").is_file() and (out / "progress" / "00000" / "x_0000.png").is_file()


@needs_fixture
def test_cli_rng_torch_is_their_script_seeded_per_image(tmp_path, tiny32, capsys):
    """--rng torch == their sample_condition.py loop body, seeded with (seed + i), on the drop-in."""
    import functools

    from dps_fast.compat.dps2022.tasks import list_images, load_image
    from tests.compat.standins import GaussianNoise, InpaintingOperator, PosteriorSampling, create_unet

    argv = _write_setup(tmp_path, tiny32, n_images=2, respacing=3)
    assert main(argv + ["--rng", "torch", "--seed", "5"]) == 0, capsys.readouterr().err
    out = tmp_path / "results" / "inpainting"
    assert json.loads((out / "manifest.json").read_text())["batch"]["rows"] == 1
    model = create_unet(**tiny32["config"])
    model.load_state_dict(tiny32["state_dict"])
    model.eval()
    op, noiser = InpaintingOperator("cpu"), GaussianNoise(0.05)
    cond = PosteriorSampling(op, noiser, scale=0.5)
    sampler = create_sampler(sampler="ddpm", steps=1000, noise_schedule="linear", model_mean_type="epsilon",
                             model_var_type="learned_range", dynamic_threshold=False, clip_denoised=True,
                             rescale_timesteps=False, timestep_respacing=3, rng="torch", progress=False)
    gen = MaskGenerator("random", mask_prob_range=(0.3, 0.7), image_size=32)
    for i, path in enumerate(list_images(str(tmp_path / "data"))):
        torch.manual_seed(5 + i)
        np.random.seed(5 + i)
        ref_img = load_image(path)[None]
        mask = gen(np.random)  # their mask_gen(ref_img)[:, 0].unsqueeze(0): [1, 1, S, S]
        y_n = noiser(op.forward(ref_img, mask=mask))
        x_start = torch.randn(ref_img.shape)
        sample = sampler.p_sample_loop(model, x_start, y_n, functools.partial(cond.conditioning, mask=mask),
                                       record=False, save_root=None)
        got = torch.load(out / "items" / f"{i:05d}" / "tensors.pt", weights_only=True)
        torch.testing.assert_close(got["measurement"], y_n[0], rtol=0, atol=0)
        # same draws; the command's one-mask-per-image operator rounds like the single mask
        # operator up to float32 ulps, which 3 guided steps amplify to ~1e-6
        assert float((got["recon"] - sample[0]).norm() / sample.norm()) < 1e-5


@needs_fixture
@pytest.mark.parametrize("operator, extra, words", [
    ("nonlinear_blur", "    opt_yml_path: ./bkse/options/generate_blur/default.yml\n",
     "'nonlinear_blur' runs the external bkse KernelWizard network"),
    ("bogus", "", "measurement.operator.name: expected one of"),
])
def test_cli_refuses_what_it_cannot_honour_before_any_work(tmp_path, tiny32, capsys, operator, extra, words):
    argv = _write_setup(tmp_path, tiny32, task_extra=extra, operator=operator)
    assert main(argv) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


@needs_fixture
def test_cli_bad_files_and_keys_are_clear_errors(tmp_path, tiny32, capsys):
    argv = _write_setup(tmp_path, tiny32)
    (tmp_path / "diffusion.yaml").write_text(DIFFUSION_YAML + "use_ddim: True\n")
    assert main(argv) == 2
    assert "--diffusion_config: unknown keys ['use_ddim']" in capsys.readouterr().err
    (tmp_path / "diffusion.yaml").write_text(DIFFUSION_YAML)
    (tmp_path / "tiny32.pt").unlink()
    assert main(argv) == 2
    assert "--model_config: model_path: no checkpoint at" in capsys.readouterr().err
    assert main(argv[:2] + [str(tmp_path / "nope.yaml")] + argv[3:]) == 2
    assert "--model_config: no file" in capsys.readouterr().err


@needs_fixture
def test_cli_refuses_to_resume_a_run_with_other_settings_and_names_them(tmp_path, tiny32, capsys):
    argv = _write_setup(tmp_path, tiny32, n_images=1, respacing=2)
    assert main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(argv + ["--seed", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("dps-fast dps2022: error: --save_dir:"), err
    assert "holds a run with other settings (differing: seed)" in err and "another --save_dir" in err


def test_cli_help_shows_each_default_once(capsys):
    assert main(["dps2022", "--help"]) == 0
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "(default: False)" not in text  # required options and flags
    options = text.split("\n  -")  # one chunk per option
    assert not [o for o in options if o.count("(default") > 1]
    assert "(default: ./results)" in text and "(default: philox)" in text
    backend = next(o for o in options if o.startswith("-backend"))
    assert "cuda" in backend and "reconstruct" in backend  # it has a help text now


@needs_fixture
def test_progress_shows_the_steps_of_the_batch_in_flight(tmp_path, tiny32, capsys):
    """Besides the bar over images, a bar over the steps of the batch being sampled (a batch can
    take minutes, the image bar would sit still)."""
    argv = [a for a in _write_setup(tmp_path, tiny32, n_images=1, respacing=3) if a != "--quiet"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "dps2022:" in err  # the bar over images
    assert re.search(r"dps2022 \S+: .*\d/3 ", err), err[-2000:]  # the bar over the 3 steps
