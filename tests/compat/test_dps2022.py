"""The dps2022 drop-in: their create_sampler keys, their objects accepted unchanged, the recognised
fast paths against the generic path and their formulas, rng="torch" against their loop, DDIM."""

from __future__ import annotations

import functools
import io
import logging

import numpy as np
import pytest
import torch

from dps_fast import NonFiniteError
from dps_fast.compat.dps2022 import clear_color, create_sampler
from dps_fast.compat.dps2022.unet import to_admunet
from dps_fast.priors import GaussianPrior
from tests.compat.conftest import diffusion_config, needs_fixture
from dps_fast.compat.dps2022.recognize import map_operator
from tests.compat.standins import (DenoiseOperator, GaussialBlurOperator, GaussianNoise, Identity,
                                   InpaintingOperator, ManifoldConstraintGradient, MotionBlurOperator,
                                   PhaseRetrievalOperator, PoissonNoise, PosteriorSampling, PosteriorSamplingPlus,
                                   Projection, SquaredOperator, SuperResolutionOperator, UNetModel, create_unet,
                                   even_keep, linear_betas, respaced, their_ddpm_loop)
from tests.nets import TinyEps

F64 = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def _inpainting(shape=(1, 3, 16, 16), dtype=torch.float32, seed=0, noise="gaussian"):
    """Their inpainting set-up: operator, noiser, a random mask [1, 1, H, W], y = noiser(A x)."""
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand((1, 1) + shape[2:], generator=g) > 0.3).to(dtype)
    op = InpaintingOperator("cpu")
    x = (torch.rand(shape, generator=g, dtype=dtype) * 1.6 - 0.8)
    y = op.forward(x, mask=mask)
    if noise == "gaussian":
        noiser = GaussianNoise(0.05)
        y = y + 0.05 * torch.randn(y.shape, generator=g, dtype=dtype)
    else:
        noiser = PoissonNoise(1.0)
        y = (torch.poisson(((y + 1) / 2).clamp(0, 1) * 255, generator=g) / 255 * 2 - 1).clamp(-1, 1).to(dtype)
        y = torch.where(y == 0, torch.full_like(y, 1 / 255), y)  # their Poisson step divides by |y|
    x_start = torch.randn(shape, generator=g, dtype=dtype)
    return op, noiser, mask, y, x_start


# ---- create_sampler --------------------------------------------------------------------------
def test_create_sampler_takes_their_keys_and_schedule():
    s = create_sampler(**diffusion_config(timestep_respacing="10,5"))
    keep = sorted(set(even_keep(500, 10)) | {500 + k for k in even_keep(500, 5)})
    betas, tmap = respaced(linear_betas(1000), keep)
    assert s.timestep_map == tmap and s.num_timesteps == 15
    np.testing.assert_allclose(s.betas, betas, rtol=1e-12, atol=0)
    np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-12, atol=0)
    assert type(s).__name__ == "DDPM" and s.rng == "philox"
    assert type(create_sampler(**diffusion_config(sampler="ddim", timestep_respacing=""))).__name__ == "DDIM"
    # "epsilon " with the trailing blank of their YAML file
    assert create_sampler(**diffusion_config(model_mean_type="epsilon ")).model_mean_type == "epsilon"


@pytest.mark.parametrize("key, value, words", [
    ("sampler", "euler", "sampler: expected one of ('ddpm', 'ddim')"),
    ("noise_schedule", "quadratic", "noise_schedule"),
    ("model_var_type", "fixed", "model_var_type"),
    ("clip_denoised", "yes", "clip_denoised: expected true or false"),
    ("timestep_respacing", 2000, "timestep_respacing"),
    ("steps", 0, "steps: expected a positive integer"),
    ("steps", 10, "steps: the linear schedule scaled to 10 steps"),
], ids=["sampler", "schedule", "var", "flag", "respacing", "steps", "short-linear"])
def test_create_sampler_bad_values_name_the_key(key, value, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        create_sampler(**diffusion_config(**{key: value}))


# ---- the network ------------------------------------------------------------------------------
@needs_fixture
def test_their_unet_runs_as_admunet_with_reference_outputs(unet, tiny32):
    adm = to_admunet(unet)
    assert adm.state_dict().keys() == unet.state_dict().keys()
    # the weights are shared, not copied
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(adm.state_dict().values(), unet.state_dict().values()))
    x = tiny32["x"].clone().requires_grad_(True)
    out = adm(x, tiny32["t"])
    (vjp,) = torch.autograd.grad((out[:, :3] * tiny32["cotangent"]).sum(), x)
    # float32 rounding against their UNetModel's outputs (same bound as tests/models/test_adm.py)
    assert rel(out, tiny32["output"]) < 1e-5 and rel(vjp, tiny32["input_vjp"]) < 1e-5


