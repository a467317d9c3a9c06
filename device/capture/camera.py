"""Frame sources behind one interface, and a capture thread that runs ahead of processing.

Sources: the Pi camera (picamera2), an IP camera's RTSP stream (`RtspSource`: credentials kept out of
the URL, TCP or UDP, only the newest frame kept), anything OpenCV opens (/dev/videoN, an HTTP/MJPEG URL, a
video file) and a folder of images. `Capture` reads a source in its own thread into a small bounded queue; a live
camera never waits for the recogniser, so when the queue is full the OLDEST frame is dropped (stale
frames are worthless at a door) and counted. Files and folders are not real time: unless given an fps
they wait for the consumer and drop nothing. The end of a file or folder ends the stream cleanly.

A live source that fails or stops delivering (a cable, Wi-Fi, an RTSP camera rebooting) is supervised:
`Capture` closes it and reopens it with backoff (1 s doubling to `reopen_max_s`), logging the outage once
when it starts and once when it ends, with its duration; the consumer just sees no frames meanwhile. A live
source that is absent when the daemon starts (the camera boots slower than the Pi, the Wi-Fi is not up yet)
is the same outage, begun at start. Only an outage longer than `max_outage_s` (0 = never) ends the stream
with an error, so that systemd restarts the daemon afresh. A file or folder that does not exist, disappears
or is cut short under us is an error at once (retrying cannot bring it back), raised once to the consumer;
so is a camera library that is not installed (`CameraSetupError`).
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import logging
import os
import re
import socket
import ssl
import threading
import time
import urllib.parse
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from faceberry.contract import IMAGE_SUFFIXES
from faceberry.device.config import CameraConfig
from faceberry.errors import EXIT_USAGE, UnavailableError
from faceberry.preprocess import ImageError, load_image

log = logging.getLogger(__name__)



def picamera2_import_failure(exc: BaseException) -> str:
    """One line naming why apt's picamera2 would not import, and the fix."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "dtype size changed" in text or "numpy" in text.lower():
        import numpy

        return (f"picamera2 cannot import with this venv's numpy {numpy.__version__} ({text}): apt's picamera2 is "
                "built on Debian's numpy 1.x; reinstall the device requirements, which cap numpy below 2 on "
                "Bookworm (`pip install -r requirements-device.txt`, or `pip install 'numpy<2' "
                "'opencv-python-headless<4.12' 'ml_dtypes<0.6'`)")
    return (f"picamera2 failed to import ({type(exc).__name__}: {text}); reinstall it with "
            "`sudo apt install --reinstall python3-picamera2` (or use camera.source: opencv)")


class CameraError(UnavailableError):
    """A camera that cannot be opened or stopped delivering; the message says what to check."""


class CameraSetupError(CameraError):
    """A camera this install cannot drive at all (its library missing or broken): reopening cannot help."""

    # Permanent: the unit's RestartPreventExitStatus=2 keeps systemd from reloading the models every 10 s
    # for a library that will not appear by itself (faceberry/errors.py).
    exit_code = EXIT_USAGE


@dataclass
class Frame:
    image: np.ndarray  # RGB uint8 (H, W, 3)
    timestamp: float  # Unix time of capture
    index: int  # 0, 1, 2 … in capture order (dropped frames leave gaps)
    origin: str | None = None  # file path for folder frames, for logs


