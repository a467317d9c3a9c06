"""IP cameras over RTSP, against a real RTSP server on loopback (GStreamer's gst-rtsp-server, H.264).

The server (tests/rtsp_server.py) runs under the system Python that has GStreamer's bindings; CI installs
them from Debian (.ci/run: gir1.2-gst-rtsp-server-1.0, gstreamer1.0-plugins-good/-ugly, python3-gi). Where
they are missing these tests skip, saying what to install. The video it serves is made here, in a temporary
folder, from real LFW face photos in ../shared: a still of each of six people, one after the other.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from faceberry.device.capture.camera import CameraError, Capture, RtspSource, open_source, redact_url
from faceberry.device.config import ConfigError, config_from_dict
from tests.conftest import need_shared
from tests.plugins.processes import accepts, free_port

SERVER = Path(__file__).with_name("rtsp_server.py")
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/usr/local/bin") or "/usr/bin/python3"
APT_LINE = ("apt install gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good "
            "gstreamer1.0-plugins-ugly python3-gi")
FPS = 15
USER, PASSWORD = "viewer", "p@ss:w/rd#1"  # characters that would break a URL unless encoded


def _server_missing() -> str | None:
    probe = ("import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0'); "
             "from gi.repository import Gst, GstRtspServer; Gst.init(None); "
             "missing = [e for e in ('x264enc', 'rtph264pay', 'jpegdec', 'multifilesrc') "
             "if Gst.ElementFactory.find(e) is None]; print(' '.join(missing))")
    try:
        out = subprocess.run([SYSTEM_PYTHON, "-c", probe], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"no system Python with GStreamer ({exc}); {APT_LINE}"
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        return f"GStreamer's RTSP server is not installed ({last}); {APT_LINE}"
    if out.stdout.strip():
        return f"GStreamer elements missing: {out.stdout.strip()}; {APT_LINE}"
    return None


@pytest.fixture(scope="module")
def face_frames(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[np.ndarray]]:
    """Six 640×360 frames, each a different person's LFW photo on a grey background, as JPEG files."""
    lfw = need_shared("faces", "lfw-dev")
    people = sorted(p for p in lfw.iterdir() if p.is_dir())[:6]
    folder = tmp_path_factory.mktemp("rtsp-video")
    frames = []
    for i, person in enumerate(people):
        photo = cv2.imread(str(sorted(person.glob("*.jpg"))[0]))
        canvas = np.full((360, 640, 3), 90, np.uint8)
        canvas[55:305, 195:445] = photo  # LFW photos are 250×250
        # Each still is held for a third of a second, so a client sees every person.
        for k in range(FPS // 3):
            cv2.imwrite(str(folder / f"frame{i * (FPS // 3) + k:03d}.jpg"), canvas)
        frames.append(canvas)
    return str(folder / "frame%03d.jpg"), frames


class RtspServer:
    """tests/rtsp_server.py on a fixed loopback port; stop() and start() keep the port, as a camera rebooting."""

    def __init__(self, frames: str, workdir: Path, auth: str | None = "digest") -> None:
        self.frames, self.workdir, self.auth = frames, workdir, auth
        self.port = free_port()
        self.log = workdir / f"rtsp-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, path: str = "/face", user: str | None = USER) -> str:
        return f"rtsp://{user + '@' if user else ''}127.0.0.1:{self.port}{path}"

    def start(self) -> None:
        args = [SYSTEM_PYTHON, str(SERVER), "--port", str(self.port), "--frames", self.frames, "--fps", str(FPS)]
        if self.auth:
            args += ["--user", USER, "--password", PASSWORD, "--auth", self.auth]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not accepts("127.0.0.1", self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the RTSP server did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def transports(self) -> list[str]:
        return re.findall(r"setup transport=(\S+)", self.log.read_text())


@pytest.fixture(scope="module")
def server_available() -> None:
    reason = _server_missing()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def rtsp_server(server_available: None, face_frames: tuple[str, list[np.ndarray]], tmp_path: Path,
                request: pytest.FixtureRequest) -> Iterator[RtspServer]:
    """A camera asking for a Digest password (as most do), or what the test's `auth` parameter names."""
    server = RtspServer(face_frames[0], tmp_path, getattr(request, "param", "digest"))
    server.start()
    yield server
    server.stop()


def camera_config(tmp_path: Path, url: str, password: str | None = PASSWORD, **extra: object):
    camera: dict[str, object] = {"source": "rtsp", "device": url, **extra}
    if password is not None:
        secret = tmp_path / "camera_password"
        secret.write_text(password + "\n")
        secret.chmod(0o600)
        camera["password_file"] = str(secret)
    return config_from_dict({"bundle": "/b", "device_id": "d1", "camera": camera}, env={}).camera


def which_face(image_rgb: np.ndarray, faces: list[np.ndarray]) -> tuple[int, float, float]:
    """The index of the source still a decoded frame shows, its mean absolute difference, and the runner-up's."""
    bgr = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR).astype(np.float32)
    diffs = sorted((float(np.abs(bgr - f.astype(np.float32)).mean()), i) for i, f in enumerate(faces))
    return diffs[0][1], diffs[0][0], diffs[1][0]


def frames_from(capture: Capture, n: int, timeout: float = 20.0) -> list:
    deadline = time.monotonic() + timeout
    frames = []
    while len(frames) < n and time.monotonic() < deadline:
        try:
            frame = capture.get(timeout=0.5)
        except TimeoutError:
            continue
        assert frame is not None
        frames.append(frame)
    return frames


def test_the_daemons_rtsp_source_delivers_the_cameras_frames_over_tcp_with_the_password_from_a_file(
        rtsp_server: RtspServer, face_frames: tuple[str, list[np.ndarray]], tmp_path: Path) -> None:
    cfg = camera_config(tmp_path, rtsp_server.url())
    source = open_source(cfg)
    assert isinstance(source, RtspSource) and PASSWORD not in source.name
    capture = Capture(source, cfg.queue_size, fps=cfg.fps, reopen_max_s=cfg.reopen_max_s).start()
    try:
        frames = frames_from(capture, 40)
    finally:
        capture.stop()
    assert len(frames) == 40
    seen = set()
    for frame in frames:
        assert frame.image.shape == (360, 640, 3) and frame.image.dtype == np.uint8
        index, diff, runner_up = which_face(frame.image, face_frames[1])
        # H.264 at 800 kbit/s changes a pixel by a few levels; another person's photo by tens.
        assert diff < 8 < runner_up, (diff, runner_up)
        seen.add(index)
    assert len(seen) >= 3  # the video plays: several people went by, not one frozen frame
    assert rtsp_server.transports() and all("/TCP" in t for t in rtsp_server.transports())


def test_udp_transport_is_what_the_camera_is_asked_for(rtsp_server: RtspServer, tmp_path: Path) -> None:
    cfg = camera_config(tmp_path, rtsp_server.url(), rtsp_transport="udp")
    capture = Capture(open_source(cfg), 1).start()
    try:
        frames = frames_from(capture, 10)
    finally:
        capture.stop()
    assert len(frames) == 10
    transports = rtsp_server.transports()
    assert transports and all("/TCP" not in t and "client_port=" in t for t in transports), transports


def test_a_slow_consumer_gets_the_newest_frame_and_the_skipped_ones_are_counted_as_drops(
        rtsp_server: RtspServer, tmp_path: Path) -> None:
    capture = Capture(open_source(camera_config(tmp_path, rtsp_server.url())), 2).start()
    try:
        got = []
        for _ in range(6):  # a recogniser that needs 0.4 s per frame, on a 15 fps camera
            got.extend(frames_from(capture, 1))
            time.sleep(0.4)
    finally:
        capture.stop()  # the reader stops with it, so the counts below are final
    grabbed, dropped = capture.source.grabbed, capture.dropped
    assert len(got) == 6
    # Each frame handed out was decoded for it, none waited in a queue: every other decoded frame is a drop
    # (but one, which may have been decoded for a request the stop cut short).
    assert grabbed - capture.captured - 1 <= dropped <= grabbed - capture.captured and dropped > 0
    assert capture.captured == 6


def test_a_camera_that_reboots_is_an_outage_and_frames_come_back_on_their_own(
        rtsp_server: RtspServer, tmp_path: Path) -> None:
    cfg = camera_config(tmp_path, rtsp_server.url(), reopen_max_s=0.5)
    capture = Capture(open_source(cfg), cfg.queue_size, reopen_min_s=0.2, reopen_max_s=cfg.reopen_max_s,
                      max_outage_s=cfg.max_outage_s).start()
    try:
        assert len(frames_from(capture, 5)) == 5
        rtsp_server.stop()
        deadline = time.monotonic() + 30
        while not capture.out_now and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):  # the daemon keeps asking for frames; none come
                capture.get(timeout=0.5)
        assert capture.out_now and capture.outages == 1
        rtsp_server.start()
        before = capture.captured
        frames = frames_from(capture, 5, timeout=60)
    finally:
        capture.stop()
    assert len(frames) == 5 and capture.captured >= before + 5
    assert not capture.out_now and capture.outages == 1 and capture.last_outage_s > 0


