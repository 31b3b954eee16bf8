"""The one source of training settings (``CPCLSegmentLib/settings.py``): typed checks, named recipes, the CLI
flags derived from ``TrainConfig``, and ``--minutes``."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time

import pytest
from conftest import ROOT

from CPCLSegmentLib import cli, settings
from CPCLSegmentLib.errors import InputError
from CPCLSegmentLib.settings import PRESETS, TrainConfig


@pytest.mark.parametrize("bad, words", [
    ({"iterations": "ten"}, "iterations must be a whole number"),
    ({"width": 2.5}, "width must be a whole number"),
    ({"compile": "yes"}, "compile must be true or false"),
    ({"consistency_weight": -5}, "consistency_weight must be a finite number >= 0"),
    ({"validation_every": -3}, "validation_every must be >= 0"),
    ({"patch_size": [16, 16, 15]}, "patch_size must be three multiples of 16"),
    ({"patch_size": [16, 16, 16]}, "single voxel at the network's deepest level.*at least one side 32"),
    ({"method": "cpl"}, "method must be one of cpcl, mean_teacher, supervised"),
    ({"minutes": 0}, r"minutes must be in \(0, 1000000\)"),
    ({"seed": -1}, "seed must be a whole number from 0 to 4294967295"),
    ({"ema_decay": 1.0}, r"ema_decay must be in \[0, 1\)"),
    ({"depth": 3, "feature_level": 3}, r"feature_level must be in \[0, depth - 1 = 2\]"),
    ({"lr": float("nan")}, "lr must be a finite number"),
    ({"device": "gpu"}, "device must be auto, cpu, cuda, cuda:N or mps"),
])
def test_invalid_settings_are_named(bad, words):
    with pytest.raises(InputError, match=words):
        TrainConfig.from_dict(bad).validate()


def test_unknown_setting_lists_the_known_ones():
    with pytest.raises(InputError, match="unknown training setting.*lamda_max.*known:.*lambda_max"):
        TrainConfig.from_dict({"lamda_max": 0.1})


def test_yaml_number_text_is_read_as_a_number_only_for_float_settings():
    assert TrainConfig.from_dict({"lr": "3e-3"}).validate().lr == pytest.approx(3e-3)
    with pytest.raises(InputError, match="iterations must be a whole number"):
        TrainConfig.from_dict({"iterations": "300"}).validate()


def test_every_default_is_valid_and_round_trips():
    cfg = TrainConfig().validate()
    assert TrainConfig.from_dict(cfg.to_dict()).validate() == cfg


def test_paper_preset_is_the_claimed_method():
    cfg = TrainConfig.from_dict(PRESETS["cpcl-paper"]).validate()
    assert (cfg.method, cfg.forward_prediction, cfg.per_sample_prototypes, cfg.mt_weight()) == ("cpcl", "teacher", True, 0.0)
    assert (cfg.lambda_max, cfg.beta, cfg.scale, cfg.detach_features) == (0.1, 10.0, 20.0, False)
    default = TrainConfig.from_dict(PRESETS["cpcl-default"]).validate()
    plain = TrainConfig().validate()  # the spelled-out default trains what the default trains
    assert dataclasses.replace(default, consistency_weight=None, copy_paste=None) == plain and default.mt_weight() == plain.mt_weight()
    assert default.uses_copy_paste() and plain.uses_copy_paste() and not cfg.uses_copy_paste()  # the paper: no copy-paste
    assert not TrainConfig.from_dict(PRESETS["mean-teacher"]).uses_copy_paste()  # the plain baseline


def test_config_flag_takes_a_preset_name(tmp_path):
    args = cli.build_parser().parse_args(["train", "--labeled", "a.nrrd", "a.seg.nrrd", "--out", str(tmp_path / "m.pt"),
                                          "--config", "cpcl-paper", "--iterations", "7"])
    cfg = cli.build_train_request(args).config
    assert cfg.forward_prediction == "teacher" and cfg.per_sample_prototypes and cfg.iterations == 7


def test_cli_flags_are_derived_from_train_config():
    parser = cli.build_parser()
    train = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "train")[1]
    flags = {opt for a in train._actions for opt in a.option_strings}
    for name, meta in settings.cli_settings():
        assert meta["flag"] in flags, name
    assert "--patch-size" in flags and "--minutes" in flags


def test_adding_a_setting_to_train_config_is_all_it_takes(monkeypatch, tmp_path):
    """A new field with a flag reaches the CLI parser and the trainer's config without other edits."""
    extended = dataclasses.make_dataclass(
        "TrainConfig", [("warmup_fraction", float, dataclasses.field(default=0.0, metadata={"flag": "--warmup-fraction", "help": "x"}))],
        bases=(TrainConfig,))
    monkeypatch.setattr(settings, "TrainConfig", extended)
    args = cli.build_parser().parse_args(["train", "--labeled", "a.nrrd", "a.seg.nrrd", "--out", str(tmp_path / "m.pt"),
                                          "--warmup-fraction", "0.25"])
    cfg = cli.build_train_request(args).config
    assert cfg.warmup_fraction == 0.25 and cfg.to_dict()["warmup_fraction"] == 0.25
    assert "warmup_fraction" in settings.setting_names() and settings.default_settings()["warmup_fraction"] == 0.0