class FrameSource:
    """open() → read() until it returns None (end of stream) → close()."""

    name = "source"
    live = True  # a live source cannot wait: the capture queue drops its oldest frames
    # A source that reads ahead in a thread of its own and keeps only its newest frame: `Capture` then
    # asks it for a frame only when the consumer wants one (no queue of frames growing stale), and the
    # source counts the frames nobody asked for in `dropped`.
    keeps_latest = False
    dropped = 0

    def open(self) -> None:
        raise NotImplementedError

    def read(self) -> np.ndarray | None:
        """The next RGB uint8 frame, or None at the end of a file or folder."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def origin(self) -> str | None:
        return None


class Picamera2Source(FrameSource):
    """The Raspberry Pi camera through picamera2 (from apt: python3-picamera2).

    One RGB stream at the configured size is enough: BlazeFace letterboxes every frame to 128×128
    anyway, and the crops are cut from that same frame, so a separate low-res stream would save
    only a resize while complicating keypoint mapping.
    """

    name = "picamera2"

    def __init__(self, width: int = 640, height: int = 480, fps: float = 0.0, camera_num: int = 0,
                 module: Any = None) -> None:
        self.size = (int(width), int(height))
        self.fps = fps
        self.camera_num = camera_num
        self._module = module
        self.camera: Any = None

    def open(self) -> None:
        module = self._module
        if module is None:
            try:
                module = importlib.import_module("picamera2")
            except ImportError as exc:
                raise CameraSetupError(
                    "picamera2 is not installed: on Raspberry Pi OS run `sudo apt install python3-picamera2` and "
                    "create the venv with --system-site-packages (or use camera.source: opencv)"
                ) from exc
            except Exception as exc:
                raise CameraSetupError(picamera2_import_failure(exc)) from exc
        try:
            self.camera = module.Picamera2(self.camera_num)
            controls = {"FrameRate": float(self.fps)} if self.fps else {}
            config = self.camera.create_video_configuration(
                main={"size": self.size, "format": "RGB888"}, controls=controls
            )
            self.camera.configure(config)
            self.camera.start()
        except Exception as exc:  # libcamera raises RuntimeError, IndexError (no camera), OSError …
            self.close()
            raise CameraError(
                f"cannot open the Pi camera {self.camera_num}: {exc}; check the ribbon cable, "
                "`rpicam-hello --list-cameras`, and that the service user is in the 'video' group"
            ) from exc

    def read(self) -> np.ndarray | None:
        try:
            array = self.camera.capture_array("main")
        except Exception as exc:
            raise CameraError(f"the Pi camera stopped delivering frames: {exc}") from exc
        # libcamera names formats by word order: "RGB888" is stored B, G, R in memory, so the array
        # is BGR (and XRGB8888 is BGRA). The pipeline wants RGB.
        return np.ascontiguousarray(array[..., 2::-1])

    def close(self) -> None:
        if self.camera is not None:
            for step in ("stop", "close"):
                try:
                    getattr(self.camera, step)()
                except Exception as exc:  # closing must not mask the original error
                    log.debug("picamera2 %s failed: %s", step, exc)
            self.camera = None


class OpenCVSource(FrameSource):
    """A V4L2 camera (index or /dev/videoN), an RTSP/HTTP stream or a video file, through OpenCV."""

    # Consecutive failed reads before a live camera or stream is declared gone.
    MAX_FAILURES = 50

    def __init__(self, device: int | str = 0, width: int = 640, height: int = 480, fps: float = 0.0,
                 loop: bool = False) -> None:
        if isinstance(device, str) and device.isdigit():
            device = int(device)
        self.device = device
        self.is_file = isinstance(device, str) and "://" not in device and not device.startswith("/dev/")
        self.live = not self.is_file
        # The name goes into logs and stats: never with the password a URL may carry.
        self.name = f"opencv:{redact_url(device) if isinstance(device, str) else device}"
        self.width, self.height, self.fps, self.loop = width, height, fps, loop
        self.cap: cv2.VideoCapture | None = None
        self._failures = 0
        self._pass_frames = 0  # frames read since the file was (re)opened
        self._file_id: tuple[int, int] | None = None  # (inode, size) of the file when opened

    # Without these a stream that accepts the TCP connection and then says nothing blocks open() or
    # read() for FFmpeg's default 30 s, and a stop request with it.
    STREAM_TIMEOUTS_MS = (cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, 10_000, cv2.CAP_PROP_READ_TIMEOUT_MSEC, 5_000)

    def open(self) -> None:
        if self.is_file and not Path(str(self.device)).is_file():
            raise CameraError(f"video file not found: {self.device}; fix camera.device")
        if isinstance(self.device, str) and self.device.startswith("/dev/") and not Path(self.device).exists():
            raise CameraError(f"camera {self.device} does not exist; check the cable and `v4l2-ctl --list-devices`")
        if isinstance(self.device, str) and "://" in self.device:
            self.cap = cv2.VideoCapture(self.device, cv2.CAP_FFMPEG, list(self.STREAM_TIMEOUTS_MS))
        else:
            self.cap = cv2.VideoCapture(self.device)
        if not self.cap.isOpened():
            self.cap.release()
            self.cap = None
            if self.is_file:
                hint = "the file is not a video OpenCV can decode"
            elif isinstance(self.device, str) and "://" in self.device:
                hint = "check the URL, the network and the credentials in it"
            else:
                hint = "check camera.device and that the service user is in the 'video' group"
            raise CameraError(f"cannot open camera {self.name.removeprefix('opencv:')}: {hint}")
        self._pass_frames = 0
        self._failures = 0
        if self.is_file:
            st = Path(str(self.device)).stat()
            self._file_id = (st.st_ino, st.st_size)
        else:
            self.cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
            self.cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
            if self.fps:
                self.cap.set(cv2.CAP_PROP_FPS, self.fps)
            # Keep the driver's own buffer short: we buffer (and drop) ourselves.
            self.cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)

    def read(self) -> np.ndarray | None:
        assert self.cap is not None, "open() first"
        while True:
            ok, bgr = self.cap.read()
            if ok and bgr is not None:
                self._failures = 0
                self._pass_frames += 1
                if bgr.ndim == 2:
                    return cv2.cvtColor(bgr, cv2.COLOR_GRAY2RGB)
                return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            if self.is_file:
                self._check_file_unchanged()
                if not self.loop:
                    return None
                if self._pass_frames == 0:
                    # Rewinding a file that yields nothing would spin forever (and FFmpeg would log each try).
                    raise CameraError(f"video file {self.device} gave no frames (damaged or cut short?); replace "
                                      "it or fix camera.device")
                # Reopened by path, not rewound: a file replaced on disk is played anew, not its old inode.
                self.close()
                self.open()
                continue
            self._failures += 1
            if self._failures >= self.MAX_FAILURES:
                raise CameraError(f"camera {self.name.removeprefix('opencv:')} stopped delivering frames "
                                  f"({self._failures} failed reads)")
            time.sleep(0.1)

    def _check_file_unchanged(self) -> None:
        """At the end of a pass: a deleted or shortened file is an error, not the end of a good video."""
        path = Path(str(self.device))
        try:
            st = path.stat()
        except OSError:
            raise CameraError(f"video file {self.device} was deleted while it was played; restore it or fix "
                              "camera.device") from None
        if self._file_id is not None and st.st_ino == self._file_id[0] and st.st_size < self._file_id[1]:
            raise CameraError(f"video file {self.device} was cut short while it was played ({self._file_id[1]} → "
                              f"{st.st_size} bytes); replace it or fix camera.device")

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None


def redact_url(url: str) -> str:
    """`url` with any password in it replaced by ***, for logs and messages."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def url_with_password(url: str, password: str | None) -> str:
    """The URL FFmpeg is given: `url` (which may name the user) with the password from its file put in."""
    if not password:
        return url
    parts = urllib.parse.urlsplit(url)
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    # Percent-encoded: a password with @ : / # in it would otherwise change the host or the path.
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:{urllib.parse.quote(password, safe='')}@{host}"))


