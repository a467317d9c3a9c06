"""`python -m device run`: the daemon. camera → FacePipeline → tracker → dispatcher → outputs → MQTT.

This module is the command's entry: it loads the config, has the composition root (device/app.py) build
the daemon, and runs its frame loop (device/loop.py) with the signals wired: SIGTERM/SIGINT stop it,
SIGHUP (`systemctl reload faceberry`) asks it to load the bundle `cfg.bundle` points to (on the Pi the
`current` link of the versions store) between two frames. How a frame and a command travel is in
docs/ARCHITECTURE.md; the broker connection and its durable outbox are device/messaging/mqtt.py and
device/messaging/outbox.py.

Runs until the camera stream ends (files and folders), a fatal camera error, a dead MQTT client, a broker
that keeps refusing our credentials or certificates, or SIGTERM/SIGINT; in every case capture stops, what
the broker can take is delivered, `offline` is published, and whatever is left stays in the outbox for the
next start. A live camera that drops out, or is not there at start, is reopened by the capture thread
(device/capture/camera.py) for up to camera.max_outage_s; the loop just waits.
Exit codes (via the CLI; faceberry/errors.py): 0 at the end of a file or folder or on a signal; 3 on a camera
error (a missing file or folder, a live camera out longer than camera.max_outage_s); 2 for what restarting
cannot fix, so the unit does not loop on it: the config, a bundle absent, damaged or with nobody enrolled,
a camera library not installed (camera.CameraSetupError), the broker refusing us for mqtt.fatal_after_s;
1 when the MQTT client died.
"""

from __future__ import annotations

import argparse
import signal

from faceberry.device.app import build, open_outbox, state_dir
from faceberry.device.config import add_config_argument, load_config
from faceberry.device.loop import STATUS_WRITE_S
from faceberry.device.messaging.dispatcher import ReloadResult

# Kept importable from here for their callers (the tests, status_cmd's documentation).
__all__ = ["HELP", "STATUS_WRITE_S", "ReloadResult", "add_arguments", "open_outbox", "run", "state_dir"]

HELP = "run the daemon: watch the camera and publish who it sees over MQTT"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)
    parser.add_argument(
        "--max-frames", type=int, default=0, metavar="N",
        help="stop after processing N frames (0 = run until the stream ends or a signal; for testing)",
    )


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    app = build(cfg)
    loop = app.loop
    previous = {sig: signal.signal(sig, loop.request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    # systemctl reload faceberry (ExecReload=/bin/kill -HUP $MAINPID): load the bundle `current` points to.
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda *_: loop.request_reload())
    try:
        return app.run(max_frames=args.max_frames)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
