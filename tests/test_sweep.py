"""`mnistlab sweep`: search spaces, studies shared by worker processes on a journal file and on PostgreSQL,
pruning, interruptions, resumption, reports. Trials train a small MLP on a 2,500-image slice of the real MNIST
(written as IDX files, since worker processes load their data from disk), so every trial is a real run."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from mnistlab.cli import main
from mnistlab.config import load_config, shipped_configs
from mnistlab.data.idx import read_images, read_labels
from mnistlab.errors import MnistlabError
from mnistlab.files import Interrupts
from mnistlab.sweep.plan import SweepOptions, make_plans
from mnistlab.sweep.space import Param, Space, apply, check_space, load_space_file, parse_spec
from mnistlab.sweep.storage import open_storage, open_study

from .support.cli import assert_user_error, mnistlab, run_main
from .support.idx_files import write_images, write_labels

TINY = """description = "a small MLP for sweep tests"
[model]
hidden = [32]
activations = ["relu"]
[optimizer]
name = "sgd"
lr = 0.01
[training]
epochs = {epochs}
batch_size = 64
[data]
val_size = 500
"""


@pytest.fixture(scope="module")
def small_mnist(mnist_path, tmp_path_factory) -> Path:
    """The first 2,500 training images (500 of them become the validation split) and 500 test images of the
    real MNIST, as IDX files under <dir>/mnist/."""
    root = tmp_path_factory.mktemp("small-mnist")
    (root / "mnist").mkdir()
    for split, n in (("train", 2500), ("t10k", 500)):
        images = read_images(mnist_path / f"{split}-images-idx3-ubyte.gz")[:n]
        labels = read_labels(mnist_path / f"{split}-labels-idx1-ubyte.gz")[:n]
        write_images(root / "mnist" / f"{split}-images-idx3-ubyte.gz", images, compress=True)
        write_labels(root / "mnist" / f"{split}-labels-idx1-ubyte.gz", labels, compress=True)
    return root


def tiny_config(folder: Path, epochs: int = 2) -> Path:
    path = folder / f"tiny-{epochs}.toml"
    path.write_text(TINY.format(epochs=epochs))
    return path


def table_rows(report: str) -> list[int]:
    """The trial numbers in a report's trials table, in order."""
    table = report.split("## Trials", 1)[1].strip().splitlines()[2:]
    return [int(row.split("|")[1].strip().split()[0].strip("*")) for row in table]


def load_study(out: Path, storage: str | None = None) -> optuna.Study:
    saved = json.loads((out / "sweep.json").read_text())
    where = storage or str(out / saved["storage"])
    return optuna.load_study(study_name=saved["study"], storage=open_storage(where))


def by_state(study: optuna.Study) -> dict[TrialState, list[int]]:
    trials = study.get_trials(deepcopy=False)
    return {s: sorted(t.number for t in trials if t.state == s) for s in TrialState}


def check_trial_folders(out: Path, study: optuna.Study) -> None:
    """Every finished trial is an ordinary run directory marked with its own state; each number is one folder
    that exactly one worker process wrote."""
    trials = study.get_trials(deepcopy=False)
    folders = sorted(int(p.name) for p in (out / "trials").iterdir())
    assert folders == sorted(t.number for t in trials)
    assert len({t.number for t in trials}) == len(trials)
    for t in trials:
        folder = out / "trials" / str(t.number)
        marker = json.loads((folder / "trial.json").read_text())
        assert marker["trial"] == t.number
        assert t.user_attrs["worker"]["run_dir"] == str(folder)
        metrics = json.loads((folder / "metrics.json").read_text()) if t.state != TrialState.FAIL else {}
        if t.state == TrialState.COMPLETE:
            assert marker["state"] == "complete"
            assert (folder / "model.safetensors").is_file()
            assert len(metrics["epochs"]) == t.user_attrs["result"]["epochs"]
            assert t.value == metrics["epochs"][-1]["val_accuracy"] == marker["value"]
            config = load_config(folder / "config.toml").to_dict()
            for key, value in t.params.items():  # the folder trained what the study sampled
                section, field = key.split(".")
                assert config[section][field] == value
        elif t.state == TrialState.PRUNED:
            # Pruning leaves the loop by an exception: a checkpoint and metrics up to that epoch, no model.
            assert marker["state"] == "pruned"
            assert not (folder / "model.safetensors").exists()
            assert (folder / "checkpoint.safetensors").is_file()
            assert len(metrics["epochs"]) == marker["pruned_at"] == max(t.intermediate_values)
            assert marker["pruned_at"] < load_config(folder / "config.toml").training.epochs
        elif t.state == TrialState.FAIL:
            assert marker["state"] == "failed"


