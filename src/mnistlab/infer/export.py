"""ONNX export of a saved model, checked against PyTorch on real test images.

The exported graph takes `images` (N, 28, 28) float32 with pixels in [0, 1] (N free) and returns
`probabilities` (N, 10), calibrated, whatever the model's own output was (logits, Softmax, ensemble), and
`outlier_score` (N,) from the same forward pass: an image is unlike the model's training data ("not a digit")
where its score is above the model's outlier threshold, which the graph's metadata holds (`outlier_threshold`;
absent, and every score 0, for a model file without an outlier detector).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mnistlab.data.splits import to_float
from mnistlab.datasets import DIGITS
from mnistlab.errors import MnistlabError, warn
from mnistlab.files import make_dirs, replacing
from mnistlab.infer.evaluate import evaluation_split
from mnistlab.models.files import LoadedModel, load_model

# How close onnxruntime's answers must be to PyTorch's: probabilities within 1e-4 (absolute), outlier scores
# within 1e-3 of their size (sums of about 1,000 squares in float32, in another order). Measured on the bundled
# ensemble (1,000 test digits, 500 garments, 200 noise images): at most 6e-7 for both, BatchNorm folded or not.
PROBABILITY_TOLERANCE = 1e-4
SCORE_TOLERANCE = 1e-3
DOC = (
    "mnistlab model: images (N, 28, 28) float32 in [0, 1] -> probabilities (N, 10), calibrated, and outlier_score "
    "(N,) from the same pass; an image is flagged as unlike the training data where its score is above the "
    "metadata's outlier_threshold (no outlier_threshold: the model has no detector and every score is 0)."
)


def agree(probabilities: float, scores: float) -> bool:
    """Whether `differences` are within PROBABILITY_TOLERANCE and SCORE_TOLERANCE (a NaN difference is not)."""
    return probabilities < PROBABILITY_TOLERANCE and scores < SCORE_TOLERANCE


def differences(
    expected: tuple[torch.Tensor, torch.Tensor], got: tuple[torch.Tensor, torch.Tensor]
) -> tuple[float, float]:
    """The largest absolute probability difference and the largest outlier score difference relative to the
    expected score (scores of 0, from a model without a detector, must be 0)."""
    probabilities = float((torch.as_tensor(got[0]) - expected[0]).abs().max())
    scores = (torch.as_tensor(got[1]) - expected[1]).abs() / expected[1].abs().clamp_min(1e-30)
    return probabilities, float(scores.max()) if len(scores) else 0.0


def onnx_bytes(loaded: LoadedModel) -> bytes:
    """`loaded` as an ONNX model (opset of torch's exporter): `images` (N, 28, 28) float32 in [0, 1], N free,
    to `probabilities` (N, 10) and `outlier_score` (N,), with the outlier threshold in its metadata. Needs onnx
    and onnxscript; a second or two for a small CNN (four for the first export in a process, which loads the
    exporter)."""
    batch = torch.export.Dim("batch", min=1)
    # The exporter reports its progress on stdout and warns about optional torchvision ops and its own
    # deprecations on stderr, and its graph library about the zeros a model without a detector outputs as its
    # scores; none of it concerns the user, so keep the command's output clean.
    for name in ("torch.onnx", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            loaded.answering().eval(),
            (torch.rand(2, 28, 28),),
            input_names=["images"],
            output_names=["probabilities", "outlier_score"],
            dynamic_shapes={"images": {0: batch}},
            dynamo=True,
        )
    proto = program.model_proto
    proto.doc_string = DOC
    if loaded.outlier_threshold is not None:
        proto.metadata_props.add(key="outlier_threshold", value=repr(loaded.outlier_threshold))
    return proto.SerializeToString()


@dataclass
class ExportCheck:
    path: Path
    images: int
    max_abs_diff: float
    argmax_agreement: float
    classes: list[str] = field(default_factory=lambda: list(DIGITS))  # the model's class names
    max_score_diff: float = 0.0  # the largest outlier score difference, relative to PyTorch's score


def export_onnx(
    model_path: str | Path | None,
    onnx_path: str | Path,
    data_dir: str | Path | None = None,
    check_images: int = 1000,
    force: bool = False,
) -> ExportCheck:
    """Export to ONNX (dynamic batch), then run onnxruntime and PyTorch on `check_images` test images and
    require probabilities within 1e-4, outlier scores within a relative 1e-3 and the same predicted class for
    every image. Nothing is written unless the check passes; an existing file is replaced only with `force`."""
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
    images = evaluation_split(loaded, data_dir).images[:check_images]
    x = to_float(images)
    with torch.inference_mode():
        expected = loaded.answering().eval()(x)
    with replacing(out) as tmp:  # the file appears only once the check has passed
        tmp.write_bytes(onnx_bytes(loaded))
        session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = tuple(torch.from_numpy(a) for a in session.run(["probabilities", "outlier_score"], {"images": x.numpy()}))
        diff, score_diff = differences(expected, got)
        agreement = float((got[0].argmax(1) == expected[0].argmax(1)).double().mean())
        if not agree(diff, score_diff) or agreement < 1.0:
            raise MnistlabError(
                f"ONNX check failed: max probability difference {diff:.2e}, max relative outlier score difference "
                f"{score_diff:.2e}, argmax agreement {agreement:.4f}; nothing was written"
            )
    if out.suffix.lower() != ".onnx":  # written all the same (the name is the user's), once it is written
        warn(f"{out}: an ONNX model, though its name does not end in .onnx (onnxruntime reads it whatever its name)")
    return ExportCheck(out, len(x), diff, agreement, loaded.classes, score_diff)