@needs_fixture
def test_unet_config_is_read_from_the_model(tiny32):
    cfg = dict(tiny32["config"], use_new_attention_order=True, use_scale_shift_norm=False, resblock_updown=False)
    model = create_unet(**cfg)
    adm = to_admunet(model)
    blocks = [m for m in adm.modules() if type(m).__name__ == "AttentionBlock"]
    assert blocks and all(b.new_order for b in blocks)
    assert sum(p.numel() for p in adm.parameters()) == sum(p.numel() for p in model.parameters())
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([300])
    torch.testing.assert_close(adm(x, t), model(x, t), rtol=0, atol=0)


def test_unet_with_a_foreign_layout_is_refused():
    model = UNetModel(32, 3, 32, 6, 1, (2,), channel_mult=(1, 2))
    model.extra = torch.nn.Linear(2, 2)  # a key ADMUNet does not have
    with pytest.raises(ValueError, match="no ADMUNet layout matches"):
        to_admunet(model)


# ---- rng="torch": their loop, their draws ------------------------------------------------------
@pytest.mark.parametrize("method", ["ps+", "generic-ps"])
def test_rng_torch_formula_paths_reproduce_their_loop(small_unet, method):
    unet = small_unet
    op, noiser, mask, y, x_start = _inpainting()
    if method == "ps+":
        cond = PosteriorSamplingPlus(op, noiser, scale=0.5, num_sampling=2)
        sampler = create_sampler(**diffusion_config(), rng="torch", progress=False)
    else:
        cond = PosteriorSampling(op, noiser, scale=0.5)
        sampler = create_sampler(**diffusion_config(), rng="torch", progress=False, fast=False)
    fn = functools.partial(cond.conditioning, mask=mask)
    torch.manual_seed(11)
    theirs = their_ddpm_loop(unet, x_start.clone(), y, fn, even_keep(1000, 5))
    torch.manual_seed(11)
    ours = sampler.p_sample_loop(unet, x_start.clone(), y, fn, record=False, save_root=None)
    assert sampler.last_plan["path"] == ("formula" if method == "ps+" else "callback")
    # same operations in the same order on the same draws: float32 rounding at most
    assert float((ours - theirs).abs().max()) <= 1e-6
    torch.manual_seed(12)  # negative control: other draws give another sample
    assert rel(sampler.p_sample_loop(unet, x_start.clone(), y, fn, record=False, save_root=None), theirs) > 0.05


