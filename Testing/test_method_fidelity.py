"""Would the default suite notice a wrong method? (issue 13)

- An **oracle**: the CPCL terms written out literally from ``../shared/design.md`` (per-class loops,
  ``F.cosine_similarity``, MONAI's Dice, ``F.cross_entropy``), compared term by term, value and gradient, with
  what the ``Trainer`` actually computes for the default recipe, on networks whose teacher differs from the
  student (so every term's sources, student or teacher, are told apart).
- Each source perturbed on its own: the forward (L2U) map must follow the teacher's features and the
  student's prediction; the backward (U2L) prototypes the teacher's features and pseudo-labels.
- The trainer's schedule end to end: the ramp-up in iterations, λ(t), the EMA step, and the configuration the
  CLI's ``train`` hands to the loss terms (the default recipe, pinned here).
"""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from CPCLSegmentLib import losses
from CPCLSegmentLib.data import make_case
from CPCLSegmentLib.losses import StepInputs, cpcl_terms, total_loss
from CPCLSegmentLib.settings import TrainConfig
from CPCLSegmentLib.trainer import Trainer

K = 3
PATCH = (16, 16, 16)

# The default recipe (docs/method.md, "The equations"). Changing a default must change this line too.
DEFAULT_RECIPE = dict(method="cpcl", lambda_max=0.1, beta=10.0, rampup=0.4, consistency_weight=None, ema_decay=0.99, scale=20.0,
                      per_sample_prototypes=False, forward_prediction="student", confidence_weighting=True,
                      detach_features=False, use_forward=True, use_backward=True, map_resolution="feature",
                      optimizer="adamw", lr=3e-3, iterations=1500, labeled_batch=2, unlabeled_batch=2, width=16, depth=4,
                      norm="instance", feature_level=1, intensity_prob=0.5, strong_unlabeled=True, teacher_noise=0.0,
                      flip=False, rot90=False, copy_paste=None, copy_paste_weight=0.5, copy_paste_size=2.0 / 3.0)


def test_the_default_recipe_is_pinned():
    cfg = TrainConfig()
    assert {k: getattr(cfg, k) for k in DEFAULT_RECIPE} == DEFAULT_RECIPE
    assert cfg.mt_weight() == 1.0 and cfg.rampup_iterations() == 600
    # copy-paste: on for cpcl by default, off for the mean-teacher baseline and supervised-only, as asked otherwise
    assert cfg.uses_copy_paste() and not TrainConfig(method="mean_teacher").uses_copy_paste()
    assert not TrainConfig(method="supervised", copy_paste=True).uses_copy_paste()
    assert not TrainConfig(copy_paste=False).uses_copy_paste() and TrainConfig(method="mean_teacher", copy_paste=True).uses_copy_paste()


# ------------------------------------------------------------------------------------------ oracle


