"""Network shapes and input checks; EMA teacher formula, buffers and gradient isolation."""

import pytest
import torch

from CPCLSegmentLib.network import VNet, build_network
from CPCLSegmentLib.teacher import ema_alpha, make_teacher, update_teacher


@pytest.mark.parametrize("depth,level", [(4, 1), (3, 0), (2, 1)])
def test_vnet_returns_logits_and_decoder_features(depth, level):
    net = VNet(num_classes=3, width=4, depth=depth, feature_level=level)
    x = torch.randn(2, 1, 16, 32, 16)
    logits, feats = net(x)
    assert logits.shape == (2, 3, 16, 32, 16)
    f = 2**level
    assert feats.shape == (2, 4 * 2**level, 16 // f, 32 // f, 16 // f)
    assert net.feature_channels == feats.shape[1]


def test_reference_network_size():
    # the reference VNet (16 -> 256 channels, 4 downsamplings) has about 9.45 M parameters (with BN)
    net = VNet(num_classes=2, width=16, depth=4, norm="batch")
    n = sum(p.numel() for p in net.parameters())
    assert 9.3e6 < n < 9.6e6


def test_sizes_not_multiple_of_16_get_a_clear_error():
    net = VNet(num_classes=2, width=4)
    with pytest.raises(ValueError, match="multiples of 16"):
        net(torch.randn(1, 1, 16, 20, 16))
    with pytest.raises(ValueError, match="input channel"):
        net(torch.randn(1, 2, 16, 16, 16))


def test_build_network_rejects_unknown_settings():
    with pytest.raises(ValueError, match="unknown"):
        build_network({"num_classes": 2, "bogus": 1})


def test_ema_formula_is_exact():
    torch.manual_seed(0)
    student = VNet(num_classes=2, width=4, depth=2, norm="batch")
    teacher = make_teacher(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
        student.train()
        student(torch.randn(2, 1, 8, 8, 8))  # changes BN running statistics
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    s_state = student.state_dict()
    step = 37
    alpha = update_teacher(teacher, student, step, decay=0.99)
    assert alpha == pytest.approx(min(1 - 1 / (step + 1), 0.99))
    for k, v in teacher.state_dict().items():
        if v.dtype.is_floating_point:
            assert torch.allclose(v, alpha * before[k] + (1 - alpha) * s_state[k], atol=1e-6), k
        else:
            assert torch.equal(v, s_state[k]), k  # num_batches_tracked copied


def test_alpha_schedule():
    assert ema_alpha(0) == 0.0  # the first update copies the student
    assert ema_alpha(1) == 0.5
    assert ema_alpha(10**6, 0.99) == 0.99


def test_teacher_gets_no_gradient_and_is_not_trainable():
    student = VNet(num_classes=2, width=4, depth=2)
    teacher = make_teacher(student)
    assert not any(p.requires_grad for p in teacher.parameters())
    out = teacher(torch.randn(1, 1, 8, 8, 8))[0].sum()
    assert not out.requires_grad
