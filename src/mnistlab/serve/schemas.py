"""The JSON the web API takes and answers, as Pydantic models: `/openapi.json` is generated from them, and every
answer is validated against its model on the way out (a route that drifted from its model fails loudly).

Request bodies are read by hand (`bodies.read_upload`: one-line refusals with statuses that say why, not
FastAPI's validation errors), so their models describe them for the OpenAPI document: `image_body` refers an
operation to them and `request_schemas` puts them among its components."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

REF = "#/components/schemas/{model}"
DATA_URL = "data:image/png;base64,iVBORw0..."
IMAGE_FILE = "the image file: PNG, JPEG, ... (at most 5 MB, and the preprocessing pixel limit)"
LABEL = "the class the image shows (the served models' class number)"

# ---------------------------------------------------------------------------------------------- requests


class PredictRequest(BaseModel):
    """An image as JSON: a base64 data URL, as a canvas's `toDataURL()` gives it."""

    image: str = Field(description="the image as a base64 data URL", examples=[DATA_URL])


class PredictUpload(BaseModel):
    """An image as a multipart form: the file in the field `image`."""

    image: bytes = Field(description=IMAGE_FILE)


class CollectRequest(PredictRequest):
    """A labelled image as JSON."""

    label: int = Field(ge=0, le=9, description=LABEL)


class CollectUpload(PredictUpload):
    """A labelled image as a multipart form."""

    label: int = Field(ge=0, le=9, description=LABEL)


MODEL = "a served model's name, as /api/models lists it (default: the first served)"


class ExplainRequest(PredictRequest):
    """An image to explain, as JSON."""

    model: str | None = Field(None, description=MODEL)
    method: str = Field(
        "integrated-gradients",
        description="integrated-gradients (or ig), occlusion, saliency, or grad-cam (convolutional networks only)",
    )
    target: int | str | None = Field(
        None,
        description="also explain this class (its number, or one of the model's class names), after the answer; "
        "default: the answer and the runner-up",
    )


class ExplainUpload(PredictUpload):
    """An image to explain, as a multipart form."""

    model: str | None = Field(None, description=MODEL)
    method: str = Field("integrated-gradients", description=ExplainRequest.model_fields["method"].description)
    target: str | None = Field(None, description=ExplainRequest.model_fields["target"].description)


class InsideRequest(PredictRequest):
    """An image whose activations to show, as JSON."""

    model: str | None = Field(None, description=MODEL)


class InsideUpload(PredictUpload):
    """An image whose activations to show, as a multipart form."""

    model: str | None = Field(None, description=MODEL)


NEIGHBOURS = "how many training images to return (1 to 20)"


class NeighboursRequest(InsideRequest):
    """An image whose nearest training images to find, as JSON."""

    k: int = Field(5, ge=1, le=20, description=NEIGHBOURS)


class NeighboursUpload(InsideUpload):
    """An image whose nearest training images to find, as a multipart form."""

    k: int = Field(5, ge=1, le=20, description=NEIGHBOURS)


class RunRequest(BaseModel):
    """A run to start (or a learning rate to find): a shipped config and the values that change in it."""

    config: str = Field(description="a shipped config's name, as GET /api/configs lists it", examples=["seed-b-fixed"])
    set: dict[str, Any] = Field(
        default_factory=dict,
        description="values by dotted key: a string is read as `--set KEY=VALUE` reads it (a TOML value, else the "
        "text), a number, boolean or list is taken as it is, null keeps the config's",
        examples=[{"training.epochs": 2, "optimizer.lr": "0.01"}],
    )


REQUEST_MODELS: tuple[type[BaseModel], ...] = (
    RunRequest,
    PredictRequest,
    PredictUpload,
    CollectRequest,
    CollectUpload,
    ExplainRequest,
    ExplainUpload,
    InsideRequest,
    InsideUpload,
    NeighboursRequest,
    NeighboursUpload,
)


