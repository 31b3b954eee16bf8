"""Starting points other than our own model files: MONAI Auto3DSeg checkpoints, MONAI bundles, MONAI backbones.

The fixtures are tiny random networks written the way those tools write them (read from their sources):
Auto3DSeg's segresnet ``segmenter.py`` saves ``torch.save({"state_dict", "config", "epoch", "best_metric"})``
with the network as ``config["network"]`` (``_target_`` + arguments) and, in a MONAIAuto3DSeg model folder,
``labels.csv`` beside ``model.pt``; a MONAI bundle is ``configs/inference.json`` (``network_def``, preprocessing
transforms), ``configs/metadata.json`` (``channel_def``) and ``models/model.pt`` (a state dict).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from CPCLSegmentLib import pipeline
from CPCLSegmentLib import io as cio
from CPCLSegmentLib.backbones import BackboneError, MonaiBackbone, make_spec
from CPCLSegmentLib.errors import ModelFileError
from CPCLSegmentLib.modelfile import build_from_record, load_model, save_model
from CPCLSegmentLib.prediction import Predictor
from CPCLSegmentLib.preparation import LabeledInput, TrainRequest, normalize
from CPCLSegmentLib.localmodels import find_auto3dseg_models
from CPCLSegmentLib.pretrained import read_starting_point, starting_state
from CPCLSegmentLib.settings import RunOptions, TrainConfig

from conftest import COARSE_SPACING, LUNGS, child_env

SEGRESNETDS = {"_target_": "SegResNetDS", "init_filters": 4, "blocks_down": [1, 1, 1], "norm": "INSTANCE_NVFUSER",
               "in_channels": 1, "out_channels": 3, "dsdepth": 2}
LABELS_CSV = ("LabelValue,Name,SegmentedPropertyCategoryCodeSequence.CodingSchemeDesignator\n"
              "1,right lung,SCT\n2,Spleen,SCT\n")


def auto3dseg_folder(folder, network=None, labels=True, **config_over):
    """A MONAIAuto3DSeg model folder: ``model.pt`` as Auto3DSeg's segmenter saves it, and ``labels.csv``."""
    from monai.networks.nets import SegResNetDS

    network = dict(network or SEGRESNETDS)
    torch.manual_seed(0)
    net = SegResNetDS(**{k: v for k, v in network.items() if k != "_target_"} | {"norm": "INSTANCE"})
    config = {"network": network, "normalize_mode": "range", "intensity_bounds": [-1000, 500], "modality": "ct",
              "resample_resolution": list(COARSE_SPACING), "roi_size": [64, 64, 16], "sigmoid": False,
              "class_names": ["right lung", "Spleen"], "orientation_ras": True, "bundle_root": "/x",
              "ckpt_path": "$@bundle_root + '/model'", "loss": {"_target_": "DiceCELoss", "softmax": "$not @sigmoid"}}
    config.update(config_over)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": net.state_dict(), "config": config, "epoch": 3, "best_metric": 0.5}, folder / "model.pt")
    if labels:
        (folder / "labels.csv").write_text(LABELS_CSV, encoding="utf-8")
    return folder


def bundle_folder(folder, network_def=None, channels=("background", "right lung", "left lung")):
    """A MONAI bundle: configs/inference.json + metadata.json, models/model.pt (a BasicUNet's state dict)."""
    from monai.networks.nets import BasicUNet

    network_def = network_def or {"_target_": "monai.networks.nets.BasicUNet", "spatial_dims": 3, "in_channels": 1,
                                  "out_channels": "@num_classes", "features": [4, 4, 8, 8, 16, 4]}
    (folder / "configs").mkdir(parents=True, exist_ok=True)
    (folder / "models").mkdir(exist_ok=True)
    inference = {
        "imports": ["$import glob"], "bundle_root": ".", "num_classes": len(channels),
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": network_def, "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": list(COARSE_SPACING), "mode": "bilinear"},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -1000, "a_max": 500, "b_min": 0.0,
             "b_max": 1.0, "clip": True}]},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [64, 64, 16], "sw_batch_size": 1}}
    (folder / "configs" / "inference.json").write_text(json.dumps(inference), encoding="utf-8")
    meta = {"network_data_format": {"outputs": {"pred": {"channel_def": {str(i): c for i, c in enumerate(channels)}}}}}
    (folder / "configs" / "metadata.json").write_text(json.dumps(meta), encoding="utf-8")
    torch.manual_seed(0)
    torch.save(BasicUNet(spatial_dims=3, in_channels=1, out_channels=len(channels), features=(4, 4, 8, 8, 16, 4)).state_dict(),
               folder / "models" / "model.pt")
    return folder


