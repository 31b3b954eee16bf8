"""Every training setting and every allowed choice, in one torch-free place.

``TrainConfig`` is the single source of the trainer's settings: the CLI's ``train`` flags, the ``--config``
file keys, the Slicer panel's settings and the model file's record are all derived from its fields. A field
whose ``metadata`` carries ``flag`` gets that command-line flag (with ``help``, and ``choices`` when given);
every field is a valid ``--config`` key. Its valid range (``min`` / ``max``), whether ``--resume`` may change it
(``resume_may_change``) and whether a model file records it as its network (``network``) are metadata too.
Adding a setting therefore means adding a field here (and a widget to the ``.ui`` file if the panel shows it)
and nothing else.

``RunOptions`` is the same for run options (how a run is run: the starting model, partial segments, the
supervised-only comparison, the cache): the ``train`` command's own flags, ``TrainRequest.options``, the
module's ``train(...)`` keywords and the panel's own settings derive from its fields.

Also here: the choices the CLI, the engine and the Slicer module share (methods, annotated slices, weights,
output formats, uncertainty scores; exit codes are the error classes' in ``errors``) and the named recipes (``PRESETS``) that ``--config NAME``
accepts. This module imports only the standard library, so the Slicer GUI process can read it without
loading torch.
"""

from __future__ import annotations

import functools
import math
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional, Tuple

from .errors import InputError

METHODS = ("cpcl", "mean_teacher", "supervised")
OPTIMIZERS = ("sgd", "adamw")
NORMS = ("instance", "batch", "group", "none")
FORWARD_PREDICTIONS = ("student", "teacher")
MAP_RESOLUTIONS = ("feature", "label")
ANNOTATED_SLICES = ("all", "auto", "axial", "coronal", "sagittal")
WEIGHTS = ("teacher", "best", "student")  # which weights of a model file segment: last teacher, validation-best, student
OUTPUT_FORMATS = (".seg.nrrd", ".nii.gz", ".nrrd", ".mha")
MODALITIES = ("auto", "ct", "mr", "other")
PROGRESS_MODES = ("bar", "json", "none")
CPU_BF16_CHOICES = ("auto", "on", "off")  # the cpu_bf16 setting
UNCERTAINTY_SCORES = ("entropy", "student_teacher", "label_disagreement", "prototype")
DEVICES = ("auto", "cpu", "cuda", "mps")  # the panel's and the module's devices (the command line also takes cuda:N)
LENGTH_MODES = ("minutes", "iterations")  # how the panel gives a run's length
SURFACES = ("cli", "module", "panel")  # where a run option applies (``RunOptions``)

IGNORE_INDEX = -1  # the label of unknown voxels (sparse labels, segments not annotated in a case)
COSINE_SCALE = 20.0  # s in softmax_k(s · cos(F(x), p^k)) (the method's value)
CPCL_CONSISTENCY = 1.0  # the mean-teacher term's weight inside the default CPCL recipe (BENCHMARKS.md, tuning round 2)
# Copy-paste runs shorter than this were measured below supervised-only (BENCHMARKS.md, "Short runs", 4 labeled,
# 3 seeds, validation cases): hippocampus at 300 iterations (one seed had not yet learned a class), left atrium at
# 500 (every seed) and 1000 (one seed 2.6 points below); at 1500 no seed of either was more than 0.2 below it and
# the validation means were above it. The default length is this threshold: the shortest run measured safe on both.
SHORT_COPY_PASTE_RUN = 1500


def _flag(flag: str, help: str, **extra: Any) -> Dict[str, Any]:
    return {"flag": flag, "help": help, **extra}