def image_body(as_json: type[BaseModel], as_form: type[BaseModel]) -> dict[str, Any]:
    """An operation's request body, for a route's `openapi_extra`: JSON or a multipart form, each its model."""
    content = {"application/json": as_json, "multipart/form-data": as_form}
    return {
        "requestBody": {
            "required": True,
            "content": {media: {"schema": {"$ref": REF.format(model=m.__name__)}} for media, m in content.items()},
        }
    }


def request_schemas() -> dict[str, Any]:
    """The JSON schemas of the request models, by name, for the OpenAPI document's components."""
    _, schema = models_json_schema([(m, "validation") for m in REQUEST_MODELS], ref_template=REF)
    return schema["$defs"]


# ---------------------------------------------------------------------------------------------- answers


class Answer(BaseModel):
    """An answer of the API: exactly these fields, no others."""

    model_config = ConfigDict(extra="forbid")


class Prediction(Answer):
    """One model's answer for one image."""

    model: str = Field(description="the served model's name, as /api/models lists it")
    label: int = Field(description="the most probable class's number")
    class_: str = Field(alias="class", description="the most probable class's name")
    confidence: float = Field(description="its probability (6 decimals)")
    probabilities: list[float] = Field(description="every class's probability, by class number (6 decimals)")
    outlier: bool | None = Field(
        description="whether the image looks unlike the model's training data (\"doesn't look like a digit\"): its "
        "outlier_score is above the model's outlier_threshold; null: the model has no outlier detector"
    )
    outlier_score: float | None = Field(
        description="how unlike the training data the image is, by the density of the model's features (higher: "
        "less alike; 6 significant digits); null: the model has no outlier detector"
    )


class PredictResponse(Answer):
    """Every served model's answer, in the order served, and the image they saw."""

    predictions: list[Prediction]
    preprocessed: str = Field(description="the 28x28 image the models saw, as a base64 PNG (white ink on black)")


class ModelInfo(Answer):
    """A served model."""

    name: str
    engine: Literal["torch", "onnxruntime"] = Field(description="what runs it")
    architecture: str = Field(description='one line, such as "MLP 784-512-10 relu"')
    parameters: int
    dataset: str
    classes: list[str] = Field(description="the class names, by class number")
    item: str = Field(description='what one of its images shows ("digit", "garment"), for "doesn\'t look like a digit"')
    test_accuracy: float | None = Field(description="as its model file records it (none in an older ensemble's)")
    members_test_accuracy: list[float] = Field(description="an ensemble's members' test accuracies")
    calibrated: bool = Field(
        description="whether its probabilities are temperature-scaled on held-out data (an ensemble: each member)"
    )
    temperature: float | None = Field(description="its temperature (none for an ensemble or an uncalibrated model)")
    confidence_map: bool = Field(
        description="whether its top label's probability then goes through a confidence map fitted on held-out data "
        "(a single model's, trained or calibrated since the map came; never an ensemble's)"
    )
    calibration_ece: float | None = Field(
        description="the expected calibration error of its calibrated probabilities on its validation split, "
        "as its model file records it (none where it records none: an ensemble, an older file)"
    )
    test_ece: float | None = Field(
        description="the expected calibration error of its calibrated probabilities on its test split, as its model "
        "file records it (measured when it was trained or averaged; none in an older file)"
    )
    outlier_threshold: float | None = Field(
        description="the outlier score above which an image is flagged (chosen to flag at most 1% of its held-out "
        "validation images); null: the model has no outlier detector"
    )


class ModelsResponse(Answer):
    """The served models, and whether /api/collect saves drawings."""

    models: list[ModelInfo]
    collect: bool


class HealthResponse(Answer):
    """The server answers; and how many images it classified in how many forward passes (batching at work)."""

    status: Literal["ok"]
    models: int
    images: int
    forward_passes: int


