"""One training epoch of the report's network B (784-512-10, Adam, batch 64), several ways, in one process.

1. The typical tutorial pipeline: a Dataset that turns each image into a PIL image and then a tensor
   (what torchvision's MNIST + ToTensor do per sample, reimplemented here without torchvision), batched by a
   DataLoader, default Adam, and the epoch's loss and accuracy summed per batch with `.item()` as a
   Keras-style report of both per epoch does.
2. mnistlab's trainer (`mnistlab.train`): the whole split as one uint8 tensor, batches by index, per-batch
   conversion, hand-derived MLP gradients, the fused Adam kernel called directly, subnormals flushed.
3. Ablations: the trainer's loop with one fast path at a time swapped back for the plain PyTorch way.
4. Floors on batches already converted to float, in order, with no bookkeeping: what autograd plus
   `optimizer.step()` can do at best, and what the hand-derived step does.

Each pipeline trains one model for `--repeats` epochs and reports the median epoch, so later epochs (where
subnormal numbers appear) count as much as the first.

Run: .venv/bin/python benchmarks/epoch_speed.py [--data-dir DIR] [--repeats 5]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
import torch
from common import held_back_prefix, held_back_suffix, machine, median_time, write_section
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from mnistlab.config import load_config
from mnistlab.data.splits import Split, batches, load_data, to_float
from mnistlab.models.gradients import GradientFn, autograd_gradients, mlp_gradients
from mnistlab.models.losses import make_loss
from mnistlab.models.metrics import loss_and_correct
from mnistlab.models.networks import build_model
from mnistlab.models.optimizers import make_optimizer, make_step
from mnistlab.subnormals import flush_subnormals
from mnistlab.train.loop import train


class PerSampleMnist(Dataset):
    """What torchvision.datasets.MNIST does for each sample with the report's transforms: a row of the uint8
    tensor becomes a PIL image, ToTensor turns it back into a (1, 28, 28) float tensor in [0, 1], and Flatten
    makes it the 784 values the network takes."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.data, self.targets = images, labels

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        image, target = self.data[i], int(self.targets[i])
        image = Image.fromarray(image.numpy(), mode="L")
        for transform in (to_tensor, torch.flatten):  # the report's Compose([ToTensor(), Flatten])
            image = transform(image)
        return image, target


def to_tensor(image: Image.Image) -> torch.Tensor:
    """ToTensor on a PIL image: array, view as HxWxC, to CxHxW, contiguous, to float, / 255."""
    tensor = torch.from_numpy(np.array(image, np.uint8, copy=True))
    tensor = tensor.view(image.size[1], image.size[0], 1).permute((2, 0, 1)).contiguous()
    return tensor.to(dtype=torch.get_default_dtype()).div(255)


