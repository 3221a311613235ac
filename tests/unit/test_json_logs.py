"""``--log-format json``: one JSON object per line, with time, level, logger and message,
and the traceback of a logged exception."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import datetime

import pytest
from click.testing import CliRunner

from tapestry.cli import main as cli
from tapestry.observe import json_logs
from tapestry.observe.json_logs import LogFormat, log_handler


@pytest.fixture
def logger() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger of its own whose lines land in a string."""
    out = io.StringIO()
    log = logging.getLogger("tapestry.test.json_logs")
    log.propagate = False
    log.setLevel(logging.INFO)
    yield log, out
    log.handlers.clear()
    log.propagate = True


def test_a_record_is_one_line_of_json_with_its_exception(logger) -> None:
    log, out = logger
    log.addHandler(log_handler("json", out))
    log.debug("not at INFO")
    log.info("round %d committed:\nbase %s", 3, "ab12")
    try:
        raise ValueError("bad tensor 'é'")
    except ValueError:
        log.exception("round failed")

    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert set(first) == {"time", "level", "logger", "message"}
    assert first["level"] == "INFO" and first["logger"] == "tapestry.test.json_logs"
    assert first["message"] == "round 3 committed:\nbase ab12"
    assert datetime.fromisoformat(first["time"]).utcoffset().total_seconds() == 0
    assert second["level"] == "ERROR" and second["message"] == "round failed"
    assert second["exception"].startswith("Traceback (most recent call last):")
    assert second["exception"].endswith("ValueError: bad tensor 'é'")


def test_text_stays_the_default(logger) -> None:
    log, out = logger
    log.addHandler(log_handler(stream=out))
    log.warning("careful")
    assert out.getvalue().endswith(" WARNING tapestry.test.json_logs: careful\n")


def test_the_cli_takes_the_format_from_its_option_or_environment(monkeypatch) -> None:
    chosen: list[tuple[str, LogFormat]] = []
    monkeypatch.setattr(json_logs, "configure_logging", lambda *args: chosen.append(args))
    for args, env in ((["--log-format", "json"], {}), ([], {"TAPESTRY_LOG_FORMAT": "json"})):
        ran = CliRunner().invoke(cli, [*args, "certs", "--help"], env=env)
        assert ran.exit_code == 0, ran.output
    ran = CliRunner().invoke(cli, ["certs", "--help"], env={"TAPESTRY_LOG_FORMAT": ""})
    assert chosen == [("INFO", "json"), ("INFO", "json"), ("INFO", "text")]

    ran = CliRunner().invoke(cli, ["certs", "--help"], env={"TAPESTRY_LOG_FORMAT": "yaml"})
    assert ran.exit_code == 2
    assert "Invalid value for '--log-format' (from TAPESTRY_LOG_FORMAT)" in ran.output