class CollectResponse(Answer):
    """Where a labelled drawing was saved, and how many its class's folder holds now."""

    saved: str = Field(description="its path in the collect folder: <label>/<server-chosen name>.png")
    count: int


class Refusal(Answer):
    """A refused request: why, in one line."""

    detail: str


MALFORMED = "Malformed: an empty body, no image field, bad JSON or data URL, a label that is no class number"
REFUSALS: dict[int | str, dict[str, Any]] = {
    400: {"model": Refusal, "description": MALFORMED},
    413: {"model": Refusal, "description": "The body is over 5 MB, or the image over the pixel limit"},
    415: {"model": Refusal, "description": "Not an image, or a content type other than multipart or JSON"},
    422: {"model": Refusal, "description": "A truncated or corrupt image, or a blank drawing"},
}


# ---------------------------------------------------------------------------------------------- explanations


class AttributionMap(Answer):
    """One class's attribution map: how much each pixel of the 28x28 view counted for or against it."""

    target: int = Field(description="the class explained, by number")
    class_: str = Field(alias="class", description="its name")
    role: Literal["answer", "runner-up", "asked"] = Field(description="why it is explained")
    map: list[list[float]] = Field(
        description="28 rows of 28 numbers (4 significant digits): > 0 evidence for the class, < 0 against "
        "(grad-cam: >= 0); in units of the network's score (its output before the softmax)"
    )
    scale: float = Field(description="the largest |value| of the map: what the overlay's strongest colour means")
    overlay: str = Field(
        description="the map as a 28x28 RGBA PNG (base64) to lay over the view: red for evidence for, blue against, "
        "opacity by |value| / scale, transparent where it is under 5% of the scale"
    )
    completeness_error: float | None = Field(
        description="integrated gradients: |sum of the map - (score(image) - score(black))| relative to the latter; "
        "null for the other methods"
    )


class ExplainResponse(Answer):
    """One model's explanation of one image."""

    model: str
    method: Literal["integrated-gradients", "occlusion", "saliency", "grad-cam"]
    members: int = Field(description="1, or the ensemble's size: its maps are the members' mean")
    label: int = Field(description="the model's answer, by class number")
    probabilities: list[float] = Field(description="the model's calibrated probabilities, by class number")
    preprocessed: str = Field(description="the 28x28 image explained, as a base64 PNG (white ink on black)")
    attributions: list[AttributionMap] = Field(
        description="the answer's map, then the asked target's (if any), then the runner-up's"
    )


class LayerActivations(Answer):
    """What one layer of the network computed for the image."""

    name: str = Field(description='the layer, such as "conv 1 (32 maps, 28x28)" or "hidden 1 (512 units)"')
    kind: Literal["maps", "units"] = Field(description="maps: a convolution's feature maps; units: a hidden layer's")
    shape: list[int] = Field(description="(channels, height, width) for maps, (units,) for units")
    maximum: float = Field(description="the largest activation of the layer: what white (or a full bar) means")
    tiles: list[str] | None = Field(
        description="maps: one greyscale 28x28 (or smaller) PNG (base64) per channel shown, 0 black to the layer's "
        "maximum white; else null"
    )
    values: list[float] | None = Field(description="units: every unit's activation (6 significant digits); else null")
    top_units: list[int] = Field(description="units: the most active (at most 16), most active first; maps: none")
    channels: list[int] = Field(
        description="maps: the layer's channels the tiles show (at most 16, the most active first); units: none"
    )
    member: int | None = Field(
        description="an ensemble: the member whose layers these are (its first, 0); null for a single network"
    )
    unit_weights: list[str] | None = Field(
        description="an MLP's first layer: the top units' input weights as 28x28 RGBA PNGs (base64; red positive, "
        "blue negative): what each unit looks for; else null"
    )


class ActivationsResponse(Answer):
    """What each layer of one model computed for one image."""

    model: str
    preprocessed: str = Field(description="the 28x28 image, as a base64 PNG")
    layers: list[LayerActivations]


