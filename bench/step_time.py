"""Training-step time: supervised-only vs plain mean teacher vs CPCL, side by side in ONE run.

Every variant has its own student, EMA teacher and SGD optimizer, all starting from the same weights, and
takes exactly the step ``trainer.Trainer.step`` takes (the engine's loss-term function, ``total_loss``,
backward, optimizer step, ``update_teacher``; patch sampling is left out). Variants
are **interleaved**: each round runs one step of every variant (order rotated every round) on the same batch,
so load from other processes hits all of them alike; the table reports the median over rounds after
warm-up rounds, plus the median of the per-round ratios to mean teacher (paired, the more robust figure).
Both wall time and process CPU time are recorded; on a shared machine CPU time with ``--threads 1`` is the
stable measure of work, wall time with the default threads is what a user waits.

Variants (``--variants``; default all but ``fullres_grad``; ``all`` adds it):

- ``supervised``: student on the 2 labeled patches (``losses.supervised_loss_terms``).
- ``mean_teacher``: student on 2 + 2, teacher on the 2 unlabeled, MSE of softmaxes
  (``losses.mean_teacher_loss_terms``; the SSL4MIS / UA-MT recipe).
- ``cpcl``: ours, the engine defaults (``losses.cpcl_loss_terms``): one student pass on 2 + 2, one teacher pass
  on the 2 unlabeled, prototypes and cosine maps at the feature map's resolution, gradient-carrying, plus the
  mean-teacher consistency term at the default weight (``trainer.CPCL_CONSISTENCY``).
- ``cpcl_mt``: the same with the mean-teacher term at weight 0.1 (the reference's weight).
- ``ref_teacher_passes``: the reference script (lemoshu/CPCL ``train_CPCL_general_3D.py``) without its
  prototype terms: student on 4, teacher on the **noisy batch of 4** (logit-MSE "stability" loss) **and**
  again on the clean unlabeled 2.
- ``ref_cpcl``: the reference's whole CPCL step rebuilt from our prototype functions: as
  ``ref_teacher_passes`` plus 32-channel features of labeled (student) and unlabeled (teacher) patches
  upsampled trilinearly to the full patch, per-sample confidence-weighted prototypes, cosine maps and
  softmaxes at full resolution, double softmax in the U2L cross-entropy; features detached as in the
  reference (so its prototype losses carry no gradient, measured in the issue).
- ``ref_cpcl_ops``: the same step with the reference's own operation sequence (``getPrototype`` /
  ``calDist`` / ``prototype_pred`` re-implemented op for op: the features are upsampled again for every class
  and every prototype set, masked sums by broadcasting at full resolution, one ``F.cosine_similarity`` per
  class): the kind of cost the issue measured (2.2× on the reference's own network).
- ``mean_teacher_relu_inplace``, ``cpcl_relu_inplace`` (experiments, only when named): the same steps with the
  network's ReLU (out of place while recording gradients) switched back to ``nn.ReLU(inplace=True)`` (the engine before the change measured
  in BENCHMARKS.md, "Engine changes").
- ``fullres_grad``: what gradient-carrying CPCL would cost at full resolution (``ref_cpcl``'s full-resolution
  prototype maths without the detach and without the extra teacher pass): why the engine works at the
  feature resolution.

Configurations (``--configs``): ``reference`` = VNet width 16, depth 4 (16→256 channels), patch
(D, H, W) = (48, 64, 64), i.e. the reference's 64×64×48 (its tensors are (x, y, z) = (64, 64, 48)), K = 2,
batch 2 + 2; ``cpu-default`` = the engine defaults (width 16, depth 4, batch 2 + 2) with the patch
``planning.plan_patch_size`` chooses on the CPU for the hippocampus set's median case (K = 3);
``demo`` = the demo / test config (width 8, patch (16, 64, 64), K = 4).

``--profile`` additionally runs ``torch.profiler`` over a few steps of mean teacher, CPCL and the
reference-style step and writes each stage's time (student forward, teacher forward, the rest of the loss,
backward, optimizer, EMA) and the top operators, plus the operator-level difference CPCL − mean teacher.

Usage::

    python bench/step_time.py                          # both configurations, results/step_time.json
    python bench/step_time.py --threads 1 --rounds 8   # the stable CPU-time measurement on a shared machine
    python bench/step_time.py --configs reference --profile
    python bench/step_time.py --smoke                  # CI: tiny sizes, 1 warm-up + 2 rounds
    python bench/step_time.py --device cuda --rounds 20 # GPU, fp32 (bf16 / channels-last: gpu_step.py)
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from speed_common import (  # noqa: E402
    RESULTS_DIR,
    Clock,
    StepRunner,
    config,
    fmt_ratio,
    fmt_s,
    load_average,
    machine_info,
    make_batches,
    median,
    quartiles,
    set_threads,
    write_json,
)

from CPCLSegmentLib.losses import supervised_loss  # noqa: E402
from CPCLSegmentLib.settings import PRESETS  # noqa: E402
from CPCLSegmentLib.network import VNet  # noqa: E402
from CPCLSegmentLib.planning import plan_patch_size  # noqa: E402
from CPCLSegmentLib.prototypes import masked_average_pooling, prototype_logits  # noqa: E402

HIPPOCAMPUS_MEDIAN_SHAPE = (36, 51, 36)  # (D, H, W) at 1 mm: median of ../shared/data/msd-hippocampus (x, y, z 36×51×36.5)
HIPPOCAMPUS_SPACING = (1.0, 1.0, 1.0)

DEFAULT_VARIANTS = ["supervised", "mean_teacher", "cpcl", "cpcl_mt", "cpcl_paper", "ref_teacher_passes", "ref_cpcl", "ref_cpcl_ops"]
ALL_VARIANTS = DEFAULT_VARIANTS + ["cpcl_label_maps", "cpcl_cp", "mean_teacher_cp", "fullres_grad"]
EXPERIMENTS = ["mean_teacher_relu_inplace", "cpcl_relu_inplace"]  # engine-change experiments (BENCHMARKS.md, "Engine changes")


def configurations(smoke: bool) -> Dict[str, Dict[str, Any]]:
    if smoke:
        return {"smoke": {"patch": (16, 32, 32), "width": 4, "K": 2, "note": "CI smoke size"}}
    planned, _ = plan_patch_size(HIPPOCAMPUS_MEDIAN_SHAPE, HIPPOCAMPUS_SPACING, 4, "cpu", 16, 3)
    return {
        "reference": {"patch": (48, 64, 64), "width": 16, "K": 2,
                      "note": "reference network (16→256 channels) at the reference measurement's 64×64×48 patch"},
        "cpu-default": {"patch": tuple(planned), "width": 16, "K": 3,
                        "note": "engine defaults; patch planned on the CPU for the hippocampus median case"},
        "demo": {"patch": (16, 64, 64), "width": 8, "K": 4, "note": "demo / test configuration"},
    }


# ---------------------------------------------------------------------------- reference-style CPCL step


def _upsample(f: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(f, size=tuple(size), mode="trilinear")  # reference: align_corners default (False)


def _weighted_masks(labels: torch.Tensor, probs: torch.Tensor, k: int) -> torch.Tensor:
    """Reference masks: one-hot of ``labels`` weighted by the probability of that class (``P^k(x)``)."""
    return F.one_hot(labels, k).permute(0, 4, 1, 2, 3).float() * probs


def _literal_prototype(features: torch.Tensor, mask: torch.Tensor, confidence: torch.Tensor, size) -> torch.Tensor:
    """The reference's per-class prototype, operation for operation: upsample the features again, broadcast
    multiply by the mask and by the confidence at full resolution, sum."""
    fts = _upsample(features, size)
    m = mask.unsqueeze(1).float()
    return torch.sum(fts * m * confidence, dim=(2, 3, 4)) / ((m * confidence).sum(dim=(2, 3, 4)) + 1e-5)


def _literal_prediction(prototypes: List[torch.Tensor], features: torch.Tensor, size, k: int) -> torch.Tensor:
    """The reference's prototype prediction: upsample, one ``F.cosine_similarity`` per class at full resolution
    (×20), concatenate, softmax."""
    f = _upsample(features, size)
    d = torch.cat([(F.cosine_similarity(f, prototypes[c][:, :, None, None, None], dim=1) * 20.0).unsqueeze(1) for c in range(k)], 1)
    return torch.softmax(d, dim=1)


def literal_reference_terms(r: StepRunner, b: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The reference's loop body with its own operation sequence (per-class re-upsampling of the features,
    broadcast masked sums, ``F.cosine_similarity`` per class), on our network: the cost the issue measured."""
    terms = reference_terms(r, b, prototypes=False, keep=True)
    x_l, y_l = b["x_l"], b["y_l"]
    bl, size, k = x_l.shape[0], y_l.shape[1:], r.K
    logits, feats = r._last_student
    t_logits, t_feats = r._last_teacher
    del r._last_student, r._last_teacher
    label_fts = feats[:bl].detach().float()
    p_student = torch.softmax(logits[:bl].float(), 1)
    protos_l = [_literal_prototype(label_fts, y_l == c, p_student[:, c:c + 1], size).detach() for c in range(k)]
    t_soft = torch.softmax(t_logits.float(), 1)
    l2u = _literal_prediction(protos_l, t_feats.float(), size, k)
    terms["forward"] = torch.mean((l2u - t_soft) ** 2)
    pre_mask = torch.argmax(t_soft, dim=1)
    protos_u = [_literal_prototype(t_feats.float(), pre_mask == c, t_soft[:, c:c + 1], size).detach() for c in range(k)]
    u2l = _literal_prediction(protos_u, label_fts, size, k)
    terms["backward"] = F.cross_entropy(u2l, y_l)
    return terms


