"""Configs: shipped ones load and describe the report's networks; bad files give clear errors."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from mnistlab.config import check_value, config_from_dict, load_config, parse_set, read_value, shipped_configs
from mnistlab.errors import MnistlabError
from mnistlab.models.networks import build_model, count_parameters

SEED = {
    # name: (hidden sizes, activations, softmax output, optimizer)
    "seed-a": ([512], ["relu"], True, "sgd"),
    "seed-b": ([512], ["relu"], True, "adam"),
    "seed-c": ([512, 64], ["relu", "tanh"], True, "sgd"),
    "seed-a-fixed": ([512], ["relu"], False, "sgd"),
    "seed-b-fixed": ([512], ["relu"], False, "adam"),
    "seed-c-fixed": ([512, 64], ["relu", "tanh"], False, "sgd"),
}


@pytest.mark.parametrize("name", sorted(SEED))
def test_seed_configs_match_the_report(name):
    hidden, activations, softmax, optimizer = SEED[name]
    c = load_config(name)
    assert (c.model.hidden, c.model.activations, c.model.softmax_output) == (hidden, activations, softmax)
    assert (c.optimizer.name, c.optimizer.lr) == (optimizer, 0.001)
    assert (c.training.batch_size, c.training.epochs, c.training.loss) == (64, 10, "cross-entropy")
    assert c.data.normalize is False  # ToTensor semantics: pixels in [0, 1]


@pytest.mark.parametrize("name", sorted(SEED))
def test_each_config_builds_the_right_shapes(name):
    hidden, _, softmax, _ = SEED[name]
    model = build_model(load_config(name).model)
    widths = [784, *hidden, 10]
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == list(pairwise(widths))
    assert count_parameters(model) == sum(a * b + b for a, b in pairwise(widths))
    out = model(torch.rand(5, 28, 28))
    assert out.shape == (5, 10)
    if softmax:
        torch.testing.assert_close(out.sum(1), torch.ones(5))
        assert (out >= 0).all()
    else:
        assert (out < 0).any()  # logits, not probabilities


def test_all_shipped_configs_load():
    for name in shipped_configs():
        assert load_config(name).description


def test_toml_round_trip(tmp_path):
    c = load_config("seed-c").with_overrides({"training.epochs": 3, "optimizer.lr": 0.5})
    path = tmp_path / "mine.toml"
    path.write_text(c.to_toml())
    again = load_config(path)
    assert again == c
    assert (again.training.epochs, again.optimizer.lr) == (3, 0.5)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"model": {"hiden": [5]}}, "unknown key model.hiden"),
        ({"training": {"epochs": "ten"}}, "training.epochs: expected int"),
        ({"model": {"hidden": [5], "activations": ["relu", "tanh"]}}, "same length"),
        ({"model": {"activations": ["swish"]}}, "unknown 'swish'"),
        ({"optimizer": {"name": "lbfgs"}}, "unknown 'lbfgs'"),
        ({"optimizer": {"lr": -1}}, "lr must be positive"),
        ({"colour": "red"}, "unknown key 'colour'"),
    ],
)
def test_bad_configs_are_clear_errors(data, message):
    with pytest.raises(MnistlabError, match=message):
        config_from_dict(data, source="mine.toml")


def test_unknown_name_and_bad_toml(tmp_path):
    with pytest.raises(MnistlabError, match=r"no config named 'seed-z'.*seed-a"):
        load_config("seed-z")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(MnistlabError, match="not valid TOML"):
        load_config(bad)


def test_unknown_override_key():
    with pytest.raises(MnistlabError, match="unknown config key"):
        load_config("seed-a").with_overrides({"training.epoch": 3})


def test_a_bad_epoch_count_is_the_only_complaint():
    with pytest.raises(MnistlabError) as excinfo:
        load_config("seed-a").with_overrides({"training.epochs": -1})
    assert "training.epochs and training.batch_size must be at least 1" in str(excinfo.value)
    assert "warmup" not in str(excinfo.value)
    with pytest.raises(MnistlabError, match=r"warmup_epochs must be at least 0 and less than training\.epochs"):
        load_config("seed-a").with_overrides({"training.epochs": 2, "training.warmup_epochs": 2})


def test_every_value_is_read_by_one_rule():
    """--set, sweep spaces and config files: text is a TOML value or else itself; the key's type decides."""
    texts = ("true", "0.1", "3", '["conv 8 3"]', "sgd", " adam ", '"x"')
    assert [read_value(t) for t in texts] == [True, 0.1, 3, ["conv 8 3"], "sgd", "adam", "x"]
    assert parse_set(["training.epochs=3", "optimizer.name=sgd"]) == {"training.epochs": 3, "optimizer.name": "sgd"}
    value = check_value(3, 0.5, "optimizer.lr")
    assert value == 3.0 and isinstance(value, float)  # an integer where a number is expected
    with pytest.raises(MnistlabError, match=r"training.epochs: expected int \('ten' is not an integer\)"):
        check_value("ten", 10, "training.epochs")
    with pytest.raises(MnistlabError, match=r"optimizer.lr must be a finite number \(nan is not a number\)"):
        check_value(float("nan"), 0.5, "optimizer.lr")
    with pytest.raises(MnistlabError, match="is not a list of integers"):
        check_value([512, "64"], [512], "model.hidden")


def test_overrides_take_dotted_keys_and_section_tables():
    base = load_config("seed-a")
    config = base.with_overrides({"optimizer": {"name": "adam", "lr": 0.01}, "training.epochs": 2})
    assert (config.optimizer.name, config.optimizer.lr, config.training.epochs) == ("adam", 0.01, 2)
    assert "changed: optimizer.name" in config.description
    with pytest.raises(MnistlabError, match=r"seed-a with optimizer.lr=-1.0: optimizer.lr must be positive"):
        base.with_overrides({"optimizer.lr": -1.0})