# ---------------------------------------------------------------------------------------------- spaces


def test_specs_parse_to_typed_params():
    assert parse_spec("optimizer.lr", "log:1e-4:1") == Param("optimizer.lr", "log", 1e-4, 1.0)
    assert parse_spec("training.batch_size", "int:16:256") == Param("training.batch_size", "int", 16, 256)
    assert parse_spec("training.batch_size", "log:16:256") == Param("training.batch_size", "log", 16, 256)
    assert parse_spec("optimizer.momentum", "float:0:0.99") == Param("optimizer.momentum", "float", 0.0, 0.99)
    assert parse_spec("optimizer.momentum", "0,0.9").choices == (0.0, 0.9)  # floats, like the config's field
    assert parse_spec("optimizer.name", "sgd, adam").choices == ("sgd", "adam")
    assert parse_spec("optimizer.nesterov", "true,false").choices == (True, False)
    assert parse_spec("training.epochs", "3") == 3  # one value: fixed for every trial, not searched


@pytest.mark.parametrize(
    ("key", "spec", "needle"),
    [
        ("optimizer.lrr", "log:1e-4:1", "unknown config key 'optimizer.lrr'"),
        ("optimiser.lr", "log:1e-4:1", "unknown config key 'optimiser.lr'"),
        ("optimizer.lr", "log:0:1", "positive bounds"),
        ("optimizer.lr", "log:-1:1", "positive bounds"),
        ("optimizer.lr", "log:1:1e-3", "empty range"),
        ("optimizer.lr", "float:0.5:0.5", "empty range"),
        ("training.batch_size", "int:64:32", "empty range"),
        ("optimizer.lr", "lg:1:2", "unknown range kind 'lg'"),
        ("optimizer.lr", "log:1", "LOW:HIGH"),
        ("optimizer.lr", "log:a:1", "not a number"),
        ("training.batch_size", "float:1:2", "takes an integer"),
        ("optimizer.momentum", "int:0:1", "takes a number"),
        ("optimizer.name", "log:1:2", "needs a numeric key"),
        ("training.batch_size", "32,abc", "'abc' is not an integer"),
        ("optimizer.nesterov", "yes,no", "not true or false"),
        ("optimizer.lr", "0.1,nan", "not a number"),
        ("model.hidden", "512", "--space-file"),
        ("optimizer.name", "sgd,sgd", "given twice"),
    ],
)
def test_bad_specs_are_one_line_errors(key, spec, needle, capsys, tmp_path):
    args = ["sweep", "--config", "seed-a", "--space", f"{key}={spec}", "--out", str(tmp_path / "sweep")]
    result = run_main(capsys, *args)
    assert_user_error(result, needle)
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--space", "optimizer.name=sgd,nope"], "unknown 'nope'"),
        (["--space", "optimizer.momentum=0,0.9", "--space", "optimizer.nesterov=true"], "nesterov needs"),
        (["--space", "training.batch_size=int:0:64"], "batch_size must be at least 1"),
        (["--space", "optimizer.lr=log:1e-4:1", "--space", "data.val_size=0"], "validation split"),
        (["--space", "optimizer.lr=0.1"], "nothing to search: --space optimizer.lr=0.1 is one value"),
        (["--space", "optimizer.lr=log:1e-3:1", "--space", "optimizer.lr=0.1"], "--space optimizer.lr is given twice"),
        (["--space", "training.epochs=1,2", "--epochs", "3"], "--epochs or --space training.epochs"),
        (["--space", "optimizer.lr=log:1e-4:1", "--threads", "0"], "--threads must be at least 1, got 0"),
        (["--space", "optimizer.lr=log:1e-4:1", "--workers", "0"], "--workers must be at least 1"),
        (["--space", "optimizer.lr=log:1e-4:1", "--timeout", "-5"], "--timeout must be above 0 seconds, got -5"),
        (["--space", "optimizer.lr=log:1e-4:1", "--timeout", "nan"], "--timeout must be above 0"),
        (["--space", "optimizer.lr=log:1e-4:1", "--metric", "test_accuracy"], "the test set never chooses"),
        (["--space", "optimizer.lr=log:1e-4:1", "--trials", "0"], "--trials"),
        (["--space", "optimizer"], "KEY=SPEC"),
        (["--preset", "no-such-preset"], "no sweep preset"),
    ],
)
def test_bad_sweeps_fail_before_any_work(args, needle, capsys, tmp_path):
    config = [] if "--preset" in args else ["--config", "seed-a"]
    assert_user_error(run_main(capsys, "sweep", *config, *args, "--out", str(tmp_path / "sweep")), needle)
    assert not (tmp_path / "sweep").exists()