@pytest.mark.parametrize("method", ["ps", "mcg"])
def test_rng_torch_fused_path_reproduces_their_loop(small_unet, method):
    unet = small_unet
    op, noiser, mask, y, x_start = _inpainting()
    cls = PosteriorSampling if method == "ps" else ManifoldConstraintGradient
    fn = functools.partial(cls(op, noiser, scale=0.3).conditioning, mask=mask)
    keep = even_keep(1000, 5)
    sampler = create_sampler(**diffusion_config(), rng="torch", progress=False)
    torch.manual_seed(5)
    theirs = their_ddpm_loop(unet, x_start.clone(), y, fn, keep)
    torch.manual_seed(5)
    ours = sampler.p_sample_loop(unet, x_start.clone(), y, fn, record=False, save_root=None)
    assert sampler.last_plan["path"] == "fused" and sampler.last_plan["network_fast"]
    # The fused update rounds differently (one fused pass instead of their op sequence) and the
    # chain amplifies float32 rounding, so the yardstick is how far their own loop moves when an
    # input moves by one float32 ulp (flash-attention rule: at most 2x that). Measured over 4
    # problems x 2 methods: ours 1.0e-6..2.7e-6 relative, one nudge of x_start 1.3e-6..1.4e-5.
    # A wrong draw order gives O(1) differences (see the formula-path test's negative control).
    nudges = []
    for xs, yy in ((x_start * (1 + 2.0 ** -23), y), (x_start * (1 - 2.0 ** -23), y), (x_start, y * (1 + 2.0 ** -23))):
        torch.manual_seed(5)
        nudges.append(rel(their_ddpm_loop(unet, xs.clone(), yy, fn, keep), theirs))
    assert rel(ours, theirs) <= 2 * max(nudges), (rel(ours, theirs), nudges)
    assert rel(ours, theirs) < 1e-5


