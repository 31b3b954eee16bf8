"""3D VNet-style encoder-decoder that returns ``(logits, features)``.

Layout follows the VNet used by UA-MT / SSL4MIS / CPCL (yulequan/UA-MT ``code/networks/vnet.py``):
plain (non-residual) conv stages, strided-conv downsampling, transposed-conv upsampling and **additive**
skip connections. Width, depth, normalisation and the decoder stage that feeds the prototypes are
configurable. ``VNet(width=16, depth=4)`` is the reference 16→256-channel network.

Shapes: input ``(B, C_in, D, H, W)`` with D, H, W multiples of ``2**depth``; ``logits`` is
``(B, K, D, H, W)``; ``features`` is ``(B, width * 2**feature_level, D / 2**f, H / 2**f, W / 2**f)`` with
``f = feature_level`` (the decoder stage at that level, after its convolutions; level 1 = half resolution,
the reference's ``block_eight`` output).
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
from torch import nn

NORMS = ("instance", "batch", "group", "none")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "group":
        return nn.GroupNorm(min(16, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


class ReLU(nn.Module):
    """ReLU, in place only when no gradient is being recorded (inference, the teacher's pass).

    While training, in place would make autograd copy whole activations back after instance norm (a view:
    CopySlices); out of place is 7-10 % faster on the CPU with 3 % less memory (bench/step_time.py;
    BENCHMARKS.md, "Engine changes"). Without autograd, in place saves a write of every activation.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) if torch.is_grad_enabled() else torch.relu_(x)


class ConvStage(nn.Sequential):
    """``n`` × (Conv3d 3³ → norm → ReLU)."""

    def __init__(self, n: int, c_in: int, c_out: int, norm: str) -> None:
        layers: List[nn.Module] = []
        for i in range(n):
            layers += [
                nn.Conv3d(c_in if i == 0 else c_out, c_out, 3, padding=1, bias=norm == "none"),
                _norm(norm, c_out),
                ReLU(),
            ]
        super().__init__(*layers)


class Down(nn.Sequential):
    """Conv3d(k=2, s=2) → norm → ReLU: halves each spatial size, changes channels."""

    def __init__(self, c_in: int, c_out: int, norm: str) -> None:
        super().__init__(nn.Conv3d(c_in, c_out, 2, stride=2, bias=norm == "none"), _norm(norm, c_out), ReLU())


class Up(nn.Sequential):
    """ConvTranspose3d(k=2, s=2) → norm → ReLU: doubles each spatial size, changes channels."""

    def __init__(self, c_in: int, c_out: int, norm: str) -> None:
        super().__init__(
            nn.ConvTranspose3d(c_in, c_out, 2, stride=2, bias=norm == "none"), _norm(norm, c_out), ReLU()
        )