def test_an_unknown_pruner_is_refused_with_the_choices(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["sweep", "--config", "seed-a", "--space", "optimizer.lr=log:1e-4:1", "--pruner", "sometimes"])
    assert exc.value.code == 2
    assert "--pruner: invalid choice: 'sometimes'" in capsys.readouterr().err


@settings(max_examples=60, deadline=None)
@given(low=st.floats(1e-7, 1e3), high=st.floats(1e-7, 1e3), seed=st.integers(0, 2**16))
def test_log_ranges_sample_inside_their_bounds_or_are_refused(low, high, seed):
    spec = f"log:{low!r}:{high!r}"
    if not low < high:
        with pytest.raises(MnistlabError, match="empty range"):
            parse_spec("optimizer.lr", spec)
        return
    param = parse_spec("optimizer.lr", spec)
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed)).ask()
    value = param.suggest(trial)
    assert low <= value <= high
    assert apply(load_config("seed-a"), {"optimizer.lr": value}).optimizer.lr == value


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(-5, 4096), min_size=2, max_size=6, unique=True))
def test_categorical_choices_are_checked_against_the_config_rules(sizes):
    space = Space()
    space.add("training.batch_size", parse_spec("training.batch_size", ",".join(map(str, sizes))))
    if min(sizes) < 1:
        with pytest.raises(MnistlabError, match="batch_size must be at least 1"):
            check_space(load_config("seed-a"), space)
    else:
        check_space(load_config("seed-a"), space)


def test_space_file_lists_tables_and_fixed_values(tmp_path):
    path = tmp_path / "space.toml"
    path.write_text(
        """
[space]
"optimizer.lr" = "log:1e-4:1"
"model.hidden" = [[64], [128, 32]]
"model.activations" = [["relu"], ["relu", "tanh"]]
optimizer = [{ name = "sgd", momentum = 0.9 }, { name = "adam" }]
training.batch_size = [32, 64]

[set]
"training.epochs" = 3
"""
    )
    spec = load_space_file(path)
    assert spec.space.fixed == {"training.epochs": 3}
    assert list(spec.space.params) == [
        "optimizer.lr",
        "model.hidden",
        "model.activations",
        "optimizer",
        "training.batch_size",
    ]
    assert spec.space.params["optimizer"].choices == ({"name": "sgd", "momentum": 0.9}, {"name": "adam"})
    # hidden sizes and activations of different lengths are a combination the config rules refuse
    with pytest.raises(MnistlabError, match="same length"):
        check_space(load_config("seed-a"), spec.space)
    config = apply(load_config("seed-a"), {"optimizer": {"name": "sgd", "momentum": 0.9}, "model.hidden": [64]})
    assert (config.optimizer.name, config.optimizer.momentum, config.model.hidden) == ("sgd", 0.9, [64])


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[space]\n"model.hidden" = [512, 64]', "each itself a list"),
        ('[space]\noptimizer = [{ name = "sgd", lrr = 0.1 }, { name = "adam" }]', "unknown config key 'optimizer.lrr'"),
        ('[space]\n"optimizer.lr" = "log:1e-4:1"\n"optimizer" = [{ lr = 0.1 }, { lr = 0.2 }]', "set both"),
        ('[space]\n"optimizer.lr" = ["fast", "slow"]', "not a number"),
        ('[space]\n"optimizer.lr" = "log:1e-4:1"\n[sett]\nx = 1', "unknown key(s) sett"),
        ('[space\n"optimizer.lr" = "log:1e-4:1"', "not valid TOML"),
        ('[space]\n"optimizer.lr" = "log:1e-4:1"\noptimizer.lr = "log:1e-3:1"', "optimizer.lr is given twice"),
        ('[set]\n"optimizer.lr" = 0.1\n[space]\n"optimizer.lr" = "log:1e-4:1"', "given twice, in [set] and in [space]"),
        ('[space]\n"optimizer.lr" = 0.1\n"optimizer.momentum" = [0.9]', "only fixes optimizer.lr, optimizer.momentum"),
    ],
)
def test_bad_space_files_are_one_line_errors(text, needle, tmp_path, capsys):
    path = tmp_path / "space.toml"
    path.write_text(text)
    args = ["sweep", "--config", "seed-a", "--space-file", str(path), "--out", str(tmp_path / "sweep")]
    result = run_main(capsys, *args)
    assert_user_error(result, needle, str(path))
    assert "--space" not in result.stderr  # the mistake is in the file: the message does not send them elsewhere