def dataloader_epoch(loader: DataLoader, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    loss_fn = torch.nn.CrossEntropyLoss()
    total_loss, correct = 0.0, 0
    for x, y in loader:
        pred = model(x)
        loss = loss_fn(pred, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(y)
        correct += (pred.argmax(1) == y).type(torch.float).sum().item()


def loop_epochs(
    train_split: Split, gradient: str, step: str, repeats: int, index_select: bool = True
) -> tuple[float, list[float]]:
    """The trainer's loop with each fast path on or off: `gradient` "by hand" or "autograd", `step` "direct"
    (the fused kernel) or "optimizer" (`optimizer.step()`), `index_select` or `images[idx]` batches."""
    config = load_config("seed-b-fixed")
    torch.manual_seed(0)
    model = build_model(config.model)
    optimizer = make_optimizer(model.parameters(), config.optimizer)
    gradients: GradientFn = (
        mlp_gradients(model, config.model.activations, config.model.softmax_output)
        if gradient == "by hand"
        else autograd_gradients(model, make_loss(config.training.loss))
    )
    do_step: Callable[[], object] = make_step(optimizer) if step == "direct" else optimizer.step
    shuffle = torch.Generator().manual_seed(0)

    def epoch() -> None:
        loss_sum, correct = torch.zeros(()), torch.zeros((), dtype=torch.int64)
        if index_select:
            batch_iter = batches(train_split, 64, shuffle)
        else:
            order = torch.randperm(len(train_split), generator=shuffle)
            batch_iter = (Split(train_split.images[i], train_split.labels[i]) for i in order.split(64))
        for batch in batch_iter:
            loss, out = gradients(to_float(batch.images), batch.labels)
            do_step()
            loss_sum += loss * len(batch)
            correct += (out.argmax(1) == batch.labels).sum()
        loss_sum.item(), correct.item()

    return median_time(epoch, repeats)


def floor_epochs(xs: list[torch.Tensor], ys: list[torch.Tensor], how: str, repeats: int) -> tuple[float, list[float]]:
    """Forward, backward and step on pre-converted batches: autograd with `optimizer.step()` of fused or
    default Adam, or mnistlab's hand-derived gradients with the direct fused step."""
    torch.manual_seed(0)
    model = build_model(load_config("seed-b-fixed").model)
    if how == "by hand":
        gradients = mlp_gradients(model, ["relu"], False)
        step = make_step(torch.optim.Adam(model.parameters(), lr=1e-3, fused=True))

        def epoch() -> None:
            for x, y in zip(xs, ys, strict=True):
                gradients(x, y)
                step()
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=how == "fused" or None)

        def epoch() -> None:
            for x, y in zip(xs, ys, strict=True):
                optimizer.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()

    return median_time(epoch, repeats)


def parts_epochs(xs: list[torch.Tensor], part: str, repeats: int) -> tuple[float, list[float]]:
    """One part of every step of an epoch, alone: the first layer's forward product and weight-gradient
    product (the bulk of the arithmetic), or the fused Adam step over all 407k parameters."""
    torch.manual_seed(0)
    model = build_model(load_config("seed-b-fixed").model)
    weight = model[1].weight.detach()
    grad = torch.randn(64, weight.shape[0])
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    step = make_step(torch.optim.Adam(model.parameters(), lr=1e-3, fused=True))

    flat = [x.flatten(1) for x in xs]

    def epoch() -> None:
        for x in flat:
            if part == "products":
                x @ weight.t()
                grad[: len(x)].t() @ x
            else:
                step()

    return median_time(epoch, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    repeats = args.repeats

    config = load_config("seed-b-fixed").with_overrides({"training.epochs": repeats})
    data = load_data("mnist", args.data_dir, config.data.val_size, config.training.seed)
    train_split = data.train
    n = len(train_split)

    rows: list[tuple[str, float, list[float]]] = []
    torch.manual_seed(0)
    model = build_model(config.model)
    loader = DataLoader(PerSampleMnist(train_split.images, train_split.labels), batch_size=64, shuffle=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    rows.append(("Dataset + ToTensor + DataLoader, default Adam", *median_time(
        lambda: dataloader_epoch(loader, model, optimizer), repeats)))  # fmt: skip

    run = train(config, quiet=True, data=data, device="cpu")  # flushes subnormals itself, then stops
    epochs = [e["train_seconds"] for e in run.epochs]  # the loop alone, as the trainer times it
    rows.append(("**mnistlab** (`train`)", float(np.median(epochs)), epochs))
    # What the trainer adds to each epoch: the loss and accuracy on the validation and test splits.
    loss_fn = make_loss(config.training.loss, config.model.softmax_output)
    evaluation, _ = median_time(
        lambda: [loss_and_correct(run.model, split, loss_fn).tolist() for split in (data.val, data.test)], repeats
    )

    flush_subnormals(True)  # as the trainer does, for everything below but the last ablation
    rows.append(("ablation: autograd instead of hand-derived gradients",
                 *loop_epochs(train_split, "autograd", "direct", repeats)))  # fmt: skip
    rows.append(("ablation: `optimizer.step()` instead of the direct fused kernel",
                 *loop_epochs(train_split, "by hand", "optimizer", repeats)))  # fmt: skip
    rows.append(("ablation: both (autograd and `optimizer.step()`)",
                 *loop_epochs(train_split, "autograd", "optimizer", repeats)))  # fmt: skip
    rows.append(("ablation: `images[idx]` instead of `index_select` batches",
                 *loop_epochs(train_split, "by hand", "direct", repeats, index_select=False)))  # fmt: skip
    xs = [train_split.images[i : i + 64].float().div(255) for i in range(0, n, 64)]
    ys = [train_split.labels[i : i + 64] for i in range(0, n, 64)]
    rows.append(("floor: autograd + fused Adam `optimizer.step()`", *floor_epochs(xs, ys, "fused", repeats)))
    rows.append(("floor: autograd + default Adam `optimizer.step()`", *floor_epochs(xs, ys, "default", repeats)))
    rows.append(("floor: hand-derived gradients + direct fused step", *floor_epochs(xs, ys, "by hand", repeats)))
    rows.append(("part: the two 64x784x512 matrix products per step", *parts_epochs(xs, "products", repeats)))
    rows.append(("part: the fused Adam step", *parts_epochs(xs, "adam", repeats)))
    flush_subnormals(False)
    torch.set_flush_denormal(True)  # the calling thread only: what `torch.set_flush_denormal` alone gives
    rows.append(("ablation: subnormals flushed on the main thread only",
                 *loop_epochs(train_split, "by hand", "direct", repeats)))  # fmt: skip
    torch.set_flush_denormal(False)

    baseline = rows[0][1]
    suffix = held_back_suffix()
    env = held_back_prefix(suffix)
    lines = [
        f"| {name} | {median:.2f} | {', '.join(f'{t:.2f}' for t in times)} | {baseline / median:.1f}x |"
        for name, median, times in rows
    ]
    table = (
        f"""## Seed-B epoch ({torch.backends.cpu.get_cpu_capability()} kernels): mnistlab vs a per-sample DataLoader

Command: `{env}.venv/bin/python benchmarks/epoch_speed.py --repeats {repeats}`
Machine: {machine()}
One epoch over {n:,} training images, batch 64, network 784-512-10 (report network B). Each row trains one
model for {repeats} epochs in this one process; the median epoch is shown, then every epoch.

| pipeline | seconds per epoch (median) | epochs | vs DataLoader |
|---|---|---|---|
"""
        + "\n".join(lines)
        + f"""

mnistlab trains the seed-B network {baseline / rows[1][1]:.1f}x as fast as the DataLoader pipeline. Most of
what is left is the arithmetic itself: the two large matrix products and the fused Adam step, timed alone
in the "part" rows, add up to {rows[-3][1] + rows[-2][1]:.2f} s of the epoch's {rows[1][1]:.2f} s. Evaluating
the {len(data.val) + len(data.test):,} validation and test images after each epoch takes {evaluation:.3f} s
(median of {repeats}).
"""
    )
    print(table)
    write_section(f"epoch-speed{suffix}", table)


if __name__ == "__main__":
    main()