@dataclass
class TrainConfig:
    """Every trainer setting (the CLI's flags and ``--config`` file, the Slicer panel's settings).

    Defaults are the recipe the hippocampus benchmark selected on its validation split (BENCHMARKS.md);
    the reference's values are noted where they differ. ``metadata["flag"]``: the CLI flag of the setting.
    """

    method: str = field(default="cpcl", metadata=_flag("--method", "training method", choices=METHODS))
    iterations: int = field(default=SHORT_COPY_PASTE_RUN, metadata=_flag(
        "--iterations", f"training iterations (optimizer steps; default {SHORT_COPY_PASTE_RUN}: shorter semi-supervised runs "
        "scored below supervised-only on the benchmarks)", min=1, resume_may_change=True))
    # Train for about this long instead: the iteration count is planned from the measured step time (one GPU or
    # the CPU; not with torchrun). None: ``iterations`` decides.
    minutes: Optional[float] = field(default=None, metadata=_flag(
        "--minutes", "train for about this many minutes: the iteration count is planned from a timed step (overrides --iterations)",
        min=0, min_open=True, max=10**6, max_open=True))
    # (D, H, W) voxels, multiples of 2**depth; None = planned. The CLI flag takes X Y Z.
    patch_size: Optional[Tuple[int, int, int]] = field(
        default=None, metadata=_flag("--patch-size", "patch size in voxels, X Y Z (multiples of 16); default: planned", xyz=True))
    labeled_batch: int = field(default=2, metadata={"min": 1})
    unlabeled_batch: int = field(default=2, metadata={"min": 0})
    # optimisation (reference: SGD 0.01, momentum 0.9, wd 1e-4, poly 0.9; AdamW 3e-3 won on validation)
    optimizer: str = field(default="adamw", metadata={"choices": OPTIMIZERS})
    lr: float = field(default=3e-3, metadata=_flag("--lr", "learning rate", min=0, resume_may_change=True))
    momentum: float = field(default=0.9, metadata={"min": 0})
    weight_decay: float = field(default=1e-4, metadata={"min": 0})
    poly_power: float = field(default=0.9, metadata={"min": 0})
    lr_warmup: float = field(default=0.0, metadata={"min": 0})  # linear warm-up: a fraction (< 1) or number of iterations
    freeze_encoder: bool = field(default=False, metadata=_flag("--freeze-encoder", "with --init: train only the decoder and head"))
    keep_model_segments: bool = field(default=False, metadata=_flag(
        "--keep-model-segments", "with --init: keep the starting model's segments that yours do not name, as extra outputs "
        "(your labeled cases then count them as background where they do not label them)"))
    lambda_max: float = field(default=0.1, metadata={"min": 0})  # CPCL loss: L = L_s + λ(t)(L_fpc + β L_bpc) [+ ...]
    beta: float = field(default=10.0, metadata={"min": 0})
    rampup: float = field(default=0.4, metadata={"min": 0})  # ramp-up length: a fraction of the semi-supervised iterations (<= 1) or a number (> 1)
    # Supervised warm start: the first iterations train L_s alone (supervised-only steps), then the unlabeled terms
    # switch on and ramp up from there. A fraction of the iterations (< 1) or a number (>= 1).
    warm_start: float = field(default=0.0, metadata=_flag(
        "--warm-start", "train supervised-only for the first iterations, then add the unlabeled terms: a fraction of "
        "the iterations (< 1) or a number of iterations (default 0: none)", min=0))
    # mean-teacher MSE term's weight w_mt; None: CPCL_CONSISTENCY for cpcl, lambda_max for mean_teacher
    consistency_weight: Optional[float] = field(default=None, metadata={"min": 0})
    ema_decay: float = field(default=0.99, metadata={"min": 0, "max": 1, "max_open": True})
    scale: float = field(default=COSINE_SCALE, metadata={"min": 0})  # s, the cosine scale of the prototype maps
    per_sample_prototypes: bool = False
    forward_prediction: str = field(default="student", metadata={"choices": FORWARD_PREDICTIONS})  # whose P_u in L_fpc
    confidence_weighting: bool = True
    detach_features: bool = False  # ablation: the public reference's effective behaviour
    # where the cosine maps P_l2u / P_u2l are computed: "feature" = on the decoder feature grid, the K-channel
    # logits then upsampled trilinearly; "label" = features upsampled to the label grid first (the literal form)
    map_resolution: str = field(default="feature", metadata={"choices": MAP_RESOLUTIONS})
    use_forward: bool = True
    use_backward: bool = True
    # Cross-image copy-paste (bidirectional copy-paste, Bai et al. CVPR 2023), for cpcl and mean_teacher: labeled
    # patch i and unlabeled patch i are mixed through a box of copy_paste_size of the patch (inward for even i: the
    # unlabeled box pasted into the labeled patch; outward for odd i); the student learns the ground truth where it
    # is known (term "paste", weight 1, or r(t) with copy_paste_ramp) and the teacher's pseudo-label elsewhere
    # ("paste_pseudo", copy_paste_weight · r(t)). None (the default): on for cpcl, where it won on the validation cases
    # of both benchmarks, off for mean_teacher (the plain baseline); ``uses_copy_paste()``.
    copy_paste: Optional[bool] = None
    copy_paste_weight: float = field(default=0.5, metadata={"min": 0})
    copy_paste_ramp: bool = False
    copy_paste_size: float = field(default=2.0 / 3.0, metadata={"min": 0, "min_open": True, "max": 1, "max_open": True})
    # network (reference: width 16, depth 4, batch norm, feature level 1, dropout 0.5). metadata "network": a model file
    # records it; "fixed": fixed by a starting model (--init; another value given is refused), "adopted": taken from it
    width: int = field(default=16, metadata=_flag("--width", "network width (channels of the first stage)", min=1, network="fixed"))
    depth: int = field(default=4, metadata={"min": 1, "max": 6, "network": "fixed"})
    norm: str = field(default="instance", metadata={"choices": NORMS, "network": "fixed"})
    feature_level: int = field(default=1, metadata={"network": "fixed"})  # in [0, depth - 1] (validate)
    dropout: float = field(default=0.0, metadata={"min": 0, "max": 1, "max_open": True, "network": "adopted"})
    # A MONAI network instead of the VNet (``backbones``: an allow-listed class, its arguments, the feature level and
    # array layout), set by ``--init`` from an Auto3DSeg / bundle / MONAI-backbone model; None: the VNet above.
    backbone: Optional[Dict[str, Any]] = None
    foreground_oversample: float = field(default=0.33, metadata={"min": 0, "max": 1})  # data: as nnU-Net
    # Mirroring and rot90 are off by default: they swap left/right (lungs, kidneys) and anterior/posterior (hippocampus
    # head/body), so a flipped patch teaches the wrong class. On for symmetric single-structure tasks (the left atrium).
    flip: bool = False
    rot90: bool = False
    intensity_prob: float = field(default=0.5, metadata={"min": 0, "max": 1})  # probability of each intensity augmentation (student views; reference: none)
    strong_unlabeled: bool = True  # student sees an intensity-augmented view of X_u, the teacher a clean one
    teacher_noise: float = field(default=0.0, metadata={"min": 0})  # σ of clipped Gaussian noise on the teacher input (reference 0.1)
    # run
    seed: int = field(default=0, metadata=_flag("--seed", "random seed (weights, patches, augmentation)", min=0, max=2**32 - 1))
    # "resume_may_change": ``--resume`` may change it (length, learning rate, reporting, device); others are refused
    device: str = field(default="auto", metadata={"resume_may_change": True})  # auto | cpu | cuda | cuda:N | mps (--device)
    amp: bool = field(default=True, metadata={"resume_may_change": True})  # CUDA: bf16 / fp16 autocast by compute capability (``precision``); False: fp32 everywhere
    # bf16 autocast on a CPU with native bf16 (AMX-BF16 / AVX512-BF16; elsewhere fp32, saying why): auto | on | off
    cpu_bf16: str = field(default="off", metadata={"choices": CPU_BF16_CHOICES, "resume_may_change": True})
    channels_last: bool = field(default=True, metadata={"resume_may_change": True})  # channels_last_3d: CUDA and CPU
    compile: bool = field(default=False, metadata={"resume_may_change": True})
    # processes sampling patches ahead of the step (torch DataLoader workers); None: none (4 is the GPU check's setting)
    sampling_workers: Optional[int] = field(default=None, metadata={"min": 0, "resume_may_change": True})
    # 0: about 10 times per run when validation cases (a checkpoint path) are given
    validation_every: int = field(default=0, metadata={"min": 0, "resume_may_change": True})
    checkpoint_every: int = field(default=0, metadata={"min": 0, "resume_may_change": True})
    # MONAI's sliding window needs overlap < 1
    validation_overlap: float = field(default=0.25, metadata={"min": 0, "max": 1, "max_open": True, "resume_may_change": True})

    # ------------------------------------------------------------------------------------ checks

    def validate(self) -> "TrainConfig":
        """Raises ``InputError`` listing every invalid field (wrong type or out of range); returns self."""
        errs = [e for f in fields(self) for e in _type_errors(f.name, getattr(self, f.name), _field_types()[f.name])]
        if errs:  # ranges only make sense once the types are right
            raise InputError("invalid training settings: " + "; ".join(errs))
        for f in fields(self):
            value = getattr(self, f.name)
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                errs.append(f"{f.name} must be one of {', '.join(choices)}, not {value!r}")
            if value is not None and not in_range(value, f.metadata):
                errs.append(f"{f.name} must be {range_text(f.metadata, field_type(f.name) is float)}, not {value!r}")
        if 1 <= self.depth <= 6 and not 0 <= self.feature_level < self.depth:
            errs.append(f"feature_level must be in [0, depth - 1 = {self.depth - 1}], not {self.feature_level}")
        if self.patch_size is not None:
            m = 2 ** self.depth if 1 <= self.depth <= 6 else 16
            if len(self.patch_size) != 3 or any(p < m or p % m for p in self.patch_size):
                errs.append(f"patch_size must be three multiples of {m} (2**depth), not {list(self.patch_size)}")
            elif self.norm == "instance" and all(p == m for p in self.patch_size):
                errs.append(f"patch_size {list(self.patch_size)} is a single voxel at the network's deepest level, where instance "
                            f"normalisation has nothing to normalise: make at least one side {2 * m}")
            else:
                self.patch_size = tuple(int(p) for p in self.patch_size)
        if self.backbone is not None and not (isinstance(self.backbone, dict) and isinstance(self.backbone.get("backbone"), str)):
            errs.append(f"backbone must be a mapping naming a MONAI network ('backbone': 'SegResNetDS', ...), not {self.backbone!r:.80}")
        if not (self.device in ("auto", "cpu", "mps", "cuda") or (self.device.startswith("cuda:") and self.device[5:].isdigit())):
            errs.append(f"device must be auto, cpu, cuda, cuda:N or mps, not {self.device!r}")
        if errs:
            raise InputError("invalid training settings: " + "; ".join(errs))
        return self

    # ------------------------------------------------------------------------------ conversions

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        if d["patch_size"] is not None:
            d["patch_size"] = list(d["patch_size"])
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        """From a ``--config`` mapping: unknown keys are an ``InputError`` (types: ``validate``)."""
        unknown = sorted(set(d) - set(setting_names()))
        if unknown:
            raise InputError(f"unknown training setting(s): {', '.join(unknown)} (known: {', '.join(setting_names())})")
        d = dict(d)
        for k, v in d.items():  # YAML 1.1 reads 3e-3 as text: accept number literals for float settings
            if isinstance(v, str) and field_type(k) is float:
                try:
                    d[k] = float(v)
                except ValueError:
                    pass
        cfg = cls(**d)
        if isinstance(cfg.patch_size, list):
            cfg.patch_size = tuple(cfg.patch_size)
        return cfg

    def network_config(self, num_classes: int, in_channels: int = 1) -> Dict[str, Any]:
        if self.backbone is not None:
            return dict(self.backbone, in_channels=in_channels, num_classes=num_classes)
        return dict(
            in_channels=in_channels, num_classes=num_classes, width=self.width, depth=self.depth, norm=self.norm,
            feature_level=self.feature_level, dropout=self.dropout,
        )

    def warm_start_iterations(self) -> int:
        """W, the supervised-only iterations a semi-supervised run starts with (``warm_start``; at most all of them)."""
        if self.method == "supervised":
            return 0
        w = self.warm_start * self.iterations if self.warm_start < 1 else self.warm_start
        return int(min(w, self.iterations))

    def lr_warmup_iterations(self) -> float:
        """The learning-rate warm-up's length in iterations: ``lr_warmup`` × iterations when < 1, else ``lr_warmup``."""
        return self.lr_warmup * self.iterations if self.lr_warmup < 1 else self.lr_warmup

    def rampup_iterations(self) -> float:
        """The ramp-up length T in iterations, counted from the end of the warm start W: ``rampup`` × (iterations - W)
        when ``rampup`` <= 1, else ``rampup``."""
        return self.rampup * (self.iterations - self.warm_start_iterations()) if self.rampup <= 1 else self.rampup

    def uses_copy_paste(self) -> bool:
        """Whether steps mix labeled and unlabeled patches: ``copy_paste`` if given, else on for cpcl only."""
        if self.method == "supervised":
            return False
        return bool(self.copy_paste) if self.copy_paste is not None else self.method == "cpcl"

    def mt_weight(self) -> float:
        """The weight of the mean-teacher MSE term (0: the term is not computed)."""
        if self.consistency_weight is not None:
            return float(self.consistency_weight)
        return {"mean_teacher": self.lambda_max, "cpcl": CPCL_CONSISTENCY}.get(self.method, 0.0)


