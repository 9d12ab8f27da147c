"""ONNX export of a saved model, checked against PyTorch on real test images.

The exported graph takes `images` (N, 28, 28) float32 with pixels in [0, 1] (N free) and returns
`probabilities` (N, 10), whatever the model's own output was (logits, Softmax, ensemble).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mnistlab.data.splits import to_float
from mnistlab.datasets import DIGITS
from mnistlab.errors import MnistlabError, warn
from mnistlab.files import make_dirs, replacing
from mnistlab.infer.evaluate import evaluation_split
from mnistlab.models.files import LoadedModel, load_model


class _Probabilities(nn.Module):
    def __init__(self, loaded: LoadedModel):
        super().__init__()
        self.model, self.to_probabilities = loaded.model, loaded.probabilities_of

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.to_probabilities(self.model(images))


def onnx_bytes(loaded: LoadedModel) -> bytes:
    """`loaded` as an ONNX model (opset of torch's exporter): `images` (N, 28, 28) float32 in [0, 1], N free,
    to `probabilities` (N, 10). Needs onnx and onnxscript; a second or two for a small CNN (four for the
    first export in a process, which loads the exporter)."""
    batch = torch.export.Dim("batch", min=1)
    # The exporter reports its progress on stdout and warns about optional torchvision ops and its own
    # deprecations on stderr; none of it concerns the user, so keep the command's output clean.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            _Probabilities(loaded).eval(),
            (torch.rand(2, 28, 28),),
            input_names=["images"],
            output_names=["probabilities"],
            dynamic_shapes={"images": {0: batch}},
            dynamo=True,
        )
    return program.model_proto.SerializeToString()


@dataclass
class ExportCheck:
    path: Path
    images: int
    max_abs_diff: float
    argmax_agreement: float
    classes: list[str] = field(default_factory=lambda: list(DIGITS))  # the model's class names


def export_onnx(
    model_path: str | Path | None,
    onnx_path: str | Path,
    data_dir: str | Path | None = None,
    check_images: int = 1000,
    force: bool = False,
) -> ExportCheck:
    """Export to ONNX (dynamic batch), then run onnxruntime and PyTorch on `check_images` test images and
    require probabilities within 1e-4 and the same predicted digit for every image. Nothing is written unless
    the check passes; an existing file is replaced only with `force`."""
    out = Path(onnx_path)
    if out.is_dir():
        raise MnistlabError(f"{out}: is a folder; give the path of the .onnx file to write")
    if out.exists() and not force:
        raise MnistlabError(f"{out} already exists (use --force to replace it)")
    make_dirs(out.parent)
    try:
        import onnxruntime
    except ImportError:
        raise MnistlabError("ONNX export needs onnx and onnxruntime: pip install 'mnistlab[onnx]'") from None
    loaded = load_model(model_path, "cpu")
    module = _Probabilities(loaded).eval()
    images = evaluation_split(loaded, data_dir).images[:check_images]
    x = to_float(images)
    with torch.inference_mode():
        expected = module(x).numpy()
    with replacing(out) as tmp:  # the file appears only once the check has passed
        tmp.write_bytes(onnx_bytes(loaded))
        session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = session.run(["probabilities"], {"images": x.numpy()})[0]
        diff = float(abs(got - expected).max())
        agreement = float((got.argmax(1) == expected.argmax(1)).mean())
        if not diff < 1e-4 or agreement < 1.0:  # `not <` so that a NaN difference fails too
            raise MnistlabError(
                f"ONNX check failed: max probability difference {diff:.2e}, argmax agreement {agreement:.4f}; "
                "nothing was written"
            )
    if out.suffix.lower() != ".onnx":  # written all the same (the name is the user's), once it is written
        warn(f"{out}: an ONNX model, though its name does not end in .onnx (onnxruntime reads it whatever its name)")
    return ExportCheck(out, len(x), diff, agreement, loaded.classes)