class VNet(nn.Module):
    """VNet returning ``(logits, features)``.

    Args:
        in_channels: image channels (1 for CT / MR).
        num_classes: K, background included.
        width: channels of the first stage (reference 16); stage i has ``width * 2**i`` channels.
        depth: number of downsamplings (reference 4); inputs must be multiples of ``2**depth``.
        norm: "instance" (default; no running statistics, so train and eval mode agree and DDP ranks never
            diverge), "batch" (the reference), "group" or "none".
        feature_level: decoder level whose output feeds the prototypes, 0 (full resolution) to depth - 1.
            Level 1 (half resolution, ``2 * width`` channels) is the reference's choice.
        dropout: Dropout3d probability on the bottleneck and on the last decoder stage (reference 0.5).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        width: int = 16,
        depth: int = 4,
        norm: str = "instance",
        feature_level: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2 (background + one segment), got {num_classes}")
        if not 1 <= depth <= 6:
            raise ValueError(f"depth must be between 1 and 6, got {depth}")
        if not 0 <= feature_level < depth:
            raise ValueError(f"feature_level must be between 0 and depth - 1 = {depth - 1}, got {feature_level}")
        if width < 1:
            raise ValueError(f"width must be positive, got {width}")
        _norm(norm, 4)  # validates the name
        self.config: Dict[str, Any] = dict(
            in_channels=in_channels,
            num_classes=num_classes,
            width=width,
            depth=depth,
            norm=norm,
            feature_level=feature_level,
            dropout=dropout,
        )
        widths = [width * 2**i for i in range(depth + 1)]
        enc_convs = [min(i + 1, 3) for i in range(depth + 1)]  # 1, 2, 3, 3, 3 as in the reference
        dec_convs = [min(i + 1, 3) for i in range(depth)]  # per level: 1, 2, 3, 3 (level 0 = full resolution)
        self.encoder = nn.ModuleList(
            [ConvStage(enc_convs[0], in_channels, widths[0], norm)]
            + [ConvStage(enc_convs[i], widths[i], widths[i], norm) for i in range(1, depth + 1)]
        )
        self.down = nn.ModuleList([Down(widths[i], widths[i + 1], norm) for i in range(depth)])
        # up[i] goes from level i+1 to level i; decoder[i] runs at level i.
        self.up = nn.ModuleList([Up(widths[i + 1], widths[i], norm) for i in range(depth)])
        self.decoder = nn.ModuleList([ConvStage(dec_convs[i], widths[i], widths[i], norm) for i in range(depth)])
        self.head = nn.Conv3d(widths[0], num_classes, 1)
        self.dropout = nn.Dropout3d(dropout) if dropout > 0 else nn.Identity()
        self.feature_level = feature_level
        self.depth = depth
        self.feature_channels = widths[feature_level]
        for m in self.modules():
            if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def size_multiple(self) -> int:
        return 2**self.depth

    def encoder_modules(self) -> List[nn.Module]:
        """The encoder (frozen by ``freeze_encoder``)."""
        return [self.encoder, self.down]

    def head_parameters(self) -> List[str]:
        """State-dict keys of the final 1×1 convolution (class dimension first)."""
        return ["head.weight", "head.bias"]

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 5:
            raise ValueError(f"VNet expects a (B, C, D, H, W) tensor, got shape {tuple(x.shape)}")
        if x.shape[1] != self.config["in_channels"]:
            raise ValueError(f"VNet expects {self.config['in_channels']} input channel(s), got {x.shape[1]}")
        bad = [s for s in x.shape[2:] if s % self.size_multiple]
        if bad:
            raise ValueError(
                f"VNet(depth={self.depth}) needs spatial sizes that are multiples of {self.size_multiple}; "
                f"got {tuple(x.shape[2:])} (pad the input; sliding-window inference takes patches of such sizes)"
            )

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        self.check_input(x)
        skips = []
        h = x
        for i in range(self.depth):
            h = self.encoder[i](h)
            skips.append(h)
            h = self.down[i](h)
        h = self.dropout(self.encoder[self.depth](h))
        features = h
        for i in reversed(range(self.depth)):
            h = self.up[i](h) + skips[i]
            h = self.decoder[i](h)
            if i == 0:
                h = self.dropout(h)
            if i == self.feature_level:
                features = h
        return self.head(h), features


def build_network(config: Dict[str, Any]) -> nn.Module:
    """Builds the network a model file's ``network`` dict describes: a VNet (``VNet.config``) or, when it names a
    ``backbone``, an allow-listed MONAI network (``backbones.MonaiBackbone``; anything else is refused)."""
    if "backbone" in config:
        from .backbones import MonaiBackbone

        return MonaiBackbone(config)
    known = {"in_channels", "num_classes", "width", "depth", "norm", "feature_level", "dropout"}
    unknown = set(config) - known
    if unknown:
        raise ValueError(f"unknown network setting(s): {sorted(unknown)}")
    return VNet(**config)


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def activation_voxels_per_input_voxel(config: Dict[str, Any]) -> float:
    """Channels × (fraction of input voxels) summed over every stored activation of one forward pass.

    Used by ``planning.estimate_memory``: memory for activations ≈ this × batch × patch voxels × bytes ×
    (tensors kept per layer). Counts conv, norm and ReLU outputs (3 per conv layer) per level.
    """
    width, depth = config["width"], config["depth"]
    total = 0.0
    for level in range(depth + 1):
        frac = 1.0 / 8**level
        c = width * 2**level
        n_enc = min(level + 1, 3) + (1 if level < depth else 0)  # stage + its downsampling conv output
        n_dec = (min(level + 1, 3) + 1) if level < depth else 0  # stage + upsampling into this level
        total += 3 * c * frac * (n_enc + n_dec)
    total += config["num_classes"]
    return total