def test_a_journal_in_a_missing_folder_is_refused_and_only_folders_inside_out_are_made(tmp_path, capsys):
    """A mistyped --storage on a shared disk must not silently start a study of its own."""
    missing = tmp_path / "no-such-dir" / "study.journal"
    args = ["sweep", "--config", "seed-a", "--space", "optimizer.lr=log:1e-4:1", "--out", str(tmp_path / "sweep")]
    assert_user_error(run_main(capsys, *args, "--storage", str(missing)), f"the folder {missing.parent} does not exist")
    assert not missing.parent.exists() and not (tmp_path / "sweep").exists()
    inside = tmp_path / "sweep" / "studies" / "study.journal"  # inside --out: made when the sweep starts
    (plan,) = make_plans(SweepOptions(config="seed-a", space=args[4:5], storage=str(inside), out=tmp_path / "sweep"))
    assert plan.storage == str(inside)


def test_a_space_key_replaces_the_space_file_s_and_help_says_so(tmp_path, capsys):
    path = tmp_path / "space.toml"
    path.write_text('[space]\n"optimizer.lr" = "log:1e-4:1"\n"optimizer.momentum" = [0.0, 0.9]\n')
    options = SweepOptions(config="seed-a", space_file=path, space=("optimizer.lr=log:1e-2:1",), out=tmp_path / "s")
    (plan,) = make_plans(options)
    assert (plan.space["optimizer.lr"].low, plan.space["optimizer.momentum"].choices) == (1e-2, (0.0, 0.9))
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    assert "a key also in --space-file or --preset is replaced by this one" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--trials", "3"], "--trials is for running a sweep"),
        (["--workers", "2", "--space", "optimizer.lr=log:1e-4:1"], "--space, --workers are for running a sweep"),
        (["--data-dir", "somewhere"], "--data-dir is for running a sweep"),
    ],
)
def test_report_refuses_the_options_of_running_a_sweep(args, needle, tmp_path, capsys):
    assert_user_error(run_main(capsys, "sweep", "--report", str(tmp_path), *args), needle)


def readme_space_file() -> tuple[str, str]:
    """README's space file (the TOML block that starts `# my-space.toml`) and the config its command gives it."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    text = readme.split("```toml\n# my-space.toml\n", 1)[1].split("```", 1)[0]
    config = readme.split("--space-file my-space.toml", 1)[0].rsplit("--config ", 1)[1].split()[0]
    return text, config


MLP_CONFIGS = [name for name in shipped_configs() if load_config(name).model.kind == "mlp"]


@pytest.mark.parametrize("config", MLP_CONFIGS)
def test_readme_space_file_fits_every_shipped_mlp_config(config, tmp_path):
    """Its hidden-layer choices carry the config's activations, as README says: by position, the last repeated."""
    path = tmp_path / "my-space.toml"
    path.write_text(readme_space_file()[0])
    (plan,) = make_plans(SweepOptions(config=config, space_file=path, out=tmp_path / "sweep"))
    activations = load_config(config).model.activations
    for hidden in plan.space["model.hidden"].choices:
        got = apply(plan.config, {"model.hidden": hidden}).model.activations
        assert got == [activations[min(i, len(activations) - 1)] for i in range(len(hidden))]


@settings(max_examples=60, deadline=None)
@given(
    base=st.lists(st.sampled_from(["relu", "tanh", "sigmoid"]), min_size=1, max_size=4),
    hidden=st.lists(st.integers(1, 64), min_size=0, max_size=5),
)
def test_activations_follow_a_hidden_choice_unless_given(base, hidden):
    config = load_config("seed-a").with_overrides({"model.hidden": [8] * len(base), "model.activations": base})
    followed = apply(config, {"model.hidden": hidden}).model
    assert followed.hidden == hidden and len(followed.activations) == len(hidden)
    assert followed.activations[: len(base)] == base[: len(hidden)]  # each layer keeps its own where it has one
    assert set(followed.activations[len(base) :]) <= {base[-1]}
    assert apply(config, {"model": {"hidden": hidden}}).model == followed  # a table choice follows the same way
    if len(hidden) != len(base):  # given, the activations are the user's: never changed
        with pytest.raises(MnistlabError, match="same length"):
            apply(config, {"model.hidden": hidden, "model.activations": base})


def test_fixed_activations_are_not_followed_but_refused(tmp_path):
    path = tmp_path / "space.toml"
    path.write_text('[space]\n"model.hidden" = [[64], [64, 32]]\n[set]\n"model.activations" = ["tanh"]\n')
    with pytest.raises(MnistlabError, match=r"model.activations is fixed at \[tanh\] but a model.hidden choice has 2"):
        make_plans(SweepOptions(config="seed-a", space_file=path, out=tmp_path / "sweep"))