# OpenCV hands FFmpeg its options through one process-wide variable, read when a capture opens; this lock
# keeps two cameras opening at once from seeing each other's transport.
_FFMPEG_OPTIONS_LOCK = threading.Lock()
_FFMPEG_OPTIONS_VAR = "OPENCV_FFMPEG_CAPTURE_OPTIONS"


def _open_ffmpeg(url: str, options: str, timeouts: list[int]) -> cv2.VideoCapture:
    with _FFMPEG_OPTIONS_LOCK:
        before = os.environ.get(_FFMPEG_OPTIONS_VAR)
        # The user's own options (if any) come last, so they still win.
        os.environ[_FFMPEG_OPTIONS_VAR] = options + (f"|{before}" if before else "")
        try:
            return cv2.VideoCapture(url, cv2.CAP_FFMPEG, timeouts)
        finally:
            if before is None:
                os.environ.pop(_FFMPEG_OPTIONS_VAR, None)
            else:
                os.environ[_FFMPEG_OPTIONS_VAR] = before


def diagnose_rtsp(url: str, password: str | None, timeout: float = 5.0, transport: str = "tcp") -> str:
    """Why an RTSP URL does not open, as '<what>; <fix>', found by asking the camera ourselves.

    OpenCV only says "not opened" (FFmpeg's reason goes to stderr, if anywhere). A DESCRIBE, and a second
    one with Digest or Basic credentials when the camera asks, tells a wrong host, port, path or password
    apart. Each request has a connection of its own: some cameras hang up after a 401.
    """
    parts = urllib.parse.urlsplit(url)
    host, secure = parts.hostname or "", parts.scheme == "rtsps"
    port = parts.port or (322 if secure else 554)
    plain = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    where = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))

    def ask(authorization: str | None) -> tuple[int, dict[str, list[str]]]:
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            if secure:
                # Cameras serve RTSPS with self-signed certificates; this only asks for a status code.
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                sock = context.wrap_socket(sock, server_hostname=host)
            return _describe(sock, plain, authorization)
        finally:
            sock.close()

    try:
        status, headers = ask(None)
    except socket.gaierror:
        return (f"the host name {host!r} does not resolve; fix the host in camera.device (the camera's IP address "
                "is safest)")
    except ConnectionRefusedError:
        return (f"{host} refuses connections on port {port}; check the port in camera.device (554 for most "
                "cameras) and that RTSP is enabled in the camera's settings")
    except TimeoutError:
        return (f"{host}:{port} does not answer (timed out); check that the camera is on, its address and port in "
                "camera.device, and the network between them")
    except OSError as exc:
        return (f"{host}:{port} is unreachable ({exc.strerror or exc}); check that the camera is on, its IP "
                "address in camera.device, and the network between them")
    except ValueError as exc:
        return f"{host}:{port} does not speak RTSP ({exc}); check the port in camera.device (554 for most cameras)"
    if status == 401:
        if not password:
            return ("the camera asks for a user name and password; put the user in camera.device "
                    "(rtsp://USER@host/...) and the password in camera.password_file")
        user = urllib.parse.unquote(parts.username or "")
        try:
            status, _ = ask(_authorization(headers.get("www-authenticate", []), "DESCRIBE", plain, user, password))
        except (OSError, ValueError) as exc:
            return f"{host}:{port} stopped answering after asking for a password ({exc}); try again"
        if status == 401:
            return ("the camera refused the user name and password; check the user in camera.device and the "
                    "password in camera.password_file")
    if status == 404:
        return (f"the camera has no stream at {where}; check the path in camera.device against the camera's "
                "documented RTSP URL (README: IP cameras and doorbells)")
    if status != 200:
        return f"the camera answered RTSP {status} to {where}; check the URL in camera.device"
    if transport == "udp":
        return ("the camera accepts the URL and credentials but no video arrived over UDP (a firewall or NAT "
                "drops it); set camera.rtsp_transport: tcp")
    return ("the camera accepts the URL and credentials but the stream could not be decoded; choose an H.264 "
            "stream (the substream) in camera.device or in the camera's video settings")