def reference_terms(r: StepRunner, b: Dict[str, torch.Tensor], *, prototypes: bool = True, detach: bool = True,
                    stability: bool = True, keep: bool = False) -> Dict[str, torch.Tensor]:
    """The reference step's costs (lemoshu/CPCL ``train_CPCL_general_3D.py`` loop body, ``vnet_MTPD``),
    from our network and prototype functions. See the module docstring."""
    x_l, y_l, x_u = b["x_l"], b["y_l"], b["x_u"]
    bl, size, k = x_l.shape[0], y_l.shape[1:], r.K
    x = torch.cat([x_l, x_u], 0)
    logits, feats = r.model(x)
    if keep:
        r._last_student = (logits, feats)
    terms: Dict[str, torch.Tensor] = {"supervised": supervised_loss(logits[:bl], y_l)}
    with torch.no_grad():
        if stability:
            noise = torch.clamp(torch.randn_like(x) * 0.1, -0.2, 0.2)
            t_all, _ = r.teacher(x + noise)  # pass 1: the whole noisy batch (stability loss)
        t_logits, t_feats = r.teacher(x_u)  # pass 2: the clean unlabeled half (prototypes, pseudo-masks)
    if keep:
        r._last_teacher = (t_logits, t_feats)
    if stability:  # the reference's logit-MSE "stability" loss, weighted λ(t) (the runner's consistency_weight = λ_max)
        terms["consistency"] = torch.mean((t_all.float() - logits.float()) ** 2)
    if not prototypes:
        return terms
    f_l = feats[:bl].detach() if detach else feats[:bl]
    f_l_up = _upsample(f_l.float(), size)  # (B, 32, D, H, W): the full-resolution feature maps
    f_u_up = _upsample(t_feats.float(), size)
    p_student = torch.softmax(logits[:bl].float(), 1)
    m_l = _weighted_masks(y_l, p_student.detach() if detach else p_student, k)
    p_l, v_l = masked_average_pooling(f_l_up, m_l, per_sample=True)
    p_l = p_l.detach() if detach else p_l
    l2u = torch.softmax(prototype_logits(f_u_up, p_l, v_l), 1)
    t_probs = torch.softmax(t_logits.float(), 1)
    terms["forward"] = torch.mean((l2u - t_probs) ** 2)
    pseudo = t_probs.argmax(1)
    p_u, v_u = masked_average_pooling(f_u_up, _weighted_masks(pseudo, t_probs, k), per_sample=True)
    u2l = torch.softmax(prototype_logits(f_l_up, p_u, v_u), 1)
    terms["backward"] = F.cross_entropy(u2l, y_l)  # softmax applied twice, as in the reference
    return terms


