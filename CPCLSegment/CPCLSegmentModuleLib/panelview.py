"""What the panel shows, as plain data and HTML text: the widget is a thin mapping of ``PanelView`` to Qt.

- **Enabled states** (``build_view``): one job of each kind at a time; Label next is off while a segmentation
  runs (its pre-fill is one); nothing starts while the inputs are missing.
- Texts: the model (``model_text``), the input check (``check_text``), training progress
  (``train_event_display``).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from CPCLSegmentLib.durations import format_seconds

from . import environment
from .inputcheck import CheckResult
from .models import model_nested, model_summary
from .panelsettings import setting_names
from .trainrun import can_resume

RED, ORANGE, GREY, GREEN = "#c62828", "#e65100", "#555555", "#2e7d32"
Progress = Tuple[int, int, str]  # value, maximum, format


def _h(text: Any) -> str:
    return html.escape(str(text), quote=False)


def _span(color: str, text: str) -> str:
    return f'<span style="color:{color}">{text}</span>'


@dataclass
class PanelView:
    """What the widget shows; keys are the ``.ui`` file's object names."""

    enabled: Dict[str, bool] = field(default_factory=dict)
    visible: Dict[str, bool] = field(default_factory=dict)
    text: Dict[str, str] = field(default_factory=dict)
    progress: Dict[str, Progress] = field(default_factory=dict)
    cases: List[Tuple[str, str, bool]] = field(default_factory=list)  # volume, segmentation, painted slices only
    segments: List[Tuple[str, Tuple[float, float, float], bool]] = field(default_factory=list)  # name, colour, checked
    rank_rows: List[Tuple[int, str, float]] = field(default_factory=list)
    settings: Dict[str, Any] = field(default_factory=dict)
    unlabeled: List[str] = field(default_factory=list)  # checked node IDs
    segment_volumes: List[str] = field(default_factory=list)
    start_rows: List[Tuple[str, str]] = field(default_factory=list)  # "Start from": key, label
    start_from: str = ""
    filters: Dict[str, int] = field(default_factory=dict)  # ctkPathLineEdit filters
    model_rows: List[Tuple[str, str, str, str]] = field(default_factory=list)  # name, size, date, segments
    model_row: Optional[int] = None  # the panel's model
    run_rows: List[Tuple[str, str, str, str, str]] = field(default_factory=list)  # name, kind, size, date, note
    output_segmentation: Optional[str] = None  # node ID; None: "Create new segmentation"
    output_base_name: str = "segmentation"
    shown_in_3d: Optional[str] = None  # node ID
    package_rows: List[Tuple[str, str, str, str]] = field(default_factory=list)  # package, installed, needs, status


def model_text(model: Optional[Any]) -> str:
    if model is None:
        return "No model yet: train one or load a model file."
    s = model_summary(model)
    parts = [f"Model: {_h(model.GetName())} (saved with the scene)"]
    if s.get("segments"):
        parts.append("segments: " + _h(", ".join(s["segments"])))
    if s.get("method") or s.get("iterations"):
        parts.append(f"{_h(s.get('method') or '')} ({_h(s.get('status') or '')}), {_h(s.get('iterations'))} iterations")
    nested = model_nested(model)
    if nested:
        parts.append("nested: " + _h("; ".join(f"{k} contains {', '.join(v)}" for k, v in nested.items())))
    return "<br>".join(parts)


def check_text(res: CheckResult) -> str:
    """The input check's messages, coloured by level, after a "ready" line with the voxels per segment."""
    colors = {"error": RED, "warning": ORANGE, "info": GREY}
    lines = [_span(colors[level], f"{level}: {_h(msg)}") for level, msg in res.messages()]
    if res.ok:
        total: Dict[str, int] = {}
        for counts in res.counts.values():
            for name, n in counts.items():
                total[name] = total.get(name, 0) + (n or 0)  # None: a segmentation handed over as its file
        later = f" (+ {len(res.files)} segmentation file(s), counted by the training process)" if res.files else ""
        lines.insert(0, _span(GREEN, "ready: " + _h(", ".join(f"{k} {v} voxels" for k, v in total.items()) + later)))
    return "<br>".join(lines)


def train_event_display(progress: Progress, event: Dict[str, Any]) -> Tuple[Progress, Dict[str, str]]:
    """The training progress bar and the texts (``lossLabel``, ``diceLabel``) a training event changes."""
    name = event.get("event")
    value, maximum, _ = progress
    if name == "summary":
        return (value, maximum, f"preparing ({event.get('device')}, patch {event.get('patch_size')})…"), {}
    if name == "preprocess":
        return (value, maximum, f"preparing {event.get('stage')} case {event.get('index')}/{event.get('of')}…"), {}
    if name == "progress":
        it, of = int(event["iteration"]), int(event["of"])
        terms = ", ".join(f"{k} {v:.3f}" for k, v in (event.get("loss") or {}).items() if v is not None)
        return ((it, of, f"iteration {it}/{of}, ETA {format_seconds(event.get('eta_s'))}"),
                {"lossLabel": f"loss: {_h(terms)}; λ {event.get('lambda', 0):.3f}"})
    if name == "validation":
        return progress, {"diceLabel": _dice_text(event)}
    return progress, {}