def _describe(sock: socket.socket, url: str, authorization: str | None) -> tuple[int, dict[str, list[str]]]:
    """Send one RTSP DESCRIBE on `sock`; the status code and the response headers (lower-case names)."""
    lines = [f"DESCRIBE {url} RTSP/1.0", "CSeq: 1", "Accept: application/sdp", "User-Agent: faceberry"]
    if authorization:
        lines.append(f"Authorization: {authorization}")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    data = b""
    while b"\r\n\r\n" not in data and len(data) < 65536:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    match = re.match(r"RTSP/\d\.\d (\d{3})", head[0] if head else "")
    if not match:
        raise ValueError("no RTSP status line")
    headers: dict[str, list[str]] = {}
    for line in head[1:]:
        key, _, value = line.partition(":")
        headers.setdefault(key.strip().lower(), []).append(value.strip())
    return int(match.group(1)), headers


def _authorization(challenges: list[str], method: str, uri: str, user: str, password: str) -> str:
    """The Authorization header answering the camera's WWW-Authenticate challenges: Digest if offered, else Basic."""
    digest = next((c for c in challenges if c.lower().startswith("digest")), None)
    if digest is None:
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    fields = {key: quoted or bare for key, quoted, bare in re.findall(r'(\w+)=(?:"([^"]*)"|([^\s,]*))', digest[6:])}
    realm, nonce = fields.get("realm", ""), fields.get("nonce", "")

    def md5(text: str) -> str:
        return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()

    ha1, ha2 = md5(f"{user}:{realm}:{password}"), md5(f"{method}:{uri}")
    header = f'Digest username="{user}", realm="{realm}", nonce="{nonce}", uri="{uri}"'
    if "auth" in [q.strip() for q in fields.get("qop", "").split(",")]:  # RFC 2617 with qop=auth
        cnonce = hashlib.sha256(os.urandom(16)).hexdigest()[:16]
        response = md5(f"{ha1}:{nonce}:00000001:{cnonce}:auth:{ha2}")
        header += f', qop=auth, nc=00000001, cnonce="{cnonce}"'
    else:
        response = md5(f"{ha1}:{nonce}:{ha2}")
    header += f', response="{response}"'
    if "opaque" in fields:
        header += f', opaque="{fields["opaque"]}"'
    return header