VARIANT_DOC = {
    "supervised": "supervised only (student on 2 labeled)",
    "mean_teacher": "plain mean teacher (student on 4, teacher on 2, MSE on softmax)",
    "cpcl": "CPCL, ours (engine default: 1 teacher pass, prototypes at feature resolution, gradients, mean-teacher term 1.0)",
    "cpcl_mt": "CPCL with the mean-teacher term at the reference's weight 0.1",
    "cpcl_paper": "CPCL as claimed (--config cpcl-paper: teacher P_u, per-sample prototypes, no mean-teacher term)",
    "cpcl_label_maps": "CPCL default with map_resolution=label (features upsampled before the cosine maps: the literal form)",
    "cpcl_cp": "CPCL default + cross-image copy-paste (student also on 2 mixed patches)",
    "mean_teacher_cp": "mean teacher + cross-image copy-paste (student also on 2 mixed patches)",
    "ref_teacher_passes": "reference step without prototypes (student on 4, teacher on noisy 4 + clean 2)",
    "ref_cpcl": "reference-style CPCL (teacher twice, 32-ch features upsampled to full patch, detached)",
    "ref_cpcl_ops": "reference CPCL with the reference's own operation sequence (per-class upsampling, cosine_similarity)",
    "fullres_grad": "CPCL at full resolution with gradients (teacher once)",
    "mean_teacher_relu_inplace": "mean_teacher with nn.ReLU(inplace=True) in the network (the engine before the change)",
    "cpcl_relu_inplace": "cpcl with nn.ReLU(inplace=True) in the network (the engine before the change)",
}