def blobs(n: int, seed: int) -> np.ndarray:
    """(n, D, H, W) labels with a box of class 1 and a box of class 2 per sample."""
    rng = np.random.RandomState(seed)
    out = np.zeros((n, *PATCH), dtype=np.int64)
    for b in range(n):
        for k in (1, 2):
            lo = rng.randint(1, 8, size=3)
            hi = lo + rng.randint(4, 8, size=3)
            out[b, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = k
    return out


def tiny_trainer(**settings) -> Trainer:
    """A Trainer (the product's object) on two synthetic labeled cases and one unlabeled case."""
    lab = blobs(2, 0)
    imgs = [(lab[i] * 1.0 + np.random.RandomState(i).randn(*PATCH)).astype(np.float32) for i in range(2)]
    labeled = [make_case(f"l{i}", imgs[i], lab[i]) for i in range(2)]
    unl = blobs(1, 1)[0]
    unlabeled = [make_case("u", (unl + np.random.RandomState(5).randn(*PATCH)).astype(np.float32))]
    # copy-paste off unless asked: the oracle below is equations 1-6 + the mean-teacher term; the copy-paste terms
    # of the default recipe have their own tests (test_copy_paste_*)
    cfg = dict(patch_size=PATCH, width=4, depth=2, device="cpu", iterations=10, intensity_prob=0.0, seed=0, copy_paste=False)
    cfg.update(settings)
    trainer = Trainer(TrainConfig(**cfg), labeled, unlabeled, K)
    with torch.no_grad():  # a teacher that differs from the student, as after some training
        g = torch.Generator().manual_seed(7)
        for p in trainer.teacher.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return trainer


class IntensityTeacher(torch.nn.Module):
    """A teacher whose logits classify by intensity (the synthetic images are label + noise, so every class is
    in its pseudo-labels) and whose features are a real network's."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        logits = torch.cat([-4.0 * (x - k) ** 2 for k in range(K)], 1)
        return logits, self.net(x)[1]


def one_hot(y: torch.Tensor) -> torch.Tensor:
    return F.one_hot(y, K).permute(0, 4, 1, 2, 3).float()


def oracle_terms(student, teacher, x: StepInputs, s: float = 20.0, lam_beta=None):
    """The method, literally: design.md equations 1-6 plus the default recipe's mean-teacher term."""
    from monai.losses import DiceLoss

    bl = x.labeled.shape[0]
    logits, feats = student(torch.cat([x.labeled, x.unlabeled]))
    with torch.no_grad():
        t_logits, t_feats = teacher(x.teacher_input)
    y = x.labels
    size = y.shape[1:]
    # 1. L_s = ½ (CE + Dice)
    ls = 0.5 * (F.cross_entropy(logits[:bl], y) + DiceLoss(softmax=True, to_onehot_y=True, batch=True)(logits[:bl], y.unsqueeze(1)))
    # 2. p_l^k: student labeled features, labels averaged onto the feature grid
    f_l = feats[:bl]
    m_l = F.avg_pool3d(one_hot(y), kernel_size=2)
    p_l = [(f_l * m_l[:, k:k + 1]).sum(dim=(0, 2, 3, 4)) / m_l[:, k].sum() for k in range(K)]
    # 3. P_l2u = softmax_k(s · cos(F̃_u, p_l^k)) on the TEACHER's unlabeled features, brought to label resolution
    l2u = torch.stack([s * F.cosine_similarity(t_feats, p_l[k][None, :, None, None, None], dim=1) for k in range(K)], 1)
    p_l2u = torch.softmax(F.interpolate(l2u, size=size, mode="trilinear", align_corners=False), 1)
    # 4. L_fpc = MSE(P_l2u, P_u), P_u = softmax of the STUDENT's unlabeled logits (default recipe)
    p_u = torch.softmax(logits[bl:], 1)
    lf = ((p_l2u - p_u) ** 2).mean()
    # 5. Ŷ_u = argmax of the teacher's P̃_u; p_u^k from the TEACHER's features weighted by its confidence
    t_p = torch.softmax(t_logits, 1)
    conf, pseudo = t_p.max(1)
    m_u = F.avg_pool3d(one_hot(pseudo) * conf.unsqueeze(1), kernel_size=2)
    p_un = [(t_feats * m_u[:, k:k + 1]).sum(dim=(0, 2, 3, 4)) / m_u[:, k].sum() for k in range(K)]
    u2l = torch.stack([s * F.cosine_similarity(f_l, p_un[k][None, :, None, None, None], dim=1) for k in range(K)], 1)
    # 6. L_bpc = NLL(log softmax(u2l), Y_l): one log-softmax
    lb = F.cross_entropy(F.interpolate(u2l, size=size, mode="trilinear", align_corners=False), y)
    # mean-teacher term: MSE(softmax student(X_u), softmax teacher(X_u))
    lmt = F.mse_loss(p_u, t_p)
    return {"supervised": ls, "forward": lf, "backward": lb, "consistency": lmt}


def test_trainer_terms_equal_the_literal_method_in_value_and_gradient():
    trainer = tiny_trainer()
    inputs = trainer.sample(0)
    teacher = IntensityTeacher(trainer.teacher)
    ours = trainer.loss_terms(trainer.model, teacher, inputs, trainer.cfg, None)
    ref = oracle_terms(trainer.model, teacher, inputs)
    assert set(ours) == set(ref)
    assert torch.softmax(teacher(inputs.teacher_input)[0], 1).argmax(1).unique().numel() == K  # every class has p_u
    params = [p for p in trainer.student.parameters()]
    for name in ref:
        assert float(ours[name].detach()) == pytest.approx(float(ref[name].detach()), rel=1e-4, abs=1e-6), name
        g_ours = torch.autograd.grad(ours[name], params, retain_graph=True, allow_unused=True)
        g_ref = torch.autograd.grad(ref[name], params, retain_graph=True, allow_unused=True)
        for a, b in zip(g_ours, g_ref):
            a = torch.zeros(1) if a is None else a
            b = torch.zeros(1) if b is None else b
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-6), f"gradient of {name} differs"
        assert sum(float(g.abs().sum()) for g in g_ours if g is not None) > 0, f"{name} does not train the student"
    # and the total the trainer minimises: L_s + λ(t)(L_fpc + β L_bpc) + 1.0 · r(t) · L_mt
    r = 0.3
    expected = ref["supervised"] + 0.1 * r * (ref["forward"] + 10 * ref["backward"]) + 1.0 * r * ref["consistency"]
    assert float(total_loss(ours, r, trainer.cfg).detach()) == pytest.approx(float(expected.detach()), rel=1e-4)