def _option(default: Any, applies: Tuple[str, ...], help: str, flag: Optional[str] = None, **extra: Any) -> Any:
    return field(default=default, metadata={"applies": applies, "help": help, **({"flag": flag} if flag else {}), **extra})


CLI, MODULE, PANEL = ("cli",), ("module",), ("panel",)


@dataclass
class RunOptions:
    """Every run option: how a training run is run, beside what the trainer learns (``TrainConfig``).

    The single source of the ``train`` command's own flags, the ``TrainRequest``'s ``options``, the module's
    ``train(...)`` keywords (``CPCLSegmentModuleLib/options.py``) and the panel's own settings
    (``panelsettings.py``). ``metadata["applies"]``: where the option exists: ``"cli"`` (a ``train`` flag,
    ``flag``, and part of the request), ``"module"`` (a keyword of the module's train API; given to the child
    process by its flag when the command line has it too), ``"panel"`` (a panel setting in the parameter node,
    shown by the ``.ui`` widget whose ``cpclSetting`` names it). ``help``, ``choices``, ``nargs`` / ``metavar``
    as for ``argparse``; ``every_command``: a flag of every command, not only ``train``.
    """

    device: str = _option("auto", CLI + MODULE + PANEL, "auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N or mps",
                          "--device", choices=DEVICES, every_command=True)
    init: Optional[str] = _option(None, CLI + MODULE + PANEL, (
        "model to fine-tune from: a CPCLSegment model file, a MONAI Auto3DSeg segresnet checkpoint (model.pt, or its "
        "MONAIAuto3DSeg model folder) or a MONAI bundle folder; its spacing and intensity normalisation are adopted, its "
        "segments matched to yours by name (new ones get new outputs)"), "--init")
    partial_segments: bool = _option(False, CLI + MODULE + PANEL, "a segment missing from a case means 'not annotated there', "
                                     "not 'absent'", "--partial-segments")
    # The module holds out its last case as a validation case (the command line names validation cases itself).
    hold_out_last: bool = _option(False, MODULE + PANEL, "score the model on the last case instead of training on it")
    # Off unless asked, on every surface (it adds a supervised-only run, about 0.4x the time). Without it, a run with
    # validation cases says how to check that the unlabeled volumes help.
    compare_supervised: bool = _option(False, CLI + MODULE + PANEL, "also train supervised-only; keep the better on the "
                                       "validation cases", "--compare-supervised")
    # A later segment in the list wins where segments overlap (organ, then lesion inside it), instead of an error.
    later_wins: bool = _option(False, MODULE + PANEL, "a later segment wins where segments overlap")
    modality: str = _option("auto", CLI, "intensity normalisation (auto: CT if it has air at -1000)", "--modality", choices=MODALITIES)
    spacing: Optional[List[float]] = _option(None, CLI + MODULE, "target spacing in mm (default: median of the labeled cases)",
                                             "--spacing", nargs=3, metavar=("X", "Y", "Z"))
    resume: bool = _option(False, CLI, "continue an interrupted run from <out>.checkpoint.pt", "--resume")
    retry_smaller_on_oom: bool = _option(False, CLI, "on out-of-memory, retry once with half the patch size", "--retry-smaller-on-oom")
    # {CACHE_DIR_ENV} and the like: filled in by the parser (``cli_args``) from ``prepcache``
    cache_dir: Optional[str] = _option(None, CLI + MODULE, (
        "preprocessing cache folder, kept and reused across runs (default: ${CACHE_DIR_ENV}, else the per-user cache folder, "
        "e.g. ~/.cache/cpcl-segment; `cpcl-segment cache` lists it)"), "--cache-dir")
    cache_limit: Optional[str] = _option(None, CLI, (
        "size limit of the preprocessing cache, e.g. 50GB (default: ${CACHE_LIMIT_ENV}, else {DEFAULT_LIMIT}); least recently "
        "used cases go first"), "--cache-limit", metavar="SIZE")
    work_dir: Optional[str] = _option(None, CLI, "the same as --cache-dir (older name)", "--work-dir")
    length_mode: str = _option("minutes", PANEL, "the run's length in minutes (planned from a timed step) or iterations",
                               choices=LENGTH_MODES)
    prefill: bool = _option(False, PANEL, "label next: start from the model's segmentation of the volume")