def test_ranges_the_resume_set_and_the_network_keys_are_field_metadata(monkeypatch):
    """A new setting's valid range, whether ``--resume`` may change it and whether a model file records it as its
    network are declared on the field: ``validate``, ``resume`` and ``--init`` read them from there."""
    extended = dataclasses.make_dataclass("TrainConfig", [("warmup_fraction", float, dataclasses.field(
        default=0.0, metadata={"min": 0, "max": 1, "max_open": True, "resume_may_change": True, "network": "fixed"}))],
        bases=(TrainConfig,))
    monkeypatch.setattr(settings, "TrainConfig", extended)
    with pytest.raises(InputError, match=r"warmup_fraction must be in \[0, 1\), not 1.5"):
        extended(warmup_fraction=1.5).validate()
    assert extended(warmup_fraction=0.5).validate().warmup_fraction == 0.5
    assert "warmup_fraction" in settings.resume_may_change() and "seed" not in settings.resume_may_change()
    assert settings.network_keys("fixed")[-1] == "warmup_fraction" and "dropout" in settings.network_keys()
    from CPCLSegmentLib.resume import setting_flag

    assert setting_flag("warmup_fraction") == "warmup_fraction (network)" and setting_flag("lr") == "--lr"


def test_a_new_run_option_is_a_field_of_run_options_and_nothing_else(monkeypatch, tmp_path):
    """The places a new run option touches: its ``RunOptions`` field in ``settings.py`` (and, if the panel shows
    it, a widget in the ``.ui`` file whose ``cpclSetting`` names it). From the field alone, the ``train`` command
    line gets its flag, the ``TrainRequest`` carries it, the module's ``train(...)`` takes it as a keyword and
    gives it to the child by its flag, and the panel stores it and passes it on."""
    from CPCLSegmentModuleLib import options, panelsettings

    extended = dataclasses.make_dataclass("RunOptions", [("keep_inputs", bool, dataclasses.field(
        default=False, metadata={"applies": ("cli", "module", "panel"), "flag": "--keep-inputs", "help": "x"}))],
        bases=(settings.RunOptions,))
    monkeypatch.setattr(settings, "RunOptions", extended)
    args = cli.build_parser().parse_args(["train", "--labeled", "a.nrrd", "a.seg.nrrd", "--out", str(tmp_path / "m.pt"),
                                          "--keep-inputs"])
    assert cli.build_train_request(args).options.keep_inputs is True  # the command line -> the request
    module, config = options.split_settings({"keep_inputs": True, "lr": 1e-3})  # the console's keyword
    assert module["keep_inputs"] is True and config == {"lr": 1e-3}
    assert options.option_args(module) == ["--keep-inputs"]  # the module -> the child's command line
    assert options.option_args(options.module_settings()) == []  # defaults are not spelled out

    class Node:  # the parameter node's two calls the panel's settings use
        def __init__(self):
            self.values = {}

        def GetParameter(self, key):
            return self.values.get(key, "")

        def SetParameter(self, key, value):
            self.values[key] = value

    class Panel(panelsettings.PanelSettings):
        node = Node()

        def _json(self, key, default):
            return json.loads(self.node.GetParameter(key)) if self.node.GetParameter(key) else default

        def _set_json(self, key, value):
            self.node.SetParameter(key, json.dumps(value))

    panel = Panel()
    assert panel.is_setting("keep_inputs") and panel.default("keep_inputs") is False and not panel.train_values()["keep_inputs"]
    panel.set_setting("keep_inputs", True)  # what the widget bound to it does
    assert panel.train_values()["keep_inputs"] is True and "keep_inputs" in panelsettings.setting_names()


def test_settings_module_does_not_import_torch():
    code = "import sys; sys.path.insert(0, sys.argv[1]); import CPCLSegmentLib.settings; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "CPCLSegment")], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_minutes_plans_the_iterations_from_a_timed_step():
    import torch

    from CPCLSegmentLib.pace import iterations_for_minutes, step_seconds

    cfg = TrainConfig(minutes=0.2, patch_size=(16, 32, 32), width=4, device="cpu").validate()
    timed = []

    def timer(c, num_classes, device):  # real steps, timed in process time: the work, whatever else the machine runs
        timed.append(step_seconds(c, num_classes, device, clock=time.process_time))
        return timed[-1]

    n = iterations_for_minutes(cfg, 3, torch.device("cpu"), timer)
    assert len(timed) == 1 and timed[0] is not None and timed[0] > 0  # the run's own steps, timed once (no warm start)
    assert n >= 1 and n * timed[0] <= 12.0 < (n + 1) * timed[0]  # the most iterations that fit 0.2 minutes
