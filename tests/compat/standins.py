"""Stand-ins with the interfaces of the DPS code (DPS2022/diffusion-posterior-sampling): the class
names, attributes, method signatures and state_dict layout its users' objects have, written
here from that code's documented behaviour. Their formulas are written out in full, so a test
comparing dps_fast's recognised paths against these objects compares against the formula.

* ``UNetModel``: guided-diffusion's constructor arguments and stored attributes, its key layout
  and ``forward(x, timesteps, y=None)``; the blocks are dps_fast's ADMUNet blocks (the ADM
  conformance fixture shows they compute the reference function).
* operators ``DenoiseOperator``, ``InpaintingOperator``, ``GaussialBlurOperator`` (sic, their
  spelling), ``MotionBlurOperator``, ``SuperResolutionOperator`` (their antialiased bicubic
  resizer), ``PhaseRetrievalOperator`` with ``forward(data, **kwargs)``, ``transpose``,
  ``ortho_project``, ``project``, and a user's own ``SquaredOperator``;
* noisers ``GaussianNoise(sigma)``, ``PoissonNoise(rate)`` with the ``__name__`` their
  ``get_noise`` sets;
* conditioning classes ``Identity`` ('vanilla'), ``Projection``, ``PosteriorSampling`` ('ps'),
  ``PosteriorSamplingPlus`` ('ps+'), ``ManifoldConstraintGradient`` ('mcg').
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from dps_fast.models.adm import ADMUNet


# ---- the network ------------------------------------------------------------------------------
class QKVAttentionLegacy(nn.Module):
    """Marker with their attention class name (parameter-free, as theirs)."""

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads


class QKVAttention(QKVAttentionLegacy):
    """Marker for ``use_new_attention_order=True``."""


class UNetModel(nn.Module):
    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks,
                 attention_resolutions, dropout=0, channel_mult=(1, 2, 4, 8), conv_resample=True, dims=2,
                 num_classes=None, use_checkpoint=False, use_fp16=False, num_heads=1, num_head_channels=-1,
                 num_heads_upsample=-1, use_scale_shift_norm=False, resblock_updown=False,
                 use_new_attention_order=False):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.dtype = torch.float16 if use_fp16 else torch.float32
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample
        core = ADMUNet(image_size, in_channels, model_channels, out_channels, num_res_blocks,
                       attention_resolutions, dropout, channel_mult, conv_resample, num_classes, num_heads,
                       num_head_channels, num_heads_upsample, use_scale_shift_norm, resblock_updown,
                       use_new_attention_order)
        self.time_embed = core.time_embed
        self.input_blocks = core.input_blocks
        self.middle_block = core.middle_block
        self.output_blocks = core.output_blocks
        self.out = core.out
        marker = QKVAttention if use_new_attention_order else QKVAttentionLegacy
        self.attention_kinds = nn.ModuleList([marker(num_heads)])  # no parameters: layout unchanged
        self._core = [core]  # a list, so the core is not a second registered copy

    def forward(self, x, timesteps, y=None):
        return self._core[0](x, timesteps, y)


def create_unet(image_size, num_channels, num_res_blocks, channel_mult="", learn_sigma=False, class_cond=False,
                use_checkpoint=False, attention_resolutions="16", num_heads=1, num_head_channels=-1,
                num_heads_upsample=-1, use_scale_shift_norm=False, dropout=0, resblock_updown=False,
                use_fp16=False, use_new_attention_order=False, **_ignored) -> UNetModel:
    """Their ``create_model`` argument mapping (without loading a checkpoint)."""
    if channel_mult == "":
        channel_mult = {256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}[image_size]
    else:
        channel_mult = tuple(int(c) for c in channel_mult.split(","))
    res = [attention_resolutions] if isinstance(attention_resolutions, int) else \
        [int(r) for r in attention_resolutions.split(",")]
    return UNetModel(image_size=image_size, in_channels=3, model_channels=num_channels,
                     out_channels=6 if learn_sigma else 3, num_res_blocks=num_res_blocks,
                     attention_resolutions=tuple(image_size // r for r in res), dropout=dropout,
                     channel_mult=channel_mult, num_classes=1000 if class_cond else None,
                     use_checkpoint=use_checkpoint, use_fp16=use_fp16, num_heads=num_heads,
                     num_head_channels=num_head_channels, num_heads_upsample=num_heads_upsample,
                     use_scale_shift_norm=use_scale_shift_norm, resblock_updown=resblock_updown,
                     use_new_attention_order=use_new_attention_order)


# ---- operators ----------------------------------------------------------------------------------
class LinearOperator:
    def forward(self, data, **kwargs):
        raise NotImplementedError

    def transpose(self, data, **kwargs):
        raise NotImplementedError

    def ortho_project(self, data, **kwargs):
        # (I - A^T A) data
        return data - self.transpose(self.forward(data, **kwargs), **kwargs)

    def project(self, data, measurement, **kwargs):
        # their base-class formula: (I - A^T A) measurement - A data
        return self.ortho_project(measurement, **kwargs) - self.forward(data, **kwargs)


class DenoiseOperator(LinearOperator):
    def __init__(self, device):
        self.device = device

    def forward(self, data):
        return data

    def transpose(self, data):
        return data

    def ortho_project(self, data):
        return data

    def project(self, data):
        return data


class InpaintingOperator(LinearOperator):
    def __init__(self, device):
        self.device = device

    def forward(self, data, **kwargs):
        mask = kwargs.get("mask", None)
        if mask is None:
            raise ValueError("Require mask")
        return data * mask.to(data.device)

    def transpose(self, data, **kwargs):
        return data

    def ortho_project(self, data, **kwargs):
        return data - self.forward(data, **kwargs)


class _ReflectConv(nn.Module):
    """Their ``Blurkernel``: reflection padding by k // 2, then a depthwise 3-channel conv2d."""

    def __init__(self, kernel: torch.Tensor) -> None:
        super().__init__()
        k = kernel.shape[-1]
        self.seq = nn.Sequential(nn.ReflectionPad2d(k // 2), nn.Conv2d(3, 3, k, padding=0, bias=False, groups=3))
        with torch.no_grad():
            self.seq[1].weight.copy_(kernel.expand(3, 1, k, k))

    def forward(self, x):
        return self.seq(x)


def scipy_like_gaussian(kernel_size: int, std: float) -> torch.Tensor:
    """``gaussian_filter`` of a centred delta (truncate 4): normalised taps within int(4 std + 0.5)."""
    radius = int(4.0 * std + 0.5)
    j = np.arange(-radius, radius + 1)
    g = np.exp(-0.5 * (j / std) ** 2)
    g /= g.sum()
    k = np.zeros((kernel_size, kernel_size))
    c = kernel_size // 2
    k[c - radius:c + radius + 1, c - radius:c + radius + 1] = np.outer(g, g)
    return torch.from_numpy(k)


class GaussialBlurOperator(LinearOperator):
    def __init__(self, kernel_size, intensity, device):
        self.device = device
        self.kernel_size = kernel_size
        self.kernel = scipy_like_gaussian(kernel_size, intensity)
        self.conv = _ReflectConv(self.kernel.float()).to(device)

    def forward(self, data, **kwargs):
        return self.conv(data)

    def transpose(self, data, **kwargs):
        return data

    def get_kernel(self):
        return self.kernel.view(1, 1, self.kernel_size, self.kernel_size)


class MotionBlurOperator(LinearOperator):
    """Their motion blur: the same reflect-padded depthwise conv, with a (non-symmetric) kernel
    matrix (theirs comes from the ``motionblur`` package's random trajectory)."""

    def __init__(self, kernel_size, intensity, device, kernel=None):
        self.device = device
        self.kernel_size = kernel_size
        if kernel is None:
            g = torch.Generator().manual_seed(int(intensity * 1000))
            kernel = torch.rand(kernel_size, kernel_size, generator=g, dtype=torch.float64)
            kernel /= kernel.sum()
        self.conv = _ReflectConv(kernel.float()).to(device)

    def forward(self, data, **kwargs):
        return self.conv(data)

    def transpose(self, data, **kwargs):
        return data


def _keys(t: np.ndarray) -> np.ndarray:
    a = np.abs(t)
    return ((1.5 * a ** 3 - 2.5 * a ** 2 + 1) * (a <= 1)
            + (-0.5 * a ** 3 + 2.5 * a ** 2 - 4 * a + 2) * ((a > 1) & (a <= 2)))


class _Resizer(torch.nn.Module):
    """Their util/resizer.py for a downscale by ``1/factor`` along the last two axes: per output
    pixel the input pixels within the stretched cubic's reach, weights ``cubic(scale * d) *
    scale`` normalised, out-of-range indices mirrored ([0..n-1, n-1..0])."""

    def __init__(self, in_shape, scale):
        super().__init__()
        self.mats = []
        for n in in_shape[-2:]:
            m = int(np.ceil(n * scale))
            width = 4.0 / scale
            out = np.arange(1, m + 1)
            match = (out - (m - n * scale) / 2) / scale + 0.5 * (1 - 1 / scale)
            left = np.floor(match - width / 2)
            taps = left[:, None] + np.arange(np.ceil(width) + 2) - 1
            w = scale * _keys(scale * (match[:, None] - taps - 1))
            w = w / w.sum(1, keepdims=True)
            mirror = np.concatenate([np.arange(n), np.arange(n - 1, -1, -1)])
            idx = mirror[np.mod(taps.astype(np.int64), 2 * n)]
            mat = np.zeros((m, n))
            for i in range(m):
                for j, wt in zip(idx[i], w[i]):
                    mat[i, j] += wt
            self.mats.append(torch.from_numpy(mat))

    def forward(self, x):
        mh, mw = (m.to(x) for m in self.mats)
        return torch.einsum("ih,bchw,jw->bcij", mh, x, mw)


class SuperResolutionOperator(LinearOperator):
    def __init__(self, in_shape, scale_factor, device):
        self.device = device
        self.up_sample = functools.partial(torch.nn.functional.interpolate, scale_factor=scale_factor)
        self.down_sample = _Resizer(in_shape, 1 / scale_factor).to(device)

    def forward(self, data, **kwargs):
        return self.down_sample(data)

    def transpose(self, data, **kwargs):
        return self.up_sample(data)

    def project(self, data, measurement, **kwargs):
        return data - self.transpose(self.forward(data)) + self.transpose(measurement)


class PhaseRetrievalOperator:
    def __init__(self, oversample, device):
        self.pad = int((oversample / 8.0) * 256)
        self.device = device

    def forward(self, data, **kwargs):
        padded = torch.nn.functional.pad(data, (self.pad, self.pad, self.pad, self.pad))
        centred = torch.fft.ifftshift(padded, dim=(-2, -1))
        return torch.fft.fftshift(torch.fft.fft2(centred, norm="ortho"), dim=(-2, -1)).abs()

    def project(self, data, measurement, **kwargs):
        return data + measurement - self.forward(data)


class SquaredOperator(LinearOperator):
    """A user's own (nonlinear) operator: not recognised, runs through autograd."""

    def forward(self, data, **kwargs):
        return data * data.abs()

    def project(self, data, measurement, **kwargs):
        return data + measurement - self.forward(data)


# ---- noise ------------------------------------------------------------------------------------
class GaussianNoise:
    def __init__(self, sigma):
        self.sigma = sigma
        self.__name__ = "gaussian"

    def __call__(self, data):
        return data + torch.randn_like(data, device=data.device) * self.sigma


class PoissonNoise:
    def __init__(self, rate):
        self.rate = rate
        self.__name__ = "poisson"

    def __call__(self, data):
        data = ((data + 1.0) / 2.0).clamp(0, 1)
        out = torch.from_numpy(np.random.poisson(data.detach().cpu().numpy() * 255.0 * self.rate) / 255.0 / self.rate)
        return (out * 2.0 - 1.0).clamp(-1, 1).to(data.device)


# ---- conditioning ----------------------------------------------------------------------------
class ConditioningMethod:
    def __init__(self, operator, noiser, **kwargs):
        self.operator = operator
        self.noiser = noiser

    def project(self, data, noisy_measurement, **kwargs):
        return self.operator.project(data=data, measurement=noisy_measurement, **kwargs)

    def grad_and_value(self, x_prev, x_0_hat, measurement, **kwargs):
        if self.noiser.__name__ == "gaussian":
            norm = torch.linalg.norm(measurement - self.operator.forward(x_0_hat, **kwargs))
        elif self.noiser.__name__ == "poisson":
            diff = measurement - self.operator.forward(x_0_hat, **kwargs)
            norm = (torch.linalg.norm(diff) / measurement.abs()).mean()
        else:
            raise NotImplementedError
        return torch.autograd.grad(outputs=norm, inputs=x_prev)[0], norm


class Identity(ConditioningMethod):
    def conditioning(self, x_t):
        return x_t


class Projection(ConditioningMethod):
    def conditioning(self, x_t, noisy_measurement, **kwargs):
        # Their code passes no keywords here, so with an inpainting mask it raises "Require
        # mask"; the formula dps_fast implements (and this stand-in) passes the bound mask.
        bound = {"mask": kwargs["mask"]} if "mask" in kwargs else {}
        return self.project(data=x_t, noisy_measurement=noisy_measurement, **bound)


class ManifoldConstraintGradient(ConditioningMethod):
    def __init__(self, operator, noiser, **kwargs):
        super().__init__(operator, noiser)
        self.scale = kwargs.get("scale", 1.0)

    def conditioning(self, x_prev, x_t, x_0_hat, measurement, noisy_measurement, **kwargs):
        norm_grad, norm = self.grad_and_value(x_prev=x_prev, x_0_hat=x_0_hat, measurement=measurement, **kwargs)
        x_t = x_t - norm_grad * self.scale
        return self.project(data=x_t, noisy_measurement=noisy_measurement, **kwargs), norm


class PosteriorSampling(ConditioningMethod):
    def __init__(self, operator, noiser, **kwargs):
        super().__init__(operator, noiser)
        self.scale = kwargs.get("scale", 1.0)

    def conditioning(self, x_prev, x_t, x_0_hat, measurement, **kwargs):
        norm_grad, norm = self.grad_and_value(x_prev=x_prev, x_0_hat=x_0_hat, measurement=measurement, **kwargs)
        return x_t - norm_grad * self.scale, norm


class PosteriorSamplingPlus(ConditioningMethod):
    def __init__(self, operator, noiser, **kwargs):
        super().__init__(operator, noiser)
        self.num_sampling = kwargs.get("num_sampling", 5)
        self.scale = kwargs.get("scale", 1.0)

    def conditioning(self, x_prev, x_t, x_0_hat, measurement, **kwargs):
        norm = 0
        for _ in range(self.num_sampling):
            # their code calls forward(perturbed) without the keywords (fails for inpainting)
            perturbed = x_0_hat + 0.05 * torch.rand_like(x_0_hat)
            norm = norm + torch.linalg.norm(measurement - self.operator.forward(perturbed, **kwargs)) / self.num_sampling
        norm_grad = torch.autograd.grad(outputs=norm, inputs=x_prev)[0]
        return x_t - norm_grad * self.scale, norm


# ---- their sampling loop, from their algorithm ------------------------------------------------
def linear_betas(steps: int) -> np.ndarray:
    scale = 1000 / steps
    return np.linspace(scale * 0.0001, scale * 0.02, steps, dtype=np.float64)


def respaced(betas: np.ndarray, keep: list[int]) -> tuple[np.ndarray, list[int]]:
    """Their SpacedDiffusion: betas of the kept timesteps (alpha-bar preserved) and the map."""
    abar = np.cumprod(1.0 - betas)
    last, new, tmap = 1.0, [], []
    for i, a in enumerate(abar):
        if i in keep:
            new.append(1 - a / last)
            last = a
            tmap.append(i)
    return np.array(new), tmap


def even_keep(total: int, count: int) -> list[int]:
    """Their space_timesteps for one section of ``count`` steps."""
    stride = 1.0 if count <= 1 else (total - 1) / (count - 1)
    return sorted({round(j * stride) for j in range(count)})


def _at(arr: np.ndarray, idx: int, like: torch.Tensor) -> torch.Tensor:
    """Their extract_and_expand: a float32 tensor of arr[idx] (then broadcast)."""
    return torch.from_numpy(np.asarray(arr))[idx].float().to(like.device)


def their_ddpm_loop(model, x_start, measurement, cond_fn, keep: list[int], var_type="learned_range",
                    clip=True, sampler="ddpm", eta=0.0):
    """Their p_sample_loop with DDPM (or DDIM) p_sample, epsilon prediction, written out."""
    betas, tmap = respaced(linear_betas(1000), keep)
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    post_logvar_clipped = np.log(np.append(post_var[1], post_var[1:]))
    c1 = betas * np.sqrt(abar_prev) / (1.0 - abar)
    c2 = (1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar)
    img = x_start
    for idx in reversed(range(len(betas))):
        img = img.requires_grad_()
        out = model(img, torch.tensor([tmap[idx]] * img.shape[0], device=img.device))
        c = img.shape[1]
        eps, v = (out[:, :c], out[:, c:]) if out.shape[1] == 2 * c else (out, out)
        x0 = _at(np.sqrt(1.0 / abar), idx, img) * img - _at(np.sqrt(1.0 / abar - 1), idx, img) * eps
        if clip:
            x0 = x0.clamp(-1, 1)
        if sampler == "ddpm":
            mean = _at(c1, idx, img) * x0 + _at(c2, idx, img) * img
            if var_type == "learned_range":
                frac = (v + 1.0) / 2.0
                logvar = frac * _at(np.log(betas), idx, img) + (1 - frac) * _at(post_logvar_clipped, idx, img)
            else:
                logvar = _at(np.log(np.maximum(post_var, 1e-300)), idx, img)
            noise = torch.randn_like(img)
            sample = mean + torch.exp(0.5 * logvar) * noise if idx != 0 else mean
        else:
            e = (_at(np.sqrt(1.0 / abar), idx, img) * img - x0) / _at(np.sqrt(1.0 / abar - 1), idx, img)
            ab, abp = _at(abar, idx, img), _at(abar_prev, idx, img)
            sigma = eta * torch.sqrt((1 - abp) / (1 - ab)) * torch.sqrt(1 - ab / abp)
            noise = torch.randn_like(img)
            sample = x0 * torch.sqrt(abp) + torch.sqrt(1 - abp - sigma ** 2) * e
            if idx != 0:
                sample = sample + sigma * noise
        noisy = _at(np.sqrt(abar), idx, measurement) * measurement + \
            _at(np.sqrt(1.0 - abar), idx, measurement) * torch.randn_like(measurement)
        img, distance = cond_fn(x_t=sample, measurement=measurement, noisy_measurement=noisy, x_prev=img, x_0_hat=x0)
        img = img.detach_()
        _ = distance.item()  # their progress bar's postfix (a host sync per step)
    return img

