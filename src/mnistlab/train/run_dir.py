"""The run directory: config.toml, metrics.json, the checkpoint, the model file and curves, locked while written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mnistlab.data.splits import MnistData, Split, to_float
from mnistlab.datasets import DATASETS
from mnistlab.errors import MnistlabError
from mnistlab.files import FolderLock, atomic_write_text, check_output_dir, clear_dir, signals_held, write_json
from mnistlab.models.calibration import ConfidenceMap, calibrated, fit_on_split, reliability
from mnistlab.models.calibration import calibration as calibration_of
from mnistlab.models.files import save_model
from mnistlab.models.metrics import predict_scores
from mnistlab.models.networks import Standardized, as_probabilities, for_inference
from mnistlab.models.outliers import fit_detector, fit_max_probability
from mnistlab.train.checkpoint import CHECKPOINT
from mnistlab.train.state import Run, RunState


class RunDirectory:
    """The folder a run writes, locked while the run lasts.

    Nothing is written into it until the first epoch is saved (config.toml, checkpoint, metrics.json), and
    only then is an old run replaced (`--force`): a run that fails or is interrupted before that leaves the
    folder as it found it. The model files and curves are written when the run ends.
    """

    def __init__(self, path: str | Path, *, force: bool = False, resuming: bool = False, tensorboard: bool = False):
        self.path = Path(path)
        self.resuming = resuming
        if tensorboard:
            _check_tensorboard()
        if not resuming:
            check_output_dir(self.path, force)  # before any work
        self._lock = FolderLock(self.path)
        try:
            with signals_held():  # taken whole or not at all: a Ctrl-C meanwhile is raised just after, and below
                self._lock.acquire()  # the lock is released again, removing the folder it made
            if not resuming:
                check_output_dir(self.path, force)  # again: another run may have finished meanwhile
        except BaseException:
            self._lock.release()
            raise
        self._tensorboard = tensorboard
        self._writer = None
        self.saved = 0  # epochs saved by this process

    def save_epoch(self, state: RunState, device: torch.device, ranks_rng: list[dict[str, torch.Tensor]]) -> None:
        """After an epoch: the checkpoint, metrics.json and the TensorBoard scalars; config.toml at the first."""
        if not self.saved and not self.resuming:
            clear_dir(self.path)
            atomic_write_text(self.path / "config.toml", state.config.to_toml())
        with signals_held():  # a resumable checkpoint always has the metrics.json of its epoch beside it
            state.to_checkpoint(ranks_rng).save(self.path / CHECKPOINT)
            write_json(self.path / "metrics.json", _metrics(state, device))
        self.saved = state.epoch
        if self._tensorboard:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(self.path / "tensorboard"))
            record = state.epochs[-1]
            for key, value in record.items():
                if key != "epoch":
                    self._writer.add_scalar(key.replace("_", "/", 1), value, record["epoch"])

    def finish(self, run: Run, normalize: tuple[float, float] | None, data: MnistData) -> list[str]:
        """The finished run's model files (calibrated on the validation split, where there is one), metrics,
        config (with the epochs it was trained to), curves and reliability diagram; returns the files' names."""
        from mnistlab.plots import plot_curves, plot_reliability

        config = run.config

        def outputs(split: Split) -> torch.Tensor:
            return predict_scores(run.model, split.images, normalize).cpu()

        def probabilities(outputs: torch.Tensor) -> torch.Tensor:
            return as_probabilities(outputs, config.model.softmax_output)

        # The temperature and the outlier threshold are chosen on the validation split (the outlier density is
        # fitted on the training split); the test split only shows how well they hold.
        calibration = outliers = confidence_map = None
        if data.val is not None:
            val = outputs(data.val)
            calibration = fit_on_split(probabilities(val.float()), data.val.labels.cpu())
            confidence_map = ConfidenceMap.from_dict(calibration["confidence_map"], self.path)
            if config.training.outlier_exposure > 0:  # trained to be unsure of non-digits: its confidence is the score
                # in float64, as LoadedModel.answering() computes them for this method
                val_probs = calibrated(probabilities(val.double()), calibration["temperature"], confidence_map)
                outliers = (None, fit_max_probability(val_probs))
            else:
                network = Standardized(for_inference(run.model), normalize)
                outliers = fit_detector(
                    network, (to_float(data.train.images), data.train.labels), to_float(data.val.images)
                )
        # The test split measured, as test_accuracy is: the file records how well the calibration held there.
        tables, recorded = {}, {}
        if calibration is not None:
            test, labels = probabilities(outputs(data.test).float()), data.test.labels.cpu()
            tempered = calibrated(test.double(), calibration["temperature"], confidence_map)
            tables = {
                "as trained": reliability(test, labels),
                f"temperature {calibration['temperature']:.3g} + confidence map": reliability(tempered, labels),
            }
            recorded = {"test_ece": calibration_of(tempered, labels).ece}
        atomic_write_text(self.path / "config.toml", config.to_toml())
        saved = run.saved
        save_model(
            run.model,
            config.model,
            self.path,
            normalize,
            metadata={
                "config": config.name,
                "dataset": config.data.dataset,
                "classes": list(DATASETS[config.data.dataset].classes),
                "loss": config.training.loss,
                "label_smoothing": config.training.label_smoothing,
                "epoch": saved["epoch"],
                "test_accuracy": saved["test_accuracy"],
                "split": {"seed": config.training.seed, "val_size": config.data.val_size},
                **recorded,
            },
            calibration=calibration,
            outliers=outliers,
        )
        plot_curves(run.epochs, self.path / "curves.png", f"{config.name}: {config.summary()}")
        written = ["model.safetensors", "model.json", "metrics.json", "curves.png", "config.toml"]
        if tables:
            plot_reliability(tables, self.path / "reliability.png", f"{config.name}: test split")
            written.append("reliability.png")
        return written

    def close(self) -> None:
        """Release the lock (which removes the folder again if this run made it and never saved into it)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._lock.release()


def _check_tensorboard() -> None:
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise MnistlabError(
            "--tensorboard needs the tensorboard package: pip install 'mnistlab[tensorboard]'"
        ) from None


def _metrics(state: RunState, device: torch.device) -> dict[str, Any]:
    config, tracker = state.config, state.tracker
    restored = bool(config.training.early_stopping)
    return {
        "config": config.name,
        "device": str(device),
        "world_size": state.cluster.world_size,
        "backend": state.cluster.backend,
        "torch": torch.__version__,
        "epochs": state.epochs,
        "final": state.epochs[-1] if state.epochs else None,
        "monitor": tracker.monitor,
        "best_epoch": tracker.best_epoch,
        "best_value": tracker.best_value,
        "stop_reason": state.stop_reason,
        "saved_model_epoch": tracker.best_epoch if restored else state.epoch,
    }


def epoch_line(r: dict[str, Any], total: int) -> str:
    parts = [f"epoch {r['epoch']}/{total}", f"train loss {r['train_loss']:.4f} acc {100 * r['train_accuracy']:.2f}%"]
    if "val_loss" in r:
        parts.append(f"val loss {r['val_loss']:.4f} acc {100 * r['val_accuracy']:.2f}%")
    parts.append(f"test loss {r['test_loss']:.4f} acc {100 * r['test_accuracy']:.2f}%")
    parts.append(f"{r['seconds']:.1f}s")
    return " | ".join(parts)
