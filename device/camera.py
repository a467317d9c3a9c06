"""Frame sources behind one interface, and a capture thread that runs ahead of processing.

Sources: the Pi camera (picamera2), anything OpenCV opens (/dev/videoN, RTSP/HTTP URL, video file)
and a folder of images. `Capture` reads a source in its own thread into a small bounded queue; a live
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

import importlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from device.contract import IMAGE_SUFFIXES
from device.errors import EXIT_USAGE, UnavailableError
from device.preprocess import ImageError, load_image

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
    # for a library that will not appear by itself (device/errors.py).
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
        self.name = f"opencv:{device}"
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
            raise CameraError(f"cannot open camera {self.device}: {hint}")
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
                raise CameraError(f"camera {self.device} stopped delivering frames ({self._failures} failed reads)")
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


def open_source(cfg: Any) -> FrameSource:
    """The FrameSource a CameraConfig describes (not yet opened)."""
    if cfg.source == "picamera2":
        num = cfg.device if isinstance(cfg.device, int) else 0
        return Picamera2Source(cfg.width, cfg.height, cfg.fps, camera_num=num)
    if cfg.source == "opencv":
        return OpenCVSource(cfg.device, cfg.width, cfg.height, cfg.fps, cfg.loop)
    if cfg.source == "folder":
        return FolderSource(str(cfg.device), loop=cfg.loop)
    raise CameraError(f"unknown camera source {cfg.source!r}; use picamera2, opencv or folder")


_END = object()


class Capture:
    """Reads a source in a background thread into a bounded queue.

    `drop_oldest` defaults to the source being live (or paced by `fps`): then a full queue discards its
    oldest frame, counted in `dropped`; otherwise the reader waits for room.

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
        self.drop_oldest = (source.live or bool(self.pace)) if drop_oldest is None else drop_oldest
        self.captured = 0
        self.dropped = 0
        self.error: BaseException | None = None
        self._queue: deque[Any] = deque()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

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
                        self.dropped += 1
                    elif self._stop.is_set():
                        return
                    else:
                        self._cond.wait(0.1)
            self._queue.append(item)
            self._cond.notify_all()

    def _run(self) -> None:
        index = 0
        next_due = time.monotonic()
        try:
            if self._absent_at_start is not None:
                self._recover(self._absent_at_start, at_start=True)
            while not self._stop.is_set():
                if self.pace:
                    delay = next_due - time.monotonic()
                    if delay > 0:
                        self._stop.wait(delay)
                    next_due = max(next_due + self.pace, time.monotonic() - self.pace)
                try:
                    image = self.source.read()
                except Exception as exc:
                    if not self.supervise:
                        raise
                    self._recover(str(exc))
                    continue
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
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.source.close()

    @property
    def skipped(self) -> list[str]:
        return list(getattr(self.source, "skipped", []))