class NeighbourImage(Answer):
    """A training image near the input in the model's penultimate features."""

    index: int = Field(description="its place in the training file")
    label: int
    class_: str = Field(alias="class")
    distance: float = Field(description="its distance from the input in the model's penultimate features")
    image: str = Field(description="the training image, as a 28x28 base64 PNG")


class NeighboursResponse(Answer):
    """The training images nearest one image, as one model sees them."""

    model: str
    neighbours: list[NeighbourImage] = Field(description="nearest first")


# ---------------------------------------------------------------------------------------------- the lab

RunStatus = Literal["queued", "running", "finished", "stopped", "failed"]


class LabResponse(Answer):
    """Whether the lab (training from the page) is on, and what it is doing."""

    enabled: bool
    reason: str | None = Field(description="why the lab is off; null when on")
    token_required: bool = Field(description="whether writes (starting, stopping runs) need the server's token")
    runs_dir: str = Field(description="the folder the runs are written in (--runs)")
    running: str | None = Field(description="the run training now, if any")
    queue: list[str] = Field(description="the runs waiting, first to start first")


class ConfigInfo(Answer):
    """A shipped config."""

    name: str
    description: str
    summary: str = Field(description="one line saying what it trains, from its values")
    values: dict[str, Any] = Field(description="every value by dotted key (optimizer.lr)")


class ConfigKey(Answer):
    """A key a run can set."""

    key: str = Field(description="dotted, such as optimizer.lr")
    type: Literal["float", "int", "bool", "str", "list"]
    choices: list[str] | None = Field(description="the names it may take; null: any value of its type")
    help: str | None


class ConfigsResponse(Answer):
    """The shipped configs and the keys the form can set."""

    configs: list[ConfigInfo]
    keys: list[ConfigKey]


class RunStarted(Answer):
    """A run queued or started."""

    id: str = Field(description="the run's name: <config>-<n>, its folder under the runs folder")
    status: Literal["queued", "running"]


class RunInfo(Answer):
    """A run directory under the runs folder (started here or in a terminal), or a run the lab has queued."""

    id: str
    config: str = Field(description="the shipped config it started from")
    description: str
    status: RunStatus
    reason: str | None = Field(description="why it failed (its error, or its last lines), or why it stopped")
    epoch: int = Field(description="epochs done")
    epochs: int | None = Field(description="the epochs it trains to")
    best_epoch: int | None = Field(description="the epoch early stopping's monitor found best so far")
    best_val_accuracy: float | None
    test_accuracy: float | None = Field(description="a finished run's model's (of the epoch it keeps)")
    created: str = Field(description="when it was made, ISO 8601 (UTC)")
    seconds: float = Field(description="training time of its epochs, summed")
    elapsed: float | None = Field(description="a running run: seconds since its process started")
    eta: float | None = Field(description="a running run: an estimate of the seconds left")
    served: bool = Field(description="whether its model is served (GET /api/models lists it under the run's id)")
    resumable: bool = Field(description="stopped or failed with a checkpoint: POST .../resume continues it")


class RunDetail(RunInfo):
    """One run with its config's values and its metrics so far."""

    epochs: list[dict[str, Any]] = Field(  # type: ignore[assignment]
        description="its epoch records so far, as metrics.json holds them (the target: values['training.epochs'])"
    )
    values: dict[str, Any] = Field(description="its fully resolved config by dotted key")
    progress: list[dict[str, Any]] = Field(
        description="its progress events (epoch, images, train_size, train_loss, train_accuracy) in this server's life"
    )


class RunsResponse(Answer):
    """Every run, newest first."""

    runs: list[RunInfo]


class LrFindResponse(Answer):
    """The learning-rate range test's answer (`mnistlab lr-find`)."""

    suggested_lr: float
    method: str = Field(description="how the rate was chosen")
    points: list[list[float]] = Field(description="[learning rate, smoothed loss] for each batch")
