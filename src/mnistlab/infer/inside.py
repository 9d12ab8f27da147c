"""Inside the network: what each layer computed for one image, and the training digits the model thinks it
resembles.

`layer_views` runs one image through the network layer by layer (an ensemble: its first member) and keeps each
convolution's feature maps and each hidden linear layer's activations, each after its normalisation and
activation; for an MLP's first hidden layer also the incoming weights of its most active units, as 28x28
images of what each unit looks for.

`NeighbourIndex` holds the penultimate features (what the last linear layer reads) of every image in the
dataset's training file, built once per model and kept in memory. Near in that space means alike to the model,
which is what the nearest training digits should show: for the bundled model, the nearest training digit of a
test digit carries its label for 99.6% of the first 1,000 test digits (benchmarks/inside_cost.py).

- Distance: cosine distance, 1 - cos, on L2-normalised features (0: the same direction, 2: opposite). ReLU
  features grow with the ink, so a thick and a thin 7 differ more in length than in direction; cosine
  ignores the length. (Euclidean distance gave the same label agreement, 99.3%.)
- Ensembles: every member counts. The members' neighbours differ a lot (the 5 nearest of two of the bundled
  model's members share half their digits), so no member speaks for the ensemble: the distance is 1 - the mean
  over the members of their cosines, computed as one dot product of the members' normalised features
  concatenated and scaled by 1/sqrt(members).
- Memory: each member's features are projected onto at most RANK (256) directions, then stored as float16.
  The directions are the model's outlier density's basis (models/outliers.py: the shared covariance's largest
  directions, fitted on the training split) where it has one, else the largest principal directions (not
  centred) of the features of the first BASIS_IMAGES training images. For the earlier bundled model (3 members
  x 1,152 features) that was 60,000 x 768 x 2 bytes = 92 MB instead of 829 MB as float32, plus 47 MB for the
  images shown; the 5 nearest of the projection shared 87% of their digits with those of the full features,
  and the same label agreement. The bundled model's members have 128 features each, kept whole: 46 MB.
- Queries: one float16 matrix product over the index picks the 4k + 32 best candidates, whose distances are
  then computed again in float32, so the distances returned are exact to float32 rounding and an image of the
  training file finds itself at distance ~0.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mnistlab.data.splits import load_data, to_float
from mnistlab.errors import MnistlabError
from mnistlab.layers import ACTIVATIONS
from mnistlab.models.files import LoadedModel
from mnistlab.models.metrics import BATCH
from mnistlab.models.networks import Ensemble, Standardized, for_inference
from mnistlab.models.outliers import RANK, head_index

TOP_UNITS = 16  # the most active units a "units" view names (and, for an MLP's first layer, draws)
BASIS_IMAGES = 4096  # training images whose features choose the directions kept, where the model has no density
_QUERIES = 256  # images per pass in `search`: their float16 scores against 60,000 images take 31 MB
_ACTIVATIONS = tuple(getattr(nn, name) for name in ACTIVATIONS.values())
_AFTER = (nn.BatchNorm1d, nn.BatchNorm2d, *_ACTIVATIONS)  # what belongs to the layer before it in a view

Progress = Callable[[int, int], None]  # (training images done, images in all), after each batch


# ---------------------------------------------------------------------------------------------- layer views


@dataclass
class LayerView:
    """What one layer computed for one image."""

    name: str  # "conv 1 (32 maps, 28x28)", "hidden 1 (512 units)", "features (1152 units)"
    kind: str  # "maps" (a convolution's feature maps) or "units" (a linear layer's activations, or the features)
    values: torch.Tensor  # maps: (shown, H, W), the most active first; units: (U,) every unit; float32 CPU
    top_units: list[int]  # units: the indices of the most active units, most active first (<= 16); maps: []
    # An MLP's first hidden layer: the incoming weights of the top units (len(top_units), 28, 28); else None.
    unit_weights: torch.Tensor | None
    channels: list[int] = field(default_factory=list)  # maps: which of the layer's channels `values` holds
    member: int | None = None  # the ensemble member shown (its first, 0); None for a single network


def layer_views(model: LoadedModel, image: torch.Tensor, max_maps: int = 16) -> list[LayerView]:
    """Each convolution's feature maps (at most `max_maps` per layer, the most active first: by mean activation)
    and each hidden linear layer's activations for one preprocessed image (28, 28) in [0, 1], in network order,
    each taken after the normalisation and activation that follow the layer. A CNN with no hidden linear layer
    also shows its features (the flattened last block, what the output layer reads) as units. An ensemble shows
    its first member."""
    if max_maps < 1:
        raise MnistlabError(f"max_maps must be at least 1, not {max_maps}")
    network, member = _shown_network(model)
    sequence = network.network
    ends = _view_ends(sequence)
    head = head_index(sequence)
    convolutional = any(isinstance(layer, nn.Conv2d) for layer in sequence)
    hidden_linear = any(isinstance(sequence[i], nn.Linear) for i in ends.values())
    views: list[LayerView] = []
    counts = {"conv": 0, "hidden": 0}
    with torch.inference_mode():
        x = network.standardize(_as_batch(image).to(_device(network)))
        for i, layer in enumerate(sequence):
            if i == head and convolutional and not hidden_linear:
                views.append(_units_view(f"features ({x.shape[1]} units)", x[0], None, member))
            x = layer(x)
            if i not in ends:
                continue
            source = sequence[ends[i]]
            if isinstance(source, nn.Conv2d):
                counts["conv"] += 1
                views.append(_maps_view(counts["conv"], x[0], max_maps, member))
            else:
                counts["hidden"] += 1
                # an MLP's first layer reads the pixels: its weights are images
                reads_pixels = not convolutional and counts["hidden"] == 1 and source.in_features == 28 * 28
                weights = source.weight if reads_pixels else None
                views.append(_units_view(f"hidden {counts['hidden']} ({x.shape[1]} units)", x[0], weights, member))
    return views


def _shown_network(model: LoadedModel) -> tuple[Standardized, int | None]:
    """The network whose layers are shown, and its member index (None: not an ensemble)."""
    if isinstance(model.model, Ensemble):
        return model.model.members[0], 0
    return model.model, None


def _view_ends(sequence: nn.Sequential) -> dict[int, int]:
    """{index of the module whose output a view shows: index of its convolution or hidden linear layer}: each
    layer's output after the normalisation and activation right after it (the output layer has no view). A
    convolution pooled before its normalisation (conv, maxpool, bn, relu) is shown after all three: its raw
    output would be a map before BatchNorm, with negative values, not what the next layer reads."""
    head = head_index(sequence)
    ends = {}
    for i, layer in enumerate(sequence):
        if i == head or not isinstance(layer, (nn.Conv2d, nn.Linear)):
            continue
        end = i
        while end + 1 < len(sequence) and (
            isinstance(sequence[end + 1], _AFTER)
            or (
                isinstance(sequence[end + 1], nn.MaxPool2d)
                and end + 2 < len(sequence)
                and isinstance(sequence[end + 2], _AFTER)
            )
        ):
            end += 1
        ends[end] = i
    return ends


def _maps_view(number: int, maps: torch.Tensor, max_maps: int, member: int | None) -> LayerView:
    channels, height, width = maps.shape
    shown = maps.mean((1, 2)).topk(min(max_maps, channels)).indices
    return LayerView(
        f"conv {number} ({channels} maps, {height}x{width})",
        "maps",
        maps[shown].float().cpu().clone(),
        [],
        None,
        shown.tolist(),
        member,
    )


def _units_view(name: str, units: torch.Tensor, weights: torch.Tensor | None, member: int | None) -> LayerView:
    top = units.topk(min(TOP_UNITS, len(units))).indices
    drawn = weights[top].detach().float().cpu().reshape(-1, 28, 28).clone() if weights is not None else None
    return LayerView(name, "units", units.float().cpu().clone(), top.tolist(), drawn, [], member)


def _as_batch(image: torch.Tensor) -> torch.Tensor:
    """One image (28, 28), floats in [0, 1] or uint8, as a batch of one in float32."""
    if tuple(image.shape) != (28, 28):
        raise MnistlabError(f"expected one 28x28 image, got an array of shape {tuple(image.shape)}")
    return _as_floats(image[None])


def _as_floats(images: torch.Tensor) -> torch.Tensor:
    """Images (B, 28, 28), floats in [0, 1] or uint8 (0-255), as float32 in [0, 1]."""
    if images.dim() != 3 or tuple(images.shape[1:]) != (28, 28):
        raise MnistlabError(f"expected 28x28 images (B, 28, 28), got an array of shape {tuple(images.shape)}")
    return to_float(images) if images.dtype == torch.uint8 else images.float()


# ---------------------------------------------------------------------------------------------- neighbours


@dataclass
class Neighbour:
    """A training image near the one asked about, in the model's penultimate feature space."""

    index: int  # row in the dataset's training file
    label: int
    distance: float  # cosine distance: 1 - the cosine (an ensemble: the mean of its members' cosines)
    image: torch.Tensor  # (28, 28) uint8