@pytest.mark.parametrize("rtsp_server", ["digest", "basic"], indirect=True)
@pytest.mark.parametrize("case, message", [
    ("wrong password", r"refused the user name and password; check the user in camera\.device and the password "
                       r"in camera\.password_file"),
    ("no password", r"asks for a user name and password; .*camera\.password_file"),
    ("wrong path", r"no stream at /main; check the path in camera\.device"),
    ("closed port", r"refuses connections on port \d+; check the port"),
])
def test_a_wrong_url_or_password_is_one_line_naming_the_fix(
        rtsp_server: RtspServer, tmp_path: Path, case: str, message: str) -> None:
    url, password = rtsp_server.url(), PASSWORD
    if case == "wrong password":
        password = "guess"
    elif case == "no password":
        password = None
    elif case == "wrong path":
        url = rtsp_server.url("/main")
    elif case == "closed port":
        url = f"rtsp://{USER}@127.0.0.1:{free_port()}/face"
    cfg = camera_config(tmp_path, url, password)
    capture = Capture(open_source(cfg), supervise=False)
    with pytest.raises(CameraError) as caught:
        capture.start()
    text = str(caught.value)
    assert re.search(message, text) and "\n" not in text, text
    assert text.startswith(f"cannot open RTSP camera {url}: ")
    if password:
        assert password not in text


