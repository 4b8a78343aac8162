"""setup_config.json parsing: typed, frozen, and loud about mistakes."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from ts_handlers.config import ConfigError, HandlerConfig, load_config, parse_config
from ts_handlers.image_classification import ImageClassificationConfig


def test_defaults_and_coercion():
    config = parse_config(ImageClassificationConfig, {"image_size": [32, 32], "top_k": 1}, "test")
    assert config.image_size == (32, 32)
    assert config.mean == (0.1307,)
    assert config.verify_atol == 1e-4
    with pytest.raises(ValidationError, match="frozen"):
        config.top_k = 3  # type: ignore[misc]


def test_integers_are_accepted_where_floats_are_expected():
    config = parse_config(ImageClassificationConfig, {"mean": [0], "std": [1]}, "test")
    assert config.mean == (0.0,) and isinstance(config.mean[0], float)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"top_k": "3"}, "top_k must be an integer"),
        ({"top_k": True}, "top_k must be an integer"),
        ({"freeze": "yes"}, "freeze must be true or false"),
        ({"image_size": 28}, "image_size must be a list"),
        ({"mean": ["a"]}, r"mean\[0\] must be a number"),
        ({"color_mode": "CMYK"}, "color_mode='CMYK' is not supported; choose one of 'L', 'RGB'"),
        ({"export_method": "compile"}, "choose one of 'trace', 'script'"),
        ({"color_mode": "RGB"}, "mean and std need 3 value"),
        ({"image_size": [28]}, "image_size must be"),
        ({"max_lenght": 3}, "unknown key.*max_lenght.*valid keys are"),
    ],
)
def test_mistakes_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(ImageClassificationConfig, raw, "setup_config.json")


def test_required_mode_for_the_base_config():
    with pytest.raises(ConfigError, match="mode"):
        parse_config(HandlerConfig, {}, "x")


def test_load_config_reports_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="missing"):
        load_config(ImageClassificationConfig, tmp_path / "setup_config.json")
    (tmp_path / "setup_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(ImageClassificationConfig, tmp_path / "setup_config.json")


def test_round_trip_through_json(tmp_path):
    config = parse_config(ImageClassificationConfig, {"image_size": [8, 9]}, "x")
    (tmp_path / "setup_config.json").write_text(json.dumps(config.to_dict()))
    assert load_config(ImageClassificationConfig, tmp_path / "setup_config.json") == config
