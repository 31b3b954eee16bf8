"""Mutation check (slow tier): plausible wrong implementations of the method must fail the default suite.

Each fault is applied to a copy of the engine (``CPCLSegmentLib``) in a temporary folder, and the default suite's
method tests (``test_method_fidelity.py``, ``test_losses.py``, ``test_prototypes.py``, ``test_network_teacher.py``,
``test_warm_start.py``, all in the default tier) run against the copy in a child process, stopping at the first failure. Every fault must
make them fail; the unchanged copy must pass (so a failure is the fault's doing, not the harness's).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow

LIB = ROOT / "CPCLSegment" / "CPCLSegmentLib"
TESTS = ["Testing/test_method_fidelity.py", "Testing/test_losses.py", "Testing/test_prototypes.py", "Testing/test_network_teacher.py",
         "Testing/test_warm_start.py"]

# (name, file, exact text, replacement): each text must occur exactly once in the engine.
FAULTS = [
    ("cosine temperature 1 in TrainConfig", "settings.py", "COSINE_SCALE = 20.0", "COSINE_SCALE = 1.0"),
    ("cosine temperature 1 in the prototype module", "prototypes.py",
     "valid: torch.Tensor, scale: float = DEFAULT_SCALE\n) -> torch.Tensor:\n    \"\"\"Cosine logits",
     "valid: torch.Tensor, scale: float = 1.0\n) -> torch.Tensor:\n    \"\"\"Cosine logits"),
    ("the trainer ignores the configured scale", "losses.py",
     "l2u = to_label_resolution(prototype_logits(f_u, p_l, valid_l, cfg.scale), size)",
     "l2u = to_label_resolution(prototype_logits(f_u, p_l, valid_l, 1.0), size)"),
    ("student's unlabeled features in the L2U map and unlabeled prototypes", "losses.py",
     "(logits_l, logits_u, logits_m), (feats_l, _, _), (t_logits, t_feats), paste = _student_and_teacher(student, teacher, x)",
     "(logits_l, logits_u, logits_m), (feats_l, t_feats, _), (t_logits, _), paste = _student_and_teacher(student, teacher, x)"),
    ("student's labeled features replaced by the teacher's in U2L", "losses.py",
     "u2l = to_label_resolution(prototype_logits(f_l, p_u, valid_u, cfg.scale), size)",
     "u2l = to_label_resolution(prototype_logits(f_u[: f_l.shape[0]], p_u, valid_u, cfg.scale), size)"),
    ("inverted confidence weights", "losses.py",
     "weights=conf if cfg.confidence_weighting else None", "weights=1 - conf if cfg.confidence_weighting else None"),
    ("student's P_u detached", "losses.py",
     "logits_u if use_student else t_logits", "logits_u.detach() if use_student else t_logits"),
    ("labeled prototypes detached", "losses.py",
     "p_l, valid_l = masked_average_pooling(f_l, masks_l, cfg.per_sample_prototypes, sync)",
     "p_l, valid_l = masked_average_pooling(f_l.detach(), masks_l, cfg.per_sample_prototypes, sync)"),
    ("softmax twice in the backward loss", "losses.py",
     "return _nll(merged_log_probabilities(u2l_logits, class_known), target, sync)",
     "return _nll(merged_log_probabilities(torch.softmax(u2l_logits, 1), class_known), target, sync)"),
    ("ramp-up length taken as iterations when it is a fraction", "settings.py",
     "return self.rampup * (self.iterations - self.warm_start_iterations()) if self.rampup <= 1 else self.rampup",
     "return self.rampup"),
    ("no ramp-up", "trainer.py", "ramp = sigmoid_rampup(it - warm, cfg.rampup_iterations()) if it >= warm else 0.0", "ramp = 1.0"),
    ("the ramp-up counted from iteration 0, not from the end of the warm start", "trainer.py",
     "ramp = sigmoid_rampup(it - warm, cfg.rampup_iterations())", "ramp = sigmoid_rampup(it, cfg.rampup_iterations())"),
    ("the warm start ignored", "trainer.py",
     "terms_fn = supervised_terms if it < warm else self.loss_terms", "terms_fn = self.loss_terms"),
    ("EMA step offset by one", "trainer.py",
     "update_teacher(self.teacher, self.student, self.ema_offset + it, cfg.ema_decay)",
     "update_teacher(self.teacher, self.student, self.ema_offset + it + 1, cfg.ema_decay)"),
    ("EMA at the final decay from the start", "teacher.py", "return min(1.0 - 1.0 / (step + 1), decay)", "return decay"),
    ("fine-tuning restarts the EMA", "trainer.py",
     "self.ema_offset = int(init_state.get(\"iterations\") or 0)", "self.ema_offset = 0"),
    ("default recipe: mean-teacher term weight changed", "settings.py", "CPCL_CONSISTENCY = 1.0", "CPCL_CONSISTENCY = 0.1"),
    ("default recipe: teacher's P_u by default", "settings.py",
     "forward_prediction: str = field(default=\"student\"", "forward_prediction: str = field(default=\"teacher\""),
    ("default recipe: λ_max changed", "settings.py", "    lambda_max: float = field(default=0.1,",
     "    lambda_max: float = field(default=1.0,"),
    ("default recipe: copy-paste off", "settings.py",
     "return bool(self.copy_paste) if self.copy_paste is not None else self.method == \"cpcl\"",
     "return bool(self.copy_paste) if self.copy_paste is not None else False"),
    ("copy-paste pseudo-label term weight ignored", "losses.py",
     "cfg.copy_paste_weight * ramp * terms[\"paste_pseudo\"]", "ramp * terms[\"paste_pseudo\"]"),
    ("β not applied", "losses.py", "(terms[\"forward\"] + cfg.beta * terms[\"backward\"])", "(terms[\"forward\"] + terms[\"backward\"])"),
    ("copy-paste ramp ignored", "losses.py", "w_p = ramp if cfg.copy_paste_ramp else 1.0", "w_p = 1.0"),
    ("learning-rate warm-up ignored", "trainer.py",
     "lr = learning_rate(it, cfg.iterations, cfg.lr, cfg.poly_power, cfg.lr_warmup_iterations())",
     "lr = learning_rate(it, cfg.iterations, cfg.lr, cfg.poly_power)"),
]


def _engine_copy(tmp: Path) -> Path:
    dst = tmp / "engine"
    shutil.copytree(LIB, dst / "CPCLSegmentLib", ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def _run_suite(engine: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(engine) + os.pathsep + env.get("PYTHONPATH", "")
    env["CPCL_ENGINE_UNDER_TEST"] = str(engine)
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not slow", *TESTS]
    return subprocess.run(cmd, cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=1800)


def test_the_unchanged_copy_passes_and_is_the_code_under_test(tmp_path):
    engine = _engine_copy(tmp_path)
    code = "import CPCLSegmentLib, sys; print(CPCLSegmentLib.__file__)"
    env = dict(os.environ, PYTHONPATH=str(engine))
    where = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert where.strip().startswith(str(engine)), where
    proc = _run_suite(engine)
    assert proc.returncode == 0, proc.stdout[-3000:]


@pytest.mark.parametrize("name, file, text, replacement", FAULTS, ids=[f[0] for f in FAULTS])
def test_fault_is_caught_by_the_default_suite(tmp_path, name, file, text, replacement):
    engine = _engine_copy(tmp_path)
    path = engine / "CPCLSegmentLib" / file
    source = path.read_text(encoding="utf-8")
    assert source.count(text) == 1, f"the fault's text is not found exactly once in {file}: update FAULTS"
    path.write_text(source.replace(text, replacement), encoding="utf-8")
    proc = _run_suite(engine)
    assert proc.returncode == 1, f"the default suite did not notice: {name}\n{proc.stdout[-2000:]}"