def test_paper_preset_uses_the_teachers_prediction_and_per_sample_prototypes():
    trainer = tiny_trainer(forward_prediction="teacher", per_sample_prototypes=True, consistency_weight=0.0)
    x = trainer.sample(0)
    ours = trainer.loss_terms(trainer.model, trainer.teacher, x, trainer.cfg, None)
    assert "consistency" not in ours
    student, teacher = trainer.model, trainer.teacher
    bl = x.labeled.shape[0]
    logits, feats = student(torch.cat([x.labeled, x.unlabeled]))
    with torch.no_grad():
        t_logits, t_feats = teacher(x.teacher_input)
    m_l = F.avg_pool3d(one_hot(x.labels), kernel_size=2)
    lf = 0.0
    for b in range(bl):  # labeled sample b pairs with unlabeled sample b
        p = [(feats[b] * m_l[b, k]).sum(dim=(1, 2, 3)) / m_l[b, k].sum() for k in range(K)]
        l2u = torch.stack([20 * F.cosine_similarity(t_feats[b:b + 1], p[k][None, :, None, None, None], dim=1) for k in range(K)], 1)
        p_l2u = torch.softmax(F.interpolate(l2u, size=PATCH, mode="trilinear", align_corners=False), 1)
        lf = lf + ((p_l2u - torch.softmax(t_logits[b:b + 1], 1)) ** 2).mean() / bl
    assert float(ours["forward"]) == pytest.approx(float(lf), rel=1e-4)


# ------------------------------------------------------------------------------ sources, one at a time


def _terms_with(trainer: Trainer, x: StepInputs, student=None, teacher=None):
    return {k: float(v) for k, v in cpcl_terms(student or trainer.model, teacher or trainer.teacher, x, trainer.cfg).items()}


class _Swap(torch.nn.Module):
    """A network whose logits come from one net and features from another."""

    def __init__(self, logits_net, feats_net):
        super().__init__()
        self.a, self.b = logits_net, feats_net

    def forward(self, x):
        return self.a(x)[0], self.b(x)[1]


def test_each_term_reads_the_right_network():
    trainer = tiny_trainer()
    x = trainer.sample(0)
    base = _terms_with(trainer, x)
    other = copy.deepcopy(trainer.teacher)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.3 * torch.randn_like(p))
    # the teacher's FEATURES feed the L2U map and the unlabeled prototypes: forward and backward change,
    # the supervised term does not
    feats_changed = _terms_with(trainer, x, teacher=_Swap(trainer.teacher, other))
    assert feats_changed["forward"] != pytest.approx(base["forward"], rel=1e-6)
    assert feats_changed["backward"] != pytest.approx(base["backward"], rel=1e-6)
    assert feats_changed["supervised"] == base["supervised"] and feats_changed["consistency"] == base["consistency"]
    # the teacher's LOGITS feed the pseudo-labels / confidence (backward) and the mean-teacher term, not L2U
    logits_changed = _terms_with(trainer, x, teacher=_Swap(other, trainer.teacher))
    assert logits_changed["forward"] == base["forward"]
    assert logits_changed["backward"] != pytest.approx(base["backward"], rel=1e-6)
    assert logits_changed["consistency"] != pytest.approx(base["consistency"], rel=1e-6)


def test_forward_loss_gradient_reaches_the_student_through_its_prediction():
    trainer = tiny_trainer()
    x = trainer.sample(0)
    logits, feats = trainer.model(torch.cat([x.labeled, x.unlabeled]))
    logits = logits.detach().requires_grad_(True)
    feats = feats.detach().requires_grad_(True)

    class Fixed(torch.nn.Module):
        def forward(self, _):
            return logits, feats

    terms = cpcl_terms(Fixed(), trainer.teacher, x, trainer.cfg)
    g_logits, g_feats = torch.autograd.grad(terms["forward"], [logits, feats])
    bl = x.labeled.shape[0]
    assert g_logits[bl:].abs().sum() > 0, "P_u (the student's unlabeled prediction) is detached"
    assert g_logits[:bl].abs().sum() == 0
    assert g_feats[:bl].abs().sum() > 0, "the labeled prototypes p_l are detached"
    gb = torch.autograd.grad(terms["backward"], [feats])[0]
    assert gb[:bl].abs().sum() > 0 and gb[bl:].abs().sum() == 0  # U2L: through F_l only


