"""The ADM UNet of guided-diffusion ("Diffusion Models Beat GANs"), reimplemented.

:class:`ADMUNet` has the module names and parameter shapes of guided-diffusion's ``UNetModel``
as built by ``create_model`` (``guided_diffusion/script_util.py``), so the official
checkpoints the DPS paper uses (``ffhq_10m.pt``, ``imagenet256.pt``) load with
``load_state_dict(strict=True)``. Numerics follow the reference: float32 sinusoidal timestep
embedding, GroupNorm computed in float32 and cast back, the legacy QKV head split
(``use_new_attention_order=False``) and scale-shift (FiLM) conditioning.

Differences from the reference, on purpose:

- Attention runs under plain autograd (``scaled_dot_product_attention``). The reference always
  wraps attention in its own ``checkpoint``, whose backward asks for gradients of every
  parameter and fails when the weights are frozen, the usual case in DPS.
- Activation checkpointing is opt-in (``use_checkpoint`` / :meth:`ADMUNet.set_checkpointing`)
  and uses ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``, which gives the
  same outputs and input-VJPs with frozen weights.
- Mixed precision goes through ``torch.autocast`` or ``model.to(dtype)`` instead of
  ``use_fp16`` (that create_model argument is accepted and ignored).

Example:
    >>> model = ADMUNet.from_config("tiny32")
    >>> model(torch.randn(2, 3, 32, 32), torch.tensor([10, 700])).shape
    torch.Size([2, 6, 32, 32])
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["ADMUNet", "ADM_CONFIGS", "timestep_embedding", "legacy_qkv_attention", "read_state_dict",
           "best_matching_config"]

logger = logging.getLogger(__name__)

#: ``create_model`` arguments of the supported checkpoints; arguments not listed take the
#: create_model defaults (class_cond=False, dropout=0.0, num_heads_upsample=-1,
#: use_new_attention_order=False, ...).
ADM_CONFIGS: dict[str, dict[str, Any]] = {
    "ffhq256": {  # ffhq_10m.pt (DPS)
        "image_size": 256, "num_channels": 128, "num_res_blocks": 1, "channel_mult": "",
        "learn_sigma": True, "attention_resolutions": "16", "num_heads": 4,
        "num_head_channels": 64, "use_scale_shift_norm": True, "resblock_updown": True,
    },
    "imagenet256": {  # imagenet256.pt (unconditional ADM)
        "image_size": 256, "num_channels": 256, "num_res_blocks": 2, "channel_mult": "",
        "learn_sigma": True, "attention_resolutions": "32,16,8", "num_heads": 4,
        "num_head_channels": 64, "use_scale_shift_norm": True, "resblock_updown": True,
    },
    "tiny32": {  # test-sized model of the conformance fixture
        "image_size": 32, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2,2",
        "learn_sigma": True, "attention_resolutions": "16,8", "num_heads": 4,
        "num_head_channels": 16, "use_scale_shift_norm": True, "resblock_updown": True,
    },
}

# create_model's keyword defaults; "in_channels" is our extension (create_model fixes 3).
_CREATE_MODEL_DEFAULTS: dict[str, Any] = {
    "channel_mult": "", "learn_sigma": False, "class_cond": False, "use_checkpoint": False,
    "attention_resolutions": "16", "num_heads": 1, "num_head_channels": -1,
    "num_heads_upsample": -1, "use_scale_shift_norm": False, "dropout": 0.0,
    "resblock_updown": False, "use_fp16": False, "use_new_attention_order": False,
    "in_channels": 3,
}
_REQUIRED_KEYS = ("image_size", "num_channels", "num_res_blocks")
_DEFAULT_CHANNEL_MULT: dict[int, tuple[float, ...]] = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}
_NUM_CLASSES = 1000  # guided-diffusion's class-conditional ImageNet models


# ---- functional pieces --------------------------------------------------------------------
def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(t f), sin(t f)]`` of guided-diffusion, in float32.

    Args:
        t: ``[B]`` timesteps (integer or fractional).
        dim: embedding width; an odd width gets one zero column.

    Returns:
        ``[B, dim]`` float32.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def legacy_qkv_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reference ``QKVAttentionLegacy``: einsum attention with the softmax in float32.

    The reference for :class:`AttentionBlock`'s fused path; heads are split before q/k/v.

    Args:
        qkv: ``[B, H * 3 * C, T]``.
        num_heads: ``H``.

    Returns:
        ``[B, H * C, T]``.
    """
    bs, width, length = qkv.shape
    ch = width // (3 * num_heads)
    q, k, v = qkv.reshape(bs * num_heads, 3 * ch, length).split(ch, dim=1)
    scale = 1.0 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(bs, -1, length)