def default_recipe(**over):
    """The default CPCL recipe (copy-paste, mean-teacher term, prototypes) at test sizes."""
    cfg = dict(iterations=2, patch_size=(16, 32, 32), device="cpu", seed=0, labeled_batch=1, unlabeled_batch=1)
    cfg.update(over)
    return TrainConfig(**cfg)


def fine_tune(tmp_path, ct_path, seg_path, init, name, segments=LUNGS, **over):
    events = []
    req = TrainRequest(labeled=[LabeledInput(ct_path, seg_path)], unlabeled=[ct_path], out=str(tmp_path / name),
                       segments=list(segments), config=default_recipe(**over), options=RunOptions(init=str(init)))
    pipeline.train(req, events.append)
    return req.out, [e.get("message", "") for e in events]


def check_prediction(model_path, ct_path, n_classes):
    image = cio.read_image(ct_path)
    labels = Predictor(model_path).segment(image)
    assert labels.shape == sitk.GetArrayViewFromImage(image).shape
    assert labels.min() >= 0 and labels.max() < n_classes


def continues_and_predicts(tmp_path, ct_path, seg_path, init, name, backbone):
    """Fine-tuning from a model with exactly the run's segments continues from its weights; the result predicts."""
    out, messages = fine_tune(tmp_path, ct_path, seg_path, init, name)
    assert any("same segments, continuing" in m for m in messages)
    assert load_model(out)["network"]["backbone"] == backbone
    check_prediction(out, ct_path, 3)


# ----------------------------------------------------------------------------------------- the three kinds


def test_auto3dseg_model_folder_fine_tunes_with_the_default_recipe_and_predicts(tmp_path, ct_path, seg_path):
    auto3dseg_folder(tmp_path / "models" / "lungs-v1.0.0" / "model")  # the extension unpacks into a subfolder
    out, messages = fine_tune(tmp_path, ct_path, seg_path, tmp_path / "models" / "lungs-v1.0.0", "from_auto3dseg.pt")
    said = " ".join(messages)
    assert "its preprocessing is adopted" in said and "then sigmoid" in said
    assert "segments from the model: ['right lung']" in said and "new segments (new output channels): ['left lung']" in said
    assert "'Spleen'" in said and "--keep-model-segments" in said
    record = load_model(out)
    assert record["format_version"] == 2
    assert record["network"]["backbone"] == "SegResNetDS" and record["network"]["layout"] == "ras"
    assert record["normalization"] == {"scheme": "range", "low": -1000.0, "high": 500.0, "out_low": -1.0, "out_high": 1.0,
                                       "clip": False, "sigmoid": True}
    assert record["spacing"] == pytest.approx(COARSE_SPACING)
    assert [c["name"] for c in record["classes"]] == ["background"] + LUNGS
    check_prediction(out, ct_path, 3)
    # (a) our own model file with a MONAI backbone is itself a starting point: same segments continue its EMA
    continues_and_predicts(tmp_path, ct_path, seg_path, out, "again.pt", "SegResNetDS")


def test_bundle_folder_with_the_same_segments_continues_from_its_weights_and_predicts(tmp_path, ct_path, seg_path):
    bundle = bundle_folder(tmp_path / "lung_bundle")
    record = read_starting_point(str(bundle))
    assert record["network"]["backbone"] == "BasicUNet" and record["network"]["layout"] == "ras"
    assert record["normalization"] == {"scheme": "range", "low": -1000.0, "high": 500.0, "out_low": 0.0, "out_high": 1.0,
                                       "clip": True, "sigmoid": False}
    continues_and_predicts(tmp_path, ct_path, seg_path, bundle, "from_bundle.pt", "BasicUNet")


def test_keep_model_segments_adds_the_models_other_segments_as_outputs(tmp_path, ct_path, seg_path):
    folder = auto3dseg_folder(tmp_path / "m")
    out, messages = fine_tune(tmp_path, ct_path, seg_path, folder, "kept.pt", keep_model_segments=True)
    record = load_model(out)
    assert [c["name"] for c in record["classes"]] == ["background"] + LUNGS + ["Spleen"]
    assert record["network"]["num_classes"] == 4
    assert any("kept from the model besides yours: ['Spleen']" in m for m in messages)


