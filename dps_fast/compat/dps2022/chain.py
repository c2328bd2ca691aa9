"""One ``p_sample_loop`` run: the random draws in the chosen order and the three step paths.

* ``fused``: one :class:`~dps_fast.DPS` backend step per iteration (DDPM), or the backend's pieces
  (forward, ``prep``, one input VJP) with the DDIM update here;
* ``formula``: their reverse step and their conditioning formulas (:mod:`.methods`), autograd
  through the step with the network's weights frozen;
* ``callback``: their reverse step, then their own ``measurement_cond_fn``.

Every path yields ``(idx, x_{idx-1})`` per step; :meth:`Chain.run` checks finiteness, records
progress and raises :class:`~dps_fast.NonFiniteError` naming the first bad step.

Example:
    >>> u = _philox_uniform(torch.tensor([1, 2]), 4, step=0, stream=STREAM_PERTURB, dtype=torch.float32)
    >>> u.shape, bool(((u >= 0) & (u < 1)).all())
    (torch.Size([2, 4]), True)
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence, Union

import torch

from ...backends.base import FusedBackend
from ...models.wrapper import frozen_weights
from ...noise import STREAM_STEP, philox4x32, philox_normal
from ...operators.base import Operator
from ...sampler import DPS, NonFiniteError
from ...schedule import Coef
from . import methods
from .recognize import Conditioning, unwrap_partial

if TYPE_CHECKING:
    from .diffusion import SpacedDiffusion

__all__ = ["Chain", "STREAM_Q_SAMPLE", "STREAM_PERTURB", "RECORD_EVERY"]

#: Philox streams of the noise drawn here besides the sampler's own (0: step, 1: x_T): q_sample's
#: noise of the measurement, and ps+'s k-th perturbation at stream STREAM_PERTURB + k. Not
#: dps_fast.noise.STREAM_MEASUREMENT (2), the stream of dps_fast's own MCG ``y_{t-1}`` noise:
#: this one has been 3 since the drop-in's first release, and changing it would change the
#: samples (and break resuming) of every philox run that draws q_sample's noise.
STREAM_Q_SAMPLE = 3
STREAM_PERTURB = 4
RECORD_EVERY = 10  # their p_sample_loop saves progress/x_{idx}.png when idx % 10 == 0


def _philox_uniform(seeds: torch.Tensor, numel: int, step: int, stream: int, dtype: torch.dtype) -> torch.Tensor:
    """Uniforms in [0, 1) ``[N, numel]`` from the Philox words of ``(seed, element, step, stream)``."""
    dev = seeds.device
    k0 = (seeds & 0xFFFFFFFF).unsqueeze(1)
    k1 = ((seeds >> 32) & 0xFFFFFFFF).unsqueeze(1)
    c0 = torch.arange(numel, device=dev, dtype=torch.int64).unsqueeze(0)
    full = lambda v: torch.full((1, 1), v, device=dev, dtype=torch.int64)  # noqa: E731
    r0, _, _, _ = philox4x32(c0, full(step & 0xFFFFFFFF), full(stream), full(0), k0, k1)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    return ((r0 >> 8).to(work) * (2.0 ** -24)).to(dtype)


class Chain:
    """One ``p_sample_loop`` run: the draws in the chosen order and the three step paths."""

    def __init__(self, diff: "SpacedDiffusion", net: Callable[..., torch.Tensor], cond: Conditioning,
                 fast_op: Optional[Operator], x: torch.Tensor, y: torch.Tensor, seeds: torch.Tensor,
                 on_record: Optional[Callable[[int, torch.Tensor], None]]) -> None:
        self.d = diff
        self.net = net
        self.cond = cond
        self.fast_op = fast_op
        self.x = x
        self.y = y
        self.seeds = seeds.to(x.device)
        self.on_record = on_record
        self.distance: Optional[torch.Tensor] = None
        self.forward = fast_op.forward if fast_op is not None else cond.forward

    # ---- draws ----------------------------------------------------------------------------
    def noise_x(self, i: int, like: torch.Tensor) -> torch.Tensor:
        if self.d.rng == "torch":
            return torch.randn_like(like)
        return philox_normal(self.seeds, like[0].numel(), i, STREAM_STEP, like.dtype).view_as(like)

    def noise_y(self, i: int, needed: bool) -> Optional[torch.Tensor]:
        """q_sample's noise: drawn every step with rng='torch' (their order), else when used."""
        y = self.y
        if self.d.rng == "torch":
            return torch.randn_like(y)
        if not needed:
            return None
        if y.is_complex():
            raise ValueError("measurement: complex measurements need rng='torch' for q_sample's noise")
        return philox_normal(self.seeds, y[0].numel(), i, STREAM_Q_SAMPLE, y.dtype).view_as(y)

    def uniforms(self, i: int, like: torch.Tensor, k: int) -> list[torch.Tensor]:
        if self.d.rng == "torch":
            return [torch.rand_like(like) for _ in range(k)]
        return [_philox_uniform(self.seeds, like[0].numel(), i, STREAM_PERTURB + j, like.dtype).view_as(like)
                for j in range(k)]

    # ---- the loop -------------------------------------------------------------------------
    def run(self, engine: str, steps: Optional[Sequence[int]] = None) -> torch.Tensor:
        from tqdm.auto import tqdm

        k = self.d.num_timesteps
        order = list(range(k - 1, -1, -1)) if steps is None else [int(i) for i in steps]
        if any(not 0 <= i < k for i in order) or order != sorted(order, reverse=True):
            raise ValueError(f"steps: expected descending step indices in [0, {k}), got {steps!r}")
        x = self.x
        bad = torch.full((), -1, dtype=torch.int64, device=x.device)
        bar = tqdm(order, total=len(order), disable=not self.d.progress, desc=f"dps2022 {self.d.name}")
        stepper = {"fused": self._fused_steps, "formula": self._formula_steps, "callback": self._callback_steps}[engine]
        try:
            for i, x in stepper(x, iter(bar)):
                bad.masked_fill_((bad < 0) & ~torch.isfinite(x).all(), i)
                if i % RECORD_EVERY == 0:
                    if self.distance is not None:
                        bar.set_postfix({"distance": float(self.distance.float().mean())}, refresh=False)
                    if self.on_record is not None:
                        self.on_record(i, x)
        finally:
            bar.close()
        if int(bad) >= 0:
            zeros = self.cond.noise == "poisson" and int((self.y == 0).sum())
            why = (f"their Poisson step divides by |y| and y has {zeros} zero entries, so no scale makes it finite: "
                   f"give y without zeros, or use dps_fast.DPS(noise='poisson')" if zeros else
                   f"the guidance step is too large here: try a smaller scale (now {self.cond.scale:g})")
            raise NonFiniteError(
                f"the chain became non-finite at step idx={int(bad)} (their code would save black images); {why}",
                step=int(bad))
        return x.detach()

    def _project_needed(self) -> bool:
        return self.cond.method in ("mcg", "projection")

    def _noisy_y(self, i: int) -> Optional[torch.Tensor]:
        ny = self.noise_y(i, self._project_needed() or self.cond.method is None)
        return None if ny is None else self.d._q_sample(self.y, i, ny)

    # fused: one DPS step per iteration ---------------------------------------------------------
    def _fused_steps(self, x: torch.Tensor, idx: Iterator[int]) -> Iterator[tuple[int, torch.Tensor]]:
        d, cond = self.d, self.cond
        y = self.y.to(x.dtype)
        zeta: Union[float, torch.Tensor] = cond.scale
        if cond.noise == "poisson":  # grad of ||r|| mean(1/|y|) = mean(1/|y|) grad ||r||, per sample
            zeta = cond.scale * (1.0 / self.y.abs().double()).flatten(1).mean(1)
        # sigma_n only enters "squared" guidance; their step is "normalized" (zeta grad ||r||)
        dps = DPS(self.net, d.schedule, self.fast_op, zeta=zeta, sigma_n=cond.sigma or 1.0, guidance="normalized",
                  clip_x0=(-1.0, 1.0) if d.clip_denoised else None, variance=d.model_var_type, backend=d.backend,
                  compile=False, autocast=d.autocast)
        p, _ = dps.prepare(y, 1, seeds=self.seeds.cpu().view(-1, 1))
        be = dps.backend(x.device)
        ddim = d.name == "ddim"  # SpacedDiffusion._choose sends DDIM here only with a fused backend
        # their Poisson value is ||r|| mean(1/|y|): the shown distance, not only the step, scales
        dist_scale = (zeta / cond.scale).to(x) if isinstance(zeta, torch.Tensor) and cond.scale > 0 else 1.0
        with p.net.frozen():
            for i in idx:
                noise = self.noise_x(i, x) if d.rng == "torch" or ddim else None
                noisy = self._noisy_y(i)
                if ddim:
                    x, rnorm2 = self._ddim_fused(be, p, x, i, noise)
                else:
                    out = be.step(p, x, i, noise=noise, in_place=True)
                    x, rnorm2 = out.x, out.rnorm2
                self.distance = rnorm2.sqrt() * dist_scale
                if cond.method == "mcg":
                    x = cond.project(x, noisy).detach().contiguous()
                yield i, x

    def _ddim_fused(self, be: FusedBackend, p: Any, x: torch.Tensor, i: int, noise: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step with DPS guidance from the backend's pieces: forward, ``prep`` (x0hat, the
        clip-masked ``A^H r``, ``||r||^2``), one input VJP; the DDIM update in torch."""
        c = p.table[i]
        x_in, out = p.net.forward(x, p.t[i], graph=True)
        eps_g = out[:, :x.shape[1]]
        x0hat, w, rnorm2 = be.prep(p, x, eps_g.detach(), c)
        u = p.net.vjp(eps_g, x_in, w)
        gscale = p.gscale(rnorm2).reshape((-1,) + (1,) * (x.dim() - 1))
        grad = 2.0 * c[Coef.SQRT_RECIP_ABAR] * (w - c[Coef.SQRT_1M_ABAR] * u)  # grad_x ||r||^2
        x_next = self.d._ddim_update(x, x0hat, c, i, noise)  # type: ignore[attr-defined]
        return (x_next - gscale * grad).detach(), rnorm2

    # formula: their formulas, autograd through the step --------------------------------------
    def _formula_steps(self, x: torch.Tensor, idx: Iterator[int]) -> Iterator[tuple[int, torch.Tensor]]:
        cond, d = self.cond, self.d
        needs_grad = cond.method in ("ps", "ps+", "mcg")
        with frozen_weights(self.net):
            for i in idx:
                x_prev = x.detach().requires_grad_(needs_grad)
                with torch.set_grad_enabled(needs_grad):
                    out = self.net(x_prev, d._model_t(i, x.shape[0], x.device))
                    sample, x0 = d._p_sample(x_prev, out, i, self.noise_x(i, x))
                    noisy = self._noisy_y(i)
                    if cond.method == "ps":
                        x, dist = methods.ps_step(x_prev, sample, x0, self.y, self.forward, cond.scale, cond.noise)
                    elif cond.method == "mcg":
                        x, dist = methods.mcg_step(x_prev, sample, x0, self.y, noisy, self.forward, self._project(),
                                                   cond.scale, cond.noise)
                    elif cond.method == "ps+":
                        x, dist = methods.ps_plus_step(x_prev, sample, x0, self.y, self.forward, cond.scale,
                                                       self.uniforms(i, x0, cond.num_sampling))
                    elif cond.method == "projection":
                        x, dist = self._project()(sample, noisy), None
                    else:
                        x, dist = methods.vanilla_step(sample)
                x = x.detach()
                self.distance = dist
                yield i, x

    def _project(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        if self.cond.project is None:
            raise ValueError(f"measurement_cond_fn: method '{self.cond.method}' projects onto the measurement, "
                             f"but the conditioning object has no project()")
        return self.cond.project

    # callback: their function, called as their loop calls it ----------------------------------
    def _callback_steps(self, x: torch.Tensor, idx: Iterator[int]) -> Iterator[tuple[int, torch.Tensor]]:
        d, fn = self.d, self.cond.fn
        call = _adapt_call(fn)
        with frozen_weights(self.net):
            for i in idx:
                x_prev = x.detach().requires_grad_(True)
                with torch.enable_grad():
                    out = self.net(x_prev, d._model_t(i, x.shape[0], x.device))
                    sample, x0 = d._p_sample(x_prev, out, i, self.noise_x(i, x))
                    noisy = self._noisy_y(i)
                    res = call(x_t=sample, measurement=self.y, noisy_measurement=noisy, x_prev=x_prev, x_0_hat=x0)
                if isinstance(res, tuple) and len(res) == 2:
                    x, dist = res
                    self.distance = dist.detach().reshape(-1) if isinstance(dist, torch.Tensor) else None
                else:
                    x = res
                if not isinstance(x, torch.Tensor) or x.shape != x_prev.shape:
                    raise ValueError(f"measurement_cond_fn: expected it to return x_t of shape {tuple(x_prev.shape)} "
                                     f"(or (x_t, distance)), got {type(x).__name__}")
                x = x.detach()
                yield i, x


def _adapt_call(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Call ``fn`` with the keywords their loop passes (and those a ``functools.partial`` binds),
    dropping the ones its signature does not take: their 'vanilla' and 'projection' methods
    accept fewer than their loop passes, and their script binds ``mask=`` for every method."""
    base, args, bound = unwrap_partial(fn)
    try:
        sig = inspect.signature(base)
    except (TypeError, ValueError):
        return fn
    params = sig.parameters.values()
    if args or any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params):
        return fn
    names = {p.name for p in params if p.kind in (inspect.Parameter.KEYWORD_ONLY,
                                                   inspect.Parameter.POSITIONAL_OR_KEYWORD)}

    def call(**kwargs: Any) -> Any:
        return base(**{k: v for k, v in {**bound, **kwargs}.items() if k in names})

    return call
