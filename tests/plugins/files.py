"""Files made for tests: images whose headers lie (every accepted format), damaged SQLite files, bundle
versions re-signed under a new id or corrupted, a store root owned like the Pi's, shared entries (the library's,
the strangers') re-signed with changed keys."""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np

from faceberry.bundle import MANIFEST, load_bundle, write_manifest
from faceberry.device.messaging.library import checksum
from faceberry.device.ops.store import DIR_MODE, FILE_MODE


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_claiming(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG whose IHDR claims width×height RGB pixels, followed by `idat` as its compressed data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat or zlib.compress(b"\0" * 64)) \
        + _chunk(b"IEND", b"")


def png_bomb(side: int = 12000) -> bytes:
    """A valid side×side black PNG: deflate squeezes its 432 MB of rows into about 0.4 MB."""
    row = b"\0" * (1 + 3 * side)  # filter byte + RGB
    comp = zlib.compressobj(9)
    parts = [comp.compress(row) for _ in range(side)]
    parts.append(comp.flush())
    return png_claiming(side, side, b"".join(parts))


def _small(ext: str, params: list[int] | None = None) -> bytearray:
    img = np.full((24, 32, 3), 90, np.uint8)
    ok, buf = cv2.imencode(ext, img, params or [])
    assert ok
    return bytearray(buf.tobytes())


def jpeg_claiming(width: int, height: int) -> bytes:
    data = _small(".jpg")
    i = data.index(b"\xff\xc0")  # baseline frame header: FF C0, length, precision, height, width
    data[i + 5:i + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def bmp_claiming(width: int, height: int) -> bytes:
    data = _small(".bmp")
    data[18:26] = struct.pack("<ii", width, -height)  # top-down rows: the height is negative
    return bytes(data)


def webp_claiming(width: int, height: int) -> bytes:
    data = _small(".webp", [cv2.IMWRITE_WEBP_QUALITY, 101])  # lossless: a VP8L header
    assert data[12:16] == b"VP8L"
    bits = int.from_bytes(data[21:25], "little") & ~0xFFFFFFF
    data[21:25] = (bits | (width - 1) | ((height - 1) << 14)).to_bytes(4, "little")
    return bytes(data)


def tiff_claiming(width: int, height: int) -> bytes:
    data = _small(".tif")
    order = "little" if data[:2] == b"II" else "big"
    ifd = int.from_bytes(data[4:8], order)
    for k in range(int.from_bytes(data[ifd:ifd + 2], order)):
        at = ifd + 2 + 12 * k
        tag, kind = int.from_bytes(data[at:at + 2], order), int.from_bytes(data[at + 2:at + 4], order)
        if tag in (256, 257):
            value = width if tag == 256 else height
            data[at + 2:at + 4] = (4).to_bytes(2, order)  # LONG, so sizes over 65535 fit
            data[at + 8:at + 12] = value.to_bytes(4, order)
            assert kind in (3, 4)
    return bytes(data)


LIARS = {"png": png_claiming, "jpg": jpeg_claiming, "bmp": bmp_claiming, "webp": webp_claiming, "tif": tiff_claiming}


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "header":
        data[:100] = bytes(range(100))
    elif how == "magic":
        data[:16] = b"\0" * 16
    elif how == "middle":
        page = len(data) // 2 // 4096 * 4096
        data[page:page + 4096] = b"\xa5" * 4096
    elif how == "truncated":
        data = data[:len(data) // 2 + 100]
    else:
        raise ValueError(how)
    path.write_bytes(bytes(data))


OTHER_ID = 65534  # nobody/nogroup: an owner the test process is not


def variant(source: Path, dest: Path, bundle_id: str, accept: float | None = None) -> Path:
    """A copy of the bundle `source` at `dest` whose manifest (re-signed) names `bundle_id`."""
    shutil.copytree(source, dest)
    manifest = json.loads((dest / MANIFEST).read_text(encoding="utf-8"))
    files = list(manifest.pop("files"))
    manifest["bundle_id"] = bundle_id
    if accept is not None:
        manifest["thresholds"]["accept"] = accept
    write_manifest(dest, manifest, files)
    assert load_bundle(dest).bundle_id == bundle_id
    return dest


def corrupt(bundle: Path) -> Path:
    classifier = json.loads((bundle / MANIFEST).read_text())["classifier"]["file"]
    with open(bundle / classifier, "ab") as handle:
        handle.write(b"\0" * 16)
    return bundle


def pi_root(tmp_path: Path) -> Path:
    """A store root like install.sh's: as root, owned by another user and group (the service user's role)."""
    root = tmp_path / "bundles"
    root.mkdir(mode=0o750)
    if os.geteuid() == 0:
        os.chown(root, OTHER_ID, OTHER_ID)
    return root


def assert_owned_like_root(version: Path, root: Path) -> None:
    owner = root.stat()
    entries = [version, *version.rglob("*")]
    assert len(entries) > 3
    for path in entries:
        st = path.lstat()
        assert not stat.S_ISLNK(st.st_mode), path
        want = DIR_MODE if stat.S_ISDIR(st.st_mode) else FILE_MODE
        assert stat.S_IMODE(st.st_mode) == want, (path, oct(st.st_mode))
        if os.geteuid() == 0:
            assert (st.st_uid, st.st_gid) == (owner.st_uid, owner.st_gid) == (OTHER_ID, OTHER_ID), path


def write_frame(folder: Path) -> None:
    import cv2
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(folder / "frame.png"), np.full((48, 64, 3), 128, np.uint8))


def resigned(payload: bytes, **changes) -> bytes:
    """A shared entry with `changes` to its keys and a checksum that matches them: past the checksum check, so
    what is refused is the change itself."""
    body = {**json.loads(payload), **changes}
    body["checksum"] = checksum(body)
    return json.dumps(body).encode()
