"""Devices and precision, proven on the CPU: precision by CUDA compute capability (patched), no autocast object
off CUDA, a default-recipe step free of the operators Apple MPS lacks (recorded with ``TorchDispatchMode``),
MPS chosen by ``auto`` only after its self-test, and CPU bf16 only where the processor has it."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from CPCLSegmentLib import devices, precision
from CPCLSegmentLib.data import make_case
from CPCLSegmentLib.precision import Precision, autocast_context, choose_precision
from CPCLSegmentLib.trainer import TrainConfig, Trainer

CUDA = torch.device("cuda")


@pytest.mark.parametrize("capability, name, scaler", [
    ((9, 0), "bf16", False),  # H100
    ((8, 6), "bf16", False),  # RTX 30xx / A10
    ((8, 0), "bf16", False),  # A100
    ((7, 5), "fp16", True),  # T4, RTX 20xx
    ((7, 0), "fp16", True),  # V100
    ((6, 1), "fp32", False),  # GTX 10xx (8 GB cards)
])
def test_cuda_precision_follows_compute_capability_not_is_bf16_supported(monkeypatch, capability, name, scaler):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # counts emulation: must not decide
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    p = choose_precision(CUDA, amp=True)
    assert (p.name, p.scaler) == (name, scaler)
    assert f"{capability[0]}.{capability[1]}" in p.reason
    assert choose_precision(CUDA, amp=False).name == "fp32"


def test_no_autocast_object_is_made_off_cuda(monkeypatch):
    made = []

    def refusing_autocast(device_type, *a, **k):  # torch 2.3/2.4: autocast("mps", enabled=False) raises
        made.append(device_type)
        raise RuntimeError(f"User specified an unsupported autocast device_type '{device_type}'")

    monkeypatch.setattr(torch, "autocast", refusing_autocast)
    for dev in ("mps", "cpu"):
        for amp in (True, False):
            assert isinstance(autocast_context(torch.device(dev), amp), contextlib.nullcontext)
    assert isinstance(autocast_context(torch.device("mps"), choose_precision(torch.device("mps"), True, "on")),
                      contextlib.nullcontext)
    trainer = _tiny_trainer()
    trainer.step(trainer.sample(0), 0)  # the training step and validation's prediction make none either
    trainer.validation = trainer.labeled
    trainer.validate()
    assert made == []


def _tiny_trainer(**overrides):
    rng = np.random.RandomState(0)
    img = rng.randn(32, 32, 32).astype(np.float32)
    settings = dict(iterations=4, patch_size=(16, 32, 32), width=4, seed=0, device="cpu")
    settings.update(overrides)
    cfg = TrainConfig(**settings)
    unl = [make_case("u", rng.randn(32, 32, 32).astype(np.float32))]
    return Trainer(cfg, [make_case("a", img, (img > 0.5).astype(np.int16))], unl, 3)


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.dtypes = set(), set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(str(func.overloadpacket))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.dtypes.add(t.dtype)
        return out


@pytest.mark.parametrize("map_resolution", ["feature", "label"])
def test_a_default_recipe_step_uses_no_operator_mps_lacks(map_resolution):
    """Every aten operator of one default-recipe training step (CPCL with copy-paste: student and teacher passes,
    prototypes, cosine maps, losses, backward, AdamW, EMA), recorded on the CPU, is one the MPS backend of the minimum
    torch implements; and no float64 tensor (MPS has none)."""
    trainer = _tiny_trainer(map_resolution=map_resolution)
    assert trainer.cfg.uses_copy_paste() and trainer.method == "cpcl"
    inputs = trainer.sample(0)
    with _RecordOps() as rec:
        trainer.step(inputs, 0)
    assert "aten.convolution_backward" in rec.ops and "aten.convolution" in rec.ops  # the recording saw the step
    assert not rec.ops & devices.MPS_MISSING_OPS, sorted(rec.ops & devices.MPS_MISSING_OPS)
    assert torch.float64 not in rec.dtypes


def test_auto_picks_mps_only_after_its_self_test(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "mps_available", lambda: True)
    monkeypatch.setattr(devices, "torch_version", lambda: (2, 8))
    monkeypatch.setattr(devices, "device_self_test", lambda name: None)
    assert devices.choose_device("auto") == (torch.device("mps"), None)
    failing = "a training step failed there (NotImplementedError: aten::avg_pool3d.out)"
    monkeypatch.setattr(devices, "device_self_test", lambda name: failing)
    device, note = devices.choose_device("auto")
    assert device.type == "cpu" and failing in note and "Apple MPS" in note
    with pytest.raises(devices.InputError, match="avg_pool3d.*--device cpu"):
        devices.choose_device("mps")
    monkeypatch.setattr(devices, "torch_version", lambda: (2, 4))
    monkeypatch.setattr(devices, "device_self_test", lambda name: pytest.fail("no self-test below the minimum torch"))
    device, note = devices.choose_device("auto")
    assert device.type == "cpu" and "torch >= 2.8" in note


def test_the_self_test_runs_a_step_and_compares_it_with_the_cpu(monkeypatch):
    devices.device_self_test.cache_clear()
    assert devices.device_self_test("cpu") is None  # same step on the same device: agrees
    devices.device_self_test.cache_clear()
    calls = []
    real = devices.total_loss

    def drifting(terms, ramp, cfg):  # the second device's loss 10 % off: a backend computing wrong numbers
        calls.append(1)
        loss = real(terms, ramp, cfg)
        return loss * 1.1 if len(calls) == 2 else loss

    monkeypatch.setattr(devices, "total_loss", drifting)
    assert "disagrees with the CPU (loss" in devices.device_self_test("cpu")
    devices.device_self_test.cache_clear()


def test_cpu_bf16_needs_native_bf16_and_falls_back_saying_why(monkeypatch):
    cpu = torch.device("cpu")
    precision.cpu_native_bf16.cache_clear()
    monkeypatch.setattr(precision, "_cpuinfo_flags", lambda: {"avx2", "avx512f"})
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    p = choose_precision(cpu, True, "on")
    assert p.name == "fp32" and "no native bf16" in p.reason
    precision.cpu_native_bf16.cache_clear()
    monkeypatch.setattr(precision, "_cpuinfo_flags", lambda: {"avx512f", "amx_bf16", "amx_tile"})
    assert choose_precision(cpu, True, "auto").dtype == torch.bfloat16
    assert choose_precision(cpu, True, "off").name == "fp32"
    assert choose_precision(cpu, False, "on").name == "fp32"
    precision.cpu_native_bf16.cache_clear()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")  # ATEN_CPU_CAPABILITY=avx2
    p = choose_precision(cpu, True, "on")
    assert p.name == "fp32" and "AVX2" in p.reason
    precision.cpu_native_bf16.cache_clear()


def test_a_cpu_bf16_run_steps_in_bf16_where_the_cpu_has_it(monkeypatch):
    precision.cpu_native_bf16.cache_clear()
    if not precision.cpu_native_bf16()[0]:
        pytest.skip(f"this CPU has no native bf16: {precision.cpu_native_bf16()[1]}")
    trainer = _tiny_trainer(cpu_bf16="on")
    assert trainer.precision == Precision(torch.bfloat16, False, trainer.precision.reason)
    seen = []
    handle = trainer.student.encoder[0][0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    values = trainer.step(trainer.sample(0), 0)
    handle.remove()
    assert torch.bfloat16 in seen and np.isfinite(values["total"])
    assert all(p.dtype == torch.float32 for p in trainer.student.parameters())  # weights and optimizer stay fp32


def test_the_cpu_trains_in_channels_last_as_cuda_does_and_computes_the_same_step():
    """``channels_last`` (default on) puts the networks and the step's 5-D activations in channels-last 3D on the
    CPU; off, both stay contiguous; the two compute the same losses and the same gradients (up to rounding; not the
    same updated weights: the optimizer's first step divides by sqrt(v) + eps, where rounding-level gradients grow)."""
    fmt, seen, values, grads = torch.channels_last_3d, {}, {}, {}
    for on in (True, False):
        t = _tiny_trainer(channels_last=on, copy_paste=True)
        weights = [p for net in (t.student, t.teacher) for p in net.parameters() if p.dim() == 5]
        if on:  # every conv weight channels-last (a 1-channel or 1×1×1 kernel is both), most not contiguous
            assert all(p.is_contiguous(memory_format=fmt) for p in weights)
            assert sum(not p.is_contiguous() for p in weights) > len(weights) // 2
        else:
            assert all(p.is_contiguous() for p in weights)
        t.student.encoder[0][0].register_forward_hook(lambda m, i, o, on=on: seen.setdefault(on, o))  # width channels
        values[on] = t.step(t.sample(0), 0).read()
        grads[on] = {k: p.grad for k, p in t.student.named_parameters()}  # kept until the next step
    assert seen[True].is_contiguous(memory_format=fmt) and not seen[True].is_contiguous() and seen[False].is_contiguous()
    assert {"forward", "backward", "paste"} <= set(values[True]) and set(values[True]) == set(values[False])
    assert all(values[True][k] == pytest.approx(values[False][k], rel=1e-4, abs=1e-6) for k in values[True])
    for k, g in grads[False].items():
        assert float((grads[True][k] - g).abs().max()) <= 1e-4 * float(g.abs().max()) + 1e-9, k