class NeighbourIndex:
    """Penultimate features of every training image, built once per model and held in memory.

    `vectors` (N, members x directions) float16: each member's features projected onto its kept directions,
    L2-normalised and scaled by 1/sqrt(members), so that a dot product is the mean of the members' cosines."""

    def __init__(
        self,
        network: nn.Module,
        bases: list[torch.Tensor | None],
        vectors: torch.Tensor,
        images: torch.Tensor,
        labels: torch.Tensor,
        dataset: str,
        seconds: float = 0.0,
    ):
        self.network = network  # the model folded for inference: features computed as at build time
        self.bases = bases  # per member: (D, k) float32 on the CPU, or None (its D features kept as they are)
        self.vectors = vectors
        self.images = images
        self.labels = labels
        self.dataset = dataset
        self.seconds = seconds  # how long the build took

    @classmethod
    def build(
        cls,
        model: LoadedModel,
        data_dir: str | Path | None = None,
        progress: Progress | None = None,
        download: bool = True,
    ) -> NeighbourIndex:
        """The index of `model` over its dataset's training file (in `data_dir`, else $MNISTLAB_DATA, else the
        user cache; downloaded when missing unless `download` is false), in batches of BATCH images."""
        start = time.perf_counter()
        train = load_data(model.dataset, data_dir, val_size=0, download=download).train
        network = for_inference(model.model)
        members = _members(network)
        bases = _bases(model, members, train.images)
        width = sum(_width(member, basis) for member, basis in zip(members, bases))
        vectors = torch.empty(len(train), width, dtype=torch.float16)
        with torch.inference_mode():
            for first in range(0, len(train), BATCH):
                batch = train.images[first : first + BATCH]
                vectors[first : first + len(batch)] = _vectors(members, bases, to_float(batch)).half()
                if progress is not None:
                    progress(first + len(batch), len(train))
        labels = train.labels.to(torch.uint8)
        return cls(network, bases, vectors, train.images, labels, model.dataset, time.perf_counter() - start)

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def members(self) -> int:
        """How many networks' features the distance combines (an ensemble's size, else 1)."""
        return len(self.bases)

    @property
    def nbytes(self) -> int:
        """The memory the index holds: vectors, images, labels and directions (the network not counted)."""
        tensors = [self.vectors, self.images, self.labels, *(b for b in self.bases if b is not None)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def nearest(self, image: torch.Tensor, k: int = 5) -> list[Neighbour]:
        """The `k` training images nearest to one preprocessed image (28, 28) in [0, 1] (or uint8), nearest
        first."""
        distances, rows = self.search(_as_batch(image), k)
        return [
            Neighbour(int(row), int(self.labels[row]), float(d), self.images[row].clone())
            for d, row in zip(distances[0].tolist(), rows[0].tolist())
        ]

    @torch.inference_mode()
    def search(self, images: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
        """For images (B, 28, 28) in [0, 1] (or uint8): the distances (B, k) float32 and training rows (B, k) int64 of
        each one's `k` nearest training images, nearest first."""
        if not 1 <= k <= len(self):
            raise MnistlabError(f"the number of neighbours must be between 1 and {len(self)}, not {k}")
        distances, rows = [], []
        for first in range(0, len(images), _QUERIES):
            queries = _vectors(_members(self.network), self.bases, _as_floats(images[first : first + _QUERIES]))
            # float16 products choose the candidates (one fast pass over the index), float32 ranks them
            candidates = (queries.half() @ self.vectors.T).topk(min(len(self), 4 * k + 32), dim=1).indices
            similarity = torch.einsum("bcd,bd->bc", self.vectors[candidates].float(), queries)
            best, order = similarity.topk(k, dim=1)
            distances.append((1 - best).clamp_min(0))
            rows.append(candidates.gather(1, order))
        return torch.cat(distances), torch.cat(rows)


def _members(network: nn.Module) -> list[Standardized]:
    return list(network.members) if isinstance(network, Ensemble) else [network]


def _width(member: Standardized, basis: torch.Tensor | None) -> int:
    return basis.shape[1] if basis is not None else member.network[head_index(member.network)].in_features


def _bases(model: LoadedModel, members: list[Standardized], images: torch.Tensor) -> list[torch.Tensor | None]:
    """Each member's kept directions (D, k): its outlier density's basis, else the largest principal directions
    (not centred: they keep the dot products) of the first BASIS_IMAGES images' features; None where the
    member has at most RANK features."""
    if model.outliers is not None and not model.outliers.reads_probabilities:  # a density per member: its basis
        return [density.basis.detach().float().cpu() for density in model.outliers.members]
    bases: list[torch.Tensor | None] = []
    for member in members:
        if _width(member, None) <= RANK:
            bases.append(None)
            continue
        with torch.inference_mode():
            features = torch.cat(
                [
                    member.features_and_outputs(to_float(images[i : i + BATCH]).to(_device(member)))[0].double().cpu()
                    for i in range(0, min(len(images), BASIS_IMAGES), BATCH)
                ]
            )
        _, vectors = torch.linalg.eigh(features.T @ features)  # ascending
        bases.append(vectors[:, -RANK:].flip(1).float())
    return bases


def _vectors(members: list[Standardized], bases: list[torch.Tensor | None], images: torch.Tensor) -> torch.Tensor:
    """The index's rows for float images (B, 28, 28): the members' projected, normalised features, concatenated
    and scaled so that a dot product is the mean of the members' cosines; float32 on the CPU."""
    parts = []
    for member, basis in zip(members, bases):
        features = member.features_and_outputs(images.to(_device(member)))[0].float().cpu()
        projected = features @ basis if basis is not None else features
        parts.append(nn.functional.normalize(projected, dim=1))
    return torch.cat(parts, 1) / math.sqrt(len(parts))


def _device(network: nn.Module) -> torch.device:
    return next(network.parameters()).device