def build_runner(variant: str, patch, width: int, k: int, state: Dict[str, torch.Tensor], norm: str, dropout: float,
                 device: torch.device = torch.device("cpu")) -> StepRunner:
    """A ``Trainer`` for ``variant``: the engine's own loss terms for the product's variants; the reference-style
    variants replace only the loss-term function (their losses combine as ``total_loss`` does, the reference's
    stability term weighted by λ(t))."""
    if variant.endswith("_relu_inplace"):
        r = build_runner(variant[: -len("_relu_inplace")], patch, width, k, state, norm, dropout, device)
        from CPCLSegmentLib.network import ReLU

        for net in (r.student, r.teacher):
            for parent in list(net.modules()):
                for name, child in list(parent.named_children()):
                    if isinstance(child, ReLU):
                        setattr(parent, name, torch.nn.ReLU(inplace=True))
        return r
    method = {"supervised": "supervised", "mean_teacher": "mean_teacher", "mean_teacher_cp": "mean_teacher"}.get(variant, "cpcl")
    over: Dict[str, Any] = {"norm": norm, "dropout": dropout, "device": str(device)}
    engine = {"supervised": {}, "mean_teacher": {}, "cpcl": {}, "cpcl_mt": {"consistency_weight": 0.1},
              "cpcl_paper": {k: v for k, v in PRESETS["cpcl-paper"].items() if k != "method"},
              "cpcl_label_maps": {"map_resolution": "label"}, "cpcl_cp": {"copy_paste": True},
              "mean_teacher_cp": {"copy_paste": True}}
    if variant in engine:
        return StepRunner(config(method, patch, width, **over, **engine[variant]), k, state)
    ref_cfg = config(method, patch, width, **over, consistency_weight=config(method, patch, width).lambda_max)
    if variant == "ref_teacher_passes":
        return StepRunner(ref_cfg, k, state, terms_fn=lambda r, b: reference_terms(r, b, prototypes=False))
    if variant == "ref_cpcl":
        return StepRunner(ref_cfg, k, state, terms_fn=reference_terms)
    if variant == "ref_cpcl_ops":
        return StepRunner(ref_cfg, k, state, terms_fn=literal_reference_terms)
    if variant == "fullres_grad":
        return StepRunner(config(method, patch, width, **over, consistency_weight=0.0), k, state,
                          terms_fn=lambda r, b: reference_terms(r, b, detach=False, stability=False))
    raise SystemExit(f"unknown variant {variant!r}; choose from {ALL_VARIANTS + EXPERIMENTS}")


# ------------------------------------------------------------------------------------------- timing