def test_seed_lr_preset_sweeps_the_reports_networks_as_they_are():
    plans = make_plans(SweepOptions(preset="seed-lr", out="sweeps/seed-lr"))
    assert [p.config.name for p in plans] == ["seed-a", "seed-b", "seed-c"]
    assert all(p.config.model.softmax_output for p in plans)  # the report's quirk, kept on purpose
    assert [p.study for p in plans] == ["seed-lr-seed-a", "seed-lr-seed-b", "seed-lr-seed-c"]
    assert [p.out.name for p in plans] == ["seed-a", "seed-b", "seed-c"]
    space = plans[0].space
    assert space["optimizer.lr"].kind == "log"
    assert [c["name"] for c in space["optimizer"].choices] == ["sgd", "sgd", "adam"]
    assert [c.get("momentum", 0.0) for c in space["optimizer"].choices] == [0.0, 0.9, 0.0]


def test_importances_need_enough_complete_trials():
    from mnistlab.sweep.report import _importances

    study = optuna.create_study(direction="maximize")
    distribution = optuna.distributions.FloatDistribution(1e-4, 1, log=True)
    for value, lr in ((0.5, 0.01), (0.9, 0.1)):
        study.add_trial(optuna.create_trial(params={"lr": lr}, distributions={"lr": distribution}, value=value))
    assert _importances(study) == ({}, "Too few complete trials (2) to estimate parameter importances; 3 at least.")
    for value, lr in ((0.95, 0.2), (0.3, 0.001), (0.7, 0.05)):
        study.add_trial(optuna.create_trial(params={"lr": lr}, distributions={"lr": distribution}, value=value))
    importances, _ = _importances(study)
    assert list(importances) == ["lr"]


def test_a_signal_during_a_storage_write_waits_for_it_and_leaves_a_pruned_trial_pruned():
    """Ctrl-C during a trial's storage write (`hold`) takes effect once the write is done; if the trial is pruned
    meanwhile it stays pruned (a result), and the signal, still pending, stops the worker before its next trial."""
    with Interrupts() as interrupts:
        written = []
        with pytest.raises(KeyboardInterrupt), interrupts.allow(), interrupts.hold():
            signal.raise_signal(signal.SIGINT)
            written.append("report")
        assert written == ["report"]
    with Interrupts() as interrupts:
        with pytest.raises(optuna.TrialPruned), interrupts.allow(), interrupts.hold():
            signal.raise_signal(signal.SIGINT)
            raise optuna.TrialPruned()
        assert interrupts.pending  # the worker's loop stops on it
        with pytest.raises(KeyboardInterrupt), interrupts.allow():  # as would the next trial's training
            pass
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ---------------------------------------------------------------------------------------------- studies


