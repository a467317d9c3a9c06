"""Every command in README.md is run by a test or by the demo, and what the README shows is what the code does.

Each line of a ```bash block is parsed (shlex, so quotes and comments behave as in a shell) and must be
claimed by one handler below; an unrecognised command fails `test_every_readme_command_is_covered`, so
a new README command needs a test here. The handlers:
- `python -m MODULE [SUB] --flags`: MODULE's `--help` (of SUB) runs and lists every flag the README uses;
- `./quickstart.sh demo|test|setup`: the subcommand exists; `test` is what .ci/run runs, `demo` runs demo.py
  (tests/test_demo.py runs it end to end);
- `systemd/install.sh`: run for real with the README's flags, in --dry-run mode;
- `mosquitto_sub`: run against a real mosquitto with a retained status message;
- `cp`, `scp`, `rsync`, `pip install -r`, `python3 -m venv`, `source`: their local files exist (or an earlier
  README step creates them); the venv/pip/fetch steps are the ones quickstart.sh performs.
The JSON event, the topic table and the Home Assistant YAML are checked against device/outputs/events.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from tests.plugins.processes import run

README = ROOT / "README.md"
PYTHONS = {"python", "python3", ".venv/bin/python", ".venv-device/bin/python"}
HA_DEVICE, HA_PERSON = "front-door", "alice"


def blocks(lang: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    return [m.group(2) for m in re.finditer(r"^( *)```" + lang + r"\n(.*?)^\1```", text, re.M | re.S)]


def readme_commands() -> list[list[str]]:
    """argv of every command line in ```bash blocks (continuations joined, comments dropped)."""
    commands: list[list[str]] = []
    for block in blocks("bash"):
        joined = re.sub(r"\\\n", " ", block)
        for line in joined.splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                commands.append(argv)
    return commands


def python_module(argv: list[str]) -> tuple[str, list[str], list[str]] | None:
    """(module, subcommands, rest) for `python -m module [sub …] args`, else None."""
    if len(argv) >= 3 and argv[0] in PYTHONS and argv[1] == "-m" and argv[2] not in ("venv", "pip"):
        rest = argv[3:]
        subs: list[str] = []
        while rest and not rest[0].startswith("-"):
            subs.append(rest.pop(0))
        return argv[2], subs, rest
    return None


def flags(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


@cache
def help_text(*argv: str) -> str:
    proc = run([*argv, "--help"], timeout=300, raw_env=os.environ)
    assert proc.returncode == 0, f"{' '.join(argv)} --help failed: {proc.stderr[-2000:]}"
    return proc.stdout


def classify(argv: list[str]) -> str:
    if python_module(argv):
        return "python-module"
    if argv[0] in PYTHONS and argv[1:3] == ["-m", "venv"]:
        return "venv"
    if argv[0].endswith("/pip") and argv[1:3] == ["install", "-r"]:
        return "pip-requirements"
    if argv[0] == "./quickstart.sh":
        return "quickstart"
    if argv[:2] == ["sudo", "systemd/install.sh"] or argv[0] == "systemd/install.sh":
        return "install.sh"
    if argv[0] == "mosquitto_sub":
        return "mosquitto_sub"
    if argv[0] in ("cp", "scp", "rsync"):
        return "copy"
    if argv[0] in ("source", "."):
        return "activate"
    return "UNCOVERED"


def test_readme_has_the_two_commands_on_its_first_screen() -> None:
    first_screen = "\n".join(README.read_text(encoding="utf-8").splitlines()[:30])
    assert "./quickstart.sh demo" in first_screen and "./quickstart.sh test" in first_screen
    assert "MQTT" in first_screen and "Home Assistant" in first_screen
    for stage in ("train", "convert", "Pi", "MQTT", "Home Assistant"):
        assert stage in first_screen


def test_every_readme_command_is_covered() -> None:
    commands = readme_commands()
    assert len(commands) >= 10
    uncovered = [" ".join(c) for c in commands if classify(c) == "UNCOVERED"]
    assert not uncovered, f"README commands no test covers (add a handler in tests/test_readme.py): {uncovered}"


@pytest.mark.parametrize("argv", [c for c in readme_commands() if python_module(c)], ids=" ".join)
def test_python_module_commands_exist_with_their_flags(argv: list[str]) -> None:
    module, subs, rest = python_module(argv)  # type: ignore[misc]
    text = help_text(sys.executable, "-m", module, *subs)
    for flag in flags(rest):
        assert re.search(re.escape(flag) + r"\b", text), f"`{' '.join(argv)}`: {flag} is not in its --help"


RUNNERS = [ROOT / "demo.py", ROOT / "quickstart.sh", *sorted((ROOT / "tests").rglob("*.py"))]


def runs_of(module: str, subs: list[str]) -> list[Path]:
    """Files (the demo, quickstart.sh, tests) that run `python -m module subs…` as a subprocess."""
    words = [module, *subs]
    py = r'"-m",\s*' + r",\s*".join(f'"{re.escape(w)}"' for w in words) + (r",\s*\"-" if not subs else "")
    sh = r"-m " + " ".join(re.escape(w) for w in words) + (r" -" if not subs else r"\b")
    found = []
    for path in RUNNERS:
        if path.name == "test_readme.py" or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        if re.search(py, text) or (path.suffix == ".sh" and re.search(sh, text)):
            found.append(path)
    return found


@pytest.mark.parametrize("argv", [c for c in readme_commands() if python_module(c)], ids=" ".join)
def test_python_module_commands_are_run_by_the_demo_or_a_test(argv: list[str]) -> None:
    """Not only --help: the demo or some test runs the command itself, with every flag the README shows."""
    module, subs, rest = python_module(argv)  # type: ignore[misc]
    wanted = flags(rest)
    runners = runs_of(module, subs)
    full = [p for p in runners if all(f'"{f}"' in p.read_text(encoding="utf-8") or
                                       (p.suffix == ".sh" and f in p.read_text(encoding="utf-8")) for f in wanted)]
    assert full, (f"`{' '.join(argv)}` is not run with {wanted} by demo.py, quickstart.sh or a test "
                  f"(runs of it: {[p.name for p in runners]})")


def test_inline_commands_in_the_prose_exist_with_their_flags() -> None:
    """`python -m X --flag` and `.venv/bin/python demo.py --flag` written inline in the text."""
    text = README.read_text(encoding="utf-8")
    spans = re.findall(r"`((?:\.venv/bin/)?python3? [^`]+)`", text)
    checked = 0
    for span in spans:
        argv = shlex.split(span)
        if argv[1] == "demo.py":
            help_out = help_text(sys.executable, "demo.py")
            rest = argv[2:]
        elif python_module(argv):
            module, subs, rest = python_module(argv)  # type: ignore[misc]
            help_out = help_text(sys.executable, "-m", module, *subs)
        else:
            continue
        checked += 1
        for flag in flags(rest):
            assert flag in help_out, f"README mentions `{span}` but {flag} is not in its --help"
    assert checked >= 3


def test_flags_mentioned_alone_exist_somewhere() -> None:
    """A flag written on its own (`--max-drop`) must be a flag of one of our commands."""
    text = README.read_text(encoding="utf-8")
    mentioned = set(re.findall(r"`(--[a-z][a-z0-9-]*)", text))
    helps = [help_text(sys.executable, "-m", m) for m in ("train", "convert")]
    helps += [help_text(sys.executable, "-m", "device", c) for c in ("run", "check", "eval", "enroll")]
    helps += [help_text(sys.executable, "-m", "train", "backbone"), help_text(sys.executable, "-m", "train", "cohort"),
              help_text(sys.executable, "demo.py"),
              help_text("bash", "systemd/install.sh"), help_text(sys.executable, "-m", "venv")]
    everything = "\n".join(helps)
    missing = sorted(f for f in mentioned if not re.search(re.escape(f) + r"\b", everything))
    assert not missing, f"README mentions flags no command has: {missing}"


def test_quickstart_commands() -> None:
    subs = {c[1] for c in readme_commands() if c[0] == "./quickstart.sh"}
    assert subs >= {"demo", "test"}
    script = (ROOT / "quickstart.sh").read_text(encoding="utf-8")
    subprocess.run(["bash", "-n", str(ROOT / "quickstart.sh")], check=True)
    usage = help_text("bash", "quickstart.sh")
    for sub in subs:
        assert f"    {sub})" in script and f"./quickstart.sh {sub}" in usage
    # CI runs exactly the README's test command; the demo command runs demo.py (tests/test_demo.py).
    assert re.search(r"^\./quickstart\.sh test\b", (ROOT / ".ci" / "run").read_text(encoding="utf-8"), re.M)
    assert "demo.py" in script
    # The by-hand setup in the README is what quickstart.sh does.
    for step in ("-m venv", "requirements-train.txt", "-m models fetch", "requirements-device.txt"):
        assert step in script


def test_venv_pip_activate_and_copy_commands_refer_to_real_files() -> None:
    commands = readme_commands()
    created: set[str] = set()
    for argv in commands:
        kind = classify(argv)
        if python_module(argv) and "--out" in argv:
            created.add(argv[argv.index("--out") + 1])
        if kind == "venv":
            created.add(argv[-1])
        elif kind == "pip-requirements":
            assert (ROOT / argv[3]).is_file(), argv
            assert Path(argv[0]).parts[0] in created | {".venv"}, argv
        elif kind == "activate":
            assert argv[1] == ".venv/bin/activate"
        elif kind == "copy":
            # rsync's --exclude takes a pattern, not a source
            patterns = {argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--exclude"}
            sources = [a for a in argv[1:-1] if not a.startswith("-") and a not in patterns]
            for src in sources:
                assert (ROOT / src).exists() or src in created, f"`{' '.join(argv)}`: {src} does not exist"


def test_the_example_config_the_readme_starts_from_is_valid(tmp_path: Path) -> None:
    from faceberry.device.config import load_config

    cp = next(c for c in readme_commands() if c[0] == "cp")
    target = tmp_path / cp[2]
    shutil.copy(ROOT / cp[1], target)
    cfg = load_config(target, env={})
    assert cfg.bundle == "/var/lib/faceberry/bundles/current"


def test_install_command_runs_in_dry_run_mode(tmp_path: Path) -> None:
    argv = next(c for c in readme_commands() if classify(c) == "install.sh")
    if argv[0] == "sudo":
        argv = argv[1:]
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    args = argv[1:]
    args[args.index("--bundle") + 1] = str(bundle)
    args[args.index("--config") + 1] = str(ROOT / "systemd" / "faceberry.example.yaml")
    # The plan as on the Pi (a booted systemd), whatever this machine runs.
    proc = subprocess.run(["bash", argv[0], "--dry-run", "--no-apt", "--systemd", "yes", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "systemctl enable --quiet faceberry.service" in proc.stdout
    assert f"faceberry deploy --bundle {bundle} --store /var/lib/faceberry/bundles --no-reload" in proc.stdout
    assert "faceberry check --config /etc/faceberry/config.yaml" in proc.stdout
    assert "+ systemctl start faceberry.service" in proc.stdout


@pytest.mark.broker
def test_mosquitto_sub_command_shows_faceberry_messages(mosquitto_factory) -> None:
    import paho.mqtt.client as mqtt

    if shutil.which("mosquitto_sub") is None:
        pytest.skip("mosquitto_sub is not installed (apt install mosquitto-clients)")
    mosquitto = mosquitto_factory()  # a private broker: the shared one holds other tests' retained messages
    argv = next(c for c in readme_commands() if c[0] == "mosquitto_sub")
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="readme-pub")
    pub.connect(mosquitto.host, mosquitto.port)
    pub.loop_start()
    pub.publish(f"faceberry/{HA_DEVICE}/status", "online", qos=1, retain=True).wait_for_publish(5)
    pub.publish("other/topic", "x", qos=1, retain=True).wait_for_publish(5)
    pub.disconnect()
    pub.loop_stop()
    proc = subprocess.run([*argv, "-h", mosquitto.host, "-p", str(mosquitto.port), "-C", "1", "-W", "5"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"faceberry/{HA_DEVICE}/status online"


def test_event_example_has_exactly_the_daemons_keys() -> None:
    from faceberry.device.outputs.events import event_payload

    shown = json.loads(blocks("json")[0])
    real = event_payload(device_id="front-door", camera="door", label="alice", score=0.97, bbox=[1, 2, 3, 4],
                         track_id=17, frames=5, model="m", timestamp=0.0)
    assert set(shown) == set(real)
    assert shown["schema"] == real["schema"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", shown["timestamp"])


def test_topic_table_matches_the_daemon() -> None:
    from faceberry.device.outputs.events import events_topic, person_topic, snapshot_topic, status_topic

    text = README.read_text(encoding="utf-8")
    for topic in (status_topic("faceberry", "DEV"), events_topic("faceberry", "DEV"),
                  person_topic("faceberry", "DEV", "NAME"), snapshot_topic("faceberry", "DEV", "NAME")):
        assert "`" + topic.replace("DEV", "<device>").replace("NAME", "<name>") + "`" in text


def test_home_assistant_yaml_uses_the_daemons_topics_and_fields() -> None:
    from faceberry.device.outputs.events import (
        OFFLINE,
        ONLINE,
        event_payload,
        events_topic,
        person_state_payload,
        person_topic,
        status_topic,
    )

    ha = [yaml.safe_load(b) for b in blocks("yaml")]
    sensors = next(d for d in ha if "mqtt" in d)["mqtt"]["sensor"]
    automation = next(d for d in ha if "automation" in d)["automation"]
    event = event_payload(device_id=HA_DEVICE, camera="door", label=HA_PERSON, score=0.9, bbox=[0, 0, 1, 1],
                          track_id=1, frames=5, model="m", timestamp=0.0)
    fields = {person_topic("faceberry", HA_DEVICE, HA_PERSON): set(person_state_payload(event)),
              events_topic("faceberry", HA_DEVICE): set(event)}
    for sensor in sensors:
        assert sensor["state_topic"] in fields, sensor["state_topic"]
        used = re.findall(r"value_json\.(\w+)", sensor["value_template"])
        assert used and set(used) <= fields[sensor["state_topic"]], sensor
        if "availability_topic" in sensor:
            assert sensor["availability_topic"] == status_topic("faceberry", HA_DEVICE)
            assert (sensor["payload_available"], sensor["payload_not_available"]) == (ONLINE, OFFLINE)
    trigger = automation[0]["triggers"][0]
    assert trigger["trigger"] == "mqtt" and trigger["topic"] == events_topic("faceberry", HA_DEVICE)
    used = re.findall(r"payload_json\.(\w+)", automation[0]["conditions"][0]["value_template"])
    assert used and set(used) <= set(event)


def test_mqtt_reference_doc_matches_the_daemon() -> None:
    from faceberry.device.outputs.events import (
        event_payload,
        events_topic,
        person_state_payload,
        person_topic,
        snapshot_topic,
        status_topic,
    )

    doc = (ROOT / "docs" / "MQTT.md").read_text(encoding="utf-8")
    shown = [json.loads(m) for m in re.findall(r"```json\n(.*?)```", doc, re.S)]
    event = event_payload(device_id="d", camera="c", label="alice", score=0.9, bbox=[0, 0, 1, 1], track_id=1,
                          frames=5, model="m", timestamp=0.0)
    assert set(shown[0]) == set(event)
    assert set(shown[1]) == set(person_state_payload(event))
    # The field table documents every event field, and nothing else.
    table = re.search(r"\| field \| meaning \|\n\|---\|---\|\n(.*?)\n\n", doc, re.S)
    assert table, "docs/MQTT.md: the event field table is missing"
    documented = re.findall(r"^\| `(\w+)` \|", table.group(1), re.M)
    assert sorted(documented) == sorted(event)
    for topic in (status_topic("P", "D"), events_topic("P", "D"), person_topic("P", "D", "L"),
                  snapshot_topic("P", "D", "L")):
        pattern = topic.replace("P/", "<prefix>/").replace("/D/", "/<device>/").replace("/L", "/<label>")
        assert f"`{pattern}`" in doc, pattern


def test_readme_timings_are_filled_in() -> None:
    text = README.read_text(encoding="utf-8")
    assert "**N minutes**" not in text and "**M minutes**" not in text, "measure the demo and the tests, then fill in"


def test_headline_figures_are_quoted_from_the_benchmarks() -> None:
    """Each number in the README's headline block must appear in docs/BENCHMARKS.md (no stale or invented figures)."""
    text = README.read_text(encoding="utf-8")
    block = text[text.index("<!-- HEADLINE-FIGURES"):text.index("---", text.index("<!-- HEADLINE-FIGURES"))]
    figures = re.findall(r"\*\*([^*]*\d[^*]*)\*\*", block)
    assert len(figures) >= 5
    bench = (ROOT / "docs" / "BENCHMARKS.md").read_text(encoding="utf-8")
    for figure in figures:
        number = re.search(r"\d+(?:\.\d+)?", figure).group(0)  # type: ignore[union-attr]
        found = re.search(r"(?<![\d.])" + re.escape(number) + r"(?![\d])", bench)
        assert found, f"README headline {figure!r}: {number} is not in docs/BENCHMARKS.md"