def time_config(name: str, spec: Dict[str, Any], variants: List[str], warmup: int, rounds: int, seed: int,
                norm: str, dropout: float, log: Callable[[str], None], device: torch.device = torch.device("cpu")) -> Dict[str, Any]:
    patch, width, k = spec["patch"], spec["width"], spec["K"]
    torch.manual_seed(seed)
    state = VNet(1, k, width, 4, norm=norm, dropout=dropout).state_dict()
    runners = {v: build_runner(v, patch, width, k, copy.deepcopy(state), norm, dropout, device) for v in variants}
    batches = make_batches(3, 2, 2, patch, k, seed, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    wall: Dict[str, List[float]] = {v: [] for v in variants}
    cpu: Dict[str, List[float]] = {v: [] for v in variants}
    log(f"[{name}] patch (D, H, W) {list(patch)}, width {width}, K {k}, batch 2+2, {warmup} warm-up + {rounds} rounds, "
        f"{torch.get_num_threads()} thread(s)")
    for rnd in range(warmup + rounds):
        order = variants[rnd % len(variants):] + variants[: rnd % len(variants)]
        batch = batches[rnd % len(batches)]
        line = []
        for v in order:
            with Clock(sync) as c:
                runners[v].step(batch)
            if rnd >= warmup:
                wall[v].append(c.wall)
                cpu[v].append(c.cpu)
            line.append(f"{v} {c.wall:.2f}/{c.cpu:.2f}")
        log(f"  round {rnd + 1}{' (warm-up)' if rnd < warmup else ''}: " + ", ".join(line) + "  (wall/cpu s)")
    base = "mean_teacher" if "mean_teacher" in variants else variants[0]
    out: Dict[str, Any] = {"device": str(device), "patch_dhw": list(patch), "width": width, "depth": 4, "num_classes": k, "batch": "2+2",
                           "norm": norm, "dropout": dropout, "note": spec.get("note", ""), "baseline": base,
                           "warmup_rounds": warmup, "rounds": rounds, "variants": {}}
    for v in variants:
        pw = [a / b for a, b in zip(wall[v], wall[base])]
        pc = [a / b for a, b in zip(cpu[v], cpu[base])]
        out["variants"][v] = {
            "description": VARIANT_DOC[v],
            "wall_s": [round(t, 4) for t in wall[v]], "cpu_s": [round(t, 4) for t in cpu[v]],
            "median_wall_s": median(wall[v]), "median_cpu_s": median(cpu[v]),
            "iqr_wall_s": quartiles(wall[v]), "iqr_cpu_s": quartiles(cpu[v]),
            "ratio_median_wall": median(wall[v]) / median(wall[base]),
            "ratio_median_cpu": median(cpu[v]) / median(cpu[base]),
            "paired_ratio_wall": median(pw), "paired_ratio_cpu": median(pc),
            "paired_ratio_cpu_iqr": quartiles(pc), "paired_ratio_wall_iqr": quartiles(pw),
        }
    return out


def table(name: str, res: Dict[str, Any]) -> str:
    rows = [f"\n{name}: patch (D, H, W) {res['patch_dhw']}, width {res['width']}, K {res['num_classes']}, batch 2+2, "
            f"median of {res['rounds']} interleaved rounds, ratios to {res['baseline']}",
            "| variant | wall | CPU | ratio (wall) | ratio (CPU) | paired ratio CPU [IQR] |", "|---|---|---|---|---|---|"]
    for v, r in res["variants"].items():
        lo, hi = r["paired_ratio_cpu_iqr"]
        rows.append(f"| {v} | {fmt_s(r['median_wall_s'])} | {fmt_s(r['median_cpu_s'])} | {fmt_ratio(r['ratio_median_wall'])} | "
                    f"{fmt_ratio(r['ratio_median_cpu'])} | {fmt_ratio(r['paired_ratio_cpu'])} [{lo:.2f}–{hi:.2f}] |")
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------ profiling


class Tagged(torch.nn.Module):
    """Wraps a network so its forward shows up as one ``record_function`` region in the profile."""

    def __init__(self, net: torch.nn.Module, tag: str) -> None:
        super().__init__()
        self.net, self.tag = net, tag

    def forward(self, x):  # noqa: D401
        with torch.profiler.record_function(self.tag):
            return self.net(x)


def profile_config(name: str, spec: Dict[str, Any], variants: List[str], steps: int, seed: int, norm: str,
                   dropout: float, log: Callable[[str], None]) -> Dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile, record_function

    patch, width, k = spec["patch"], spec["width"], spec["K"]
    torch.manual_seed(seed)
    state = VNet(1, k, width, 4, norm=norm, dropout=dropout).state_dict()
    batches = make_batches(2, 2, 2, patch, k, seed)
    out: Dict[str, Any] = {}
    ops_by_variant: Dict[str, Dict[str, float]] = {}
    for v in variants:
        r = build_runner(v, patch, width, k, copy.deepcopy(state), norm, dropout)
        r.step(batches[0])  # warm-up
        student, teacher = r.model, r.teacher
        r.model, r.teacher = Tagged(student, "student_forward"), Tagged(teacher, "teacher_forward")
        try:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for i in range(steps):
                    with record_function("step"):
                        r.step(batches[i % len(batches)])
        finally:
            r.model, r.teacher = student, teacher
        ka = prof.key_averages()
        region = {e.key: e.cpu_time_total / 1e6 / steps for e in ka if e.key in ("step", "student_forward", "teacher_forward")}
        optimizer = sum(e.cpu_time_total for e in ka if e.key.startswith("Optimizer.step")) / 1e6 / steps
        stages = {
            "student_forward_s": region.get("student_forward", 0.0),
            "teacher_forward_s": region.get("teacher_forward", 0.0),
            "optimizer_s": optimizer,
            "rest_s": region.get("step", 0.0) - region.get("student_forward", 0.0) - region.get("teacher_forward", 0.0) - optimizer,
            "step_s": region.get("step", 0.0),
        }
        ops = {e.key: e.self_cpu_time_total / 1e6 / steps for e in ka
               if not e.key.startswith(("step", "student_forward", "teacher_forward", "Optimizer.", "ProfilerStep"))}
        ops_by_variant[v] = ops
        top = sorted(ops.items(), key=lambda kv: -kv[1])[:15]
        total = sum(ops.values()) or 1.0
        out[v] = {"stages": stages, "top_ops_self_cpu_s": [[kk, round(vv, 4), round(vv / total, 4)] for kk, vv in top]}
        log(f"[{name}] profile {v}: " + ", ".join(f"{kk} {vv:.3f}" for kk, vv in stages.items()))
    if "cpcl" in ops_by_variant and "mean_teacher" in ops_by_variant:
        a, b = ops_by_variant["cpcl"], ops_by_variant["mean_teacher"]
        diff = {kk: a.get(kk, 0.0) - b.get(kk, 0.0) for kk in set(a) | set(b)}
        out["cpcl_minus_mean_teacher_ops_s"] = [[kk, round(vv, 4)] for kk, vv in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:20]]
    for ref in ("ref_cpcl", "ref_cpcl_ops"):
        if ref in ops_by_variant and "mean_teacher" in ops_by_variant:
            a, b = ops_by_variant[ref], ops_by_variant["mean_teacher"]
            diff = {kk: a.get(kk, 0.0) - b.get(kk, 0.0) for kk in set(a) | set(b)}
            out[f"{ref}_minus_mean_teacher_ops_s"] = [[kk, round(vv, 4)] for kk, vv in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:20]]
    return out