class RtspSource(FrameSource):
    """An IP camera or doorbell's RTSP stream, read for low latency.

    A reader thread grabs (decodes) every frame as it arrives, so neither FFmpeg's buffers nor the
    socket's fill up, and converts to RGB only the frame a `read()` is waiting for: every frame grabbed
    while nobody asked is dropped and counted in `dropped`. (CAP_PROP_BUFFERSIZE is requested too, but
    FFmpeg does not honour it.) If decoding cannot keep up with the camera (a main stream too big for the
    device), the stream falls behind the wall clock; past `max_lag_s` the source fails, so `Capture`
    reconnects (which empties the backlog) and the log says to use the substream.

    The password is never part of `url` or of the source's name: it comes from camera.password_file (or
    a systemd credential) and is put into the URL only for FFmpeg.
    """

    keeps_latest = True

    def __init__(self, url: str, password: str | None = None, transport: str = "tcp",
                 open_timeout_s: float = 10.0, read_timeout_s: float = 5.0, max_lag_s: float = 3.0) -> None:
        if transport not in ("tcp", "udp"):
            raise ValueError(f"RTSP transport must be tcp or udp, not {transport!r}")
        self.url = url
        self.password = password
        self.transport = transport
        self.open_timeout_s, self.read_timeout_s, self.max_lag_s = open_timeout_s, read_timeout_s, max_lag_s
        self.name = f"rtsp:{redact_url(url)}"
        self.grabbed = 0  # frames decoded since the source was made (all connections)
        self.dropped = 0  # of those, frames nobody asked for
        self.lag_s = 0.0  # how far the newest frame is behind the camera's clock, as far as we can tell
        self._cap: cv2.VideoCapture | None = None
        self._thread: threading.Thread | None = None
        # One per connection: a reader that outlives close() (stuck in a grab) must not feed the next one.
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._wanted = False
        self._frame: np.ndarray | None = None
        self._error: str | None = None

    def open(self) -> None:
        options = f"rtsp_transport;{self.transport}"
        timeouts = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(self.open_timeout_s * 1000),
                    cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(self.read_timeout_s * 1000)]
        cap = _open_ffmpeg(url_with_password(self.url, self.password), options, timeouts)
        if not cap.isOpened():
            cap.release()
            reason = diagnose_rtsp(self.url, self.password, timeout=min(self.open_timeout_s, 5.0),
                                   transport=self.transport)
            raise CameraError(f"cannot open RTSP camera {redact_url(self.url)}: {reason}")
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # honoured by some backends, not FFmpeg's: the thread is the fix
        self._cap = cap
        with self._cond:
            self._stop = threading.Event()
            self._error = None
            self._frame = None
            self._wanted = False
        self._thread = threading.Thread(target=self._reader, args=(cap, self._stop), name="rtsp-reader",
                                        daemon=True)
        self._thread.start()

    def _grab(self, cap: cv2.VideoCapture) -> bool:
        return bool(cap.grab())

    def _reader(self, cap: cv2.VideoCapture, stop: threading.Event) -> None:
        # Stream clock against wall clock: their difference is constant while we keep up, and grows by
        # the backlog when we do not. Its smallest value so far is the "keeping up" reference.
        best_offset: float | None = None
        last_pts = -1.0
        try:
            while not stop.is_set():
                if not self._grab(cap):
                    self._fail(stop, "the stream stopped delivering frames (the camera went away, or "
                               f"nothing came for {self.read_timeout_s:g} s)")
                    return
                self.grabbed += 1
                pts = cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
                offset = time.monotonic() - pts
                if pts <= last_pts or best_offset is None:
                    # The camera's clock restarted, or it sends no usable timestamps: a new reference, so
                    # a stream without them is never taken for one we fall behind.
                    best_offset = offset
                last_pts = pts
                best_offset = min(best_offset, offset)
                self.lag_s = offset - best_offset
                if self.max_lag_s and self.lag_s > self.max_lag_s:
                    self._fail(stop, f"this device decodes the stream slower than the camera sends it "
                               f"({self.lag_s:.1f} s behind); use the camera's substream in camera.device (README: "
                               "IP cameras and doorbells)")
                    return
                with self._cond:
                    if not self._wanted:
                        self.dropped += 1
                        continue
                ok, bgr = cap.retrieve()
                with self._cond:
                    if ok and bgr is not None and not stop.is_set():
                        self._frame = bgr
                        self._wanted = False
                        self._cond.notify_all()
        except Exception as exc:  # OpenCV errors end this connection; Capture reconnects
            self._fail(stop, f"reading the stream failed: {exc}")
        finally:
            cap.release()

    def _fail(self, stop: threading.Event, reason: str) -> None:
        with self._cond:
            if stop.is_set():
                return  # this connection was closed: its end is no news
            self._error = reason
            self._cond.notify_all()

    def read(self) -> np.ndarray | None:
        deadline = time.monotonic() + self.read_timeout_s + 1.0
        with self._cond:
            self._wanted = True
            while self._frame is None and self._error is None and not self._stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    self._error = f"no frame for {self.read_timeout_s + 1:g} s"
                    break
                self._cond.wait(min(left, 0.2))
            frame, self._frame = self._frame, None
            if frame is None:
                if self._stop.is_set():
                    return None
                raise CameraError(f"camera {self.name}: {self._error}")
        if frame.ndim == 2:
            return cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
        return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)

    def interrupt(self) -> None:
        """Make a waiting read() return None now (the capture is stopping)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        self.interrupt()
        thread, self._thread = self._thread, None
        if thread is not None:
            # The reader releases the capture itself once its grab returns (at most the read timeout):
            # releasing it under a running grab would crash FFmpeg.
            thread.join(timeout=self.read_timeout_s + 1.0)
        self._cap = None


class FolderSource(FrameSource):
    """Every image under a directory (recursively, sorted by path); unreadable images are skipped."""

    live = False

    def __init__(self, directory: str | Path, loop: bool = False) -> None:
        self.directory = Path(directory)
        self.loop = loop
        self.name = f"folder:{self.directory}"
        self.paths: list[Path] = []
        self.skipped: list[str] = []
        self._pos = 0
        self._current: str | None = None

    def open(self) -> None:
        if not self.directory.is_dir():
            raise CameraError(f"image folder not found: {self.directory}; fix camera.device")
        self.paths = sorted(p for p in self.directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.paths:
            raise CameraError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {self.directory}")
        self._pos = 0

    def read(self) -> np.ndarray | None:
        readable_seen = False
        while True:
            if self._pos >= len(self.paths):
                if not self.loop:
                    return None
                if not readable_seen and len(self.skipped) >= len(self.paths):
                    # Looping over nothing readable: the folder went away (rmtree deletes the files before
                    # the folder, so they look unreadable first) or every image in it is broken.
                    if not self.directory.is_dir() or not any(p.exists() for p in self.paths):
                        raise CameraError(f"image folder {self.directory} disappeared while it was read (or all its "
                                          "images did); restore it or fix camera.device")
                    raise CameraError(f"no readable image left in {self.directory} ({len(self.skipped)} skipped); "
                                      "put images there or fix camera.device")
                self._pos = 0
            path = self.paths[self._pos]
            self._pos += 1
            try:
                image = load_image(path)
            except (ImageError, OSError) as exc:
                if not self.directory.is_dir():
                    raise CameraError(f"image folder {self.directory} disappeared while it was read; restore it "
                                      "or fix camera.device") from None
                if str(path) not in self.skipped:  # once per file, however often a loop comes back to it
                    self.skipped.append(str(path))
                    log.warning("skipping unreadable image %s: %s", path, exc)
                continue
            readable_seen = True
            self._current = str(path)
            return image

    def origin(self) -> str | None:
        return self._current


def open_source(cfg: CameraConfig) -> FrameSource:
    """The FrameSource a CameraConfig describes (not yet opened)."""
    if cfg.source == "picamera2":
        num = cfg.device if isinstance(cfg.device, int) else 0
        return Picamera2Source(cfg.width, cfg.height, cfg.fps, camera_num=num)
    if cfg.source == "opencv":
        return OpenCVSource(cfg.device, cfg.width, cfg.height, cfg.fps, cfg.loop)
    if cfg.source == "folder":
        return FolderSource(str(cfg.device), loop=cfg.loop)
    if cfg.source == "rtsp":
        return RtspSource(str(cfg.device), password=cfg.password, transport=cfg.rtsp_transport,
                          max_lag_s=float(cfg.rtsp_max_lag_s))
    raise CameraError(f"unknown camera source {cfg.source!r}; use picamera2, rtsp, opencv or folder")


_END = object()


class Capture:
    """Reads a source in a background thread into a bounded queue.

    `drop_oldest` defaults to the source being live (or paced by `fps`): then a full queue discards its
    oldest frame, counted in `dropped`; otherwise the reader waits for room. A source that keeps its own
    newest frame (`keeps_latest`, an RTSP camera) is read on demand instead: once for each `get()` that
    finds no frame queued, so the frame it gets is the newest, never one that aged in a queue; the frames
    it skipped are the source's drops, included in `dropped`.

    `supervise` (default: the source is live) reopens a source that fails, ends or cannot be opened at
    start, waiting `reopen_min_s` doubling up to `reopen_max_s` between attempts, for up to `max_outage_s`
    (0 = as long as it takes): a camera outage is not a reason for the daemon to exit (systemd's restart
    limits would leave it failed for good). Outages are counted in `outages` and `outage_s`.
    """

    def __init__(self, source: FrameSource, queue_size: int = 2, fps: float = 0.0,
                 drop_oldest: bool | None = None, supervise: bool | None = None,
                 reopen_min_s: float = 1.0, reopen_max_s: float = 30.0, max_outage_s: float = 0.0) -> None:
        self.source = source
        self.supervise = source.live if supervise is None else supervise
        self.reopen_min_s = max(0.01, float(reopen_min_s))
        self.reopen_max_s = max(self.reopen_min_s, float(reopen_max_s))
        self.max_outage_s = max(0.0, float(max_outage_s))
        self._absent_at_start: str | None = None  # why a supervised source did not open in start()
        self.outages = 0
        self.reopen_attempts = 0
        self.last_outage_s: float | None = None
        self._outage_total = 0.0  # seconds, of outages that ended
        self._outage_since: float | None = None  # monotonic start of the current outage
        self.outage_reason: str | None = None
        self.queue_size = max(1, int(queue_size))
        self.pace = 1.0 / fps if (fps and not source.live) else 0.0
        self.on_demand = bool(getattr(source, "keeps_latest", False)) and not self.pace
        self.drop_oldest = (source.live or bool(self.pace)) if drop_oldest is None else drop_oldest
        self.captured = 0
        self._queue_dropped = 0
        # An on-demand source is read once per get() that found the queue empty: the request stays until a
        # frame answers it, so a consumer that polls (get with a short timeout) is served too.
        self._demand = False
        self.error: BaseException | None = None
        self._queue: deque[Any] = deque()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Set whenever a frame (or the end) is queued: a consumer reading several captures waits on one event.
        self.wakeup: threading.Event | None = None

    def start(self) -> Capture:
        """Open the source and start reading.

        Errors raise here, in the caller, except for a supervised source: one that does not open is an
        outage from the start, retried in the background (see `out_now`). A `CameraSetupError` always raises.
        """
        try:
            self.source.open()
        except CameraSetupError:
            raise
        except Exception as exc:
            if not self.supervise:
                raise
            self._absent_at_start = str(exc)
            # Counted from now, so the stats say "out" before the thread gets to it.
            self.outages += 1
            self._outage_since = time.monotonic()
            self.outage_reason = str(exc)
        self._thread = threading.Thread(target=self._run, name="capture", daemon=True)
        self._thread.start()
        return self

    def _put(self, item: Any) -> None:
        with self._cond:
            if item is not _END:
                while len(self._queue) >= self.queue_size:
                    if self.drop_oldest:
                        self._queue.popleft()
                        self._queue_dropped += 1
                    elif self._stop.is_set():
                        return
                    else:
                        self._cond.wait(0.1)
            self._queue.append(item)
            self._cond.notify_all()
        if self.wakeup is not None:
            self.wakeup.set()

    def _run(self) -> None:
        index = 0
        next_due = time.monotonic()
        try:
            if self._absent_at_start is not None:
                self._recover(self._absent_at_start, at_start=True)
            while not self._stop.is_set():
                if self.on_demand and not self._await_demand():
                    break
                if self.pace:
                    delay = next_due - time.monotonic()
                    if delay > 0:
                        self._stop.wait(delay)
                    next_due = max(next_due + self.pace, time.monotonic() - self.pace)
                try:
                    image = self.source.read()
                except Exception as exc:
                    if self._stop.is_set():
                        break
                    if not self.supervise:
                        raise
                    self._recover(str(exc))
                    continue
                if self._stop.is_set():
                    break
                if image is None:
                    if not self.supervise:
                        break
                    self._recover("the stream ended")
                    continue
                self._put(Frame(image, time.time(), index, self.source.origin()))
                index += 1
                self.captured += 1
        except BaseException as exc:  # handed to the consumer, which decides how to fail
            self.error = exc
        finally:
            self._put(_END)

    def _await_demand(self) -> bool:
        """Wait until a consumer asked for a frame and none is queued; False when stopping."""
        with self._cond:
            while not self._stop.is_set() and (not self._demand or self._queue):
                self._cond.wait(0.5)
            self._demand = False
            return not self._stop.is_set()

    @property
    def dropped(self) -> int:
        """Frames that were captured (or, for an on-demand source, decoded) and never handed out."""
        return self._queue_dropped + int(getattr(self.source, "dropped", 0) or 0)

    def _recover(self, reason: str, at_start: bool = False) -> None:
        """Close the failed source and reopen it with backoff until it works or we are stopped.

        Raises CameraError once the outage has lasted `max_outage_s` (when set).
        """
        limit = f"up to camera.max_outage_s {self.max_outage_s:g} s" if self.max_outage_s else "until it is back"
        if at_start:
            started = self._outage_since if self._outage_since is not None else time.monotonic()
            log.warning("camera %s is not available at start: %s; trying again (every %g s, growing to %g s) %s",
                        self.source.name, reason, self.reopen_min_s, self.reopen_max_s, limit)
        else:
            started = time.monotonic()
            self.outages += 1
            log.warning("camera %s lost: %s; reopening it (every %g s, growing to %g s) %s",
                        self.source.name, reason, self.reopen_min_s, self.reopen_max_s, limit)
        self._outage_since = started
        self.outage_reason = reason
        delay = self.reopen_min_s
        attempts = 0
        while True:
            try:
                self.source.close()
            except Exception as exc:  # a broken device may fail to close too; the reopen decides
                log.debug("closing %s failed: %s", self.source.name, exc)
            wait = delay
            if self.max_outage_s:  # the last attempt falls on the limit, not after it
                wait = min(delay, max(0.0, started + self.max_outage_s - time.monotonic()))
            if self._stop.wait(wait):
                return  # stopping: the outage ends with the run, still counted in outage_s
            attempts += 1
            self.reopen_attempts += 1
            try:
                self.source.open()
            except Exception as exc:
                # Not logged per attempt (that would flood the journal during a long outage): the
                # stats line shows the outage and its reason while it lasts.
                self.outage_reason = str(exc)
                log.debug("reopening %s failed (attempt %d): %s", self.source.name, attempts, exc)
                out_for = time.monotonic() - started
                if self.max_outage_s and out_for >= self.max_outage_s:
                    raise CameraError(
                        f"camera {self.source.name} out for {out_for:.0f} s ({attempts} reopen attempts, last: "
                        f"{self.outage_reason}), longer than camera.max_outage_s {self.max_outage_s:g}; check the "
                        "camera and its network (systemd restarts the service, which waits for it again)") from None
                delay = min(delay * 2, self.reopen_max_s)
                continue
            duration = time.monotonic() - started
            self._outage_total += duration
            self._outage_since = None
            self.last_outage_s = duration
            log.warning("camera %s is back after %.1f s out (%d reopen attempts)", self.source.name, duration,
                        attempts)
            return

    @property
    def outage_s(self) -> float:
        """Seconds the source has been out in all, the current outage included."""
        ongoing = time.monotonic() - self._outage_since if self._outage_since is not None else 0.0
        return self._outage_total + ongoing

    @property
    def out_now(self) -> bool:
        return self._outage_since is not None

    def get(self, timeout: float | None = None) -> Frame | None:
        """The next frame; None at the end of the stream (or after stop). Raises the reader's error.

        Raises TimeoutError if no frame arrived within `timeout` seconds.
        """
        with self._cond:
            if not self._queue and not self._demand:
                self._demand = True
                self._cond.notify_all()
            if not self._cond.wait_for(lambda: bool(self._queue), timeout):
                raise TimeoutError("no frame")
            item = self._queue.popleft()
            if item is _END:
                self._queue.appendleft(_END)  # every later get() also sees the end
            self._cond.notify_all()
        if item is _END:
            if self.error is not None:
                error = self.error
                if isinstance(error, CameraError):
                    raise error
                raise CameraError(f"capture from {self.source.name} failed: {error}") from error
            return None
        return item

    def stop(self) -> None:
        self._stop.set()
        interrupt = getattr(self.source, "interrupt", None)
        if interrupt is not None:  # a source waiting for its next frame returns now
            interrupt()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.source.close()

    @property
    def skipped(self) -> list[str]:
        return list(getattr(self.source, "skipped", []))