@pytest.mark.slow  # about 40 s on 2 cores: three invocations of 2 worker processes, 16 trials in all
def test_two_workers_share_a_journal_study_and_a_second_run_continues_it(small_mnist, tmp_path):
    out = tmp_path / "sweep"
    args = [
        "sweep",
        "--config",
        str(tiny_config(tmp_path)),
        "--space",
        # The seed changes the initial weights and the validation split: the accuracy after one epoch varies
        # at random, so about half the trials past the median pruner's 5 start-up trials get pruned.
        "training.seed=int:0:1000000",
        "--workers",
        "2",
        "--out",
        str(out),
        "--data-dir",
        str(small_mnist),
    ]
    first = mnistlab(*args, "--trials", "10")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == f"report: {out / 'report.md'}"
    assert "2 workers x 1 thread," in first.stderr  # 2 cores here and in CI: one torch thread each
    study = load_study(out)
    states = by_state(study)
    assert len(states[TrialState.COMPLETE] + states[TrialState.PRUNED]) == 10
    assert states[TrialState.RUNNING] == states[TrialState.FAIL] == []
    assert sum(line.startswith("trial ") for line in first.stderr.splitlines()) == 10  # one line per trial
    check_trial_folders(out, study)
    pids = {t.user_attrs["worker"]["pid"] for t in study.trials}
    assert 1 <= len(pids) <= 2
    before = {p.name: p.read_text() for p in (out / "trials").glob("*/trial.json")}

    second = mnistlab(*args, "--trials", "16")
    assert second.returncode == 0, second.stderr
    study = load_study(out)
    states = by_state(study)
    assert sorted(states[TrialState.COMPLETE] + states[TrialState.PRUNED]) == list(range(16))
    assert states[TrialState.PRUNED], "11 trials past the pruner's 5 start-up trials: about half are pruned"
    check_trial_folders(out, study)
    assert {p.name: p.read_text() for p in (out / "trials").glob("*/trial.json") if p.name in before} == before
    sessions = [v for k, v in study.user_attrs.items() if k.startswith("session ")]
    assert sorted(s["trials"] for s in sessions) == [6, 10]

    again = mnistlab(*args, "--trials", "16")
    assert again.returncode == 0 and "nothing to run" in again.stderr
    changed = mnistlab(*[a.replace(":1000000", ":1000") for a in args], "--trials", "16")
    assert_user_error(changed, "exists with a different search space", "training.seed")

    # The report names the best complete trial; best.toml is its config and trains as any config does.
    report = (out / "report.md").read_text()
    best = max(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.value)
    assert f"Trial {best.number}: val_accuracy **{100 * best.value:.2f}%**" in report
    assert table_rows(report) == list(range(16))
    assert (out / "objective.png").stat().st_size > 0 and (out / "params.png").stat().st_size > 0
    trial_config = load_config(out / "trials" / str(best.number) / "config.toml")
    best_config = load_config(out / "best.toml")
    assert best_config.with_overrides({"name": trial_config.name, "description": trial_config.description}) == (
        trial_config
    )
    retrain = mnistlab(
        *("train", "--config", str(out / "best.toml"), "--epochs", "1", "--out", str(tmp_path / "best")),
        *("--quiet", "--data-dir", str(small_mnist)),
    )
    assert retrain.returncode == 0, retrain.stderr
    # A complete trial is an ordinary run directory: evaluate reads it like any other.
    evaluation = mnistlab("evaluate", str(out / "trials" / str(best.number)), "--json", "--data-dir", str(small_mnist))
    assert json.loads(evaluation.stdout)["accuracy"] == best.user_attrs["result"]["test_accuracy"]

    # --report redraws from the storage alone.
    for name in ("report.md", "best.toml", "objective.png", "params.png"):
        (out / name).unlink()
    redraw = mnistlab("sweep", "--report", str(out))
    assert redraw.returncode == 0, redraw.stderr
    assert (out / "report.md").read_text() == report
    assert load_config(out / "best.toml") == best_config


def running_trial(out: Path, min_epochs: int = 1, timeout: float = 120) -> optuna.trial.FrozenTrial:
    """Wait for a running trial that has finished `min_epochs` epochs, and return it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (out / "sweep.json").is_file():
            for t in load_study(out).get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if len(t.intermediate_values) >= min_epochs and "worker" in t.user_attrs:
                    return t
        time.sleep(0.1)
    raise AssertionError("no trial started")


@pytest.mark.slow  # about 30 s on 2 cores
def test_ctrl_c_and_a_killed_worker_lose_only_their_running_trials(small_mnist, tmp_path):
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "mnistlab", "sweep", "--config", str(tiny_config(tmp_path, epochs=60))]
    command += ["--space", "optimizer.lr=log:1e-2:1", "--pruner", "none", "--trials", "4", "--workers", "2"]
    command += ["--out", str(out), "--data-dir", str(small_mnist)]

    # Ctrl-C reaches the whole process group, as from a terminal.
    sweep = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True)
    running_trial(out)
    os.killpg(sweep.pid, signal.SIGINT)
    _, stderr = sweep.communicate(timeout=120)
    assert sweep.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted:" in stderr
    study = load_study(out)
    interrupted = by_state(study)[TrialState.FAIL]
    assert interrupted and by_state(study)[TrialState.RUNNING] == []
    # How to go on is the sweep's own command, not a `train --resume` whose run the study would never count.
    assert "--resume" not in stderr and "rerun the same mnistlab sweep command to continue the study" in stderr
    assert f"take the places of interrupted trial{'s' if len(interrupted) > 1 else ''} " in stderr
    for number in interrupted:
        marker = json.loads((out / "trials" / str(number) / "trial.json").read_text())
        assert (marker["state"], marker["reason"]) == ("failed", "interrupted")

    # A worker killed outright: the main process marks its trial failed, the other worker carries on.
    sweep = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True)
    victim = running_trial(out)
    os.kill(victim.user_attrs["worker"]["pid"], signal.SIGKILL)
    _, stderr = sweep.communicate(timeout=300)
    assert "killed by signal 9" in stderr and f"trial {victim.number} marked failed" in stderr
    study = load_study(out)
    states = by_state(study)
    assert victim.number in states[TrialState.FAIL]
    assert json.loads((out / "trials" / str(victim.number) / "trial.json").read_text())["reason"] == (
        "its worker stopped"
    )
    if sweep.returncode == 0:  # the other worker finished the study
        assert len(states[TrialState.COMPLETE]) == 4
    else:  # it had nothing left to start when the victim died: the message says how to go on
        last = subprocess.CompletedProcess(command, sweep.returncode, "", stderr.splitlines()[-1])
        assert_user_error(last, "run the same command to continue")
        resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr
        assert len(by_state(load_study(out))[TrialState.COMPLETE]) == 4
    check_trial_folders(out, load_study(out))


@pytest.mark.slow  # about 10 s on 2 cores
def test_sigterm_to_the_sweep_alone_ends_it_as_terminated(small_mnist, tmp_path):
    """A service manager's `kill PID` reaches the main process only: it stops its workers, and ends with the
    shell's code for SIGTERM and one line saying so (docs/reliability.md)."""
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "mnistlab", "sweep", "--config", str(tiny_config(tmp_path, epochs=60))]
    command += ["--space", "optimizer.lr=log:1e-2:1", "--pruner", "none", "--trials", "2", "--workers", "1"]
    command += ["--out", str(out), "--data-dir", str(small_mnist)]
    sweep = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True)
    running_trial(out)
    sweep.send_signal(signal.SIGTERM)
    _, stderr = sweep.communicate(timeout=120)
    assert sweep.returncode == 143, stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1] == "mnistlab: terminated (SIGTERM)", stderr
    assert by_state(load_study(out))[TrialState.RUNNING] == []