def _sdpa_qkv_attention(qkv: torch.Tensor, num_heads: int, new_order: bool) -> torch.Tensor:
    """Attention over ``[B, 3 * H * C, T]`` packed qkv with fused SDPA; returns ``[B, H * C, T]``.

    ``new_order=False`` splits heads first (legacy layout ``[B, H, 3, C, T]``), ``True`` splits
    q/k/v first (``[B, 3, H, C, T]``). SDPA's single 1/sqrt(C) scale equals the reference's
    1/sqrt(sqrt(C)) on each of q and k up to float rounding.
    """
    bs, width, length = qkv.shape
    ch = width // (3 * num_heads)
    # One copy into [3, B, H, T, C]: the fused CUDA kernels need a unit stride on C.
    if new_order:
        qkv = qkv.reshape(bs, 3, num_heads, ch, length).permute(1, 0, 2, 4, 3)
    else:
        qkv = qkv.reshape(bs, num_heads, 3, ch, length).permute(2, 0, 1, 4, 3)
    q, k, v = qkv.contiguous().unbind(0)
    out = F.scaled_dot_product_attention(q, k, v)  # [B, H, T, C]
    return out.transpose(-1, -2).reshape(bs, num_heads * ch, length)


# ---- layers -------------------------------------------------------------------------------
class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (input, weight and bias upcast) and cast back to x's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