# ---------------------------------------------------------------------------------------------- main


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=None, help="reference, cpu-default, demo (default: reference cpu-default)")
    p.add_argument("--variants", nargs="+", default=None, help=f"subset of {ALL_VARIANTS + EXPERIMENTS} or 'all'")
    p.add_argument("--rounds", type=int, default=6, help="measured rounds (one step of every variant each)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up rounds, not measured")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--norm", default="instance", help="network normalisation (engine default instance; reference batch)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout (engine default 0; reference 0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda (fp32; see gpu_step.py for bf16 / channels-last)")
    p.add_argument("--profile", action="store_true", help="also profile mean teacher, CPCL and reference-style steps")
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 1 warm-up + 2 rounds (CI)")
    p.add_argument("--out", default=None, help="JSON result file (default bench/results/step_time[_smoke].json)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    threads = set_threads(args.threads)
    specs = configurations(args.smoke)
    names = args.configs or (["smoke"] if args.smoke else ["reference", "cpu-default"])
    unknown = [n for n in names if n not in specs]
    if unknown:
        p.error(f"unknown configuration(s) {unknown}; choose from {sorted(specs)}")
    variants = args.variants or list(DEFAULT_VARIANTS)
    if variants == ["all"]:
        variants = list(ALL_VARIANTS)
    warmup, rounds = (1, 2) if args.smoke else (args.warmup, args.rounds)
    result: Dict[str, Any] = {"benchmark": "step_time", "command": " ".join(["python", "bench/step_time.py", *(argv or sys.argv[1:])]),
                              "machine": machine_info(), "threads": threads, "configs": {}}
    for n in names:
        res = time_config(n, specs[n], variants, warmup, rounds, args.seed, args.norm, args.dropout, log, torch.device(args.device))
        if args.profile:
            pv = [v for v in ("mean_teacher", "cpcl", "ref_cpcl", "ref_cpcl_ops") if v in variants]
            res["profile"] = profile_config(n, specs[n], pv, 1 if args.smoke else args.profile_steps, args.seed,
                                            args.norm, args.dropout, log)
        result["configs"][n] = res
        print(table(n, res), flush=True)
    result["machine"]["load_average_at_end"] = load_average()
    out = Path(args.out) if args.out else RESULTS_DIR / ("step_time_smoke.json" if args.smoke else "step_time.json")
    write_json(out, result)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
