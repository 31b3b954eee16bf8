"""``--resume``: which interrupted run a request continues, and what it may change in it.

The checkpoint must belong to the same cases and segments; the settings marked ``resume_may_change`` in
``settings.TrainConfig`` (its length, learning rate, how often it reports, where it runs) are applied, any other changed setting is refused, naming
its flag.
"""

from __future__ import annotations

from typing import Any, Dict

import numpy as np

from . import cleanup
from .errors import InputError
from .companions import checkpoint_path
from .modelfile import load_checkpoint
from .preparation import Emit, TrainRequest, fingerprint_difference
from .settings import TrainConfig, cli_settings, network_keys, resume_may_change


def resume_checkpoint(request: TrainRequest, fingerprint: Dict[str, Any], say: Emit) -> Dict[str, Any]:
    """The checkpoint ``--resume`` continues: same cases and segments (paths compared absolute and
    link-resolved), its config with the settings that may change applied (``settings.resume_may_change``) and the ones
    that may not refused, naming them. ``request.config`` becomes that config."""
    ckpt_file = checkpoint_path(request.out)
    ck = load_checkpoint(ckpt_file)
    diff = fingerprint_difference(ck.get("fingerprint") or {}, fingerprint)
    if diff:
        raise InputError(f"--resume: checkpoint {ckpt_file} belongs to a run with other cases or segments ({diff}); "
                         "give the same cases, or start anew without --resume")
    try:
        old = TrainConfig.from_dict(ck["trainer"]["config"]).validate()
        done = int(ck["trainer"]["iteration"])
    except (KeyError, TypeError, ValueError, InputError) as e:
        raise InputError(f"--resume: checkpoint {ckpt_file} is damaged ({e})") from None
    new = request.config
    given = request.settings_given if request.settings_given is not None else [
        f for f in new.to_dict() if not (f == "iterations" and new.minutes is not None and new.minutes == old.minutes)]
    changed, refused, may_change = [], [], resume_may_change()
    for name in given:
        a, b = getattr(new, name), getattr(old, name)
        if name == "patch_size":
            if a is None:
                continue
            a, b = list(a), list(b) if b is not None else None
        if a == b:
            continue
        if name in may_change:
            setattr(old, name, getattr(new, name))
            changed.append(f"{name} {b} -> {a}")
        else:
            refused.append(f"{setting_flag(name)} {a} (the interrupted run: {b})")
    plan = ck.get("plan") or {}
    if request.options.spacing is not None and plan.get("spacing") is not None and not np.allclose(request.options.spacing, plan["spacing"]):
        refused.append(f"--spacing {list(request.options.spacing)} (the interrupted run: {plan['spacing']})")
    modality = (plan.get("normalization") or {}).get("modality")
    if request.options.modality not in ("auto", None) and modality and request.options.modality != modality:
        refused.append(f"--modality {request.options.modality} (the interrupted run: {modality})")
    if refused:
        raise InputError("--resume continues the interrupted run, whose settings cannot change mid-run: " + "; ".join(refused)
                         + ". Drop these to resume, or start a new run without --resume")
    if old.iterations <= done:
        raise InputError(f"--resume: {ckpt_file} is at iteration {done}: {old.iterations} iterations would train no further; "
                         f"give --iterations more than {done}")
    request.config = old
    cleanup.note_written(ckpt_file, "resume checkpoint: --resume continues from it")  # a cancel keeps it and says so
    say({"event": "info", "message": f"resuming from iteration {done} of {old.iterations}" + (f" ({'; '.join(changed)})" if changed else "")})
    return ck


def setting_flag(name: str) -> str:
    flags = dict((n, m.get("flag")) for n, m in cli_settings())
    return flags.get(name) or (f"{name} (network)" if name in network_keys() else f"{name} (setting)")
