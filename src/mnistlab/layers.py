"""A CNN's layer list (`["conv 32 3 1", "bn", "relu", "maxpool 2", ...]`) parsed and shape-checked, without
torch: config validation uses it to report a bad list before anything is built, models/networks.py to build one.

Each string is a layer name and its arguments:
conv OUT KERNEL [PADDING [STRIDE]] | bn | an activation (ACTIVATIONS: relu, tanh ...) | maxpool K | avgpool (global) |
dropout P | flatten | linear OUT
"""

from __future__ import annotations

from dataclasses import dataclass

# Every activation a config may name, with the torch.nn module that computes it: adding one is one entry here
# (the hand-derived MLP gradients in models/gradients.py know relu, tanh and sigmoid; others train by autograd).
ACTIVATIONS = {"relu": "ReLU", "tanh": "Tanh", "sigmoid": "Sigmoid", "gelu": "GELU"}
_ARGS = {"conv": (2, 4), "bn": (0, 0), "maxpool": (1, 1), "avgpool": (0, 0), "dropout": (1, 1), "flatten": (0, 0)}
_ARGS.update({"linear": (1, 1), **{a: (0, 0) for a in ACTIVATIONS}})


class LayerError(ValueError):
    """A layer list that does not describe a network (the message says which layer and why)."""


@dataclass(frozen=True)
class Layer:
    """One parsed layer: its name, numeric arguments, the shape it takes and the shape it gives
    ((channels, height, width) for images, (features,) after flattening)."""

    name: str
    args: tuple[float, ...]
    shape_in: tuple[int, ...]
    shape_out: tuple[int, ...]
    before_bn: bool  # followed by "bn" (maxpools between allowed), whose shift makes this layer's bias redundant


def _number(text: str, line: str, integer: bool) -> float:
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        raise LayerError(f"{line!r}: {text!r} is not {'a whole number' if integer else 'a number'}") from None
    return value


def parse_layers(spec: list[str], image: tuple[int, int, int] = (1, 28, 28)) -> list[Layer]:
    """The layers of `spec` with their shapes; LayerError for an unknown layer, wrong arguments or a shape
    that runs out."""
    layers: list[Layer] = []
    shape: tuple[int, ...] = image
    words = [line.split() for line in spec]
    for i, (line, parts) in enumerate(zip(spec, words)):
        if not parts:
            raise LayerError("an empty layer string")
        name, raw = parts[0], parts[1:]
        if name not in _ARGS:
            raise LayerError(f"unknown layer {line!r}")
        low, high = _ARGS[name]
        if not low <= len(raw) <= high:
            count = f"{low}" if low == high else f"{low} to {high}"
            raise LayerError(f"{line!r}: {name} takes {count} arguments")
        args = tuple(_number(a, line, integer=name != "dropout") for a in raw)
        # The next layer other than a maxpool (which commutes with adding a per-channel constant).
        following = next((w[:1] for w in words[i + 1 :] if w[:1] != ["maxpool"]), [])
        before_bn = following == ["bn"]
        images = len(shape) == 3
        if name == "conv":
            if not images:
                raise LayerError(f"{line!r}: a convolution needs an image, but the input is flat here")
            out, kernel = int(args[0]), int(args[1])
            padding = int(args[2]) if len(args) > 2 else 0
            stride = int(args[3]) if len(args) > 3 else 1
            if out < 1 or kernel < 1 or padding < 0 or stride < 1:
                raise LayerError(f"{line!r}: channels, kernel and stride must be positive, padding 0 or more")
            size = tuple((s + 2 * padding - kernel) // stride + 1 for s in shape[1:])
            new: tuple[int, ...] = (out, *size)
        elif name == "maxpool":
            k = int(args[0])
            if not images or k < 1:
                raise LayerError(f"{line!r}: needs an image and a positive size")
            new = (shape[0], shape[1] // k, shape[2] // k)
        elif name == "avgpool":
            if not images:
                raise LayerError(f"{line!r}: needs an image")
            new = (shape[0],)
        elif name == "flatten":
            new = (shape[0] * shape[1] * shape[2],) if images else shape
        elif name == "linear":
            if images:
                raise LayerError(f"{line!r}: flatten (or avgpool) the image before a linear layer")
            if int(args[0]) < 1:
                raise LayerError(f"{line!r}: needs a positive number of outputs")
            new = (int(args[0]),)
        elif name == "dropout":
            if not 0 <= args[0] < 1:
                raise LayerError(f"{line!r}: the dropout probability must be in [0, 1)")
            new = shape
        else:  # bn and activations keep the shape
            new = shape
        if len(new) == 3 and min(new[1:]) < 1:
            raise LayerError(f"{line!r} leaves nothing of the image ({new})")
        layers.append(Layer(name, args, shape, new, before_bn))
        shape = new
    return layers


def check_layers(spec: list[str]) -> list[str]:
    """Problems with a CNN layer list (empty when it builds and ends with 'linear 10')."""
    if not spec:
        return ["model.layers must list the CNN's layers when model.kind = 'cnn'"]
    try:
        layers = parse_layers(spec)
    except LayerError as exc:
        return [f"model.layers: {exc}"]
    if layers[-1].name != "linear" or layers[-1].shape_out != (10,):
        return ["model.layers must end with 'linear 10' (one output per class)"]
    return []