def test_a_decoder_that_falls_behind_reconnects_and_says_to_use_the_substream(
        rtsp_server: RtspServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class SlowDevice(RtspSource):
        """Decodes at a third of the camera's frame rate, as a Pi on a 4K main stream."""

        def _grab(self, cap: cv2.VideoCapture) -> bool:
            time.sleep(3 / FPS)
            return super()._grab(cap)

    source = SlowDevice(rtsp_server.url(), PASSWORD, max_lag_s=1.0)
    capture = Capture(source, 1, reopen_min_s=0.2, reopen_max_s=0.5)
    with caplog.at_level("WARNING", logger="faceberry.device.capture.camera"):
        capture.start()
        try:
            deadline = time.monotonic() + 40
            while capture.outages == 0 and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    capture.get(timeout=0.5)
        finally:
            capture.stop()
    assert capture.outages >= 1
    assert any("use the camera's substream" in r.getMessage() for r in caplog.records)


def test_check_opens_the_stream_once_with_the_password_from_the_config_file(
        rtsp_server: RtspServer, tmp_path: Path) -> None:
    from faceberry.device.config import load_config
    from faceberry.device.ops.check import check_camera

    secret = tmp_path / "camera_password"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o600)
    config = tmp_path / "config.yaml"
    config.write_text(f"bundle: /b\ndevice_id: d1\ncamera:\n  source: rtsp\n  device: {rtsp_server.url()}\n"
                      "  password_file: camera_password\n")
    assert check_camera(load_config(config, env={}), timeout=20) == f"rtsp:{rtsp_server.url()}: got a 640×360 frame"
    secret.write_text("guess\n")
    with pytest.raises(CameraError, match=r"refused the user name and password") as caught:
        check_camera(load_config(config, env={}), timeout=20)
    assert "faceberry.service" not in str(caught.value)  # a camera streams to several clients at once


# --- config and URLs (no server needed) ---------------------------------------------------------------------

def test_the_password_is_never_in_the_config_and_comes_from_a_file_or_a_systemd_credential(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"camera\.device: the URL holds a password; remove it") as caught:
        config_from_dict({"bundle": "/b", "camera": {"source": "rtsp", "device": "rtsp://u:hunter2@cam/s"}}, env={})
    assert "hunter2" not in str(caught.value)
    with pytest.raises(ConfigError, match=r"source rtsp needs an rtsp:// or rtsps:// URL"):
        config_from_dict({"bundle": "/b", "camera": {"source": "rtsp", "device": "/dev/video0"}}, env={})
    (tmp_path / "camera_password").write_text("from-systemd\n")
    cfg = config_from_dict({"bundle": "/b", "camera": {"source": "rtsp", "device": "rtsp://u@cam/s"}},
                           env={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert cfg.camera.password == "from-systemd" and "from-systemd" not in repr(cfg)
    loose = tmp_path / "loose"
    loose.write_text("pw\n")
    loose.chmod(0o644)
    cfg = config_from_dict({"bundle": "/b", "camera": {"source": "rtsp", "device": "rtsp://u@cam/s",
                                                       "password_file": str(loose)}}, env={})
    assert cfg.camera.password == "pw" and any(f"chmod 600 {loose}" in w for w in cfg.warnings)
    with pytest.raises(ConfigError, match=r"camera\.password_file .*missing.* cannot be read"):
        config_from_dict({"bundle": "/b", "camera": {"source": "rtsp", "device": "rtsp://u@cam/s",
                                                     "password_file": str(tmp_path / "missing")}}, env={})


def test_a_password_in_an_opencv_url_is_warned_about_and_never_logged() -> None:
    cfg = config_from_dict({"bundle": "/b", "camera": {"source": "opencv", "device": "rtsp://u:hunter2@cam/s"}},
                           env={})
    assert any("camera.password_file" in w for w in cfg.warnings)
    assert "hunter2" not in open_source(cfg.camera).name
    assert redact_url("rtsp://u:hunter2@cam:554/s?x=1") == "rtsp://u:***@cam:554/s?x=1"


def test_stopping_while_the_camera_is_silent_returns_promptly(tmp_path: Path) -> None:
    """A camera that accepts the connection and says nothing must not hold up a stop (systemd's timeout)."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True).start()
    source = RtspSource(f"rtsp://127.0.0.1:{port}/s", open_timeout_s=1.0, read_timeout_s=1.0)
    capture = Capture(source, reopen_min_s=0.2).start()  # supervised: silent = absent at start
    try:
        time.sleep(0.5)
        started = time.monotonic()
    finally:
        capture.stop()
        listener.close()
        for conn in accepted:
            conn.close()
    assert time.monotonic() - started < 8
    assert capture.out_now

