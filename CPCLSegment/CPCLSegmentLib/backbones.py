"""MONAI networks as CPCL backbones: an allow-listed MONAI segmentation network returning ``(logits, features)``.

The method needs a decoder feature map F(x) besides the logits (the prototypes are masked averages of it). A
MONAI network returns logits only, so ``MonaiBackbone`` wraps it and captures, with a forward hook registered for
the duration of each call, the output of one decoder stage:

==============  ===========================================  ================================  ==============
class           feature stage at level f (1 = half res.)     channels at f                      head (1×1 conv)
==============  ===========================================  ================================  ==============
SegResNetDS     ``up_layers[n_up - 1 - f].blocks``           ``init_filters · 2**f``            ``up_layers[-1].head``
SegResNet       ``up_layers[n_up - 1 - f]``                  ``init_filters · 2**f``            ``conv_final`` (last conv)
BasicUNet       ``upcat_{f + 1}``                            ``features[f]`` (f = 0: ``[5]``)   ``final_conv``
==============  ===========================================  ================================  ==============

Level 1 (the decoder stage at half resolution, after its convolutions and the skip connection) is the default for
the same reason the reference uses the VNet's ``block_eight``: it is the last stage before the full-resolution
one, so it has seen the skip connections (local detail) and the whole encoder (context), has more channels than
the final stage and costs 8× less memory in the prototype maps. See docs/pretrained.md.

Arrays in the engine are ``(D, H, W)`` = (z, y, x) in LPS voxel order; MONAI tools feed their networks
(x, y, z) arrays, RAS-oriented when their pipeline reorients (Auto3DSeg's ``orientation_ras``, bundles'
``Orientationd``). ``layout`` says which: ``"zyx"`` (as the engine's arrays), ``"xyz"`` (axes reversed) or
``"ras"`` (axes reversed, x and y flipped). The wrapper converts its input and converts logits and features back,
so a pretrained network sees the anatomy the way it was trained.

Only classes in ``ALLOWED`` are ever built, only with keyword arguments their constructor declares, and only
with plain values (numbers, text, lists): a configuration naming anything else, a callable, or a MONAI
config expression (``$...``, ``@...``, ``%...``) is refused with ``BackboneError``. Nothing is ever evaluated.

Spec (``record["network"]`` of a model file with a MONAI backbone)::

    {"backbone": "SegResNetDS", "in_channels": 1, "num_classes": K, "feature_level": 1, "layout": "ras",
     "args": {constructor keyword arguments other than in/out channels}}
"""

from __future__ import annotations

import importlib
import inspect
import math
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch import nn

from .errors import ModelFileError

LAYOUTS = ("zyx", "xyz", "ras")
SPEC_KEYS = {"backbone", "in_channels", "num_classes", "feature_level", "layout", "args"}


class BackboneError(ModelFileError):
    """A network configuration that is not allowed or not valid (exit code of ``ModelFileError``)."""


def _segresnetds_levels(args: Dict[str, Any]) -> int:
    return len(args.get("blocks_down", (1, 2, 2, 4))) - 1


def _segresnet_levels(args: Dict[str, Any]) -> int:
    return len(args.get("blocks_down", (1, 2, 2, 4))) - 1


# name -> (module, constructor args never accepted, levels(args), feature path(args, f), feature channels(args, f),
#          head module path(args), encoder module names, size multiple(args))
ALLOWED: Dict[str, Dict[str, Any]] = {
    "SegResNetDS": dict(
        module="monai.networks.nets", deny={"preprocess"},
        levels=_segresnetds_levels,
        feature=lambda a, f: f"up_layers.{_segresnetds_levels(a) - 1 - f}.blocks",
        channels=lambda a, f: a.get("init_filters", 32) * 2**f,
        head=lambda a: f"up_layers.{_segresnetds_levels(a) - 1}.head",
        encoder=("encoder",),
        multiple=lambda a: 2 ** _segresnetds_levels(a),
    ),
    "SegResNet": dict(
        module="monai.networks.nets", deny=set(),
        levels=_segresnet_levels,
        feature=lambda a, f: f"up_layers.{_segresnet_levels(a) - 1 - f}",
        channels=lambda a, f: a.get("init_filters", 8) * 2**f,
        head=lambda a: "conv_final.2.conv" if a.get("use_conv_final", True) else None,
        encoder=("convInit", "down_layers"),
        multiple=lambda a: 2 ** _segresnet_levels(a),
    ),
    "BasicUNet": dict(
        module="monai.networks.nets", deny=set(),
        levels=lambda a: 4,
        feature=lambda a, f: f"upcat_{f + 1}",
        channels=lambda a, f: list(a.get("features", (32, 32, 64, 128, 256, 32)))[5 if f == 0 else f],
        head=lambda a: "final_conv",
        encoder=("conv_0", "down_1", "down_2", "down_3", "down_4"),
        multiple=lambda a: 16,
    ),
}
# Auto3DSeg / bundles name classes by their path; these are the same classes.
ALIASES = {f"monai.networks.nets.{n}": n for n in ALLOWED}
ALIASES.update({f"monai.networks.nets.{m}.{n}": n for m, n in (
    ("segresnet_ds", "SegResNetDS"), ("segresnet", "SegResNet"), ("basic_unet", "BasicUNet"))})
