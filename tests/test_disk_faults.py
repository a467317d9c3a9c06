"""A full disk and damaged files against the whole daemon (issue 21): a real mosquitto, a folder camera,
and a state_dir that fills up, two ways: a 2 MB tmpfs mounted by the test (needs root and CAP_SYS_ADMIN;
skipped elsewhere), and everywhere SQLite's own limit `PRAGMA max_page_count` set on the daemon's outbox
by a launcher (SQLite then answers "database or disk is full", SQLITE_FULL, as on a full card).

What must hold while state_dir is full and the broker away: the daemon never exits; the loss is counted;
the stop line, the stats and what the next start finds are one number; and once the disk has room again,
every event that was written is delivered.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from faceberry.device.messaging.outbox import Outbox, salvage
from tests.plugins.broker import Subscriber
from tests.plugins.daemon import DEVICE, folder_of_photos, start_daemon, write_config
from tests.plugins.files import damage
from tests.plugins.processes import start

pytestmark = pytest.mark.broker


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A size-limited file system at `where` (a tmpfs), unmounted afterwards; skips where mounting is refused."""
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a {size} tmpfs here ({proc.stderr.strip() or proc.returncode}): needs root "
                    "and CAP_SYS_ADMIN; tests/test_outbox.py covers a full outbox without it")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(fs: Path, leave: int) -> Path:
    """Fill the file system at `fs` up to `leave` free bytes with one file; returns it (delete it to free)."""
    filler = fs / "filler"
    free = os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(0, free - leave))
    return filler


# `python -m device` with the outbox's database limited to FACEBERRY_TEST_OUTBOX_PAGES pages, when set.
LIMITED = """
import os, runpy, sys
pages = os.environ.get("FACEBERRY_TEST_OUTBOX_PAGES")
if pages:
    import faceberry.device.messaging.outbox as outbox
    connect = outbox.Outbox._connect
    def limited(self, path):
        db = connect(self, path)
        db.execute(f"PRAGMA max_page_count = {int(pages)}")
        return db
    outbox.Outbox._connect = limited
sys.argv = ["device", *sys.argv[1:]]
runpy.run_module("device", run_name="__main__", alter_sys=True)
"""


