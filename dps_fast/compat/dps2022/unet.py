"""guided-diffusion's ``UNetModel`` (as the DPS code builds it) -> :class:`~dps_fast.models.ADMUNet`.

The DPS code's network is guided-diffusion's ``UNetModel``; ADMUNet has the same parameter
names and shapes, so the conversion is a strict ``load_state_dict``. The architecture is read from
the model itself: its constructor arguments are attributes (``image_size``, ``in_channels``,
``model_channels``, ``out_channels``, ``num_res_blocks``, ``attention_resolutions`` (downsample
factors), ``dropout``, ``channel_mult``, ``conv_resample``, ``num_classes``, ``num_heads``,
``num_head_channels``, ``num_heads_upsample``); the two flags that are not stored
(``use_scale_shift_norm``, ``resblock_updown``) are the ones whose layout matches the state_dict
(each changes parameter names or shapes), and ``use_new_attention_order`` is read from the class
of the attention modules (``QKVAttention`` vs ``QKVAttentionLegacy``; neither has parameters).

The converted model shares the weights' storage (``assign=True``): no second copy on the GPU, and
in-place weight updates of the original are seen by the converted model.

Example:
    >>> from dps_fast.compat.dps2022.unet import looks_like_unet, to_admunet
    >>> looks_like_unet(torch.nn.Linear(2, 2))
    False
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import torch
from torch import nn

from ...models.adm import ADMUNet

logger = logging.getLogger(__name__)

__all__ = ["UNET_ATTRIBUTES", "looks_like_unet", "unet_config", "to_admunet"]

#: Attributes guided-diffusion's UNetModel stores from its constructor arguments.
UNET_ATTRIBUTES = ("image_size", "in_channels", "model_channels", "out_channels", "num_res_blocks",
                   "attention_resolutions", "dropout", "channel_mult", "conv_resample", "num_classes",
                   "num_heads", "num_head_channels", "num_heads_upsample")


def looks_like_unet(model: Any) -> bool:
    """Whether ``model`` is (a stand-in for) guided-diffusion's ``UNetModel``: that class name,
    an ``nn.Module`` with every attribute of :data:`UNET_ATTRIBUTES`."""
    return (isinstance(model, nn.Module) and type(model).__name__ == "UNetModel"
            and all(hasattr(model, a) for a in UNET_ATTRIBUTES))


def _attention_order(model: nn.Module) -> bool:
    """``use_new_attention_order``: True iff the attention modules are ``QKVAttention``."""
    names = {type(m).__name__ for m in model.modules()}
    if "QKVAttention" in names and "QKVAttentionLegacy" in names:
        raise ValueError("model: mixes QKVAttention and QKVAttentionLegacy modules; cannot map it to one ADMUNet")
    return "QKVAttention" in names


def unet_config(model: nn.Module) -> dict[str, Any]:
    """ADMUNet constructor arguments read from a guided-diffusion ``UNetModel``'s attributes
    (without the two layout flags, which :func:`to_admunet` finds from the state_dict)."""
    if not looks_like_unet(model):
        raise TypeError(f"model: expected guided-diffusion's UNetModel, got {type(model).__name__}")
    ds = model.attention_resolutions
    return dict(
        image_size=int(model.image_size), in_channels=int(model.in_channels),
        model_channels=int(model.model_channels), out_channels=int(model.out_channels),
        num_res_blocks=int(model.num_res_blocks), attention_resolutions=tuple(int(d) for d in ds),
        dropout=float(model.dropout), channel_mult=tuple(model.channel_mult),
        conv_resample=bool(model.conv_resample),
        num_classes=None if model.num_classes is None else int(model.num_classes),
        num_heads=int(model.num_heads), num_head_channels=int(model.num_head_channels),
        num_heads_upsample=int(model.num_heads_upsample),
        use_new_attention_order=_attention_order(model),
    )


def _layout(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def to_admunet(model: nn.Module) -> ADMUNet:
    """An :class:`ADMUNet` computing the same function with the same (shared) weights.

    Raises:
        TypeError: ``model`` is not a guided-diffusion ``UNetModel``.
        ValueError: no ADMUNet layout matches the model's state_dict (the message lists the
            closest candidate's differences).
    """
    cfg = unet_config(model)
    state = model.state_dict()
    want = {k: tuple(v.shape) for k, v in state.items()}
    best: tuple[int, str] = (-1, "")
    for ssn, updown in itertools.product((True, False), (True, False)):
        with torch.device("meta"):
            cand = ADMUNet(**cfg, use_scale_shift_norm=ssn, resblock_updown=updown)
        have = _layout(cand)
        if have == want:
            break
        score = sum(1 for k, s in have.items() if want.get(k) == s)
        if score > best[0]:
            missing = sorted(set(have) - set(want))[:4]
            unexpected = sorted(set(want) - set(have))[:4]
            best = (score, f"missing {missing}, unexpected {unexpected}")
    else:
        raise ValueError(f"model: no ADMUNet layout matches this UNetModel's state_dict ({best[1]})")
    if any(v.is_floating_point() and v.dtype != torch.float32 for v in state.values()):
        # use_fp16 models keep float16 torso weights; ADMUNet runs float32 (autocast for fp16).
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        logger.info("UNetModel has non-float32 weights (use_fp16?): the converted ADMUNet holds a float32 copy")
    cand.load_state_dict(state, strict=True, assign=True)
    cand.train(model.training)
    return cand