def run_options(where: str) -> List[Tuple[str, Dict[str, Any]]]:
    """``(name, metadata)`` of the run options that apply ``where`` (``"cli"``, ``"module"``, ``"panel"``)."""
    if where not in SURFACES:
        raise ValueError(f"where must be one of {', '.join(SURFACES)}, not {where!r}")
    return [(f.name, dict(f.metadata)) for f in fields(RunOptions) if where in f.metadata["applies"]]


def run_option_defaults(where: str) -> Dict[str, Any]:
    """The default of every run option that applies ``where``."""
    defaults = RunOptions()
    return {name: getattr(defaults, name) for name, _ in run_options(where)}


def run_option_type(name: str) -> Any:
    """The Python type of a run option's value (``Optional[...]`` unwrapped; a list's: its items' type)."""
    t = typing.get_type_hints(RunOptions)[name]
    args = [a for a in typing.get_args(t) if a is not type(None)]
    if typing.get_origin(t) is typing.Union and len(args) == 1:
        t = args[0]
    return typing.get_args(t)[0] if typing.get_origin(t) in (list, tuple) else t


def in_range(value: Any, meta: Dict[str, Any]) -> bool:
    """Whether a number is within its field's ``min`` / ``max`` metadata (``min_open`` / ``max_open``: the bound
    itself excluded); a float must also be finite. Values of fields without bounds are in range."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or ("min" not in meta and "max" not in meta):
        return True
    if isinstance(value, float) and not math.isfinite(value):
        return False
    lo, hi = meta.get("min"), meta.get("max")
    above = lo is None or (value > lo if meta.get("min_open") else value >= lo)
    below = hi is None or (value < hi if meta.get("max_open") else value <= hi)
    return above and below


def range_text(meta: Dict[str, Any], is_float: bool) -> str:
    """The valid values of a bounded field in words: ``>= 0``, ``a finite number >= 0``, ``from 1 to 6``, ``in [0, 1)``."""
    lo, hi = meta.get("min"), meta.get("max")
    if hi is None:
        return ("a finite number " if is_float else "") + (">" if meta.get("min_open") else ">=") + f" {lo}"
    if not is_float and not meta.get("min_open") and not meta.get("max_open"):
        return f"a whole number from {lo} to {hi}"
    return f"in {'(' if meta.get('min_open') else '['}{lo}, {hi}{')' if meta.get('max_open') else ']'}"


def setting_names() -> List[str]:
    return [f.name for f in fields(TrainConfig)]


def network_keys(kind: Optional[str] = None) -> List[str]:
    """The settings a model file records as its network (``network`` metadata), or only those of ``kind``:
    ``"fixed"`` (a starting model fixes them) or ``"adopted"`` (the starting model's value is taken)."""
    return [f.name for f in fields(TrainConfig) if f.metadata.get("network") and kind in (None, f.metadata["network"])]


def resume_may_change() -> List[str]:
    """The settings ``--resume`` may change in an interrupted run (``resume_may_change`` metadata)."""
    return [f.name for f in fields(TrainConfig) if f.metadata.get("resume_may_change")]


def default_settings() -> Dict[str, Any]:
    """The default value of every setting."""
    return TrainConfig().to_dict()


def cli_settings() -> List[Tuple[str, Dict[str, Any]]]:
    """``(field name, metadata)`` of the settings that have a command-line flag, in declaration order."""
    return [(f.name, dict(f.metadata)) for f in fields(TrainConfig) if f.metadata.get("flag")]


def field_type(name: str) -> Any:
    """The Python type of a setting (``int``, ``float``, ``bool``, ``str``; ``Optional[...]`` unwrapped)."""
    t = _field_types()[name]
    args = [a for a in typing.get_args(t) if a is not type(None)]
    return args[0] if typing.get_origin(t) is typing.Union and len(args) == 1 else t


def _field_types() -> Dict[str, Any]:
    return _type_hints(TrainConfig)


@functools.lru_cache(maxsize=8)
def _type_hints(cls: type) -> Dict[str, Any]:
    """A class's field types, evaluated once per class: ``get_type_hints`` evaluates every annotation each call, and a
    check calls this per field (a second per Train click on Slicer's GUI thread before it was cached). Read only."""
    return typing.get_type_hints(cls)


def _type_errors(name: str, value: Any, t: Any) -> List[str]:
    """Strict type check of one setting (JSON / YAML values): no strings for numbers, no 2.5 for an int,
    no "yes" for a bool; an int is accepted where a float is expected."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return []
        inner = [a for a in args if a is not type(None)]
        return _type_errors(name, value, inner[0]) if len(inner) == 1 else []
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [f"{name} must be a list of whole numbers, not {value!r}"]
        return []
    if t is bool:
        return [] if isinstance(value, bool) else [f"{name} must be true or false, not {value!r}"]
    if t is int:
        return [] if isinstance(value, int) and not isinstance(value, bool) else [f"{name} must be a whole number, not {value!r}"]
    if t is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return [] if ok else [f"{name} must be a number, not {value!r}"]
    if t is str:
        return [] if isinstance(value, str) else [f"{name} must be text, not {value!r}"]
    return []


# Named recipes for ``--config NAME`` (a mapping of settings, applied like a config file).
PRESETS: Dict[str, Dict[str, Any]] = {
    # The method exactly as claimed (``../shared/design.md``): L = L_s + λ(t)(L_fpc + β L_bpc) with the teacher's
    # P_u in the forward loss, per-sample prototypes (labeled sample i with unlabeled sample i, as the reference
    # pairs them) and no extra term; reference weights λ_max 0.1, β 10.
    "cpcl-paper": dict(method="cpcl", forward_prediction="teacher", per_sample_prototypes=True, consistency_weight=0.0,
                       lambda_max=0.1, beta=10.0, confidence_weighting=True, use_forward=True, use_backward=True,
                       detach_features=False, copy_paste=False),
    # Today's default CPCL recipe, spelled out (what ``method: cpcl`` with no other setting trains).
    "cpcl-default": dict(method="cpcl", forward_prediction="student", per_sample_prototypes=False,
                         consistency_weight=CPCL_CONSISTENCY, copy_paste=True),
    "mean-teacher": dict(method="mean_teacher", copy_paste=False),
    "supervised": dict(method="supervised"),
}


def _check_defaults() -> None:  # every field has a default (the CLI and the panel rely on it); options say where they apply
    for cls in (TrainConfig, RunOptions):
        for f in fields(cls):
            if f.default is MISSING and f.default_factory is MISSING:  # pragma: no cover - a programming error
                raise TypeError(f"{cls.__name__}.{f.name} needs a default")
    for f in fields(RunOptions):
        applies = f.metadata.get("applies") or ()
        if not applies or set(applies) - set(SURFACES) or ("cli" in applies and not f.metadata.get("flag")):
            raise TypeError(f"RunOptions.{f.name}: 'applies' must name {', '.join(SURFACES)}; a 'cli' option needs a flag")  # pragma: no cover


_check_defaults()