def test_matched_segments_keep_their_output_rows_and_new_ones_get_fresh_rows(tmp_path):
    folder = auto3dseg_folder(tmp_path / "m")
    record = read_starting_point(str(folder))
    source = torch.load(folder / "model.pt", weights_only=True)["state_dict"]
    classes = [{"name": "background", "label_value": 0}, {"name": "Left lung", "label_value": 1},
               {"name": "SPLEEN", "label_value": 2}]
    cfg = TrainConfig(seed=0)
    state = starting_state(record, str(folder), classes, cfg, None, lambda e: None)
    w, b = state["student"]["net.up_layers.1.head.weight"], state["student"]["net.up_layers.1.head.bias"]
    assert torch.equal(w[0], source["up_layers.1.head.weight"][0]) and torch.equal(w[2], source["up_layers.1.head.weight"][2])
    assert not torch.equal(w[1], source["up_layers.1.head.weight"][1])  # "Left lung" is new (the model has the right one)
    assert torch.equal(b[2], source["up_layers.1.head.bias"][2])
    assert torch.equal(state["student"]["net.encoder.conv_init.weight"], source["encoder.conv_init.weight"])
    assert not any(k.startswith("net.up_layers.0.head") for k in state["student"])  # deep-supervision head dropped
    assert state["teacher"] is None and cfg.backbone["backbone"] == "SegResNetDS" and cfg.depth == 2


def test_label_map_segments_match_the_models_by_label_value(tmp_path):
    record = read_starting_point(str(auto3dseg_folder(tmp_path / "m")))
    classes = [{"name": "background", "label_value": 0}, {"name": "Label 2", "label_value": 2}]
    messages = []
    starting_state(record, "m", classes, TrainConfig(), None, lambda e: messages.append(e["message"]))
    assert "segments from the model: ['Label 2']" in messages[-1]


# ----------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("target", ["torch.nn.Identity", "os.system", "monai.networks.nets.UNet", "builtins.eval"])
def test_a_checkpoint_naming_a_class_outside_the_allow_list_is_refused_naming_the_file(tmp_path, target):
    folder = auto3dseg_folder(tmp_path / "m")
    data = torch.load(folder / "model.pt", weights_only=True)
    data["config"]["network"]["_target_"] = target
    torch.save(data, folder / "model.pt")
    with pytest.raises(BackboneError, match=rf"model\.pt: network class '{target}' is not allowed"):
        read_starting_point(str(folder))


@pytest.mark.parametrize("field,value", [("init_filters", "$__import__('os').system('true')"), ("blocks_down", "@evil"),
                                         ("preprocess", "torch.sigmoid"), ("act", {"_target_": "os.system"})])
def test_expressions_references_and_callables_in_a_network_config_are_refused(tmp_path, field, value):
    network = dict(SEGRESNETDS)
    folder = auto3dseg_folder(tmp_path / "m", network)
    data = torch.load(folder / "model.pt", weights_only=True)
    data["config"]["network"][field] = value
    torch.save(data, folder / "model.pt")
    with pytest.raises(BackboneError, match="model.pt"):
        read_starting_point(str(folder))


def test_a_bundle_with_an_arbitrary_target_or_expression_is_refused(tmp_path):
    bundle = bundle_folder(tmp_path / "b", {"_target_": "subprocess.Popen", "args": ["true"]})
    with pytest.raises(BackboneError, match=r"inference\.json: network class 'subprocess.Popen' is not allowed"):
        read_starting_point(str(bundle))
    bundle = bundle_folder(tmp_path / "c", {"_target_": "BasicUNet", "in_channels": 1, "out_channels": 3,
                                            "features": "$[4] * 6"})
    with pytest.raises(BackboneError, match="inference.json: network setting .*features is a configuration expression"):
        read_starting_point(str(bundle))


def test_a_pickled_object_is_never_unpickled(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"state_dict": {}, "config": {"network": torch.nn.Conv3d(1, 1, 1)}}, path)
    with pytest.raises(ModelFileError, match="weights_only=True"):
        read_starting_point(str(path))


def test_a_model_file_naming_a_non_allowed_backbone_is_refused(tmp_path):
    record = read_starting_point(str(bundle_folder(tmp_path / "b")))
    save_model(str(tmp_path / "good.pt"), record)
    assert load_model(str(tmp_path / "good.pt"))["network"]["backbone"] == "BasicUNet"
    record["network"] = dict(record["network"], backbone="os.system")
    save_model(str(tmp_path / "bad.pt"), record)
    with pytest.raises(ModelFileError, match=r"bad\.pt is not a valid CPCLSegment model file.*'os.system' is not allowed"):
        load_model(str(tmp_path / "bad.pt"))
    record["network"] = dict(record["network"], backbone="BasicUNet", args={"features": [4, 4, 8, 8, 16, 4], "act": "$print(1)"})
    save_model(str(tmp_path / "expr.pt"), record)
    with pytest.raises(ModelFileError, match=r"expr\.pt .*act is a configuration expression"):
        load_model(str(tmp_path / "expr.pt"))


