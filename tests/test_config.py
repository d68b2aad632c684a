"""Configuration: YAML, environment and flag layering, and validation at start."""

import subprocess
import sys

import pytest

from server.config import ConfigError, load_settings
from tests.conftest import ROOT


def test_defaults_load_from_the_shipped_yaml():
    s = load_settings(environ={})
    assert s.model.model == "default" and s.http.port == 8080 and s.limits.max_batch_size == 32


def test_env_then_flags_override_yaml():
    s = load_settings(environ={"LORASERVE_MAX_BATCH_SIZE": "4", "LORASERVE_PORT": "9000"}, overrides={"port": 9100})
    assert s.limits.max_batch_size == 4 and s.http.port == 9100


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"max_batch_size": 0}, "max_batch_size must be an integer >= 1"),
        ({"max_input_length": 4096}, "max_input_length (4096) must be < max_total_tokens"),
        ({"max_total_tokens": 100000}, "must be <= max_batch_total_tokens"),
        ({"device": "tpu"}, "device must be one of"),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"port": 70000}, "port must be in"),
        ({"max_batch_size": "lots"}, "must be an integer"),
        ({"no_such_key": 1}, "unknown configuration key"),
    ],
)
def test_invalid_values_are_rejected_with_a_clear_message(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_settings(overrides=overrides, environ={})


def test_cli_refuses_a_bad_config_before_loading_anything(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_batch_size: -3\n")
    result = subprocess.run([sys.executable, "-m", "server", "serve", "--config", str(bad)],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "invalid configuration: max_batch_size must be an integer >= 1" in result.stderr
