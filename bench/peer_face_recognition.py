"""The peer: face_recognition 1.3 (dlib HOG detector + 128-d ResNet encoder), run in its own venv.

Run by bench/speed.py and bench/accuracy.py with the interpreter of .venv-bench (see
bench/setup_peer.sh), so faceberry's environments never see dlib. It uses face_recognition's
defaults, as a user of it would: HOG detection with one upsampling, the "small" 5-point
landmark model, one jitter.

    speed  --frames FRAMES.npz --out OUT.json   time HOG detect and encode on each frame
    encode --list PATHS.json   --out OUT.json   encoding of the largest face in each photo
    serve                                       read .npy frame paths on stdin, answer one JSON line
                                                of timings each (lets the caller interleave its own
                                                timings with these, frame by frame, under equal load)

It deliberately imports nothing from faceberry.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def _largest(locations: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int]:
    # face_recognition boxes are (top, right, bottom, left)
    return max(locations, key=lambda b: (b[2] - b[0]) * (b[1] - b[3]))


def speed(frames_path: Path) -> dict:
    results = []
    with np.load(frames_path, allow_pickle=False) as data:
        keys = sorted(k for k in data.files if k.startswith("f"))
        _time_frame(np.ascontiguousarray(data[keys[0]]))  # warm-up
        for key in keys:
            results.append({"key": key, **_time_frame(np.ascontiguousarray(data[key]))})
    return {"frames": results}


def _time_frame(frame: np.ndarray) -> dict:
    import face_recognition

    t0 = time.perf_counter()
    locations = face_recognition.face_locations(frame)  # HOG, upsample 1 (the defaults)
    t1 = time.perf_counter()
    face_recognition.face_encodings(frame, locations)
    t2 = time.perf_counter()
    return {"faces": len(locations), "detect_ms": (t1 - t0) * 1e3, "encode_ms": (t2 - t1) * 1e3}


def serve() -> None:
    for line in sys.stdin:
        path = line.strip()
        if not path:
            continue
        frame = np.ascontiguousarray(np.load(path, allow_pickle=False))
        print(json.dumps(_time_frame(frame)), flush=True)


def encode(list_path: Path) -> dict:
    import face_recognition

    paths = json.loads(list_path.read_text())
    out = {}
    for i, path in enumerate(paths):
        try:
            image = face_recognition.load_image_file(path)
        except Exception as exc:
            out[path] = {"faces": 0, "encoding": None, "error": str(exc)}
            continue
        t0 = time.perf_counter()
        locations = face_recognition.face_locations(image)
        encoding = None
        if locations:
            encoding = face_recognition.face_encodings(image, [_largest(locations)])[0].tolist()
        out[path] = {"faces": len(locations), "encoding": encoding, "ms": (time.perf_counter() - t0) * 1e3}
        if (i + 1) % 100 == 0:
            print(f"face_recognition: {i + 1}/{len(paths)} photos encoded", file=sys.stderr, flush=True)
    return {"photos": out}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("speed", "encode", "serve"))
    parser.add_argument("--frames", type=Path, help="speed: .npz of RGB uint8 frames, keys f00000…")
    parser.add_argument("--list", type=Path, help="encode: JSON list of photo paths")
    parser.add_argument("--out", type=Path, help="where to write the JSON result (speed, encode)")
    args = parser.parse_args(argv)
    if args.mode == "serve":
        serve()
        return 0
    if args.out is None:
        parser.error("--out is required for speed and encode")
    from importlib.metadata import version

    result = speed(args.frames) if args.mode == "speed" else encode(args.list)
    # face_recognition 1.3.0 still says 1.2.3 in __version__; the distribution metadata is right.
    result["face_recognition"] = version("face_recognition")
    result["dlib"] = version("dlib-bin")
    args.out.write_text(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
