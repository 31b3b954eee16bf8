"""Sliding-window prediction on the CPU: channels-last 3D against the contiguous layout, side by side in ONE process.

Training steps are faster in channels-last 3D on the CPU (``bench/cpu_step.py``); this measures whether the
Segment path would gain as well before it changes. The same VNet (random weights: the time does not depend on
them) predicts the same volume through ``inference.predict_probabilities`` (MONAI sliding window, overlap 0.5,
Gaussian blending, softmax, accumulation on the CPU), once as the engine runs it (``contiguous``) and once with
the network and every window in channels-last 3D (``channels_last``). The two alternate within every repeat
(the order rotating); medians of wall and process CPU time, and the largest difference of the probabilities.

Scenarios: the CPU plan on the hippocampus (width 8, patch 32x48x32, a 48x64x48 volume) and on the left atrium
(width 8, patch 32x64x80, 88x144x144), and a width-16 model (the CUDA plan's width) on 48x64x48 windows of a
64x96x96 volume.

Usage::

    python bench/predict_layout.py --threads 2 --repeats 5      # results/predict_layout.json
    python bench/predict_layout.py --smoke                       # CI: tiny sizes
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from speed_common import RESULTS_DIR, Clock, machine_info, median, set_threads, write_json  # noqa: E402

from CPCLSegmentLib.inference import predict_probabilities  # noqa: E402
from CPCLSegmentLib.network import VNet  # noqa: E402

SCENARIOS = {  # name -> (width, patch (D, H, W), volume (D, H, W), classes with the background)
    "hippocampus_cpu_plan": (8, (32, 48, 32), (48, 64, 48), 3),
    "left_atrium_cpu_plan": (8, (32, 64, 80), (88, 144, 144), 2),
    "width16": (16, (48, 64, 48), (64, 96, 96), 3),
}
SMOKE = {"smoke": (4, (32, 32, 32), (40, 40, 40), 3)}


class ChannelsLast(nn.Module):
    """The network in channels-last 3D, each window converted before it enters (what the engine would do)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net.to(memory_format=torch.channels_last_3d)

    def forward(self, x: torch.Tensor):
        return self.net(x.contiguous(memory_format=torch.channels_last_3d))


def measure(width: int, patch, shape, classes: int, repeats: int, log=print):
    torch.manual_seed(0)
    base = VNet(1, classes, width=width, depth=4).eval()
    twin = VNet(1, classes, width=width, depth=4).eval()
    twin.load_state_dict(base.state_dict())
    nets = {"contiguous": base, "channels_last": ChannelsLast(twin)}
    image = np.random.RandomState(0).standard_normal(shape).astype(np.float32)
    rows = {name: {"wall": [], "cpu": []} for name in nets}
    probs = {}
    names = list(nets)
    for name in names:  # untimed: oneDNN primitive creation
        probs[name] = predict_probabilities(nets[name], image, patch, torch.device("cpu"))
    for rep in range(repeats):
        for name in names[rep % 2:] + names[:rep % 2]:
            with Clock() as c:
                predict_probabilities(nets[name], image, patch, torch.device("cpu"))
            rows[name]["wall"].append(c.wall)
            rows[name]["cpu"].append(c.cpu)
    summary = {name: {"median_wall_s": median(r["wall"]), "median_cpu_s": median(r["cpu"])} for name, r in rows.items()}
    ratio = {kind: summary["channels_last"][f"median_{kind}_s"] / summary["contiguous"][f"median_{kind}_s"]
             for kind in ("wall", "cpu")}
    diff = float((probs["channels_last"] - probs["contiguous"]).abs().max())
    log(f"width {width}, patch {patch}, volume {shape}, K {classes}: contiguous {summary['contiguous']['median_wall_s']:.3f} s, "
        f"channels-last {summary['channels_last']['median_wall_s']:.3f} s: {ratio['wall']:.2f}x wall, {ratio['cpu']:.2f}x CPU; "
        f"max |Δp| {diff:.1e}")
    # a 3x3x3 kernel over several channels (a one-channel kernel is both layouts at once)
    conv = {name: next(w for w in net.parameters() if w.dim() == 5 and w.shape[1] > 1 and w.shape[2] > 1)
            for name, net in nets.items()}
    layout = {name: "channels_last_3d" if w.is_contiguous(memory_format=torch.channels_last_3d) and not w.is_contiguous()
              else "contiguous" for name, w in conv.items()}
    return {"width": width, "weight_layout": layout, "patch": list(patch), "volume": list(shape), "classes": classes, "raw": rows,
            "summary": summary, "channels_last_over_contiguous": ratio, "max_abs_probability_difference": diff}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="timed predictions per layout and scenario")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--quiet", action="store_true", help="accepted for the smoke tests")
    p.add_argument("--out", default=str(RESULTS_DIR / "predict_layout.json"))
    args = p.parse_args(argv)
    threads = set_threads(args.threads)
    scenarios = SMOKE if args.smoke else SCENARIOS
    repeats = 2 if args.smoke else args.repeats
    results = {name: measure(*spec, repeats=repeats) for name, spec in scenarios.items()}
    write_json(Path(args.out), {"machine": machine_info(), "threads": threads, "repeats": repeats, "smoke": args.smoke,
                                "scenarios": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