@pytest.mark.slow  # about 20 s on 2 cores: four invocations of a few 1-epoch trials
def test_a_trial_whose_epochs_all_finished_counts_though_interrupted_and_rerunning_continues(small_mnist, tmp_path):
    """Ctrl-C once a trial has reported its last epoch (while its model is written or its result stored): the
    trial is complete, its value told to the study; rerunning the same command continues the study."""
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "mnistlab", "sweep", "--config", str(tiny_config(tmp_path, epochs=1))]
    command += ["--space", "optimizer.lr=log:1e-2:1", "--pruner", "none", "--out", str(out)]
    command += ["--data-dir", str(small_mnist)]
    sweep = subprocess.Popen([*command, "--trials", "20"], stderr=subprocess.PIPE, text=True, start_new_session=True)
    finished = running_trial(out, min_epochs=1)  # its one epoch is saved and reported
    os.killpg(sweep.pid, signal.SIGINT)
    _, stderr = sweep.communicate(timeout=120)
    assert sweep.returncode == 130, stderr
    assert "Traceback" not in stderr and "--resume" not in stderr
    journal = optuna.storages.journal.JournalFileBackend(str(out / "study.journal"))
    study = optuna.load_study(study_name="sweep", storage=optuna.storages.JournalStorage(journal))
    trial = study.trials[finished.number]
    assert trial.state == TrialState.COMPLETE, stderr
    assert (
        trial.value
        == json.loads((out / "trials" / str(trial.number) / "metrics.json").read_text())["final"]["val_accuracy"]
    )
    check_trial_folders(out, load_study(out))
    complete = len(by_state(study)[TrialState.COMPLETE])

    again = mnistlab(*command[3:], "--trials", str(complete + 1))
    assert again.returncode == 0, again.stderr
    states = by_state(load_study(out))
    assert finished.number in states[TrialState.COMPLETE] and len(states[TrialState.COMPLETE]) == complete + 1

    # Another space is another study; the error's hint (another --out) is one that works.
    changed = [a.replace("1e-2", "1e-3") for a in command[3:]]
    assert_user_error(mnistlab(*changed, "--trials", "1"), "exists with a different search space", "another --out")
    other = mnistlab(*[a.replace(str(out), str(tmp_path / "other")) for a in changed], "--trials", "1")
    assert other.returncode == 0, other.stderr


@pytest.mark.slow  # about 8 s on 2 cores: one 1-epoch trial
def test_a_changed_space_on_a_shared_journal_names_a_hint_that_works(small_mnist, tmp_path):
    shared = tmp_path / "shared" / "team.journal"
    shared.parent.mkdir()
    config = str(tiny_config(tmp_path, epochs=1))
    # Another machine made the study on the shared journal, its trials in its own --out.
    options = SweepOptions(config=config, space=("optimizer.lr=log:1e-2:1",), storage=str(shared), study="team")
    (plan,) = make_plans(dataclasses.replace(options, out=tmp_path / "a"))
    open_study(plan, open_storage(plan.storage))

    def sweep(study: str, out: str) -> subprocess.CompletedProcess[str]:
        args = ["--config", config, "--space", "optimizer.lr=log:1e-3:1", "--storage", str(shared), "--study", study]
        return mnistlab("sweep", *args, "--out", str(tmp_path / out), "--trials", "1", "--data-dir", str(small_mnist))

    assert_user_error(sweep("team", "b"), "exists with a different search space", "another --study and another --out")
    followed = sweep("team-2", "c")
    assert followed.returncode == 0, followed.stderr
    assert sorted(optuna.get_all_study_names(storage=open_storage(str(shared)))) == ["team", "team-2"]