def _dice_text(event: Dict[str, Any]) -> str:
    dice = event.get("dice") or {}
    parts = []
    for seg, value in dice.items():
        text = "n/a" if value is None else f"{value:.3f}"
        parts.append(_span(RED, f"<b>{_h(seg)} {text}</b>") if value == 0 else f"{_h(seg)} {text}")
    label = event.get("label") or f"iteration {event.get('iteration')}"
    out = f"validation Dice ({_h(label)}): " + ", ".join(parts)
    zero = event.get("zero_dice_segments") or [s for s, v in dice.items() if v == 0]
    if zero:
        out += "<br>" + _span(RED, "warning: " + _h(", ".join(zero)) + " still at Dice 0: check that segment's labels in every "
                              "case (name, non-empty) before a long run")
    return out


def _add_parts(v: PanelView, *parts: Dict[str, Any]) -> None:
    """Adds what a part of the panel shows: ``visible``, ``enabled``, ``text`` (plain text) by widget name; any other
    key is a ``PanelView`` field."""
    for part in parts:
        part = dict(part)
        v.visible.update(part.pop("visible", {}))
        v.enabled.update(part.pop("enabled", {}))
        v.text.update({k: _h(t) for k, t in part.pop("text", {}).items()})
        for name, value in part.items():
            setattr(v, name, value)


def build_view(c: Any) -> PanelView:
    """The view of a ``panel.PanelController``."""
    training, segmenting, ranking = c.busy("train"), c.busy("segment"), c.busy("rank")
    cases = c.cases()
    model = c.model()
    has_model = model is not None
    segments = c.segment_choices()
    unlabeled = c.unlabeled()
    segment_volumes = c.segment_volumes()
    labeling = c.labeling()
    v = PanelView()
    v.enabled = {
        "addCaseButton": True,
        "addAllCasesButton": True,
        "removeCaseButton": bool(cases),
        "moveSegmentUpButton": len(segments) > 1,
        "moveSegmentDownButton": len(segments) > 1,
        "checkInputsButton": bool(cases) and not training,
        "trainButton": bool(cases) and not training,
        "stopButton": training,
        "cancelTrainButton": training,
        "resumeButton": not training and can_resume(c.node.GetParameter("LastRunDir")),
        "showPlotButton": c.plot is not None,
        "saveModelButton": has_model,
        "loadModelButton": not c.busy("inspect"),
        "segmentButton": has_model and not segmenting and bool(segment_volumes),
        "cancelSegmentButton": segmenting,
        "rankButton": has_model and not ranking and bool(unlabeled),
        "cancelRankButton": ranking,
        "labelNextButton": has_model and not segmenting and c.selected_rank_row is not None,
        "addLabeledCaseButton": labeling is not None,
        "installButton": not c.busy("probe"),
        # the comparison needs a held-out case to score both models on
        "compareSupervisedCheckBox": bool(c.setting("hold_out_last")) and not training,
    }
    backend, warning = environment.describe_backend(c.probe, c.problems)
    label = f"Compute: {_h(backend)}"
    if warning:
        label += "<br>" + _span(ORANGE, _h(warning))
    minutes = c.setting("length_mode") == "minutes"
    v.visible = {"installButton": bool(c.problems) or bool((c.probe or {}).get("torch", {}).get("error")),
                 "minutesSpinBox": minutes, "iterationsSpinBox": not minutes}
    v.text = dict(c.text, backendLabel=label, modelInfoLabel=model_text(model), roundLabel=_h(c.round_text()),
                  addLabeledCaseButton=f"Add '{labeling.GetName()}' as a labeled case" if labeling is not None else "Add as a labeled case",
                  lengthHintLabel=("the iteration count is planned from a timed training step" if minutes
                                   else "training steps (for experts: the time they take depends on the computer)"))
    _add_parts(v, c.start_display(), c.packages_display(), c.manage_display())
    v.enabled["keepModelSegmentsCheckBox"] = v.enabled["keepModelSegmentsCheckBox"] and not training
    v.progress = dict(c.progress)
    v.cases = [(c.volume.GetName(), c.segmentation.GetName(), c.sparse) for c in cases]
    v.segments = segments
    v.rank_rows = [(int(r["rank"]), r["volume"].GetName(), float(r["score"])) for r in c.rank_rows]
    v.settings = {n: c.setting(n) for n in setting_names()}
    v.unlabeled = [n.GetID() for n in unlabeled]
    v.segment_volumes = [n.GetID() for n in segment_volumes]
    return v
