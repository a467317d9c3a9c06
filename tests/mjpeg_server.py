"""An MJPEG-over-HTTP camera on loopback (multipart/x-mixed-replace, as IP cameras serve it), for tests.

`stop()` closes the listening socket and every open stream, as a camera losing power or Wi-Fi would;
`start()` brings it back on the same port.
"""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np

BOUNDARY = b"faceberryframe"


class MjpegCamera:
    def __init__(self, image_bgr: np.ndarray, fps: float = 15.0, port: int = 0) -> None:
        ok, jpeg = cv2.imencode(".jpg", image_bgr)
        assert ok
        self.jpeg = jpeg.tobytes()
        self.fps = fps
        self.port = port
        self.served = 0
        self._server: ThreadingHTTPServer | None = None
        self._alive = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/stream.mjpg"

    def start(self) -> MjpegCamera:
        camera = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY.decode()}")
                self.end_headers()
                try:
                    while camera._alive.is_set():
                        self.wfile.write(b"--" + BOUNDARY + b"\r\nContent-Type: image/jpeg\r\nContent-Length: "
                                         + str(len(camera.jpeg)).encode() + b"\r\n\r\n" + camera.jpeg + b"\r\n")
                        camera.served += 1
                        time.sleep(1 / camera.fps)
                except OSError:
                    pass
                self.close_connection = True

        class Server(ThreadingHTTPServer):
            allow_reuse_address = True
            daemon_threads = True

        self._server = Server(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        self._alive.set()
        threading.Thread(target=self._server.serve_forever, name="mjpeg", daemon=True).start()
        return self

    def stop(self) -> None:
        self._alive.clear()  # the open streams end
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        # Make sure nothing accepts on the port any more.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            except OSError:
                return
            time.sleep(0.05)