# ---- recognised fast paths against the generic path (float64) ---------------------------------
def _f64_problem(kind: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (1, 3, 16, 16)
    x0 = torch.rand(shape, generator=g, dtype=F64) * 1.6 - 0.8
    kw: dict = {}
    if kind == "inpaint":
        op, kw = InpaintingOperator("cpu"), {"mask": (torch.rand(1, 1, 16, 16, generator=g) > 0.4).to(F64)}
    elif kind == "denoise":
        op = DenoiseOperator("cpu")
    elif kind == "blur":
        op = GaussialBlurOperator(9, 1.0, "cpu")
        op.conv.double()
    elif kind == "motion":
        op = MotionBlurOperator(9, 0.5, "cpu")
        op.conv.double()
    elif kind == "superres":
        op = SuperResolutionOperator((1, 3, 16, 16), 4, "cpu")
    elif kind == "phase":
        op = PhaseRetrievalOperator(0.5, "cpu")
    else:
        op = SquaredOperator()
    ax = op.forward(x0, **kw)
    y = ax + 0.05 * torch.randn(ax.shape, generator=g, dtype=F64)
    return op, kw, y, torch.randn(shape, generator=g, dtype=F64)


CASES = [
    ("ps", "inpaint", "gaussian", {}),
    ("ps", "blur", "gaussian", {}),
    ("ps", "motion", "gaussian", {}),
    ("ps", "superres", "gaussian", {}),
    ("ps", "phase", "gaussian", {}),
    ("ps", "nonlinear", "gaussian", {}),
    ("mcg", "inpaint", "gaussian", {}),
    ("mcg", "superres", "gaussian", {}),
    ("ps", "inpaint", "gaussian", {"model_var_type": "fixed_small"}),
    ("ps", "inpaint", "poisson", {"model_var_type": "fixed_large"}),
    ("ps", "inpaint", "gaussian", {"sampler": "ddim"}),
    ("ps", "inpaint", "gaussian", {"sampler": "ddim", "eta": 0.5, "clip_denoised": False}),
]


@pytest.mark.parametrize("method, kind, noise, over", CASES,
                         ids=["ps-inpaint", "ps-blur", "ps-motion", "ps-superres", "ps-phase", "ps-own-operator",
                              "mcg-inpaint", "mcg-superres", "ps-fixed-small", "ps-poisson-fixed-large",
                              "ddim-ps", "ddim-eta-noclip"])
@pytest.mark.parametrize("rng", ["philox", "torch"])
def test_fused_path_equals_generic_path_float64(method, kind, noise, over, rng):
    op, kw, y, x_start = _f64_problem(kind)
    if noise == "poisson":
        y = y.clamp(-1, 1).abs().clamp_min(0.05)  # their Poisson step divides by |y|
    noiser = GaussianNoise(0.05) if noise == "gaussian" else PoissonNoise(1.0)
    cls = PosteriorSampling if method == "ps" else ManifoldConstraintGradient
    fn = functools.partial(cls(op, noiser, scale=0.4).conditioning, **kw)
    net = TinyEps(3, 8, learn_sigma=over.get("model_var_type", "learned_range") == "learned_range").double()
    cfg = diffusion_config(timestep_respacing=6, **{k: v for k, v in over.items() if k != "eta"})
    out = {}
    for fast in (True, False):
        s = create_sampler(**cfg, eta=over.get("eta", 0.0), rng=rng, fast=fast, progress=False)
        torch.manual_seed(3)
        out[fast] = s.p_sample_loop(net, x_start.clone(), y, fn, record=False, save_root=None,
                                    seeds=torch.tensor([77]))
        assert s.last_plan["path"] == ("fused" if fast else "callback")
    assert rel(out[True], out[False]) < 1e-10  # float64 rounding over 6 steps


@pytest.mark.parametrize("kind, expected", [
    ("denoise", "Identity()"), ("inpaint", "Inpainting(mask=(16, 16)"), ("blur", "Blur(kernel=(9, 9), boundary='reflect')"),
    ("motion", "Blur(kernel=(9, 9), boundary='reflect')"), ("superres", "SuperResolution(factor=4, filter='bicubic')"),
    ("phase", "PhaseRetrieval(oversample=2.0, pad=16)"), ("nonlinear", "Differentiable(")])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_their_operators_map_to_dps_fast_operators(kind, expected, dtype):
    op, kw, y, x_start = _f64_problem(kind)
    if hasattr(op, "conv"):
        op.conv.to(dtype)
    ours, desc = map_operator(op, kw, x_start.to(dtype))
    assert repr(ours).startswith(expected), desc
    x = torch.randn(x_start.shape, dtype=dtype, generator=torch.Generator().manual_seed(4))
    # same A: float rounding of the probe's sums at most (the mapping itself checks 1e-4)
    assert rel(ours.forward(x), op.forward(x, **kw)) < (1e-12 if dtype == F64 else 1e-5)


def test_an_operator_that_differs_from_its_namesake_is_not_mapped():
    op = GaussialBlurOperator(9, 1.0, "cpu")
    op.conv.seq[0].padding = (2, 2, 2, 2)  # not k // 2: a different operator behind the same class name
    op.conv.seq[0] = torch.nn.ReplicationPad2d(4)  # and another boundary
    ours, desc = map_operator(op, {}, torch.zeros(1, 3, 16, 16))
    assert repr(ours).startswith("Differentiable(") and "no dps_fast equivalent" in desc


def test_batched_rows_equal_single_runs():
    """Per-sample norms: an image's result does not depend on the others in its batch."""
    g = torch.Generator().manual_seed(1)
    op, noiser = InpaintingOperator("cpu"), GaussianNoise(0.05)
    mask = (torch.rand(3, 1, 16, 16, generator=g) > 0.4).to(F64)
    y = op.forward(torch.rand(3, 3, 16, 16, generator=g, dtype=F64), mask=mask)
    x_start = torch.randn(3, 3, 16, 16, generator=g, dtype=F64)
    net = TinyEps(3, 8, learn_sigma=True).double()
    s = create_sampler(**diffusion_config(), progress=False)
    cond = PosteriorSampling(op, noiser, scale=0.4)
    seeds = torch.tensor([4, 5, 6])
    batch = s.p_sample_loop(net, x_start, y, functools.partial(cond.conditioning, mask=mask), seeds=seeds)
    assert s.last_plan["operator"].startswith("BatchMask")
    for b in range(3):
        one = s.p_sample_loop(net, x_start[b:b + 1], y[b:b + 1],
                              functools.partial(cond.conditioning, mask=mask[b:b + 1]), seeds=seeds[b:b + 1])
        assert rel(batch[b:b + 1], one) < 1e-12


# ---- each conditioning method against its formula ---------------------------------------------
METHODS = [
    ("vanilla", lambda op, nz: Identity(op, nz)),
    ("projection", lambda op, nz: Projection(op, nz)),
    ("ps", lambda op, nz: PosteriorSampling(op, nz, scale=0.3)),
    ("ps+", lambda op, nz: PosteriorSamplingPlus(op, nz, scale=0.3, num_sampling=3)),
    ("mcg", lambda op, nz: ManifoldConstraintGradient(op, nz, scale=0.3)),
]


@pytest.mark.parametrize("name, make", METHODS, ids=[m[0] for m in METHODS])
@pytest.mark.parametrize("noise", ["gaussian", "poisson"])
@pytest.mark.parametrize("kind", ["inpaint", "nonlinear"])
def test_each_method_equals_its_formula(name, make, noise, kind):
    """The stand-in classes write their formulas out; the recognised path computes them itself."""
    op, kw, y, x_start = _f64_problem(kind, seed=2)
    y = y.abs().clamp_min(0.05) if noise == "poisson" else y
    cond = make(op, GaussianNoise(0.05) if noise == "gaussian" else PoissonNoise(1.0))
    fn = functools.partial(cond.conditioning, **kw)
    net = TinyEps(3, 8, learn_sigma=True).double()
    out, plans = {}, {}
    for fast in (True, False):
        s = create_sampler(**diffusion_config(), rng="torch", fast=fast, progress=False)
        torch.manual_seed(9)
        out[fast] = s.p_sample_loop(net, x_start.clone(), y, fn)
        plans[fast] = s.last_plan
    assert plans[True]["method"] == name and plans[False]["path"] == "callback"
    if name in ("ps", "mcg") and kind == "inpaint":
        assert plans[True]["path"] == "fused"
    assert rel(out[True], out[False]) < 1e-10


def test_unrecognised_conditioning_runs_their_function():
    op, kw, y, x_start = _f64_problem("inpaint")
    calls = []

    def my_cond(x_prev, x_t, x_0_hat, measurement, noisy_measurement, mask):
        calls.append(noisy_measurement.shape)
        norm = torch.linalg.norm(measurement - x_0_hat * mask)
        return x_t - 0.2 * torch.autograd.grad(norm, x_prev)[0], norm

    s = create_sampler(**diffusion_config(), progress=False)
    fn = functools.partial(my_cond, **kw)
    got = s.p_sample_loop(TinyEps(3, 8, learn_sigma=True).double(), x_start, y, fn, seeds=torch.tensor([1]))
    assert s.last_plan["path"] == "callback" and len(calls) == 5 and torch.isfinite(got).all()
    cond = PosteriorSampling(op, GaussianNoise(0.05), scale=0.2)
    same = s.p_sample_loop(TinyEps(3, 8, learn_sigma=True).double(), x_start, y,
                           functools.partial(cond.conditioning, **kw), seeds=torch.tensor([1]))
    assert rel(got, same) < 1e-10  # my_cond is 'ps' written by hand


def test_divergence_raises_instead_of_black_images():
    op, kw, y, x_start = _f64_problem("nonlinear")
    cond = PosteriorSampling(op, GaussianNoise(0.05), scale=0.3)

    def blows_up(x, t):  # a network that returns NaN below t = 500, as a diverged chain does
        return 0.1 * x + torch.where(t.view(-1, 1, 1, 1) < 500, float("nan"), 0.0).to(x)

    for fast in (True, False):
        s = create_sampler(**diffusion_config(model_var_type="fixed_small"), fast=fast, progress=False)
        with pytest.raises(NonFiniteError, match=r"step idx=1 .*smaller scale"):
            s.p_sample_loop(blows_up, x_start, y, cond.conditioning)


def test_one_log_line_per_setup(caplog):
    op, kw, y, x_start = _f64_problem("nonlinear")
    cond = PosteriorSampling(op, GaussianNoise(0.05), scale=0.1)
    s = create_sampler(**diffusion_config(timestep_respacing=2), progress=False)
    net = TinyEps(3, 8, learn_sigma=True).double()
    with caplog.at_level(logging.INFO, logger="dps_fast.compat"):
        for _ in range(2):
            s.p_sample_loop(net, x_start, y, cond.conditioning)
    lines = [r.getMessage() for r in caplog.records if "dps2022 drop-in" in r.getMessage()]
    assert len(lines) == 1
    assert "SquaredOperator -> Differentiable (one autograd VJP of their forward)" in lines[0]
    assert "fused DPS step" in lines[0]



def test_ddim_on_a_non_fused_backend_says_it_runs_the_formula_path(caplog):
    """DDIM's guided step is built from a fused backend's pieces: with backend='reference' it runs
    the formula path, and the plan and the log line say so (not 'fused')."""
    op, kw, y, x_start = _f64_problem("inpaint")
    fn = functools.partial(PosteriorSampling(op, GaussianNoise(0.05), scale=0.4).conditioning, **kw)
    net = TinyEps(3, 8, learn_sigma=True).double()
    out, plans = {}, {}
    for backend in ("reference", "torch"):
        s = create_sampler(**diffusion_config(sampler="ddim", timestep_respacing=4), eta=0.5, backend=backend,
                           progress=False)
        with caplog.at_level(logging.INFO, logger="dps_fast.compat"):
            out[backend] = s.p_sample_loop(net, x_start, y, fn, seeds=torch.tensor([7]))
        plans[backend] = s.last_plan
    assert plans["reference"]["path"] == "formula" and plans["torch"]["path"] == "fused"
    assert "DDIM needs a fused backend" in plans["reference"]["why_not_fused"]
    line = next(r.getMessage() for r in caplog.records if "backend='reference'" in r.getMessage())
    assert "step: formula path (DDIM needs a fused backend" in line
    assert rel(out["reference"], out["torch"]) < 1e-10  # the same chain either way (float64)

# ---- progress images ----------------------------------------------------------------------------
def test_record_writes_their_progress_images(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    op, kw, y, x_start = _f64_problem("inpaint")
    cond = PosteriorSampling(op, GaussianNoise(0.05), scale=0.3)
    s = create_sampler(**diffusion_config(timestep_respacing=12), progress=False)
    out = s.p_sample_loop(TinyEps(3, 8, learn_sigma=True).double(), x_start, y,
                          functools.partial(cond.conditioning, **kw), record=True, save_root=tmp_path)
    assert sorted(p.name for p in (tmp_path / "progress").iterdir()) == ["x_0000.png", "x_0010.png"]
    buf = io.BytesIO()
    plt.imsave(buf, clear_color(out), format="png")  # what their loop writes for the last state
    buf.seek(0)
    np.testing.assert_array_equal(np.array(Image.open(tmp_path / "progress" / "x_0000.png")),
                                  np.array(Image.open(buf)))


# ---- DDIM ---------------------------------------------------------------------------------------
def _gaussian_prior_problem(n: int = 64, d: int = 4):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(d, d, generator=g, dtype=F64) * 0.3
    prior = GaussianPrior(torch.linspace(-0.5, 0.5, d, dtype=F64), a @ a.T + 0.05 * torch.eye(d, dtype=F64))
    x_t = torch.randn(n, 1, d, generator=g, dtype=F64)
    return prior, x_t


def _flow_map(prior: GaussianPrior, x_t: torch.Tensor, abar_t: float) -> torch.Tensor:
    """The exact probability-flow map from the marginal at abar_t to the prior: the Gaussian's
    covariances commute, so x0 = m + C^{1/2} S^{-1/2} (x_T - sqrt(abar) m), S = abar C + (1-abar) I."""
    evals, evecs = torch.linalg.eigh(prior.cov)
    s = abar_t * evals + (1 - abar_t)
    z = (x_t[:, 0] - abar_t ** 0.5 * prior.mean) @ evecs
    return (prior.mean + (z * (evals.sqrt() / s.sqrt())) @ evecs.T)[:, None]


def test_ddim_eta0_without_guidance_is_deterministic_and_reaches_the_prior():
    prior, x_t = _gaussian_prior_problem()
    cond = Identity(DenoiseOperator("cpu"), GaussianNoise(0.05))
    errs = {}
    for k in (100, 400):
        s = create_sampler(**diffusion_config(sampler="ddim", timestep_respacing=k, model_var_type="fixed_small",
                                              clip_denoised=False), progress=False)
        eps = prior.eps_model(s.schedule)
        a = s.p_sample_loop(eps, x_t, torch.zeros_like(x_t), cond.conditioning, seeds=torch.arange(64))
        b = s.p_sample_loop(eps, x_t, torch.zeros_like(x_t), cond.conditioning, seeds=torch.arange(64) + 99)
        assert torch.equal(a, b)  # eta = 0: the noise draws do not enter
        abar_T = float(s.schedule.alphas_cumprod[-1])
        errs[k] = float((a - _flow_map(prior, x_t, abar_T)).norm() / _flow_map(prior, x_t, abar_T).norm())
    # DDIM is a first-order solver of the flow: 4x the steps cuts the error about 4x (>= 2.5x
    # allows for the O(beta_1) gap of the last Tweedie step); 100 steps are within 1%.
    assert errs[400] < errs[100] / 2.5 and errs[400] < 1e-2, errs


def test_ddim_with_guidance_stays_finite_and_fits_the_measurement():
    """Their DDIM path is reported to give black (NaN) images; ours samples and fits y."""
    prior, x_t = _gaussian_prior_problem(n=16)
    g = torch.Generator().manual_seed(3)
    x0 = prior.sample(16, generator=g)
    y = x0 + 0.05 * torch.randn(x0.shape, generator=g, dtype=F64)
    op = DenoiseOperator("cpu")
    res = {}
    for name, cond in (("vanilla", Identity(op, GaussianNoise(0.05))),
                       ("ps", PosteriorSampling(op, GaussianNoise(0.05), scale=0.5))):
        s = create_sampler(**diffusion_config(sampler="ddim", timestep_respacing=100, model_var_type="fixed_small",
                                              clip_denoised=False), progress=False)
        res[name] = s.p_sample_loop(prior.eps_model(s.schedule), x_t, y, cond.conditioning)
        assert torch.isfinite(res[name]).all()
    assert s.last_plan["path"] == "fused"
    fit = {k: float((v - y).norm()) for k, v in res.items()}
    assert fit["ps"] < 0.5 * fit["vanilla"], fit


# ---- packaging ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["dps_fast.compat.dps2022", "dps_fast.compat.dps2022.diffusion",
                                  "dps_fast.compat.dps2022.chain", "dps_fast.compat.dps2022.tasks",
                                  "dps_fast.compat.dps2022.images", "dps_fast.compat.dps2022.methods",
                                  "dps_fast.compat.dps2022.recognize", "dps_fast.compat.dps2022.unet"])
