"""Generated configs through `load_config` and `check`: 0 tracebacks, every refusal one line, no hang.

Cases: every numeric field of device/config.py's models below, above and far outside its documented range
(and NaN, infinity, a string, a boolean), each limit itself (accepted); state_dirs that are special or
unusable (/dev/null, /proc/x, a file, a path below a file, a link to /dev/null); password files that are
not small regular files (/dev/zero, /dev/urandom, a FIFO, a directory, a large or sparse file, bytes that
are not UTF-8); and a bundle whose gallery is empty. `check` runs in a child process under a timeout, so
a hang (issue 21: `password_file: /dev/zero`) fails the test instead of stalling the suite.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from faceberry.device.config import ConfigError, load_config, numeric_bounds, numeric_fields

ROOT = Path(__file__).resolve().parent.parent
# Environment variables that would change what a config means.
CLEAN_ENV = {k: v for k, v in os.environ.items()
             if not k.startswith("FACEBERRY_") and k != "CREDENTIALS_DIRECTORY"}


@dataclass
class Case:
    name: str
    data: dict[str, Any]
    refused: bool  # load_config (or check's config step) must refuse it
    key: str = ""  # the key the refusal must name


def _nest(key: str, value: Any) -> dict[str, Any]:
    data: Any = value
    for part in reversed(key.split(".")):
        data = {part: data}
    return data


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _bounds(info: Any) -> tuple[float, bool, float, bool]:
    low, high = numeric_bounds(info)
    assert low is not None and high is not None, "every numeric field has a documented range"
    return low[0], low[1], high[0], high[1]


def numeric_cases(base: dict[str, Any]) -> list[Case]:
    cases = []
    for key, info in numeric_fields().items():
        low, low_closed, high, high_closed = _bounds(info)
        is_int = info.annotation is int
        below = low - 1 if low_closed else low
        above = high + 1 if high_closed else high
        if not is_int:
            below = low - 0.5 if low_closed else low
            above = high * 1.5 + 1 if high_closed else high
        bad = [below, above, 1_000_000_000 if is_int else 1e9, -1_000_000_000, 10**30 if is_int else 1e300,
               "12", True, [1]]
        if not is_int:
            bad += [math.nan, math.inf, -math.inf]
        else:
            bad += [low + 0.5]  # not a whole number
        for value in bad:
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
                    and (low < value < high or (low_closed and value == low) or (high_closed and value == high)):
                continue  # e.g. 1e9 inside a byte limit: in range, not a bad case
            cases.append(Case(f"{key}={value!r}", _merge(base, _nest(key, value)), True, key))
        # The limits themselves; values within are drawn by hypothesis (test_every_value_in_range_is_accepted).
        for value in [v for v, closed in ((low, low_closed), (high, high_closed)) if closed]:
            cases.append(Case(f"{key}={value!r} (a limit)", _in_range(base, key, value, is_int), False))
    return cases


def _in_range(base: dict[str, Any], key: str, value: float, is_int: bool) -> dict[str, Any]:
    data = _merge(base, _nest(key, int(value) if is_int else float(value)))
    if key == "mqtt.reconnect_min_delay":  # must not exceed reconnect_max_delay (60 by default)
        data = _merge(data, _nest("mqtt.reconnect_max_delay", 3600))
    return data


@st.composite
def in_range(draw: st.DrawFn) -> tuple[str, float, bool]:
    """(numeric field, a value within its documented range, whether it is an integer field)."""
    key, info = draw(st.sampled_from(sorted(numeric_fields().items())))
    low, low_closed, high, high_closed = _bounds(info)
    if info.annotation is int:
        return key, draw(st.integers(int(low) + (not low_closed), int(high) - (not high_closed))), True
    return key, draw(st.floats(low, high, exclude_min=not low_closed, exclude_max=not high_closed)), False


def state_dir_cases(base: dict[str, Any], tmp: Path) -> list[Case]:
    afile = tmp / "a-file"
    afile.write_text("x")
    link = tmp / "link-to-null"
    link.symlink_to("/dev/null")
    fifo = tmp / "a-fifo"
    os.mkfifo(fifo)
    paths = ["/dev/null", "/dev/zero", "/dev", "/dev/shm/faceberry", "/proc/x", "/proc", "/proc/self",
             "/sys/kernel/faceberry", "/sys", str(afile), str(link), str(fifo)]
    cases = [Case(f"state_dir={p}", _merge(base, {"state_dir": p}), True, "state_dir") for p in paths]
    # Below a file: refused by check (config validation cannot tell before trying).
    cases.append(Case(f"state_dir={afile}/below", _merge(base, {"state_dir": f"{afile}/below"}), True, "state_dir"))
    cases.append(Case("state_dir=a new directory", _merge(base, {"state_dir": str(tmp / "new" / "state")}), False))
    return cases


def password_cases(base: dict[str, Any], tmp: Path) -> list[Case]:
    big = tmp / "big"
    big.write_bytes(b"p" * 5000)
    sparse = tmp / "sparse"
    with open(sparse, "wb") as handle:
        handle.truncate(1 << 30)  # 1 GiB of nothing, no disk used
    latin = tmp / "latin1"
    latin.write_bytes(b"caf\xe9\n")
    fifo = tmp / "pw-fifo"
    os.mkfifo(fifo)
    folder = tmp / "pw-dir"
    folder.mkdir()
    bad = ["/dev/zero", "/dev/urandom", "/dev/null", "/dev/stdin", str(fifo), str(folder), str(big), str(sparse),
           str(latin), str(tmp / "missing")]
    cases = [Case(f"password_file={p}", _merge(base, {"mqtt": {"password_file": p}}), True, "password_file")
             for p in bad]
    good = tmp / "pw"
    good.write_text("secret\n")
    good.chmod(0o600)
    cases.append(Case("password_file=a small file", _merge(base, {"mqtt": {"password_file": str(good)}}), False))
    return cases


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Case]]:
    tmp = tmp_path_factory.mktemp("fuzz-config")
    base = {"bundle": "/b", "device_id": "fuzz-1", "state_dir": str(tmp / "state")}
    found = numeric_cases(base) + state_dir_cases(base, tmp) + password_cases(base, tmp)
    return tmp, found


def _write(tmp: Path, i: int, case: Case) -> Path:
    path = tmp / f"case-{i:04d}.yaml"
    # allow_unicode: the YAML of a case is its data, whatever the values; NaN and infinity as YAML's .nan/.inf.
    path.write_text(yaml.safe_dump(case.data, allow_unicode=True), encoding="utf-8")
    return path


def test_enough_cases_and_every_numeric_field_is_covered(cases: tuple[Path, list[Case]]) -> None:
    _, found = cases
    assert len(found) >= 300
    refused_keys = {c.key for c in found if c.refused}
    assert set(numeric_fields()) <= refused_keys


def test_load_config_refuses_each_bad_case_in_one_line_naming_the_key(cases: tuple[Path, list[Case]]) -> None:
    tmp, found = cases
    refused = 0
    for i, case in enumerate(found):
        path = _write(tmp, i, case)
        try:
            load_config(path, env={}, log_warnings=False)
        except ConfigError as exc:
            refused += 1
            assert case.refused, f"{case.name}: refused ({exc})"
            for line in exc.problems:
                assert line.strip() and "\n" not in line, f"{case.name}: not one line: {line!r}"
                assert "Traceback" not in line and "pydantic" not in line.lower(), line
            if case.key:
                assert case.key.split(".")[-1] in str(exc), f"{case.name}: the key is not named: {exc}"
        else:
            # Only "below a file" gets past load_config: whether a directory can be made there is check's.
            assert not case.refused or "below" in case.name, f"{case.name}: accepted"
    assert refused >= len([c for c in found if c.refused]) - 1


@settings(max_examples=200, deadline=None, database=None, derandomize="FACEBERRY_FUZZ_SEED" not in os.environ,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@seed(int(os.environ.get("FACEBERRY_FUZZ_SEED", "21")))  # ignored while derandomized
@given(case=in_range())
def test_every_value_in_range_is_accepted(case: tuple[str, float, bool], tmp_path: Path) -> None:
    # Was one seeded draw per field; now hypothesis searches each field's range (and shrinks a failure).
    key, value, is_int = case
    path = _write(tmp_path, 0, Case(f"{key}={value!r}", _in_range({"bundle": "/b", "device_id": "fuzz-1",
                                                                    "state_dir": str(tmp_path / "state")},
                                                                   key, value, is_int), False))
    cfg = load_config(path, env={}, log_warnings=False)
    got = cfg
    for part in key.split("."):
        got = getattr(got, part)
    assert got == value


RUNNER = r"""
import argparse, io, json, sys, traceback
from faceberry.device.ops import check
for line in sys.stdin:
    path = line.strip()
    print(json.dumps({"start": path}), flush=True)  # the case a hang would stop at
    out = io.StringIO()
    try:
        code = check.run(argparse.Namespace(config=path, timeout=1.0, skip=["bundle", "camera", "broker"]), out=out)
        print(json.dumps({"path": path, "code": code, "out": out.getvalue()}), flush=True)
    except BaseException:
        print(json.dumps({"path": path, "traceback": traceback.format_exc()}), flush=True)