@pytest.mark.slow  # about 8 s on 2 cores: one 1-epoch trial
def test_readme_space_file_runs_as_written(small_mnist, tmp_path):
    text, config = readme_space_file()
    (tmp_path / "my-space.toml").write_text(text)
    args = ["sweep", "--config", config, "--space-file", "my-space.toml", "--trials", "1", "--epochs", "1"]
    args += ["--space", "data.val_size=500"]  # of small_mnist's 2,500 training images
    result = mnistlab(*args, "--out", "sweep", "--data-dir", str(small_mnist), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    states = by_state(load_study(tmp_path / "sweep"))
    assert states[TrialState.COMPLETE] + states[TrialState.PRUNED] == [0]  # Adam at lr 1 may diverge: pruned


def test_unreachable_storage_is_a_one_line_error(mnist_path, tmp_path):
    # Port 9 (discard) on the loopback: nothing listens there, so the connection is refused at once.
    result = mnistlab(
        "sweep",
        "--config",
        "seed-a",
        "--space",
        "optimizer.lr=log:1e-4:1",
        "--storage",
        "postgresql://someone:secret@127.0.0.1:9/sweeps",
        "--out",
        str(tmp_path / "sweep"),
        "--data-dir",
        str(mnist_path),
    )
    assert_user_error(result, "cannot open storage postgresql://someone@127.0.0.1:9/sweeps")
    assert "secret" not in result.stderr
    assert not (tmp_path / "sweep").exists()


def test_a_folder_of_something_else_is_refused(tmp_path, capsys):
    out = tmp_path / "sweep"
    (out / "notes").mkdir(parents=True)
    result = run_main(capsys, "sweep", "--config", "seed-a", "--space", "optimizer.lr=log:1e-4:1", "--out", str(out))
    assert_user_error(result, "already exists and is not empty")
    assert_user_error(run_main(capsys, "sweep", "--report", str(out)), "no sweep here")


@pytest.fixture
def postgres_url() -> str:
    """The PostgreSQL database `.ci/postgres.sh` provides; skipped without one, except in CI, where the
    multi-machine path must be tested."""
    url = os.environ.get("MNISTLAB_TEST_POSTGRES")
    if url:
        return url
    reason = "no PostgreSQL: run the tests under .ci/postgres.sh (it sets MNISTLAB_TEST_POSTGRES)"
    if os.environ.get("CI") == "true":
        pytest.fail(reason + "; CI must run this test")
    pytest.skip(reason)


@pytest.mark.slow  # about 20 s on 2 cores
def test_two_workers_share_a_postgresql_study(postgres_url, small_mnist, tmp_path):
    study_name = f"test-{os.getpid()}-{time.time_ns()}"
    args = ["--config", str(tiny_config(tmp_path)), "--space", "optimizer.lr=log:1e-6:1", "--workers", "2"]
    args += ["--storage", postgres_url, "--study", study_name, "--data-dir", str(small_mnist)]
    # Two "machines": each its own sweep folder, the same database and study.
    first = mnistlab("sweep", *args, "--trials", "4", "--out", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr
    second = mnistlab("sweep", *args, "--trials", "8", "--out", str(tmp_path / "b"))
    assert second.returncode == 0, second.stderr
    study = optuna.load_study(study_name=study_name, storage=open_storage(postgres_url))
    states = by_state(study)
    assert sorted(states[TrialState.COMPLETE] + states[TrialState.PRUNED]) == list(range(8))
    folders = {t.number: Path(t.user_attrs["worker"]["run_dir"]).parent.parent.name for t in study.trials}
    assert sorted(n for n, f in folders.items() if f == "a") == [0, 1, 2, 3]
    assert sorted(n for n, f in folders.items() if f == "b") == [4, 5, 6, 7]
    password = make_url(postgres_url).password
    assert password and password not in (tmp_path / "a" / "sweep.json").read_text()  # sweep.json keeps no password
    redraw = mnistlab("sweep", "--report", str(tmp_path / "b"), "--storage", postgres_url)
    assert redraw.returncode == 0, redraw.stderr
    assert table_rows((tmp_path / "b" / "report.md").read_text()) == list(range(8))  # both machines' trials
    changed = [a.replace("1e-6", "1e-5") for a in args]
    other = mnistlab("sweep", *changed, "--trials", "8", "--out", str(tmp_path / "c"))
    assert_user_error(other, "exists with a different search space")
