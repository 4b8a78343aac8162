"""A model whose every worker fails its load is reported, not waited on (issue 21).

The model log lines are TorchServe 0.12's own, as a worker whose handler raised at load writes
them (integration_tests/test_handmade_archives.py sees them from a real server).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ts_handlers.tools.cli import start_error
from ts_handlers.tools.server import LocalTorchServe, ModelLoadError

PREFIX = "2026-12-06T22:28:15,510 [INFO ] W-9000-{model}_1.0-stdout MODEL_LOG - "
DIED = [
    "Backend worker process died.",
    "Traceback (most recent call last):",
    '  File "/venv/lib/python3.11/site-packages/ts/model_loader.py", line 143, in load',
    "    initialize_fn(service.context)",
    "ts_handlers.config.ConfigError: setup_config.json: unknown key(s) hardware; valid keys "
    "are mode, model_name",
    "  input      3x32: MISMATCH",  # a multi-line message's later lines are not the cause
]


def server_with_log(tmp_path: Path, lines: list[str]) -> LocalTorchServe:
    server = LocalTorchServe(tmp_path, ["broken.mar", "good_model.mar"])
    server.workdir = tmp_path
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "model_log.log").write_text("\n".join(lines) + "\n")
    return server


def test_each_failed_load_of_a_model_is_read_with_the_handlers_line(tmp_path: Path) -> None:
    lines = [PREFIX.format(model="broken") + text for text in DIED]
    lines += [PREFIX.format(model="good_model") + "ts_handlers ready"]
    lines += [PREFIX.format(model="broken") + text for text in DIED]
    server = server_with_log(tmp_path, lines)
    failures = server.load_failures("broken")
    assert len(failures) == 2
    assert failures[-1].startswith("ts_handlers.config.ConfigError: setup_config.json: unknown")
    assert server.load_failures("good_model") == []
    assert server.load_failures("good") == []  # a name that is a prefix of another's

    with pytest.raises(ModelLoadError) as raised:
        server._check_crash_loop("broken", workers=2)
    assert raised.value.summary == (
        f"model 'broken' failed to load in every worker: {failures[-1]}"
    )
    assert start_error(raised.value).splitlines()[-1] == raised.value.summary
    server._check_crash_loop("broken", workers=3)  # a worker has not failed yet: keep waiting
    server._check_crash_loop("good_model", workers=1)