ALIASES.update({"BasicUnet": "BasicUNet", "Basicunet": "BasicUNet", "basicunet": "BasicUNet"})
# Auto3DSeg swaps apex's fused instance norm in when present; its parameters are instance norm's.
NORM_ALIASES = {"INSTANCE_NVFUSER": "INSTANCE", "instance_nvfuser": "instance"}


def allowed_name(target: Any, source: str) -> str:
    """The allow-listed class a ``_target_`` names, or ``BackboneError`` naming ``source`` (the file)."""
    if not isinstance(target, str):
        raise BackboneError(f"{source}: the network's class must be given by name, not {type(target).__name__}")
    name = ALIASES.get(target, target)
    if name not in ALLOWED:
        raise BackboneError(
            f"{source}: network class {target!r} is not allowed; CPCLSegment builds only these MONAI networks: "
            f"{', '.join(ALLOWED)} (nothing else in a model's configuration is ever instantiated or evaluated)")
    return name


def _plain(value: Any, where: str, source: str) -> Any:
    """A configuration value that is data, not code: numbers, text (no MONAI expressions), lists, mappings."""
    if value is None or isinstance(value, (bool, int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise BackboneError(f"{source}: network setting {where} is not a finite number ({value!r})")
        return value
    if isinstance(value, str):
        if value[:1] in ("$", "@", "%") or "_target_" in value:
            raise BackboneError(f"{source}: network setting {where} is a configuration expression ({value[:60]!r}); "
                                "CPCLSegment never evaluates expressions: give its value")
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]", source) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if "_target_" in value:
            raise BackboneError(f"{source}: network setting {where.lstrip('.')} names a class ({value['_target_']!r:.60}); not allowed")
        return {str(k): _plain(v, f"{where}.{k}", source) for k, v in value.items()}
    raise BackboneError(f"{source}: network setting {where} has a value of type {type(value).__name__}; only plain data is allowed")


def _frozen(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return {k: _frozen(v) for k, v in value.items()}
    return value


def network_class(name: str) -> Callable[..., nn.Module]:
    return getattr(importlib.import_module(ALLOWED[name]["module"]), name)


def make_spec(target: Any, args: Dict[str, Any], num_classes: int, in_channels: int = 1, feature_level: int = 1,
              layout: str = "xyz", source: str = "network configuration") -> Dict[str, Any]:
    """A checked backbone spec from a class name and constructor arguments (``in_channels`` / ``out_channels`` in
    ``args`` are replaced by the explicit values)."""
    name = allowed_name(target, source)
    args = _plain({k: v for k, v in dict(args).items() if k not in ("_target_", "in_channels", "out_channels")}, "", source)
    spec = {"backbone": name, "in_channels": int(in_channels), "num_classes": int(num_classes),
            "feature_level": int(feature_level), "layout": layout, "args": args}
    spec["args"] = check_spec(spec, source)  # normalised: what is built is what the model file records
    return spec


def check_spec(spec: Dict[str, Any], source: str = "network configuration") -> Dict[str, Any]:
    """Raises ``BackboneError`` for anything outside the allow-list; returns the normalised constructor arguments."""
    if not isinstance(spec, dict):
        raise BackboneError(f"{source}: the network settings are not a mapping")
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise BackboneError(f"{source}: unknown network field(s) {sorted(unknown)}")
    name = allowed_name(spec.get("backbone"), source)
    entry = ALLOWED[name]
    args = _plain(spec.get("args") or {}, "args", source)
    if not isinstance(args, dict):
        raise BackboneError(f"{source}: the network's args must be a mapping")
    for k in ("in_channels", "num_classes", "feature_level"):
        v = spec.get(k)
        if not isinstance(v, int) or isinstance(v, bool) or v < (0 if k == "feature_level" else 1) or v > 4096:
            raise BackboneError(f"{source}: network {k} must be a whole number, not {v!r}")
    if spec["num_classes"] < 2:
        raise BackboneError(f"{source}: the network needs at least 2 outputs (background + one segment)")
    if spec.get("layout") not in LAYOUTS:
        raise BackboneError(f"{source}: network layout must be one of {LAYOUTS}, not {spec.get('layout')!r}")
    params = inspect.signature(network_class(name)).parameters
    bad = sorted(k for k in args if k not in params or k in entry["deny"] or k in ("in_channels", "out_channels"))
    if bad:
        raise BackboneError(f"{source}: {name} does not accept the setting(s) {bad} here")
    if args.get("spatial_dims", 3) != 3:
        raise BackboneError(f"{source}: only 3D networks can be used (spatial_dims {args.get('spatial_dims')})")
    for key in ("norm", "norm_name"):
        if isinstance(args.get(key), str):
            args[key] = NORM_ALIASES.get(args[key], args[key])
        elif isinstance(args.get(key), list) and args[key] and isinstance(args[key][0], str):
            args[key] = [NORM_ALIASES.get(args[key][0], args[key][0])] + list(args[key][1:])
    if name == "SegResNetDS":
        args["dsdepth"] = 1  # one output: the deep-supervision heads are not trained (see ``adapt_state``)
    if not 0 <= spec["feature_level"] < entry["levels"](args):
        raise BackboneError(f"{source}: feature level {spec['feature_level']} is outside the {name}'s decoder "
                            f"(0 to {entry['levels'](args) - 1})")
    return args


class MonaiBackbone(nn.Module):
    """An allow-listed MONAI network returning ``(logits (B, K, D, H, W), features (B, C, D/2**f, H/2**f, W/2**f))``."""

    def __init__(self, spec: Dict[str, Any]) -> None:
        super().__init__()
        args = check_spec(spec)
        name = spec["backbone"]
        entry = ALLOWED[name]
        self.config: Dict[str, Any] = dict(spec, args=dict(args))
        kwargs = {k: _frozen(v) for k, v in args.items()}  # copies: MONAI may update nested settings in place
        try:
            self.net = network_class(name)(in_channels=spec["in_channels"], out_channels=spec["num_classes"], **kwargs)
        except Exception as e:  # MONAI's own checks of its arguments
            raise BackboneError(f"{name} cannot be built with {args}: {e}") from None
        self.feature_level = spec["feature_level"]
        self.feature_path = entry["feature"](args, self.feature_level)
        self.feature_channels = int(entry["channels"](args, self.feature_level))
        self.head_path = entry["head"](args)
        self.encoder_names = entry["encoder"]
        self.size_multiple = int(entry["multiple"](args))
        self.depth = int(round(math.log2(self.size_multiple)))
        self.layout = spec["layout"]

    def encoder_modules(self) -> List[nn.Module]:
        """The encoder (frozen by ``freeze_encoder``)."""
        return [self.net.get_submodule(n) for n in self.encoder_names]

    def head_parameters(self) -> List[str]:
        """State-dict keys of the final 1×1 convolution (class dimension first)."""
        if self.head_path is None:
            return []
        return [f"net.{self.head_path}.{k}" for k, _ in self.net.get_submodule(self.head_path).named_parameters()]

    def to_net(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "zyx":
            return x
        x = x.permute(0, 1, 4, 3, 2)
        return x.flip((2, 3)) if self.layout == "ras" else x

    def from_net(self, y: torch.Tensor) -> torch.Tensor:
        if self.layout == "zyx":
            return y
        if self.layout == "ras":
            y = y.flip((2, 3))
        return y.permute(0, 1, 4, 3, 2)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 5 or x.shape[1] != self.config["in_channels"]:
            raise ValueError(f"{self.config['backbone']} expects a (B, {self.config['in_channels']}, D, H, W) tensor, "
                             f"got shape {tuple(x.shape)}")
        if any(s % self.size_multiple for s in x.shape[2:]):
            raise ValueError(f"{self.config['backbone']} needs spatial sizes that are multiples of {self.size_multiple}; "
                             f"got {tuple(x.shape[2:])}")
        captured: List[torch.Tensor] = []
        hook = self.net.get_submodule(self.feature_path).register_forward_hook(lambda m, i, o: captured.append(o))
        try:
            out = self.net(self.to_net(x))
        finally:
            hook.remove()
        if isinstance(out, (list, tuple)):
            out = out[0]
        return self.from_net(out), self.from_net(captured[-1])


def adapt_state(spec: Dict[str, Any], state: Dict[str, torch.Tensor], source: str) -> Dict[str, torch.Tensor]:
    """A MONAI network's own state dict (keys without the wrapper's ``net.`` prefix) as ``MonaiBackbone``'s:
    SegResNetDS's deep-supervision heads (trained with ``dsdepth`` > 1) are dropped, since the wrapper builds
    one output."""
    out = {}
    if spec["backbone"] == "SegResNetDS":
        last = f"up_layers.{_segresnetds_levels(spec['args']) - 1}.head."
        state = {k: v for k, v in state.items() if not (k.startswith("up_layers.") and ".head." in k and not k.startswith(last))}
    for k, v in state.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise BackboneError(f"{source}: its state_dict holds something other than named tensors")
        out["net." + (k[len("module."):] if k.startswith("module.") else k)] = v
    return out
