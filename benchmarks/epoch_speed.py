"""One training epoch of the report's network B (784-512-10, Adam, batch 64) three ways, in one process.

1. The typical tutorial pipeline: a Dataset that turns each image into a PIL image and then a tensor
   (what torchvision's MNIST + ToTensor do per sample, reimplemented here without torchvision), batched by a
   DataLoader, default Adam, and the epoch's loss and accuracy summed per batch with `.item()` as a
   Keras-style report of both per epoch does.
2. mnistlab's loop: the whole split as one uint8 tensor, batches by indexing, per-batch conversion, fused
   Adam (`mnistlab.train`).
3. The compute floor: forward + backward + step on batches already converted to float and sliced in order,
   fused Adam, subnormals flushed to zero as the trainer does: no data work at all.

Run: .venv/bin/python benchmarks/epoch_speed.py [--data-dir DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from common import machine, median_time, write_section
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from mnistlab.config import load_config
from mnistlab.data import load_data
from mnistlab.models import build_model
from mnistlab.training import train


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


def floor_epoch(xs: list[torch.Tensor], ys: list[torch.Tensor], model, optimizer) -> None:
    for x, y in zip(xs, ys):
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    config = load_config("seed-b-fixed").with_overrides({"training.epochs": 1})
    data = load_data("mnist", args.data_dir, config.data.val_size, config.training.seed)
    train_images, train_labels = data.train.images, data.train.labels
    n = len(train_labels)

    torch.manual_seed(0)
    model = build_model(config.model)
    loader = DataLoader(PerSampleMnist(train_images, train_labels), batch_size=64, shuffle=True)
    typical, typical_all = median_time(
        lambda: dataloader_epoch(loader, model, torch.optim.Adam(model.parameters(), lr=1e-3)), args.repeats
    )

    epochs: list[float] = []

    def ours() -> None:
        epochs.append(train(config, quiet=True, data=data, device="cpu").final["train_seconds"])

    median_time(ours, args.repeats)
    mnistlab_s = float(np.median(epochs))  # the loop alone, as the trainer times it (no evaluation)

    # The floors use the trainer's one global setting too: subnormal floats flushed to zero.
    torch.set_flush_denormal(True)
    xs = [train_images[i : i + 64].float().div(255) for i in range(0, n, 64)]
    ys = [train_labels[i : i + 64] for i in range(0, n, 64)]
    model = build_model(config.model)
    floor, floor_all = median_time(
        lambda: floor_epoch(xs, ys, model, torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)),
        args.repeats,
    )
    model = build_model(config.model)
    default_adam, _ = median_time(
        lambda: floor_epoch(xs, ys, model, torch.optim.Adam(model.parameters(), lr=1e-3)), args.repeats
    )

    def fmt(values: list[float]) -> str:
        return ", ".join(f"{v:.2f}" for v in values)

    speedup = typical / mnistlab_s
    table = f"""## Seed-B epoch: mnistlab vs a per-sample DataLoader pipeline

Command: `.venv/bin/python benchmarks/epoch_speed.py --repeats {args.repeats}`
Machine: {machine()}
One epoch over {n:,} training images, batch 64, network 784-512-10 (report network B); median of {args.repeats}.

| pipeline | seconds per epoch | runs | vs DataLoader |
|---|---|---|---|
| Dataset + ToTensor + DataLoader, default Adam | {typical:.2f} | {fmt(typical_all)} | 1.0x |
| mnistlab (`train`, uint8 tensor in memory, fused Adam) | {mnistlab_s:.2f} | {fmt(epochs)} | {speedup:.1f}x |
| compute floor (pre-converted batches, fused Adam) | {floor:.2f} | {fmt(floor_all)} | {typical / floor:.1f}x |
| compute floor with default (foreach) Adam | {default_adam:.2f} | | {typical / default_adam:.1f}x |

mnistlab's loop runs at {floor / mnistlab_s:.0%} of the compute floor's speed; the optimizer alone (fused vs
default Adam) accounts for {default_adam - floor:.2f} s of an epoch.
"""
    print(table)
    write_section("epoch-speed", table)


if __name__ == "__main__":
    main()
