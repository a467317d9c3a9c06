"""A real RTSP camera on loopback for tests: GStreamer's RTSP server (gst-rtsp-server) serving H.264.

Run with the system Python that has GStreamer's bindings (Debian: python3-gi, gir1.2-gst-rtsp-server-1.0,
gstreamer1.0-plugins-good and -ugly for x264enc), not the project's venv:

    /usr/bin/python3 tests/rtsp_server.py --port 8554 --frames DIR/frame%03d.jpg [--user U --password P]
        [--auth digest|basic]

It plays the JPEG frames in a loop at --fps, H.264-encoded as an IP camera sends them, at
rtsp://127.0.0.1:PORT/face (and /face_sub, a second path like a camera's substream). It prints "ready" once
it listens, and one line per client SETUP with the Transport header the client asked for, so a test can
tell whether the client used TCP or UDP. SIGTERM stops it as a camera losing power would.
"""

from __future__ import annotations

import argparse
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
gi.require_version("GstRtsp", "1.0")
from gi.repository import GLib, Gst, GstRtsp, GstRtspServer  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--frames", required=True, help="multifilesrc location, e.g. DIR/frame%%03d.jpg")
    parser.add_argument("--fps", type=int, default=15)
    parser.add_argument("--user")
    parser.add_argument("--password")
    parser.add_argument("--auth", choices=("basic", "digest"), default="digest",
                        help="how the password is asked for (most cameras: digest)")
    args = parser.parse_args()

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    launch = (
        f"( multifilesrc location={args.frames} loop=true caps=image/jpeg,framerate={args.fps}/1 ! jpegdec ! "
        "videoconvert ! video/x-raw,format=I420 ! "
        f"x264enc tune=zerolatency speed-preset=ultrafast key-int-max={args.fps} bitrate=800 ! "
        "rtph264pay name=pay0 pt=96 config-interval=1 )"
    )
    mounts = server.get_mount_points()
    for path in ("/face", "/face_sub"):
        factory = GstRtspServer.RTSPMediaFactory()
        factory.set_launch(launch)
        factory.set_shared(True)  # one encoder for all clients, as a camera has
        if args.user:
            factory.add_role_from_structure(Gst.Structure.new_from_string(
                "user, media.factory.access=(boolean)true, media.factory.construct=(boolean)true"))
        mounts.add_factory(path, factory)
    if args.user:
        auth = GstRtspServer.RTSPAuth()
        token = GstRtspServer.RTSPToken()
        token.set_string(GstRtspServer.RTSP_TOKEN_MEDIA_FACTORY_ROLE, "user")
        if args.auth == "digest":
            auth.set_supported_methods(GstRtsp.RTSPAuthMethod.DIGEST)
            auth.add_digest(args.user, args.password or "", token)
        else:
            auth.add_basic(GstRtspServer.RTSPAuth.make_basic(args.user, args.password or ""), token)
        server.set_auth(auth)

    def on_setup(_client: object, ctx: GstRtspServer.RTSPContext) -> GstRtsp.RTSPStatusCode:
        _, value = ctx.request.get_header(GstRtsp.RTSPHeaderField.TRANSPORT, 0)
        print(f"setup transport={value}", flush=True)
        return GstRtsp.RTSPStatusCode.OK

    server.connect("client-connected", lambda _s, client: client.connect("pre-setup-request", on_setup))
    if server.attach(None) == 0:
        print(f"cannot listen on 127.0.0.1:{args.port}", file=sys.stderr, flush=True)
        return 1
    loop = GLib.MainLoop()
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, loop.quit)
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGINT, loop.quit)
    print("ready", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
