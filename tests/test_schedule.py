"""NoiseSchedule: constructors, guided-diffusion respacing, and the float64 coefficient table
checked against an independent derivation of the DDPM posterior q(x_{t-1} | x_t, x0)."""

import math

import pytest
import torch

from dps_fast import Coef, NoiseSchedule
from dps_fast.schedule import space_timesteps


def test_linear_and_cosine():
    s = NoiseSchedule.linear(1000)
    torch.testing.assert_close(s.betas, torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    c = NoiseSchedule.cosine(50)
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert abs(float(c.alphas_cumprod[9]) - f(10 / 50) / f(0)) < 1e-12
    assert float(c.betas.max()) <= 0.999


def test_space_timesteps_matches_guided_diffusion():
    assert space_timesteps(1000, 4) == [0, 333, 666, 999]
    # guided-diffusion's docstring example: 300 steps, sections of 10, 15 and 20
    steps = space_timesteps(300, [10, 15, 20])
    assert len(steps) == 45 and steps[:2] == [0, 11] and steps[9] == 99 and steps[10] == 100 and steps[-1] == 299
    assert space_timesteps(100, "ddim25") == list(range(0, 100, 4))
    with pytest.raises(ValueError, match="section_counts"):
        space_timesteps(10, 11)


@pytest.mark.parametrize("k", [1, 7, 100, 250, 1000])
def test_respace_keeps_alpha_bar_and_timesteps(k):
    base = NoiseSchedule.linear(1000)
    r = base.respace(k)
    assert r.num_steps == k and torch.equal(r.timesteps, torch.tensor(space_timesteps(1000, k)))
    torch.testing.assert_close(r.alphas_cumprod, base.alphas_cumprod[r.timesteps], rtol=1e-12, atol=0)
    torch.testing.assert_close(r.base_alphas_cumprod, base.alphas_cumprod)
    if k == 1000:
        torch.testing.assert_close(r.betas, base.betas, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("sched", [NoiseSchedule.linear(1000), NoiseSchedule.linear(1000).respace(37),
                                   NoiseSchedule.cosine(200)], ids=["linear", "respaced37", "cosine"])
def test_table_against_posterior_derivation(sched):
    tab = sched.table()
    abar = sched.alphas_cumprod
    for i in [1, 2, sched.num_steps // 2, sched.num_steps - 1]:
        a_t = 1 - float(sched.betas[i])
        ab, ab_prev = float(abar[i]), float(abar[i - 1])
        beta = float(sched.betas[i])
        # q(x_{t-1} | x_t, x0) by completing the square: precision = 1/(1-ab_prev) + a_t/beta
        var = 1.0 / (1.0 / (1 - ab_prev) + a_t / beta)
        assert abs(float(tab[i, Coef.VAR_SMALL]) - var) <= 1e-12 * var
        assert abs(float(tab[i, Coef.COEF_X0]) - var * math.sqrt(ab_prev) / (1 - ab_prev)) < 1e-12
        assert abs(float(tab[i, Coef.COEF_XT]) - var * math.sqrt(a_t) / beta) < 1e-12
        assert abs(float(tab[i, Coef.SQRT_ABAR]) ** 2 + float(tab[i, Coef.SQRT_1M_ABAR]) ** 2 - 1) < 1e-12
        assert abs(float(tab[i, Coef.SQRT_RECIP_ABAR]) * float(tab[i, Coef.SQRT_ABAR]) - 1) < 1e-12
        assert abs(float(tab[i, Coef.SIGMA_SMALL]) - math.sqrt(var)) < 1e-12
        assert abs(float(tab[i, Coef.SIGMA_LARGE]) - math.sqrt(beta)) < 1e-12
        assert abs(float(tab[i, Coef.LOG_BETA]) - math.log(beta)) < 1e-12
    # the last step (i = 0) is noiseless and returns x0hat: coef_x0 = 1, coef_xt = 0
    assert float(tab[0, Coef.SIGMA_SMALL]) == 0 and float(tab[0, Coef.SIGMA_LARGE]) == 0
    assert abs(float(tab[0, Coef.COEF_X0]) - 1) < 1e-12 and abs(float(tab[0, Coef.COEF_XT])) < 1e-12
    assert float(tab[0, Coef.NONZERO]) == 0 and float(tab[1, Coef.NONZERO]) == 1
    assert float(tab[0, Coef.LOG_VAR_SMALL]) == float(tab[1, Coef.LOG_VAR_SMALL])  # guided-diffusion's clip
    assert sched.table(torch.float32).dtype == torch.float32


def test_schedule_errors_name_the_argument():
    with pytest.raises(ValueError, match="betas"):
        NoiseSchedule([0.1, 1.2])
    with pytest.raises(ValueError, match="num_steps"):
        NoiseSchedule.linear(0)
    with pytest.raises(ValueError, match="steps"):
        NoiseSchedule.linear(100).respace(101)
