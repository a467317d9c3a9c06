"""`device check`'s config step: every problem of the file on its own line, warnings shown with the report."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from device import check
from device.errors import EXIT_FAILURE, EXIT_OK

SKIP_ALL = ["bundle", "camera", "broker"]


def run_check(config: Path) -> tuple[int, list[str]]:
    out = io.StringIO()
    code = check.run(argparse.Namespace(config=str(config), timeout=1.0, skip=SKIP_ALL), out=out)
    return code, out.getvalue().splitlines()


def test_every_config_problem_gets_its_own_line(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("bundle: /b\nmqtt: {keepalive: 70000, port: 0}\nevents: {homeassistant_prefix: 'ha/#'}\n")
    code, lines = run_check(config)
    assert code == EXIT_FAILURE
    assert lines[0].startswith("config  FAIL  ") and len(lines) == 4, lines
    assert [line.split()[0] for line in lines[1:3]] == ["FAIL", "FAIL"]
    problems = " ".join(lines[:3])
    for key in ("mqtt.keepalive", "mqtt.port", "events.homeassistant_prefix"):
        assert key in problems
    assert all(str(config) in line for line in lines[:3])
    assert lines[3] == "bundle, camera and broker not checked: fix the config first"


def test_warnings_are_shown_under_an_ok_config(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("bundle: /b\ndevice_id: front-door\n")
    code, lines = run_check(config)
    assert code == EXIT_OK  # a warning is not a failure: the daemon can run
    assert lines[0].startswith("config  OK    device front-door") and "state /var/lib/faceberry" in lines[0]
    assert lines[1].split(None, 1)[0] == "WARN" and "knock each other off the broker" in lines[1]
    assert lines[2:] == ["bundle  SKIP", "camera  SKIP", "broker  SKIP"]


def test_a_clean_config_has_no_warning_lines(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("bundle: /b\ndevice_id: hall-3\n")
    code, lines = run_check(config)
    assert code == EXIT_OK and len(lines) == 4 and lines[0].startswith("config  OK")