def _normalization(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class Downsample(nn.Module):
    """Stride-2 3x3 conv (``op``) or 2x2 average pool: ``[B, C, H, W] -> [B, C', H/2, W/2]``."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op: nn.Module = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        elif out_channels != channels:
            raise ValueError(
                f"out_channels: expected {channels} (= channels) without a conv, got {out_channels}"
            )
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest 2x upsampling, then an optional 3x3 conv: ``[B, C, H, W] -> [B, C', 2H, 2W]``."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding, optionally resampling 2x.

    ``forward(x [B, C, H, W], emb [B, E]) -> [B, C_out, H', W']`` with ``H' = H / 2`` (down),
    ``2 H`` (up) or ``H``.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = False
        self.resample = "up" if up else ("down" if down else None)
        self.in_layers = nn.Sequential(
            _normalization(channels), nn.SiLU(), nn.Conv2d(channels, self.out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            _normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            _zero(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)),
        )
        self.skip_connection: nn.Module = (
            nn.Identity() if self.out_channels == channels else nn.Conv2d(channels, self.out_channels, 1)
        )

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.resample == "down":
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return x

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.resample is not None:
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self._resample(h))
            x = self._resample(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all positions: ``[B, C, H, W] -> [B, C, H, W]``.

    ``num_head_channels == -1`` uses ``num_heads`` heads, otherwise ``C // num_head_channels``.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_new_attention_order: bool = False,
    ) -> None:
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        elif num_head_channels <= 0 or channels % num_head_channels:
            raise ValueError(
                f"num_head_channels: expected a positive divisor of {channels} channels or -1, "
                f"got {num_head_channels}"
            )
        else:
            self.num_heads = channels // num_head_channels
        if self.num_heads <= 0 or channels % self.num_heads:
            raise ValueError(
                f"num_heads: expected a positive divisor of {channels} channels, got {self.num_heads}"
            )
        self.new_order = use_new_attention_order
        self.use_checkpoint = False
        self.norm = _normalization(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = _sdpa_qkv_attention(self.qkv(self.norm(x)), self.num_heads, self.new_order)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class TimestepEmbedSequential(nn.Sequential):
    """Sequential container that also hands the timestep embedding to its ResBlocks."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, (ResBlock, AttentionBlock)) else layer(x)
        return x


# ---- configuration ------------------------------------------------------------------------
def _parse_ints(value: str | Sequence[float], name: str) -> tuple[float, ...]:
    if isinstance(value, str):
        try:
            return tuple(int(v) for v in value.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"{name}: expected comma-separated integers, got {value!r}") from None
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
        return tuple(value)
    raise TypeError(f"{name}: expected a comma-separated str or a sequence of numbers, got {value!r}")


def _resolve_config(config: str | Mapping[str, Any]) -> dict[str, Any]:
    """create_model arguments (preset name or dict) -> complete, validated argument dict."""
    if isinstance(config, str):
        if config not in ADM_CONFIGS:
            raise ValueError(f"config: expected one of {sorted(ADM_CONFIGS)} or a dict, got {config!r}")
        config = ADM_CONFIGS[config]
    elif not isinstance(config, Mapping):
        raise TypeError(f"config: expected a preset name or a dict, got {type(config).__name__}")
    unknown = sorted(set(config) - set(_CREATE_MODEL_DEFAULTS) - set(_REQUIRED_KEYS))
    if unknown:
        raise ValueError(f"config: unknown create_model arguments {unknown}")
    missing = [k for k in _REQUIRED_KEYS if k not in config]
    if missing:
        raise ValueError(f"config: missing required arguments {missing}")
    cfg = {**_CREATE_MODEL_DEFAULTS, **config}
    for key in ("image_size", "num_channels", "num_res_blocks", "in_channels"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1:
            raise ValueError(f"config[{key!r}]: expected a positive int, got {cfg[key]!r}")
    if cfg["channel_mult"] in ("", None, ()):
        if cfg["image_size"] not in _DEFAULT_CHANNEL_MULT:
            raise ValueError(
                f"config['channel_mult']: no default for image_size {cfg['image_size']} "
                f"(defaults exist for {sorted(_DEFAULT_CHANNEL_MULT)}); give it explicitly"
            )
        cfg["channel_mult"] = _DEFAULT_CHANNEL_MULT[cfg["image_size"]]
    else:
        cfg["channel_mult"] = _parse_ints(cfg["channel_mult"], "config['channel_mult']")
    cfg["attention_resolutions"] = _parse_ints(
        cfg["attention_resolutions"], "config['attention_resolutions']"
    )
    if cfg["use_fp16"]:
        logger.info("use_fp16 is ignored: use torch.autocast or model.to(torch.float16) instead")
    return cfg


def _mismatch_report(model_sd: Mapping[str, torch.Tensor], ckpt: Mapping[str, Any], limit: int = 3) -> str:
    """A short description of how a checkpoint's keys/shapes differ from the model's; '' if none.

    Counts, then at most ``limit`` examples of each kind (the full lists of a wrong-architecture
    checkpoint run to kilobytes)."""

    def listing(items: list[str]) -> str:
        more = ", ..." if len(items) > limit else ""
        return ", ".join(items[:limit]) + more

    missing = [k for k in model_sd if k not in ckpt]
    unexpected = [k for k in ckpt if k not in model_sd]
    shapes = [
        f"{k} {tuple(ckpt[k].shape) if torch.is_tensor(ckpt[k]) else type(ckpt[k]).__name__}"
        f" vs {tuple(v.shape)}"
        for k, v in model_sd.items()
        if k in ckpt and (not torch.is_tensor(ckpt[k]) or ckpt[k].shape != v.shape)
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} of its {len(model_sd)} tensors missing (e.g. {listing(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {listing(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} shapes differ (checkpoint vs model, e.g. {listing(shapes)})")
    if unexpected and all(k.startswith("module.") for k in ckpt):
        parts.append("hint: the keys carry a DistributedDataParallel 'module.' prefix; strip it")
    return "; ".join(parts)


def best_matching_config(ckpt: Mapping[str, Any]) -> tuple[str | None, int, int]:
    """``(preset, matching, total)``: the :data:`ADM_CONFIGS` preset whose state_dict shares the most
    (key, shape) pairs with ``ckpt``; ``total`` is the larger of the two key counts, so
    ``matching == total`` means the checkpoint is exactly that preset. Built on the meta device."""
    best: tuple[str | None, int, int] = (None, 0, max(1, len(ckpt)))
    for name in ADM_CONFIGS:
        with torch.device("meta"):
            sd = ADMUNet.from_config(name).state_dict()
        same = sum(1 for k, v in sd.items() if torch.is_tensor(ckpt.get(k)) and ckpt[k].shape == v.shape)
        total = max(len(sd), len(ckpt))
        if best[0] is None or same / total > best[1] / best[2]:
            best = (name, same, total)
    return best


_MAGIC = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
          (b"%PDF", "a PDF document"))


def read_state_dict(path: str | os.PathLike[str], map_location: str | torch.device = "cpu",
                    arg: str = "path") -> Mapping[str, Any]:
    """The state_dict in a ``torch.save`` file (a plain dict of tensors, or one under "state_dict").

    Loads with ``weights_only=True`` (no code from the file runs). Every failure is a short
    error under the argument's name ``arg``: FileNotFoundError for a missing file, ValueError
    "``arg``: PATH is not a readable state_dict (reason)" for anything else.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{arg}: no checkpoint file at {path!r}")

    def unreadable(reason: str) -> ValueError:
        return ValueError(f"{arg}: {path!r} is not a readable state_dict ({reason})")

    with open(path, "rb") as f:
        head = f.read(8)
    kind = next((what for magic, what in _MAGIC if head.startswith(magic)), None)
    if kind is not None:
        raise unreadable(f"it is {kind}")
    if not head:
        raise unreadable("the file is empty")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, KeyError, ...
        text = str(exc)
        if "Unsupported global" in text:
            reason = ("it holds Python objects besides tensors, which weights_only loading refuses; if you trust "
                      "the file, re-save only its tensors: torch.save(torch.load(path, weights_only=False)[KEY], "
                      "new_path)")
        elif head.startswith(b"PK"):
            reason = "a damaged or truncated torch.save archive"
        else:
            reason = f"not a torch.save file: {type(exc).__name__}"
        raise unreadable(reason) from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not state or not all(torch.is_tensor(v) for v in state.values()):
        got = type(state).__name__ if not isinstance(state, Mapping) else "a dict without only tensors"
        raise unreadable(f"expected a dict of tensors, got {got}")
    return state


# ---- the model ----------------------------------------------------------------------------
class ADMUNet(nn.Module):
    """guided-diffusion's ``UNetModel`` with the same parameter names (strict checkpoint loading).

    Args:
        image_size: training resolution (sets the attention levels and default channel_mult).
        in_channels: image channels ``C``.
        model_channels: base width (create_model's ``num_channels``).
        out_channels: output channels (``2 C`` for learned-variance models).
        num_res_blocks: ResBlocks per level.
        attention_resolutions: downsample factors ``ds`` whose blocks get attention.
        dropout: dropout rate in the ResBlocks.
        channel_mult: width multiplier per level.
        conv_resample: learned conv resampling when ``resblock_updown`` is False.
        num_classes: class-conditional models: the number of classes, else None.
        num_heads, num_head_channels, num_heads_upsample: attention heads (a fixed head width
            ``num_head_channels`` overrides the head count when not -1).
        use_scale_shift_norm: FiLM conditioning ``norm(h) * (1 + scale) + shift``.
        resblock_updown: resample with ResBlocks instead of plain (conv) resampling.
        use_new_attention_order: split q/k/v before heads (False = the legacy order).
        use_checkpoint: activation checkpointing of every ResBlock/AttentionBlock.

    ``forward(x [B, C, H, W], t [B]) -> [B, out_channels, H, W]``; with ``learn_sigma`` the first
    ``C`` channels are eps and the last ``C`` the variance interpolation values.

    Example:
        >>> model = ADMUNet.from_checkpoint("ffhq_10m.pt", "ffhq256")  # doctest: +SKIP
        >>> eps_and_v = model(x, t)  # doctest: +SKIP
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        num_classes: int | None = None,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.learn_sigma = out_channels == 2 * in_channels
        self.num_classes = num_classes
        self.channel_mult = tuple(channel_mult)
        emb_dim = 4 * model_channels

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)

        def res(ch_in: int, ch_out: int | None = None, up: bool = False, down: bool = False) -> ResBlock:
            return ResBlock(ch_in, emb_dim, dropout, ch_out, use_scale_shift_norm, up=up, down=down)

        def attn(ch_: int, heads: int) -> AttentionBlock:
            return AttentionBlock(ch_, heads, num_head_channels, use_new_attention_order)

        ch = input_ch = int(self.channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_chans = [ch]
        ds = 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(self.channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res(ch), attn(ch, num_heads), res(ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(self.channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(attn(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    up = res(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, ch)
                    layers.append(up)
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            _normalization(ch), nn.SiLU(), _zero(nn.Conv2d(input_ch, out_channels, 3, padding=1))
        )
        self.set_checkpointing(use_checkpoint)

    # ---- constructors -------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: str | Mapping[str, Any], **overrides: Any) -> "ADMUNet":
        """Build from ``create_model`` arguments: a preset name of :data:`ADM_CONFIGS` or a dict.

        ``overrides`` are passed to the constructor (e.g. ``use_checkpoint=True``). Build on the
        meta device (``with torch.device("meta"):``) to inspect a layout without memory.
        """
        cfg = _resolve_config(config)
        image_size = cfg["image_size"]
        kwargs: dict[str, Any] = dict(
            image_size=image_size,
            in_channels=cfg["in_channels"],
            model_channels=cfg["num_channels"],
            out_channels=cfg["in_channels"] * (2 if cfg["learn_sigma"] else 1),
            num_res_blocks=cfg["num_res_blocks"],
            attention_resolutions=tuple(image_size // int(r) for r in cfg["attention_resolutions"]),
            dropout=float(cfg["dropout"]),
            channel_mult=cfg["channel_mult"],
            num_classes=_NUM_CLASSES if cfg["class_cond"] else None,
            num_heads=cfg["num_heads"],
            num_head_channels=cfg["num_head_channels"],
            num_heads_upsample=cfg["num_heads_upsample"],
            use_scale_shift_norm=bool(cfg["use_scale_shift_norm"]),
            resblock_updown=bool(cfg["resblock_updown"]),
            use_new_attention_order=bool(cfg["use_new_attention_order"]),
            use_checkpoint=bool(cfg["use_checkpoint"]),
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike[str],
        config: str | Mapping[str, Any] = "ffhq256",
        map_location: str | torch.device = "cpu",
        *,
        path_arg: str = "path",
        config_arg: str = "config",
        **overrides: Any,
    ) -> "ADMUNet":
        """Load an official guided-diffusion checkpoint (a plain state_dict ``.pt``).

        The layout is checked against ``config`` on the meta device first, so a checkpoint of
        another architecture fails at once with a ValueError giving counts and a few examples of
        missing/unexpected keys and shape mismatches, and the preset the checkpoint matches best.
        Parameters take the checkpoint's tensors directly (no second copy); a non-float32
        checkpoint is cast to float32. ``path_arg`` / ``config_arg`` name the arguments in error
        messages (the CLI passes "--checkpoint" / "--model").

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: the file is not a readable state_dict, or it does not match ``config``.

        Example:
            >>> model = ADMUNet.from_checkpoint("ffhq_10m.pt", "ffhq256")  # doctest: +SKIP
        """
        path = os.fspath(path)
        with torch.device("meta"):
            model = cls.from_config(config, **overrides)
        state = read_state_dict(path, map_location, arg=path_arg)
        report = _mismatch_report(model.state_dict(), state)
        if report:
            name = f"{config_arg} {config}" if isinstance(config, str) else f"the given {config_arg}"
            best, same, total = best_matching_config(state)
            if best is not None and same == total:
                verdict = f"it is a {best} checkpoint: use {config_arg} {best}"
            elif best is not None and same > 0:
                verdict = f"the closest preset is {best} ({same} of {total} tensors match), so it is none of them"
            else:
                verdict = f"it matches none of the presets {sorted(ADM_CONFIGS)}"
            raise ValueError(f"{path_arg}: {path!r} does not match the ADM architecture of {name} ({report}); "
                             f"{verdict}")
        model.load_state_dict(state, strict=True, assign=True)
        if any(p.dtype != torch.float32 for p in model.parameters()):
            model = model.float()
        num_params = sum(p.numel() for p in model.parameters())
        logger.info("loaded ADM checkpoint %s (%d parameters)", path, num_params)
        return model.eval()

    @classmethod
    def with_random_weights(cls, config: str | Mapping[str, Any], seed: int = 0, scale: float = 0.05,
                            **overrides: Any) -> "ADMUNet":
        """The architecture of ``config`` with the official initialisation plus ``scale * N(0, 1)``
        on every tensor (so the zero-initialised output layers give a non-zero eps), seeded.

        For smoke tests and benchmarks without a checkpoint (``--random-weights``): the outputs
        mean nothing, the cost and the shapes are those of the real model. The conformance
        fixture of tests/fixtures/adm was made the same way.

        >>> ADMUNet.with_random_weights("tiny32", seed=1).out[2].weight.abs().sum() > 0
        tensor(True)
        """
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
        with torch.random.fork_rng(devices=[]):  # the official init draws from the global RNG
            torch.manual_seed(seed)
            model = cls.from_config(config, **overrides)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
        return model.eval()

    # ---- runtime ------------------------------------------------------------------------
    def set_checkpointing(self, enabled: bool = True) -> "ADMUNet":
        """Turn activation checkpointing of every ResBlock/AttentionBlock on or off.

        Trades one extra forward per block in the backward for not storing the blocks'
        activations; outputs and gradients are unchanged (also with frozen weights).
        """
        for module in self.modules():
            if isinstance(module, (ResBlock, AttentionBlock)):
                module.use_checkpoint = bool(enabled)
        self._use_checkpoint = bool(enabled)
        return self

    @property
    def use_checkpoint(self) -> bool:
        return self._use_checkpoint

    @use_checkpoint.setter
    def use_checkpoint(self, enabled: bool) -> None:
        self.set_checkpointing(enabled)

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor | int | float) -> torch.Tensor:
        if not torch.is_tensor(x):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        factor = 2 ** (len(self.channel_mult) - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(
                f"x: expected H and W divisible by {factor} (the UNet downsamples "
                f"{len(self.channel_mult) - 1} times), got {tuple(x.shape[2:])}"
            )
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(
                f"t: expected shape [{x.shape[0]}] (one timestep per image) or [], got {tuple(t.shape)}"
            )
        return t

    def forward(
        self, x: torch.Tensor, t: torch.Tensor | int | float, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Noise prediction (and variance values when ``learn_sigma``).

        Args:
            x: ``[B, C, H, W]`` noisy images.
            t: ``[B]`` (or scalar) training-schedule timesteps, usually int64.
            y: ``[B]`` int64 class labels, only for class-conditional models.

        Returns:
            ``[B, out_channels, H, W]`` in x's dtype (autocast dtype under autocast).
        """
        t = self._check_inputs(x, t)
        if (y is None) != (self.num_classes is None):
            raise ValueError(
                f"y: expected class labels iff the model is class-conditional "
                f"(num_classes={self.num_classes}), got {'None' if y is None else 'labels'}"
            )
        t_emb = timestep_embedding(t, self.model_channels)  # float32, as the reference
        emb = self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))
        if y is not None:
            if y.shape != (x.shape[0],):
                raise ValueError(f"y: expected shape [{x.shape[0]}], got {tuple(y.shape)}")
            emb = emb + self.label_emb(y)
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)