def test_confidence_weights_pool_confident_voxels_more():
    """p_u^k is pulled toward the features of voxels the teacher is sure of (not the unsure ones)."""
    from CPCLSegmentLib.prototypes import feature_masks, masked_average_pooling

    pseudo = torch.zeros(1, 2, 2, 2, dtype=torch.long)
    pseudo[0, 0, 0, 0] = 1
    pseudo[0, 1, 1, 1] = 1
    conf = torch.full((1, 2, 2, 2), 0.5)
    conf[0, 0, 0, 0] = 0.99  # sure
    conf[0, 1, 1, 1] = 0.51  # unsure
    f = torch.zeros(1, 1, 2, 2, 2)
    f[0, 0, 0, 0, 0] = 1.0
    f[0, 0, 1, 1, 1] = -1.0
    p, _ = masked_average_pooling(f, feature_masks(pseudo, 2, (2, 2, 2), weights=conf))
    assert p[1, 0] == pytest.approx((0.99 - 0.51) / (0.99 + 0.51))


# ------------------------------------------------------------------------------ the schedule


def test_rampup_is_in_iterations_and_lambda_follows_it():
    trainer = tiny_trainer(iterations=10, rampup=0.4)  # T = 4 iterations
    events = []
    trainer._emit = events.append
    trainer.run()
    ramps = [h["ramp"] for h in trainer.history]
    expected = [math.exp(-5 * (1 - t / 4) ** 2) if t < 4 else 1.0 for t in range(10)]
    assert ramps == pytest.approx(expected, abs=1e-6)  # the history keeps 6 decimals
    lams = [e["lambda"] for e in events if e["event"] == "progress"]
    assert lams == pytest.approx([0.1 * r for r in expected], rel=1e-6)
    absolute = tiny_trainer(iterations=10, rampup=3)  # > 1: a number of iterations
    assert absolute.cfg.rampup_iterations() == 3


def test_ema_alpha_counts_from_step_zero_and_fine_tuning_continues_it():
    trainer = tiny_trainer(iterations=3)
    params = lambda net: [p.detach().clone() for p in net.parameters()]  # noqa: E731
    x = trainer.sample(0)
    trainer.step(x, 0)  # α = 0: the teacher becomes the student
    assert all(torch.equal(a, b) for a, b in zip(params(trainer.teacher), params(trainer.student)))
    before = params(trainer.teacher)
    trainer.step(trainer.sample(1), 1)  # α = 1 - 1/2
    for t0, t, s in zip(before, params(trainer.teacher), params(trainer.student)):
        assert torch.allclose(t, 0.5 * t0 + 0.5 * s, atol=1e-6)
    # fine-tuning from a model trained 500 iterations: α = min(1 - 1/501, 0.99) = 0.99 at the first step
    init = {"student": copy.deepcopy(trainer.student.state_dict()), "teacher": copy.deepcopy(trainer.teacher.state_dict()),
            "iterations": 500}
    tuned = Trainer(trainer.cfg, trainer.labeled, trainer.unlabeled, K, init_state=init)
    loaded = params(tuned.teacher)
    tuned.step(tuned.sample(0), 0)
    for t0, t, s in zip(loaded, params(tuned.teacher), params(tuned.student)):
        assert torch.allclose(t, 0.99 * t0 + 0.01 * s, atol=1e-6)


def test_cli_train_hands_the_default_recipe_to_the_loss_terms(tmp_path, ct_path, seg_path, monkeypatch):
    """What the Trainer actually passes to the loss terms for a plain `cpcl-segment train` (flags only for size)."""
    from CPCLSegmentLib import cli

    seen, pasted = [], []
    real = losses.LOSS_TERMS["cpcl"]

    def spy(student, teacher, inputs, cfg, sync):
        seen.append(copy.deepcopy(cfg))
        pasted.append(inputs.paste_mask is not None)
        return real(student, teacher, inputs, cfg, sync)

    monkeypatch.setitem(losses.LOSS_TERMS, "cpcl", spy)
    code = cli.main(["train", "--labeled", ct_path, seg_path, "--unlabeled", ct_path, "--segments", "right lung",
                     "--out", str(tmp_path / "m.pt"), "--iterations", "2", "--patch-size", "32", "32", "16", "--width", "4",
                     "--spacing", "6.1", "6.1", "10", "--device", "cpu", "--progress", "none"])
    assert code == 0 and len(seen) >= 2
    seen, pasted = seen[-2:], pasted[-2:]  # the run's two steps (the time estimate before them times real steps too)
    cfg = seen[0]
    expected = dict(DEFAULT_RECIPE, iterations=2, width=4)
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert cfg.mt_weight() == 1.0 and pasted == [True, True]  # the default trains with copy-paste


