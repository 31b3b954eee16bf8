"""Planning: the parameter count behind the memory estimate is the real network's."""

import pytest

from CPCLSegmentLib.network import VNet, count_parameters
from CPCLSegmentLib.planning import count_params, estimate_memory, format_bytes, plan_patch_size


@pytest.mark.parametrize("width,depth,num_classes", [(4, 1, 2), (8, 3, 4), (16, 4, 3), (8, 5, 14)])
def test_count_params_on_meta_equals_the_built_network(width, depth, num_classes):
    net = VNet(num_classes=num_classes, width=width, depth=depth, feature_level=0)
    assert count_params(width, depth, num_classes) == count_parameters(net)


# (estimate_memory arguments, total bytes and the shown size as estimated before parameters were counted on
# the meta device: the former formula counted the norm parameters of each down / up convolution twice,
# 2 (w_i + w_i+1) too many per level, about 0.015 % of the parameters and 1e-5 of the estimate). The two
# mixed-precision (CUDA) rows also count the fp32 copies of the student's half-precision logits that the losses read;
# the CPU rows count the 1 GiB process base (512 MiB more than when they were recorded).
BEFORE = [
    (((64, 64, 64), 2, 2, 16, 4, 3, "cpcl", "sgd", False, "cpu"), 2153392060 + 512 * 2**20, "2.5 GiB"),
    (((128, 128, 128), 2, 2, 16, 4, 3, "cpcl", "sgd", True, "cuda"), 8507507755, "7.9 GiB"),
    (((32, 32, 32), 2, 2, 8, 4, 3, "supervised", "adamw", False, "cpu"), 642433736 + 512 * 2**20, "1.1 GiB"),
    (((16, 64, 64), 2, 2, 8, 4, 4, "mean_teacher", "adamw", False, "cpu"), 790616309 + 512 * 2**20, "1.2 GiB"),
    (((96, 160, 160), 2, 2, 32, 5, 14, "cpcl", "sgd", True, "cuda"), 26719683354, "24.9 GiB"),
]


@pytest.mark.parametrize("args,total,shown", BEFORE)
def test_memory_estimate_is_what_it_was(args, total, shown):
    est = estimate_memory(*args)["total"]
    assert est == pytest.approx(total, rel=1e-4) and format_bytes(est) == shown


def test_the_largest_volume_counts_on_the_cpu_only():
    """Preprocessing holds the largest volume in the process: on the CPU the estimate adds
    ``CPU_BYTES_PER_VOLUME_VOXEL`` per voxel of it (a 512x512x300 CT: 900 MiB), the GPU's does not change; the
    largest volume is taken on its own grid or at the target spacing, whichever has more voxels."""
    from CPCLSegmentLib.planning import CPU_BYTES_PER_VOLUME_VOXEL, largest_volume_voxels

    args = ((32, 48, 32), 2, 2, 8, 4, 3, "cpcl", "sgd", False)
    ct = 512 * 512 * 300
    cpu, cpu_ct = estimate_memory(*args, "cpu", True), estimate_memory(*args, "cpu", True, ct)
    assert cpu_ct["volume"] == CPU_BYTES_PER_VOLUME_VOXEL * ct and cpu["volume"] == 0.0
    assert cpu_ct["total"] - cpu["total"] == pytest.approx(900 * 2**20, rel=1e-3)
    assert estimate_memory(*args, "cuda", True, ct)["total"] == estimate_memory(*args, "cuda", True)["total"]
    grids = [((512, 512, 300), (0.7, 0.7, 1.0)), ((128, 128, 34), (3.0, 3.0, 10.0))]
    assert largest_volume_voxels(grids, (1.4, 1.4, 2.0)) == ct  # coarser target: the image grid is larger
    assert largest_volume_voxels(grids, (1.5, 1.5, 2.5)) == ct
    assert largest_volume_voxels(grids[1:], (1.5, 1.5, 5.0)) == 256 * 256 * 68  # finer target: the model grid
    assert largest_volume_voxels([], None) == 0.0