# ------------------------------------------------------------------------------------- pieces, against MONAI


def test_auto3dseg_normalisations_equal_monais_transforms():
    from monai.transforms import NormalizeIntensity, ScaleIntensityRange

    rng = np.random.RandomState(0)
    x = rng.normal(100, 300, (6, 7, 8)).astype(np.float32)
    x[0] = 0
    ours = normalize(x, {"scheme": "range", "low": -250, "high": 250, "out_low": -1, "out_high": 1, "clip": False, "sigmoid": True})
    theirs = torch.sigmoid(ScaleIntensityRange(a_min=-250, a_max=250, b_min=-1, b_max=1, clip=False)(torch.from_numpy(x)))
    np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-5)
    ours = normalize(x, {"scheme": "zscore", "nonzero": True})
    np.testing.assert_allclose(ours, NormalizeIntensity(nonzero=True, channel_wise=True)(torch.from_numpy(x[None]))[0].numpy(), atol=1e-4)


def test_backbone_layout_shows_the_network_ras_xyz_arrays_and_maps_outputs_back():
    spec = make_spec("BasicUNet", {"features": [4, 4, 8, 8, 16, 4]}, 3, layout="ras")
    wrapped = MonaiBackbone(spec).eval()
    x = torch.randn(1, 1, 16, 32, 48)  # (z, y, x) of an LPS array
    logits, features = wrapped(x)
    with torch.no_grad():
        direct = wrapped.net(x.permute(0, 1, 4, 3, 2).flip((2, 3)))  # what MONAI feeds it: (x, y, z), RAS
    torch.testing.assert_close(logits, direct.flip((2, 3)).permute(0, 1, 4, 3, 2))
    assert features.shape == (1, wrapped.feature_channels, 8, 16, 24)  # level 1: half resolution


def test_find_auto3dseg_models_lists_name_modality_and_segments_without_downloading(tmp_path):
    auto3dseg_folder(tmp_path / "abdomen-v1.0.0" / "model")
    (tmp_path / "half-downloaded").mkdir()
    assert find_auto3dseg_models(str(tmp_path)) == [{"name": "abdomen-v1.0.0", "path": str(tmp_path / "abdomen-v1.0.0" / "model"),
                                                    "modality": "CT", "segments": ["right lung", "Spleen"]}]
    assert find_auto3dseg_models(str(tmp_path / "absent")) == []


def test_a_backbone_model_builds_from_its_record_through_the_allow_list(tmp_path, ct_path, seg_path):
    record = read_starting_point(str(bundle_folder(tmp_path / "b")))
    net = build_from_record(record)
    assert isinstance(net, MonaiBackbone) and net.config["backbone"] == "BasicUNet"


def test_listing_the_models_never_imports_torch(tmp_path):
    import subprocess
    import sys

    auto3dseg_folder(tmp_path / "brain-v1.0.0", modality="mri")
    code = ("import sys; from CPCLSegmentLib.localmodels import find_auto3dseg_models as f; "
            f"print(f({str(tmp_path)!r})[0]['modality'], 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), timeout=120)
    assert out.stdout.split() == ["MRI", "False"], out.stderr


def test_a_stopped_fine_tuning_of_a_bundle_resumes_with_its_own_settings(tmp_path, ct_path, seg_path):
    """--resume given nothing else continues with the interrupted run's settings (network, patch, recipe)."""
    bundle = bundle_folder(tmp_path / "b")
    out = str(tmp_path / "r.pt")
    seen = []
    first = TrainRequest(labeled=[LabeledInput(ct_path, seg_path)], unlabeled=[ct_path], out=out, segments=list(LUNGS),
                         config=default_recipe(iterations=4, checkpoint_every=1), options=RunOptions(init=str(bundle)))
    pipeline.train(first, seen.append, lambda: sum(e["event"] == "progress" for e in seen) >= 2)
    events = []
    again = TrainRequest(labeled=[LabeledInput(ct_path, seg_path)], unlabeled=[ct_path], out=out, segments=list(LUNGS),
                         config=TrainConfig(device="cpu"), settings_given=[], options=RunOptions(init=str(bundle), resume=True))
    assert pipeline.train(again, events.append)["status"] == "completed"
    assert [e["iteration"] for e in events if e["event"] == "progress"] == [3, 4]
    record = load_model(out)
    assert record["network"]["backbone"] == "BasicUNet" and record["patch_size"] == [16, 32, 32]