# ------------------------------------------------------------------------------ copy-paste


def test_copy_paste_mixes_pairs_both_ways_and_splits_the_supervision():
    from CPCLSegmentLib.losses import copy_paste_batch

    xl = torch.zeros(2, 1, 4, 4, 4)
    xu = torch.ones(2, 1, 4, 4, 4)
    yl = torch.full((2, 4, 4, 4), 1)
    pseudo = torch.full((2, 4, 4, 4), 2)
    box = torch.zeros(2, 4, 4, 4, dtype=torch.bool)
    box[:, 1:3, 1:3, 1:3] = True
    x = StepInputs(xl, yl, xu, paste_mask=torch.stack([box[0], ~box[1]]))  # as data.paste_masks gives pairs 0 and 1
    images, truth, guess = copy_paste_batch(x, pseudo)
    # pair 0 inward: the unlabeled box inside the labeled patch; pair 1 outward: the labeled box inside the unlabeled one
    assert torch.equal(images[0, 0] == 1, box[0]) and torch.equal(images[1, 0] == 0, box[1])
    assert torch.equal(truth[0] == -1, box[0]) and torch.equal(truth[1] == -1, ~box[1])
    assert torch.equal(guess >= 0, truth < 0)  # every voxel is supervised exactly once
    assert set(guess[guess >= 0].tolist()) == {2} and set(truth[truth >= 0].tolist()) == {1}


def test_copy_paste_training_step_and_its_weights():
    trainer = tiny_trainer(copy_paste=True, copy_paste_weight=0.5)
    x = trainer.sample(3)
    box = (11 / 16) ** 3  # pair 0: the unlabeled box inside; pair 1: the unlabeled patch outside the box
    assert x.paste_mask.shape == (2, *PATCH) and x.paste_mask[0].float().mean() == pytest.approx(box, abs=1e-6)
    assert x.paste_mask[1].float().mean() == pytest.approx(1 - box, abs=1e-6)
    assert torch.equal(trainer.sample(3).paste_mask, x.paste_mask)  # reproducible per iteration
    assert not torch.equal(trainer.sample(4).paste_mask, x.paste_mask)
    terms = trainer.loss_terms(trainer.model, trainer.teacher, x, trainer.cfg, None)
    assert {"supervised", "forward", "backward", "consistency", "paste", "paste_pseudo"} <= set(terms)
    r = 0.5
    rest = total_loss({k: v for k, v in terms.items() if not k.startswith("paste")}, r, trainer.cfg)
    total = total_loss(terms, r, trainer.cfg)
    assert float(total - rest) == pytest.approx(float(terms["paste"] + 0.5 * r * terms["paste_pseudo"]), rel=1e-5)
    ramped = dataclasses.replace(trainer.cfg, copy_paste_ramp=True)  # copy-paste ramped in: its ground truth at r(t) too
    assert float(total_loss(terms, r, ramped) - rest) == pytest.approx(float(r * terms["paste"] + 0.5 * r * terms["paste_pseudo"]), rel=1e-5)
    values = trainer.step(x, 3)
    assert math.isfinite(values["paste"]) and math.isfinite(values["paste_pseudo"])
    mt = tiny_trainer(method="mean_teacher", copy_paste=True, consistency_weight=0.0)  # BCP: no MSE term
    assert set(mt.loss_terms(mt.model, mt.teacher, mt.sample(0), mt.cfg, None)) == {"supervised", "paste", "paste_pseudo"}


def test_the_prototype_module_s_own_default_temperature_is_the_method_s():
    """``prototype_logits`` / ``prototype_probabilities`` called without a scale (the uncertainty scores do) use
    s = 20, the method's temperature, like ``TrainConfig.scale``."""
    from CPCLSegmentLib.prototypes import prototype_logits, prototype_probabilities

    g = torch.Generator().manual_seed(3)
    f = torch.randn(2, 5, 3, 4, 4, generator=g)
    p = torch.randn(3, 5, generator=g)
    valid = torch.tensor([True, True, False])
    literal = torch.stack([20.0 * F.cosine_similarity(f, p[k][None, :, None, None, None], dim=1) for k in range(3)], 1)
    out = prototype_logits(f, p, valid)
    assert torch.allclose(out[:, :2], literal[:, :2], atol=1e-4) and (out[:, 2] < -1e3).all()
    assert torch.allclose(prototype_probabilities(f, p, valid)[:, :2], torch.softmax(literal[:, :2], 1), atol=1e-5)
    assert TrainConfig().scale == 20.0
