"""Worker for Testing/test_distributed.py (spawned processes import it by name)."""

import os

import numpy as np
import torch


def small_real_cases():
    """Two labeled crops and one unlabeled crop of slicerio's chest CT (lungs), normalised."""
    import slicerio

    from CPCLSegmentLib import io as cio
    from CPCLSegmentLib.labels import build_label_array
    from CPCLSegmentLib.data import make_case
    from CPCLSegmentLib.preparation import foreground_intensity_sample, normalize, plan_normalization

    d = os.path.join(os.path.dirname(slicerio.__file__), "data")
    img = cio.read_image(os.path.join(d, "CTChest4.nrrd"))
    lab, _ = build_label_array(cio.read_segmentation(os.path.join(d, "Segmentation.seg.nrrd")), ["right lung", "left lung"], img, "ct")
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(img)
    norm = plan_normalization("ct", [foreground_intensity_sample(arr, lab, np.random.RandomState(0))])
    a = normalize(arr, norm)[:, ::2, ::2]
    lab = lab[:, ::2, ::2]
    return [make_case("top", a[:18], lab[:18]), make_case("bottom", a[16:], lab[16:])], [make_case("all", a)]


def small_validation_cases(labeled):
    """The labeled crops at half the in-plane resolution again: validation scores them whole (sliding windows)."""
    from CPCLSegmentLib.data import make_case

    return [make_case(c.name, c.image[:, ::2, ::2].copy(), c.label[:, ::2, ::2].copy()) for c in labeled]


def config(labeled_batch, unlabeled_batch):
    """One SGD step where the prototype terms weigh as much as the supervised one: no ramp-up (λ(0) = λ_max = 1)."""
    from CPCLSegmentLib.trainer import TrainConfig

    return TrainConfig(iterations=1, patch_size=(16, 32, 32), width=4, depth=3, labeled_batch=labeled_batch,
                       unlabeled_batch=unlabeled_batch, optimizer="sgd", lr=0.05, seed=3, device="cpu",
                       foreground_oversample=0.5, rampup=0.0, lambda_max=1.0, intensity_prob=0.0)


class NonDifferentiableSync:
    """The classic mistake: the forward value is the sum over ranks, the backward only the local part."""

    def __init__(self, ctx):
        self.ctx = ctx

    def all_reduce(self, t):
        import torch.distributed as dist

        total = t.detach().clone()
        dist.all_reduce(total)
        return t + (total - t.detach())


def run_rank(rank, world, init_file, out_file, differentiable=True):
    import torch.distributed as dist

    from CPCLSegmentLib.distributed import DistributedContext
    from CPCLSegmentLib.trainer import Trainer

    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)  # float64: the comparison is far above rounding noise
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    ctx = DistributedContext(rank, world, rank, torch.device("cpu"))
    if not differentiable:
        ctx.all_reduce = NonDifferentiableSync(ctx).all_reduce
    labeled, unlabeled = small_real_cases()
    events = []
    trainer = Trainer(config(1, 1), labeled, unlabeled, 3, distributed=ctx, on_progress=events.append)
    trainer.run()
    if rank == 0:
        check = [e for e in events if e["event"] == "distributed_check"][0]
        torch.save({"student": trainer.student.state_dict(), "loss": events[1]["loss"], "check": check}, out_file)
    # as in the CLI, the trainer (whose DDP reducer holds the process group) is gone before the group is destroyed,
    # and every rank is done with its collectives: a rank once aborted at exit here ("terminate called without an
    # active exception") with the trainer still alive
    del trainer
    dist.barrier()
    ctx.close()


def run_rank_validation(rank, world, init_file, out_file, seconds_per_case, timeout_s):
    """Two ranks, two validation cases that take ``seconds_per_case`` each to score, collectives that time out after
    ``timeout_s``: one rank scoring both cases alone would keep the other waiting past the timeout."""
    import time
    from datetime import timedelta

    import torch.distributed as dist

    from CPCLSegmentLib import metrics
    from CPCLSegmentLib.distributed import DistributedContext
    from CPCLSegmentLib.trainer import Trainer

    torch.set_num_threads(1)
    labeled, unlabeled = small_real_cases()  # before the process group: the timeout is for the collectives, not start-up
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    real = metrics.predict_labels

    def slow(*a, **k):
        time.sleep(seconds_per_case)
        return real(*a, **k)

    metrics.predict_labels = slow
    ctx = DistributedContext(rank, world, rank, torch.device("cpu"))
    cfg = config(1, 1)
    cfg.iterations, cfg.validation_every = 2, 2
    events = []
    trainer = Trainer(cfg, labeled, unlabeled, 3, validation=small_validation_cases(labeled), distributed=ctx,
                      on_progress=events.append)
    trainer.run()
    if rank == 0:
        torch.save({"teacher": trainer.teacher.state_dict(), "validation": [e for e in events if e["event"] == "validation"]},
                   out_file)
    ctx.close()


def run_rank_preprocess(rank, world, init_file, out_dir, ct, seg):
    """Two ranks preprocess the same request through one cache (``preprocessing.preprocess_cases`` under torchrun):
    counts the cases each rank preprocesses itself, rank 0 slow (so a rank that did not wait would find the cache
    empty and preprocess too); then rank 0 fails and rank 1 must stop at once instead of waiting out the timeout."""
    import json
    import time
    from datetime import timedelta

    import torch.distributed as dist

    from CPCLSegmentLib import preprocessing
    from CPCLSegmentLib.distributed import DistributedContext
    from CPCLSegmentLib.errors import InputError
    from CPCLSegmentLib.preparation import LabeledInput, TrainRequest, resolve_classes

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    ctx = DistributedContext(rank, world, rank, torch.device("cpu"))
    built = []
    real = preprocessing.build_entry

    def counted(task, root):
        if rank == 0:
            time.sleep(2.0)
        if os.path.basename(root) == "failing" and rank == 0:
            raise InputError(f"{task.image}: unreadable (test)")
        built.append(task.name)
        return real(task, root)

    preprocessing.build_entry = counted
    request = TrainRequest([LabeledInput(ct, seg, name="ct")], os.path.join(out_dir, "m.pt"), unlabeled=[ct], segments=["right lung"])
    classes = resolve_classes(request)
    plan = {"spacing": [12.2, 12.2, 20.0], "normalization": {"scheme": "zscore"}}
    result = {"rank": rank}
    for folder in ("cache", "failing"):
        request.options.cache_dir = os.path.join(out_dir, folder)
        cache = preprocessing.open_cache(request)
        t = time.perf_counter()
        try:
            labeled, _, unlabeled = preprocessing.preprocess_cases(request, classes, plan, [ct], cache, lambda e: None, ctx)
            result[folder] = {"built": list(built), "labeled": len(labeled), "unlabeled": len(unlabeled),
                              "shape": list(labeled[0].image.shape)}
        except InputError as e:
            result[folder] = {"error": str(e), "seconds": time.perf_counter() - t}
        finally:
            cache.release()
        built.clear()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(result, f)
    ctx.close()
