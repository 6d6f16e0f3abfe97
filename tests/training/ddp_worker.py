"""Run by torchrun in the distributed-training test: builds the feature cache on every rank, then takes training
steps with the real `train_step` and compares each step's all-reduced gradient with the one-process gradient.

    torchrun --standalone --nproc-per-node 2 ddp_worker.py BENCH CACHE_DIR RESULT_JSON

The batches of 7 images at batch size 3 split 2+1, 2+1 and 1+0 over two ranks (an empty share included). The
learning rates are 0, so every step sees the same weights. Rank 0 writes, per step: the shares, the largest
difference to the one-process gradient, and that of averaging each rank's mean-loss gradient instead.
"""

from __future__ import annotations

import copy
import json
import sys

import torch

import vip2clip
from vip2clip.config import TrainConfig
from vip2clip.data.dataset import AnomalyDataset
from vip2clip.data.index import read_index
from vip2clip.features.feature_cache import load_or_build_cache
from vip2clip.training import loop
from vip2clip.utils.distributed import LOCAL, close, init_from_env
from vip2clip.utils.run_context import RunContext

BATCH = 3


def gradients(model) -> torch.Tensor:
    """All trainable gradients as one vector (zeros where a parameter has none, e.g. FGP's unused scalar)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in model.trainable_parameters()])  # fmt: skip


def mean_loss_gradient(model, cache, labels, rows) -> torch.Tensor:
    """The gradient of the mean loss over `rows`, computed in this process alone."""
    model.zero_grad(set_to_none=True)
    batch = next(loop._cached_batches(cache, labels, batches=[rows], device="cpu", world=LOCAL))
    loop._batch_loss(model, batch).total.backward()
    return gradients(model)


def main() -> None:
    bench, cache_dir, result = sys.argv[1:4]
    world = init_from_env("cpu")
    model = vip2clip.create_model("tiny", image_size=64, seed=111, top_k=4)
    reference = copy.deepcopy(model)
    dataset = AnomalyDataset(read_index(bench), image_size=64)
    cache = load_or_build_cache(model, dataset, directory=cache_dir, batch_size=BATCH, run=RunContext(world=world))
    optimizer = loop.build_optimizer(model, TrainConfig(lr_prompt=0.0, lr_fgp=0.0))
    steps = []
    for rows in loop.epoch_batches(cache.valid_indices, BATCH, seed=111, epoch=1):
        local = next(loop._cached_batches(cache, dataset.labels, batches=[rows], device="cpu", world=world))
        losses = loop.train_step(model, optimizer, batch=local, world=world)
        shares = world.all_gather(len(loop.local_share(rows, world)))
        if world.is_main:
            ours = gradients(model)
            one_process = mean_loss_gradient(reference, cache, dataset.labels, rows)
            per_rank = [rows[:shares[0]], rows[shares[0]:]]  # fmt: skip
            naive = torch.stack([mean_loss_gradient(reference, cache, dataset.labels, r) for r in per_rank if r])
            scale = float(one_process.abs().max())
            steps.append({
                "shares": shares,
                "difference": float((ours - one_process).abs().max()) / scale,
                "naive_difference": float((naive.mean(0) - one_process).abs().max()) / scale,
                "loss": losses["total"],
                "one_process_loss": float(loop._batch_loss(reference, next(loop._cached_batches(
                    cache, dataset.labels, batches=[rows], device="cpu", world=LOCAL))).total),
            })  # fmt: skip
    if world.is_main:
        with open(result, "w", encoding="utf-8") as stream:
            json.dump({"steps": steps, "slot": str(cache.directory)}, stream)
    close(world)


if __name__ == "__main__":
    main()