def test_planned_patches_are_what_they_were():
    plans = [((40, 56, 40), (1, 1, 1), "cpu", (32, 48, 32)), ((300, 512, 512), (0.8, 0.8, 1.5), "cuda", (128, 128, 128)),
             ((34, 128, 128), (3, 3, 10), "cpu", (16, 96, 96)), ((200, 256, 256), (1, 1, 1), "cuda", (128, 128, 128))]
    for shape, spacing, device, patch in plans:
        assert plan_patch_size(shape, spacing, 4, device, 16, 3)[0] == patch


def test_copy_paste_counts_the_students_mixed_patches():
    """With ``copy_paste`` the student also runs one mixed patch per labeled/unlabeled pair (2 + 2 + 2 patches):
    the memory estimate and the planned GPU patch include them (the timed step is a real one: ``pace``); supervised-only
    ignores it."""
    import torch

    args = ((64, 64, 64), 2, 2, 16, 4, 3, "cpcl", "sgd", False, "cpu")
    plain, mixed = estimate_memory(*args), estimate_memory(*args, copy_paste=True)
    assert mixed["activations"] == pytest.approx(plain["activations"] * 6 / 4) and mixed["teacher"] == plain["teacher"]
    sup = args[:6] + ("supervised",) + args[7:]
    assert estimate_memory(*sup, copy_paste=True)["total"] == estimate_memory(*sup)["total"]
    small = plan_patch_size((300, 512, 512), (0.8, 0.8, 1.5), 4, "cuda", 16, 3, copy_paste=True, memory_budget=8 * 2**30)[0]
    assert torch.Size(small).numel() < torch.Size(plan_patch_size((300, 512, 512), (0.8, 0.8, 1.5), 4, "cuda", 16, 3,
                                                                  memory_budget=8 * 2**30)[0]).numel()


def test_the_cpu_patch_rounds_the_median_shape_down_and_a_gpu_patch_rounds_it_up():
    """On the CPU no step time goes to padding: the hippocampus median case (36 x 50 x 35 voxels) trains on
    32 x 48 x 32 patches there (the accuracy benchmarks' patch) and on 48 x 64 x 48 on a GPU."""
    assert plan_patch_size((36, 50, 35), (1, 1, 1), 4, "cpu", 8, 3)[0] == (32, 48, 32)
    assert plan_patch_size((36, 50, 35), (1, 1, 1), 4, "cuda", 16, 3)[0] == (48, 64, 48)
    # never below one multiple, and never a single voxel at the deepest level (instance norm cannot train on it)
    assert plan_patch_size((10, 12, 9), (1, 1, 1), 4, "cpu", 8, 3)[0] == (16, 32, 16)
    assert plan_patch_size((20, 40, 20), (1, 1, 1), 4, "cpu", 8, 3)[0] == (16, 32, 16)


def test_the_planned_width_is_narrow_on_the_cpu_unless_the_user_or_a_model_chose_one():
    from CPCLSegmentLib.planning import CPU_WIDTH, GPU_WIDTH, plan_width
    from CPCLSegmentLib.settings import TrainConfig

    assert (CPU_WIDTH, GPU_WIDTH) == (8, 16) and TrainConfig().width == GPU_WIDTH
    assert plan_width(TrainConfig(), "cpu", [], False) == CPU_WIDTH
    assert plan_width(TrainConfig(), "cpu", None, False) == CPU_WIDTH  # callers that do not say what was given
    assert plan_width(TrainConfig(), "cuda", [], False) == GPU_WIDTH
    assert plan_width(TrainConfig(), "mps", [], False) == GPU_WIDTH
    assert plan_width(TrainConfig(), "cpu", ["width"], False) == 16  # --width 16 on the CPU is kept
    assert plan_width(TrainConfig(width=32), "cpu", None, False) == 32
    assert plan_width(TrainConfig(), "cpu", [], True) == 16  # a starting model or a resumed run fixes the width