class Daemon:
    """`device run` in a subprocess, its stderr collected line by line as it comes."""

    def __init__(self, config: Path, pages: int | None = None) -> None:
        if pages is None:
            self.proc = start_daemon(config)
        else:
            self.proc = start([sys.executable, "-c", LIMITED, "run", "--config", str(config)],
                              env={"FACEBERRY_TEST_OUTBOX_PAGES": str(pages)})
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> re.Match | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    found = re.search(pattern, line)
                    if found:
                        return found
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    return None
                self._cond.wait(min(left, 0.5))

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            pytest.fail("the daemon did not stop:\n" + self.text[-3000:])
        self._reader.join(10)
        return rc

    @property
    def text(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def last_stats(self) -> dict[str, int]:
        line = [x for x in self.lines if "stats:" in x][-1]
        return {k: int(v) for k, v in re.findall(r"\b(pending|lost|published|dropped)=(\d+)", line)}


def outbox_rows(path: Path) -> list[str]:
    """The event ids a restart would find in the outbox (its own connection, as the next start reads)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT topic, payload FROM outbox ORDER BY id").fetchall()
    finally:
        db.close()
    return [json.loads(p)["event_id"] for t, p in rows if t.endswith("/events")]


@contextlib.contextmanager
def full_state_dir(tmp_path: Path, how: str) -> Iterator[tuple[Path, int | None, Callable[[], None]]]:
    """(state_dir, outbox page limit for the launcher or None, a function that frees the space)."""
    if how == "tmpfs":
        with tmpfs(tmp_path / "state", "2m") as state:
            # Room for a few dozen events with their snapshots, then nothing.
            filler = fill(state, leave=1_000_000)
            yield state, None, filler.unlink
    else:
        state = tmp_path / "state"
        state.mkdir()
        limit: list[int | None] = [60]  # 60 pages of 4 KiB: the same few dozen events
        yield state, limit, lambda: limit.__setitem__(0, None)


@pytest.mark.parametrize("how", ["tmpfs", "max_page_count"])
def test_a_full_state_dir_while_the_broker_is_away_loses_nothing_it_says_it_kept(
        tmp_path, mosquitto_factory, gallery_bundle, heldout_photos, how) -> None:
    broker = mosquitto_factory(persistent=True)
    sub = Subscriber(broker.host, broker.port, f"faceberry/{DEVICE}/events", session="faceberry-test-full")
    broker.stop()  # away for the whole time the disk is full
    folder_of_photos(heldout_photos, tmp_path / "camera", per_person=3, broken=False)
    with full_state_dir(tmp_path, how) as (state, limit, free):
        config = write_config(tmp_path / "config.yaml", gallery_bundle, broker,
                              {"device": str(tmp_path / "camera"), "loop": True},
                              events={"unknown": True, "snapshots": True, "cooldown": 0},
                              memory={"strangers": True})
        outbox = state / f"outbox-{DEVICE}.sqlite3"

        def start() -> Daemon:
            return Daemon(config, pages=limit[0] if limit else None)

        daemon = start()
        try:
            assert daemon.wait_for(r"cannot write a message to the outbox .*(disk is full|No space)", 120), \
                daemon.text[-3000:]
            time.sleep(4)  # full for a while: many more events lost, still one line per kind of failure
            assert daemon.proc.poll() is None, daemon.text[-3000:]
            # The status file (`faceberry status`) shows the loss while the disk is full, not only after.
            status = state / f"status-{DEVICE}.json"
            assert json.loads(status.read_text())["mqtt"]["lost"] > 0
        finally:
            rc = daemon.stop()
        text = daemon.text
        assert rc == 0 and "Traceback" not in text, text[-3000:]
        assert len(re.findall(r"cannot write a message to the outbox", text)) == 1
        assert len(re.findall(r"cannot save the stranger memory", text)) <= 1
        kept = int(re.search(r"broker is unreachable: (\d+) messages kept in the outbox", text).group(1))
        stats = daemon.last_stats()
        on_disk = outbox_rows(outbox)
        db = sqlite3.connect(f"file:{outbox}?mode=ro", uri=True)
        rows = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        db.close()
        # The stop line, the stats and the file agree; the loss is counted, not hidden.
        assert kept == stats["pending"] == rows and on_disk, text[-2000:]
        assert stats["lost"] > 0

        # A start while the disk is still full and the broker back: it delivers, and never dies of it.
        broker.start()
        daemon = start()
        try:
            found = daemon.wait_for(r"outbox \S+: (\d+) messages left by the last run", 60)
            assert found and int(found.group(1)) == rows, daemon.text[-3000:]
            assert sub.wait_for(lambda m: {json.loads(p)["event_id"] for _, p, _ in m} >= set(on_disk), 60), \
                daemon.text[-3000:]
            time.sleep(2)
            assert daemon.proc.poll() is None, daemon.text[-3000:]
        finally:
            rc = daemon.stop()
        assert rc == 0 and "Traceback" not in daemon.text, daemon.text[-3000:]
        assert "the MQTT client stopped" not in daemon.text

        # Room again: what is written is delivered, and the status file shows the loss of this run.
        free()
        before = len(sub.messages)
        daemon = start()
        try:
            assert sub.wait_for(lambda m: len(m) >= before + 3, 60), daemon.text[-3000:]
            status = state / f"status-{DEVICE}.json"
            assert daemon.wait_for(r"stats:", 30)
            # The status file is this run's, and says what the stats line says (it is written just before
            # each stats line: read both until no new interval came between the two reads).
            for _ in range(50):
                shown = json.loads(status.read_text())
                if shown["pid"] == daemon.proc.pid and shown["mqtt"]["lost"] == daemon.last_stats()["lost"]:
                    break
                time.sleep(0.1)
            assert shown["pid"] == daemon.proc.pid and shown["mqtt"]["lost"] == daemon.last_stats()["lost"]
        finally:
            rc = daemon.stop()
        assert rc == 0, daemon.text[-3000:]
        delivered = [json.loads(p)["event_id"] for _, p, _ in sub.messages]
        assert set(on_disk) <= set(delivered)
        left = outbox_rows(outbox)
        assert not set(left) & set(on_disk)  # the backlog was delivered and deleted, not kept for a replay
    sub.close()


def test_the_daemon_starts_over_damaged_state_files_and_delivers_what_was_readable(
        tmp_path, mosquitto, gallery_bundle, heldout_photos) -> None:
    # A power cut on an SD card, everywhere at once: the outbox damaged mid-file, NaN corrections, a
    # stranger memory cut short, a discovery record that is not JSON, a recent face whose face.json is junk.
    state = tmp_path / "state"
    state.mkdir()
    outbox = state / f"outbox-{DEVICE}.sqlite3"
    box = Outbox(outbox)
    for i in range(150):
        box.put(f"faceberry/{DEVICE}/events", json.dumps({"event_id": f"old-{i}", "pad": "x" * 300}))
    box.close()
    damage(outbox, "middle")
    copy = tmp_path / "copy.sqlite3"
    copy.write_bytes(outbox.read_bytes())
    readable = [json.loads(row[2])["event_id"] for row in salvage(copy)[0]]  # (id, topic, payload, …)
    assert 0 < len(readable) < 150
    negatives = state / f"negatives-{DEVICE}.json"
    negatives.write_text(json.dumps({"corrections": [{"id": "c", "label": "x", "event_id": "e", "at": 1.0,
                                                      "embeddings": [[math.nan] * 4]}]}))
    strangers = state / f"strangers-{DEVICE}.npz"
    strangers.write_bytes(b"PK\x03\x04" + b"\0" * 40)
    ledger = state / f"discovery-{DEVICE}.json"
    ledger.write_text('{"topics": ["homeassistant/sensor/a/config", ')
    face = state / f"faces-{DEVICE}" / "e1"
    face.mkdir(parents=True)
    (face / "face.json").write_text("[1, 2")

    folder_of_photos(heldout_photos, tmp_path / "camera", per_person=1, broken=False)
    config = write_config(tmp_path / "config.yaml", gallery_bundle, mosquitto, {"device": str(tmp_path / "camera")},
                          events={"homeassistant": True}, memory={"strangers": True},
                          homeassistant={"commands": True})
    sub = Subscriber(mosquitto.host, mosquitto.port, f"faceberry/{DEVICE}/events")
    try:
        daemon = Daemon(config)
        with contextlib.suppress(subprocess.TimeoutExpired):
            daemon.proc.wait(120)  # a folder camera without loop: it ends by itself
        rc = daemon.stop()
        text = daemon.text
        assert rc == 0 and "Traceback" not in text, text[-3000:]
        for path in (outbox, negatives, strangers, ledger):
            line, = [x for x in text.splitlines() if f"{path} is damaged" in x]
            assert "moved aside to" in line and "goes on" in line
            assert list(state.glob(f"{path.name}.corrupt-*")), path
        assert f"{len(readable)} messages were readable and are sent first" in text
        assert re.search(rf"faces-{DEVICE}: 1 stored faces were damaged", text)
        # Everything readable is delivered.
        assert sub.wait_for(lambda m: {json.loads(p)["event_id"] for _, p, _ in m} >= set(readable), 30)
    finally:
        sub.close()
