"""Frame sources and the capture thread. Only the Pi camera is faked (its module); files are real."""

from __future__ import annotations

import importlib.util
import logging
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import cv2
import numpy as np
import pytest

from faceberry.device.capture.camera import (
    CameraError,
    Capture,
    FolderSource,
    FrameSource,
    OpenCVSource,
    Picamera2Source,
    open_source,
)
from tests.conftest import need_shared


def wait_captured(capture: Capture, n: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while capture.captured < n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert capture.captured == n


def drain(capture: Capture, limit: int = 10_000) -> list:
    frames = []
    while len(frames) < limit:
        frame = capture.get(timeout=10)
        if frame is None:
            break
        frames.append(frame)
    return frames


def write_png(path: Path, colour: tuple[int, int, int]) -> None:
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:] = colour
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


# --- folder ---------------------------------------------------------------------------------------------

def test_folder_yields_sorted_rgb_frames_skips_unreadable_and_ends(tmp_path: Path, caplog) -> None:
    write_png(tmp_path / "b" / "2.png", (0, 255, 0))
    write_png(tmp_path / "a" / "1.png", (255, 0, 0))
    (tmp_path / "a" / "1b.jpg").write_bytes(b"this is not a jpeg")
    write_png(tmp_path / "c.png", (0, 0, 255))
    (tmp_path / "notes.txt").write_text("ignored")
    with caplog.at_level(logging.WARNING, logger="faceberry.device.capture.camera"):
        capture = Capture(FolderSource(tmp_path), queue_size=2).start()
        frames = drain(capture)
        capture.stop()
    assert [Path(f.origin).name for f in frames] == ["1.png", "2.png", "c.png"]
    assert [f.index for f in frames] == [0, 1, 2]
    assert [tuple(f.image[0, 0]) for f in frames] == [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    assert all(f.image.dtype == np.uint8 and f.image.shape == (20, 30, 3) for f in frames)
    assert capture.dropped == 0 and capture.skipped == [str(tmp_path / "a" / "1b.jpg")]
    assert any("skipping unreadable image" in r.message and "1b.jpg" in r.message for r in caplog.records)
    assert capture.get(timeout=1) is None  # the end stays the end


def test_folder_loop_repeats(tmp_path: Path) -> None:
    write_png(tmp_path / "1.png", (1, 2, 3))
    write_png(tmp_path / "2.png", (4, 5, 6))
    capture = Capture(FolderSource(tmp_path, loop=True)).start()
    frames = drain(capture, limit=7)
    capture.stop()
    assert [tuple(f.image[0, 0]) for f in frames] == [(1, 2, 3), (4, 5, 6)] * 3 + [(1, 2, 3)]


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(CameraError, match="image folder not found"):
        FolderSource(tmp_path / "missing").open()
    with pytest.raises(CameraError, match="no images"):
        FolderSource(tmp_path).open()
    (tmp_path / "bad.jpg").write_bytes(b"x")
    source = FolderSource(tmp_path, loop=True)  # only unreadable images: an error instead of spinning
    source.open()
    with pytest.raises(CameraError, match=r"no readable image left in .*\(1 skipped\)"):
        source.read()
    once = FolderSource(tmp_path)  # not looping: the stream just ends
    once.open()
    assert once.read() is None


# --- capture thread: bounded queue, drop oldest --------------------------------------------------------

class Counter(FrameSource):
    """A synthetic live source: frame k is filled with k; it stops after `n` frames."""

    def __init__(self, n: int, live: bool = True, fail_at: int | None = None) -> None:
        self.n, self.live, self.fail_at, self.k = n, live, fail_at, 0
        self.closed = False

    def open(self) -> None:
        pass

    def read(self) -> np.ndarray | None:
        if self.fail_at is not None and self.k == self.fail_at:
            raise CameraError("cable unplugged")
        if self.k >= self.n:
            return None
        self.k += 1
        time.sleep(0.001)
        return np.full((4, 4, 3), self.k - 1, np.uint8)

    def close(self) -> None:
        self.closed = True


def test_live_source_drops_the_oldest_frames_and_counts_them() -> None:
    # Unsupervised, so the end of the synthetic stream ends the capture instead of being reopened.
    capture = Capture(Counter(60), queue_size=3, supervise=False).start()
    wait_captured(capture, 60)  # a slow consumer: the source has run to its end meanwhile
    frames = drain(capture)
    capture.stop()
    values = [int(f.image[0, 0, 0]) for f in frames]
    assert values == [57, 58, 59]  # the newest survive
    assert capture.captured == 60 and capture.dropped == 57
    assert capture.source.closed


def test_file_source_waits_for_the_consumer_and_drops_nothing() -> None:
    capture = Capture(Counter(40, live=False), queue_size=2).start()
    time.sleep(0.2)
    values = [int(f.image[0, 0, 0]) for f in drain(capture)]
    capture.stop()
    assert values == list(range(40)) and capture.dropped == 0


def test_paced_file_source_behaves_like_a_camera() -> None:
    capture = Capture(Counter(10, live=False), queue_size=2, fps=200).start()
    wait_captured(capture, 10)
    frames = drain(capture)
    capture.stop()
    assert capture.dropped == 8 and len(frames) == 2


def test_an_unsupervised_source_failure_reaches_the_consumer() -> None:
    capture = Capture(Counter(100, fail_at=3), queue_size=10, supervise=False).start()
    with pytest.raises(CameraError, match="cable unplugged"):
        drain(capture)
    capture.stop()


def test_stop_unblocks_a_waiting_reader() -> None:
    capture = Capture(Counter(10_000, live=False), queue_size=1).start()
    time.sleep(0.1)
    t0 = time.monotonic()
    capture.stop()
    assert time.monotonic() - t0 < 2
    assert not capture._thread.is_alive()


# --- OpenCV: real video files ---------------------------------------------------------------------------

def test_opencv_reads_a_video_file_in_rgb_and_ends(tmp_path: Path) -> None:
    path = tmp_path / "red.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    assert writer.isOpened()
    bgr = np.zeros((48, 64, 3), np.uint8)
    bgr[:, :, 2] = 220  # red in OpenCV's BGR
    for _ in range(5):
        writer.write(bgr)
    writer.release()
    capture = Capture(OpenCVSource(str(path))).start()
    frames = drain(capture)
    capture.stop()
    assert len(frames) == 5
    r, g, b = frames[0].image[24, 32].astype(int)
    assert r > 180 and g < 40 and b < 40

    looping = Capture(OpenCVSource(str(path), loop=True)).start()
    assert len(drain(looping, limit=12)) == 12
    looping.stop()


def test_opencv_shared_clip() -> None:
    clip = need_shared("video", "short_hamilton_clip.mp4")
    source = OpenCVSource(str(clip))
    source.open()
    try:
        first = source.read()
    finally:
        source.close()
    assert first is not None and first.shape == (360, 640, 3) and first.dtype == np.uint8


@pytest.mark.parametrize(
    ("device", "message"),
    [("/dev/video97", "camera /dev/video97 does not exist"), (97, "cannot open camera 97"),
     ("missing.mp4", "video file not found")],
)
def test_unreachable_cameras_are_clear_errors(device, message: str) -> None:
    with pytest.raises(CameraError, match=message):
        OpenCVSource(device).open()


def test_not_a_video_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "clip.mp4"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(CameraError, match=r"cannot open camera .*clip\.mp4"):
        OpenCVSource(str(bad)).open()


def test_open_source_picks_the_class(tmp_path: Path) -> None:
    assert isinstance(open_source(SimpleNamespace(source="folder", device=str(tmp_path), loop=False)), FolderSource)
    cfg = SimpleNamespace(source="opencv", device="0", width=320, height=240, fps=0.0, loop=False)
    assert isinstance(open_source(cfg), OpenCVSource) and open_source(cfg).live
    cfg = SimpleNamespace(source="picamera2", device=0, width=320, height=240, fps=10.0, loop=False)
    assert isinstance(open_source(cfg), Picamera2Source)


# --- picamera2: a fake module with picamera2's API (the hardware is the only thing mocked) --------------

class FakePicamera2:
    instances: ClassVar[list[FakePicamera2]] = []

    def __init__(self, camera_num: int = 0) -> None:
        self.camera_num = camera_num
        self.calls: list[str] = []
        self.config = None
        FakePicamera2.instances.append(self)

    def create_video_configuration(self, main=None, controls=None, **kw):
        self.calls.append("create_video_configuration")
        return {"main": dict(main), "controls": dict(controls or {})}

    def configure(self, config) -> None:
        self.calls.append("configure")
        self.config = config

    def start(self) -> None:
        self.calls.append("start")

    def capture_array(self, name: str = "main") -> np.ndarray:
        assert name == "main" and "start" in self.calls
        w, h = self.config["main"]["size"]
        # libcamera's "RGB888" is B, G, R in memory: a pure red scene arrives as [0, 0, 255].
        frame = np.zeros((h, w, 3), np.uint8)
        frame[..., 2] = 255
        frame[0, 0] = (10, 20, 30)
        return frame

    def stop(self) -> None:
        self.calls.append("stop")

    def close(self) -> None:
        self.calls.append("close")


def test_picamera2_source_configures_rgb888_and_converts_bgr_to_rgb() -> None:
    FakePicamera2.instances.clear()
    source = Picamera2Source(320, 240, fps=15, module=SimpleNamespace(Picamera2=FakePicamera2))
    capture = Capture(source, queue_size=2).start()
    frame = capture.get(timeout=5)
    capture.stop()
    cam = FakePicamera2.instances[0]
    assert cam.config == {"main": {"size": (320, 240), "format": "RGB888"}, "controls": {"FrameRate": 15.0}}
    assert frame.image.shape == (240, 320, 3) and frame.image.flags["C_CONTIGUOUS"]
    assert tuple(frame.image[5, 5]) == (255, 0, 0)  # red is red
    assert tuple(frame.image[0, 0]) == (30, 20, 10)
    assert cam.calls[:3] == ["create_video_configuration", "configure", "start"]
    assert cam.calls[-2:] == ["stop", "close"]


def test_picamera2_four_channel_frames_are_reduced_to_rgb() -> None:
    class Xrgb(FakePicamera2):
        def capture_array(self, name: str = "main") -> np.ndarray:
            return np.dstack([super().capture_array(name), np.full((240, 320), 255, np.uint8)])

    source = Picamera2Source(320, 240, module=SimpleNamespace(Picamera2=Xrgb))
    source.open()
    image = source.read()
    source.close()
    assert image.shape == (240, 320, 3) and tuple(image[5, 5]) == (255, 0, 0)


def test_picamera2_without_a_camera_is_a_clear_error() -> None:
    class NoCamera(FakePicamera2):
        def __init__(self, camera_num: int = 0) -> None:
            raise IndexError("list index out of range")

    with pytest.raises(CameraError, match=r"cannot open the Pi camera 0.*video' group"):
        Picamera2Source(module=SimpleNamespace(Picamera2=NoCamera)).open()


def test_picamera2_missing_module_says_how_to_install() -> None:
    if importlib.util.find_spec("picamera2") is not None:
        pytest.skip("picamera2 is installed here")
    with pytest.raises(CameraError, match=r"apt install python3-picamera2.*--system-site-packages"):
        Picamera2Source().open()


def test_capture_thread_is_a_daemon_and_named() -> None:
    capture = Capture(Counter(1), supervise=False).start()
    assert capture._thread.daemon and capture._thread.name == "capture"
    drain(capture)
    capture.stop()
    assert not any(t.name == "capture" for t in threading.enumerate())


# --- supervision: a live camera that goes away comes back; files that go away are errors ----------------------

class Unpluggable(FrameSource):
    """A fake live camera (the hardware is what is faked): `plugged` decides whether it opens and delivers."""

    def __init__(self) -> None:
        self.plugged = threading.Event()
        self.plugged.set()
        self.opens = 0
        self.k = 0

    def open(self) -> None:
        if not self.plugged.is_set():
            raise CameraError("no such device")
        self.opens += 1

    def read(self) -> np.ndarray | None:
        if not self.plugged.is_set():
            raise CameraError("cable unplugged")
        self.k += 1
        time.sleep(0.005)
        return np.full((4, 4, 3), self.k % 256, np.uint8)


def test_a_live_camera_that_fails_is_reopened_and_the_outage_is_logged_once_each_way(caplog) -> None:
    source = Unpluggable()
    capture = Capture(source, queue_size=2, reopen_min_s=0.05, reopen_max_s=0.2)
    with caplog.at_level(logging.INFO, logger="faceberry.device.capture.camera"):
        capture.start()
        assert capture.get(timeout=5) is not None
        source.plugged.clear()
        deadline = time.monotonic() + 10
        while not capture.out_now and time.monotonic() < deadline:
            time.sleep(0.01)
        assert capture.out_now and capture.outages == 1
        # Several failed reopen attempts while it is out, none of them an error for the consumer.
        while capture.reopen_attempts < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert capture.reopen_attempts >= 4 and capture.outage_reason == "no such device"
        source.plugged.set()
        while capture.out_now and time.monotonic() < deadline:
            time.sleep(0.01)
        before = capture.captured
        frames = [capture.get(timeout=5) for _ in range(5)]
        capture.stop()
    assert all(f is not None for f in frames) and capture.captured > before
    assert capture.outages == 1 and source.opens == 2 and capture.last_outage_s > 0
    lost = [r for r in caplog.records if "lost: cable unplugged" in r.getMessage()]
    back = [r for r in caplog.records if re.search(r"is back after [\d.]+ s out", r.getMessage())]
    assert len(lost) == 1 and len(back) == 1  # not one line per reopen attempt


def test_a_deleted_folder_is_an_error_not_the_end_of_the_stream(tmp_path: Path) -> None:
    folder = tmp_path / "camera"
    for i in range(4):
        write_png(folder / f"{i}.png", (i, i, i))
    capture = Capture(FolderSource(folder, loop=True), queue_size=1).start()
    assert capture.get(timeout=5) is not None
    shutil.rmtree(folder)
    with pytest.raises(CameraError, match=r"image folder .* disappeared"):
        drain(capture)
    capture.stop()


def write_clip(path: Path, frames: int = 5) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    assert writer.isOpened()
    for i in range(frames):
        writer.write(np.full((48, 64, 3), 20 * i, np.uint8))
    writer.release()


@pytest.mark.parametrize(("damage", "message"), [
    ("delete", "was deleted while it was played"),
    ("truncate", "cut short while it was played"),
])
def test_a_looping_video_deleted_or_truncated_stops_with_one_clear_error(tmp_path: Path, damage: str,
                                                                          message: str) -> None:
    path = tmp_path / "clip.avi"
    write_clip(path)
    capture = Capture(OpenCVSource(str(path), loop=True), queue_size=1).start()
    assert capture.get(timeout=5) is not None
    if damage == "delete":
        path.unlink()
    else:
        with open(path, "r+b") as fh:
            fh.truncate(path.stat().st_size // 3)
    with pytest.raises(CameraError, match=message):
        drain(capture, limit=1000)  # the error comes within a pass, never an endless loop
    capture.stop()


def test_a_looping_video_replaced_on_disk_is_played_anew(tmp_path: Path) -> None:
    path = tmp_path / "clip.avi"
    write_clip(path, frames=3)
    source = OpenCVSource(str(path), loop=True)
    source.open()
    try:
        first = [source.read() for _ in range(3)]
        replacement = tmp_path / "new.avi"
        frame = np.full((48, 64, 3), 200, np.uint8)
        writer = cv2.VideoWriter(str(replacement), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
        for _ in range(3):
            writer.write(frame)
        writer.release()
        replacement.replace(path)  # a new inode under the old name
        after = source.read()
    finally:
        source.close()
    assert int(first[0].mean()) < 30 and int(after.mean()) > 150


def test_picamera2_built_on_another_numpy_gives_one_line_with_the_fix(tmp_path, monkeypatch) -> None:
    """apt's picamera2 stack under a venv's numpy 2 fails at import with a ValueError, not ImportError
    (issue 10); a real package that fails the same way stands in for it."""
    pkg = tmp_path / "picamera2"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "raise ValueError('numpy.dtype size changed, may indicate binary incompatibility. "
        "Expected 96 from C header, got 88 from PyObject')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "picamera2", raising=False)
    with pytest.raises(CameraError) as info:
        Picamera2Source().open()
    message = str(info.value)
    assert "\n" not in message and "dtype size changed" in message and "'numpy<2'" in message


def test_a_live_camera_absent_at_start_is_an_outage_from_the_start_not_an_error(caplog) -> None:
    source = Unpluggable()
    source.plugged.clear()
    capture = Capture(source, queue_size=2, reopen_min_s=0.05, reopen_max_s=0.2)
    with caplog.at_level(logging.INFO, logger="faceberry.device.capture.camera"):
        capture.start()  # does not raise
        assert capture.out_now and capture.outages == 1 and capture.outage_reason == "no such device"
        with pytest.raises(TimeoutError):
            capture.get(timeout=0.3)
        deadline = time.monotonic() + 10
        while capture.reopen_attempts < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        source.plugged.set()
        frame = capture.get(timeout=10)
        capture.stop()
    assert frame is not None and capture.outages == 1 and not capture.out_now and capture.last_outage_s > 0
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "is not available at start: no such device" in m]) == 1
    assert len([m for m in messages if re.search(r"is back after [\d.]+ s out", m)]) == 1
    assert not [m for m in messages if "lost:" in m]


def test_an_outage_longer_than_max_outage_s_ends_the_stream_with_one_error() -> None:
    source = Unpluggable()
    source.plugged.clear()
    capture = Capture(source, queue_size=2, reopen_min_s=0.05, reopen_max_s=0.1, max_outage_s=0.5)
    capture.start()
    with pytest.raises(CameraError, match=r"out for \d+ s .*last: no such device.*camera\.max_outage_s 0\.5"):
        capture.get(timeout=10)
    with pytest.raises(CameraError):  # every later get() says it too, the stream does not go on
        capture.get(timeout=1)
    capture.stop()
    assert capture.reopen_attempts >= 2


def test_files_folders_and_a_missing_camera_library_still_fail_at_start(tmp_path: Path) -> None:
    from faceberry.device.capture.camera import CameraSetupError

    with pytest.raises(CameraError, match="video file not found"):
        Capture(OpenCVSource(str(tmp_path / "gone.mp4"))).start()
    with pytest.raises(CameraError, match="image folder not found"):
        Capture(FolderSource(tmp_path / "gone")).start()

    class NotInstalled(Unpluggable):
        def open(self) -> None:
            raise CameraSetupError("picamera2 is not installed")

    with pytest.raises(CameraSetupError):
        Capture(NotInstalled()).start()


class Newest(FrameSource):
    """A source that keeps its own newest frame (as RtspSource does): counts how often it is read."""

    keeps_latest = True

    def __init__(self) -> None:
        self.reads = 0
        self.dropped = 0

    def open(self) -> None:
        pass

    def read(self) -> np.ndarray | None:
        self.reads += 1
        self.dropped += 2  # the frames it decoded meanwhile that nobody asked for
        return np.full((4, 4, 3), self.reads % 256, np.uint8)


def test_a_source_that_keeps_its_newest_frame_is_read_only_when_the_consumer_asks() -> None:
    source = Newest()
    capture = Capture(source, queue_size=5).start()
    try:
        time.sleep(0.3)  # nobody asks: nothing is read ahead into the queue to grow stale there
        assert source.reads == 0
        frames = [capture.get(timeout=5) for _ in range(3)]
        time.sleep(0.3)
        # At most one read ahead of the consumer, never a queue of them.
        assert [int(f.image[0, 0, 0]) for f in frames] == [1, 2, 3] and source.reads == 3
    finally:
        capture.stop()
    # The source's own drops are the capture's: the stats and Home Assistant read capture.dropped.
    assert capture.dropped == 6 and capture.captured == 3


def test_a_consumer_that_polls_a_keeps_latest_source_is_served() -> None:
    """A scheduler serving several cameras asks each with a short timeout: the request must outlive it."""
    source = Newest()
    capture = Capture(source).start()
    try:
        got = None
        for _ in range(500):
            try:
                got = capture.get(timeout=0)
                break
            except TimeoutError:
                time.sleep(0.01)
        assert got is not None and int(got.image[0, 0, 0]) == 1
        time.sleep(0.2)
        assert source.reads == 1  # one read per request, not a stream of them
    finally:
        capture.stop()