def test_gpu_budget_is_the_devices_free_memory_with_a_margin(monkeypatch):
    import torch

    from CPCLSegmentLib import planning
    from CPCLSegmentLib.settings import TrainConfig

    cuda = torch.device("cuda", 0)
    for free in (6 * 2**30, 70 * 2**30):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a, _f=free: (_f, 80 * 2**30))
        assert planning.memory_budget(cuda) == pytest.approx(planning.GPU_FREE_MARGIN * free)
    small = plan_patch_size((300, 512, 512), (0.8, 0.8, 1.5), 4, "cuda", 16, 3, copy_paste=True,
                            memory_budget=planning.GPU_FREE_MARGIN * 6 * 2**30)
    big = plan_patch_size((300, 512, 512), (0.8, 0.8, 1.5), 4, "cuda", 16, 3, copy_paste=True,
                          memory_budget=planning.GPU_FREE_MARGIN * 70 * 2**30)
    assert small[1]["total"] <= planning.GPU_FREE_MARGIN * 6 * 2**30 and torch.Size(small[0]).numel() < torch.Size(big[0]).numel()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (_ for _ in ()).throw(RuntimeError("no CUDA")))
    assert planning.memory_budget(cuda) == planning.DEFAULT_GPU_BUDGET
    # the planner counts half-precision activations only where the run has them: MPS trains in fp32, a GTX 10xx too
    cfg = TrainConfig()
    assert not planning.planned_amp(cfg, torch.device("mps"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (6, 1))
    assert not planning.planned_amp(cfg, cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    assert planning.planned_amp(cfg, cuda)
    half = estimate_memory((64, 64, 64), 2, 2, 16, 4, 3, amp=True, copy_paste=True)
    full = estimate_memory((64, 64, 64), 2, 2, 16, 4, 3, amp=False, copy_paste=True)
    assert half["losses"] > full["losses"]  # fp32 copies of the half-precision logits are counted


@pytest.mark.slow
def test_the_timed_pace_is_within_20_percent_of_a_real_run():
    """``pace.step_seconds`` × iterations against a real ``Trainer.run`` with the same settings (the default recipe,
    small). Both are timed in this process's CPU time on one thread: the wall time of a shared machine follows its
    load, which changes between the timing and the run (a wall-time comparison failed under load 20 with 2 threads),
    while the CPU time is the work itself. On an otherwise idle machine the two clocks agree (docs/devices.md)."""
    import time

    import numpy as np
    import torch

    from CPCLSegmentLib.data import make_case
    from CPCLSegmentLib.pace import step_seconds
    from CPCLSegmentLib.settings import TrainConfig
    from CPCLSegmentLib.trainer import Trainer

    cfg = TrainConfig(iterations=8, patch_size=(16, 48, 48), width=4, device="cpu", seed=0).validate()
    cpu = torch.device("cpu")
    rng = np.random.RandomState(0)
    img = rng.randn(32, 64, 64).astype(np.float32)
    cases = [make_case("a", img, (img > 1).astype(np.int16) + (img > 2))]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        estimate = step_seconds(cfg, 3, cpu, clock=time.process_time) * cfg.iterations
        trainer = Trainer(cfg, cases, [make_case("u", rng.randn(32, 64, 64).astype(np.float32))], 3)
        c, t = time.process_time(), time.perf_counter()
        trainer.run()
        run_cpu, run_wall = time.process_time() - c, time.perf_counter() - t
    finally:
        torch.set_num_threads(threads)
    print(f"estimate {estimate:.2f} s, run {run_cpu:.2f} s CPU ({run_wall:.2f} s wall)")
    assert abs(estimate - run_cpu) <= 0.2 * run_cpu, (estimate, run_cpu, run_wall)
