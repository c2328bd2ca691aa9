"""Use a diffusers ``UNet2DModel`` (epsilon prediction) as a dps_fast score network.

diffusers is an optional extra: it is imported only when :func:`from_diffusers` is called.

Example:
    >>> from diffusers import DDPMPipeline  # doctest: +SKIP
    >>> pipe = DDPMPipeline.from_pretrained("google/ddpm-celebahq-256")  # doctest: +SKIP
    >>> model, schedule = from_diffusers(pipe.unet, pipe.scheduler)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dps_fast.schedule import NoiseSchedule

__all__ = ["DiffusersEpsModel", "from_diffusers", "import_diffusers"]


class DiffusersEpsModel(nn.Module):
    """``forward(x [B, C, H, W], t [B]) -> eps [B, C, H, W]``, i.e. ``unet(x, t).sample``.

    Attributes ``in_channels``, ``out_channels`` and ``learn_sigma = False`` match
    :class:`~dps_fast.models.adm.ADMUNet`, so the sampler treats both alike.
    """

    learn_sigma = False

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.in_channels = int(unet.config.in_channels)
        self.out_channels = int(unet.config.out_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # return_dict=False: a plain tuple, friendlier to torch.compile than the output dataclass.
        return self.unet(x, t, return_dict=False)[0]


def import_diffusers() -> Any:
    try:
        import diffusers
    except ImportError as exc:
        raise ImportError(
            "from_diffusers needs the optional dependency diffusers: pip install diffusers"
        ) from exc
    return diffusers


def from_diffusers(unet: nn.Module, scheduler: Any | None = None) -> tuple[nn.Module, NoiseSchedule | None]:
    """Wrap a diffusers ``UNet2DModel`` and, optionally, convert its scheduler's betas.

    Args:
        unet: a ``diffusers.UNet2DModel`` predicting epsilon, with ``out_channels == in_channels``.
        scheduler: e.g. ``DDPMScheduler``; anything with ``.betas`` ``[T]`` and
            ``config.prediction_type``.

    Returns:
        ``(model, schedule)``: ``model(x, t)`` gives eps ``[B, C, H, W]``; ``schedule`` is
        ``NoiseSchedule.from_betas(scheduler.betas)``, or None without a scheduler.

    Raises:
        ImportError: diffusers is not installed.
        TypeError: ``unet`` is not a ``UNet2DModel`` or ``scheduler`` has no betas/config.
        ValueError: the model is not an epsilon predictor.
    """
    diffusers = import_diffusers()
    if not isinstance(unet, diffusers.UNet2DModel):
        raise TypeError(f"unet: expected a diffusers.UNet2DModel, got {type(unet).__name__}")
    in_ch, out_ch = unet.config.in_channels, unet.config.out_channels
    if out_ch != in_ch:
        raise ValueError(
            f"unet: expected out_channels == in_channels (epsilon only, no learned variance), "
            f"got in_channels={in_ch}, out_channels={out_ch}"
        )
    schedule = None
    if scheduler is not None:
        if not hasattr(scheduler, "betas") or not hasattr(scheduler, "config"):
            raise TypeError(
                f"scheduler: expected an object with .betas and .config.prediction_type, "
                f"got {type(scheduler).__name__}"
            )
        prediction_type = getattr(scheduler.config, "prediction_type", "epsilon")
        if prediction_type != "epsilon":
            raise ValueError(
                f"scheduler: expected config.prediction_type 'epsilon', got {prediction_type!r}"
            )
        schedule = NoiseSchedule.from_betas(torch.as_tensor(scheduler.betas))
    return DiffusersEpsModel(unet), schedule