def test_docstring_examples(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), extraglobs={"torch": torch}, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_the_import_swap_needs_no_yaml():
    import subprocess
    import sys

    code = ("import sys; sys.modules['yaml'] = None\n"
            "from dps_fast.compat.dps2022 import create_sampler\n"
            "print(type(create_sampler(sampler='ddpm', steps=1000, noise_schedule='linear', model_mean_type='epsilon', "
            "model_var_type='fixed_small', dynamic_threshold=False, clip_denoised=True, rescale_timesteps=False)).__name__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "DDPM", r.stderr


def test_compile_wraps_the_network_once_per_sampler():
    """torch.compile (here its 'eager' backend: no C++ toolchain needed) is applied once and reused
    by every later call, and does not change the samples."""
    op, kw, y, x_start = _f64_problem("inpaint")
    fn = functools.partial(PosteriorSampling(op, GaussianNoise(0.05), scale=0.3).conditioning, **kw)
    net = TinyEps(3, 8, learn_sigma=True).double()
    plain = create_sampler(**diffusion_config(timestep_respacing=3), progress=False)
    comp = create_sampler(**diffusion_config(timestep_respacing=3), compile={"backend": "eager"}, progress=False)
    seeds = torch.tensor([3])
    ref = plain.p_sample_loop(net, x_start, y, fn, seeds=seeds)
    outs = [comp.p_sample_loop(net, x_start, y, fn, seeds=seeds) for _ in range(2)]
    assert len(comp._compiled) == 1 and "torch.compile" in comp.last_plan["network"]
    assert all(rel(o, ref) < 1e-12 for o in outs)