"""


def test_check_refuses_each_bad_case_in_one_line_and_never_hangs(cases: tuple[Path, list[Case]]) -> None:
    tmp, found = cases
    paths = {str(_write(tmp, i, case)): case for i, case in enumerate(found)}
    # One child for all cases (a process per case would cost minutes of start-up); a hang stops it, and its
    # last "start" names the case.
    try:
        proc = subprocess.run([sys.executable, "-c", RUNNER], input="\n".join(paths) + "\n", capture_output=True,
                              text=True, timeout=240, cwd=ROOT, env={**CLEAN_ENV, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired as exc:
        text = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        last = [json.loads(x)["start"] for x in text.splitlines() if x.startswith('{"start"')][-1:]
        pytest.fail(f"check hung on {last and paths[last[0]].name}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(x) for x in proc.stdout.splitlines() if not x.startswith('{"start"')]
    assert len(results) == len(paths)
    for result in results:
        case = paths[result["path"]]
        assert "traceback" not in result, f"{case.name}:\n{result.get('traceback')}"
        lines = result["out"].splitlines()
        fails = [line for line in lines if " FAIL " in f" {line} "]
        if case.refused:
            assert result["code"] == 1 and fails, f"{case.name}: passed check:\n{result['out']}"
            for line in fails:
                assert "Traceback" not in line and "Error:" not in line.split("FAIL", 1)[1][:40], line
        else:
            assert result["code"] == 0 and not fails, f"{case.name}:\n{result['out']}"


@pytest.mark.parametrize("password_file", ["/dev/zero", "/dev/urandom", "fifo"])
def test_the_cli_check_of_an_endless_password_file_ends_with_one_line(tmp_path: Path, password_file: str) -> None:
    """Issue 21: `password_file: /dev/zero` hung `faceberry check` for ever."""
    if password_file == "fifo":
        password_file = str(tmp_path / "fifo")
        os.mkfifo(password_file)  # no writer: opening it to read would block
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"bundle": "/b", "device_id": "fuzz-1", "state_dir": str(tmp_path),
                                      "mqtt": {"password_file": password_file}}))
    proc = subprocess.run([sys.executable, "-m", "device", "check", "--config", str(config), "--skip", "bundle",
                           "--skip", "camera", "--skip", "broker"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=CLEAN_ENV)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    fail = [line for line in proc.stdout.splitlines() if "FAIL" in line]
    assert len(fail) == 1 and "mqtt.password_file" in fail[0] and "not a regular file" in fail[0], proc.stdout


def test_a_state_dir_this_user_cannot_write_fails_check(tmp_path: Path) -> None:
    """As root every directory is writable; without CAP_DAC_OVERRIDE root is refused like any user."""
    if os.geteuid() != 0 or subprocess.run(["which", "setpriv"], capture_output=True).returncode != 0:
        pytest.skip("needs root and setpriv")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    theirs.chmod(0o755)
    cases = {str(theirs): "cannot create files there", str(theirs / "sub" / "state"): "cannot create directories"}
    for state_dir, reason in cases.items():
        config = tmp_path / "c.yaml"
        config.write_text(yaml.safe_dump({"bundle": "/b", "device_id": "fuzz-1", "state_dir": state_dir}))
        proc = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search",
                               "--inh-caps=-dac_override,-dac_read_search", "--",
                               sys.executable, "-m", "device", "check", "--config", str(config), "--skip", "bundle",
                               "--skip", "camera", "--skip", "broker"], cwd=ROOT, capture_output=True, text=True,
                              timeout=60, env=CLEAN_ENV)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
        first = proc.stdout.splitlines()[0]
        assert first.startswith("config  FAIL") and f"state_dir {state_dir}" in first and reason in first, first
        assert not (theirs / "sub").exists()
