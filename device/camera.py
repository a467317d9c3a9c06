"""Frame sources behind one interface, and a capture thread that runs ahead of processing.

Sources: the Pi camera (picamera2), anything OpenCV opens (/dev/videoN, RTSP/HTTP URL, video file)
and a folder of images. `Capture` reads a source in its own thread into a small bounded queue; a live
camera never waits for the recogniser, so when the queue is full the OLDEST frame is dropped (stale
frames are worthless at a door) and counted. Files and folders are not real time: unless given an fps
they wait for the consumer and drop nothing. The end of a file or folder ends the stream cleanly.
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

from device.preprocess import ImageError, load_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


class CameraError(RuntimeError):
    """A camera that cannot be opened or stopped delivering; the message says what to check."""


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
                raise CameraError(
                    "picamera2 is not installed: on Raspberry Pi OS run `sudo apt install python3-picamera2` and "
                    "create the venv with --system-site-packages (or use camera.source: opencv)"
                ) from exc
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

    def open(self) -> None:
        if self.is_file and not Path(str(self.device)).is_file():
            raise CameraError(f"video file not found: {self.device}; fix camera.device")
        if isinstance(self.device, str) and self.device.startswith("/dev/") and not Path(self.device).exists():
            raise CameraError(f"camera {self.device} does not exist; check the cable and `v4l2-ctl --list-devices`")
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
        if not self.is_file:
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
                if bgr.ndim == 2:
                    return cv2.cvtColor(bgr, cv2.COLOR_GRAY2RGB)
                return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            if self.is_file:
                if self.loop and self.cap.get(cv2.CAP_PROP_POS_FRAMES) > 0:
                    self.cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                    continue
                return None
            self._failures += 1
            if self._failures >= self.MAX_FAILURES:
                raise CameraError(f"camera {self.device} stopped delivering frames ({self._failures} failed reads)")
            time.sleep(0.1)

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
                if not self.loop or (not readable_seen and len(self.skipped) >= len(self.paths)):
                    return None
                self._pos = 0
            path = self.paths[self._pos]
            self._pos += 1
            try:
                image = load_image(path)
            except ImageError as exc:
                if str(path) not in self.skipped:
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
    """

    def __init__(self, source: FrameSource, queue_size: int = 2, fps: float = 0.0,
                 drop_oldest: bool | None = None) -> None:
        self.source = source
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
        """Open the source (errors raise here, in the caller) and start reading."""
        self.source.open()
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
            while not self._stop.is_set():
                if self.pace:
                    delay = next_due - time.monotonic()
                    if delay > 0:
                        self._stop.wait(delay)
                    next_due = max(next_due + self.pace, time.monotonic() - self.pace)
                image = self.source.read()
                if image is None:
                    break
                self._put(Frame(image, time.time(), index, self.source.origin()))
                index += 1
                self.captured += 1
        except BaseException as exc:  # handed to the consumer, which decides how to fail
            self.error = exc
        finally:
            self._put(_END)

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
