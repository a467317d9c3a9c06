"""Fuzz (issue 11): hundreds of malformed images, configs and bundles, made on the fly from a seeded
generator, fed to every reader and to the device CLIs. What must hold: no traceback, no hang, and every
failure is one of faceberry's own errors (in-process) or one `error: ...` line with a non-zero exit
(subprocess).

Nothing is committed: images are encoded, cut and lied about here; bundles are damaged copies of the
session's tiny bundle (tests/fixtures_bundle.py) whose model files are symlinked, not copied. Each case
has a name that says what was done to it; FACEBERRY_FUZZ_SEED draws another sample (and replays one).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from faceberry.bundle import MANIFEST, MANIFEST_SHA256, Bundle, BundleError, load_bundle
from faceberry.contract import IMAGE_SUFFIXES, PHONE_SUFFIXES, UNREADABLE
from faceberry.device.config import ConfigError, load_config
from faceberry.preprocess import MAX_IMAGE_PIXELS, ImageError, load_image
from faceberry.runtime import ModelError
from tests.conftest import ROOT
from tests.plugins.bundles import embedding_base
from tests.plugins.files import LIARS, png_claiming
from tests.plugins.processes import module

SEED = int(os.environ.get("FACEBERRY_FUZZ_SEED", "11"))
EXAMPLE_CONFIG = ROOT / "systemd" / "faceberry.example.yaml"
# Values of every wrong kind a hand edit, a bad copy or a hostile file puts where a field was.
WRONG: list[Any] = [None, True, False, -1, 0, 1, 2**70, -(2**70), 1e308, -1e308, math.nan, math.inf, -math.inf,
                    0.5, "", "x", "ünïcødé \u202e\u0000", "x" * 5000, "../../../etc/passwd", [], [1, "a"], {},
                    {"a": {"b": None}}]
SUBPROCESS_TIMEOUT_S = 90


def _encoder(suffix: str) -> str:
    return {".jpeg": ".jpg", ".tiff": ".tif"}.get(suffix, suffix)


def _encode(suffix: str, rng: random.Random) -> bytes:
    h, w = rng.randint(8, 48), rng.randint(8, 48)
    img = np.random.default_rng(rng.getrandbits(32)).integers(0, 256, (h, w, 3), dtype=np.uint8)
    if suffix in PHONE_SUFFIXES:
        return _encode_phone(img, suffix)
    ok, buf = cv2.imencode(_encoder(suffix), img)
    assert ok, suffix
    return buf.tobytes()


def _encode_phone(img: np.ndarray, suffix: str) -> bytes:
    """HEIC/AVIF bytes through Pillow (and pillow-heif); a JPEG under that name where they are absent."""
    import io

    try:
        import pillow_heif
        from PIL import Image

        pillow_heif.register_heif_opener()
        out = io.BytesIO()
        Image.fromarray(img).save(out, format="AVIF" if suffix == ".avif" else "HEIF")
        return out.getvalue()
    except (ImportError, KeyError, OSError):
        _ok, buf = cv2.imencode(".jpg", img)
        return buf.tobytes()


@functools.cache
def _good(suffix: str) -> bytes:
    """One small valid photo per suffix, the same on every run: what the hypothesis damage starts from."""
    return _encode(suffix, random.Random(SEED))


@st.composite
def damaged_images(draw: st.DrawFn) -> ImageCase:
    """A photo of any accepted suffix cut at a random point, replaced or followed by random bytes, or with 1-50
    bytes overwritten (the seeded generator's random cases, now searched and shrunk by hypothesis)."""
    suffix = draw(st.sampled_from(IMAGE_SUFFIXES))
    good = _good(suffix)
    how = draw(st.sampled_from(["cut", "garbage", "magic+garbage", "flipped"]))
    if how == "cut":
        k = draw(st.integers(1, len(good) - 1))
        return ImageCase(f"cut-{k}{suffix}", good[:k])
    if how == "garbage":
        return ImageCase(f"garbage{suffix}", draw(st.binary(min_size=1, max_size=4096)))
    if how == "magic+garbage":
        k = draw(st.sampled_from([2, 8, 16, 30]))
        return ImageCase(f"magic+garbage-{k}{suffix}", good[:k] + draw(st.binary(min_size=1, max_size=512)))
    out = bytearray(good)
    for at, value in draw(st.lists(st.tuples(st.integers(0, len(good) - 1), st.integers(0, 255)),
                                   min_size=1, max_size=50)):
        out[at] = value
    return ImageCase(f"flipped{suffix}", bytes(out))


def _small_bomb(side: int = 7000) -> bytes:
    """A valid black PNG over the pixel limit (49 MP) that deflate squeezes into ~50 KB."""
    assert side * side > MAX_IMAGE_PIXELS
    comp = zlib.compressobj(9)
    row = b"\0" * (1 + 3 * side)
    return png_claiming(side, side, b"".join([*(comp.compress(row) for _ in range(side)), comp.flush()]))


@dataclass
class ImageCase:
    name: str
    data: bytes
    huge: bool = False  # its header claims more than MAX_IMAGE_PIXELS: must be refused


def malformed_images(rng: random.Random) -> list[ImageCase]:
    """Every accepted suffix, as explicit examples: empty, cut short at the header's edges, lying headers, a
    bomb, other formats' bytes. Random damage comes from hypothesis (damaged_images)."""
    cases: list[ImageCase] = []
    bomb = _small_bomb()
    for suffix in IMAGE_SUFFIXES:
        good = _encode(suffix, rng)
        cases.append(ImageCase(f"empty{suffix}", b""))
        cuts = [1, 2, 3, 4, 8, 12, 16, 24, 26, 30, 33, 64, len(good) // 2, len(good) - 1]
        cases += [ImageCase(f"cut-{k}{suffix}", good[:k]) for k in cuts if k < len(good)]
        # Random cuts, garbage and flipped bytes: drawn by hypothesis (damaged_images, below).
        for fmt, liar in LIARS.items():
            for w, h in ((60000, 60000), (16000, 16000), (65535, 700)):
                if fmt == "webp" and max(w, h) > 16384:  # VP8L holds 14-bit sizes
                    continue
                cases.append(ImageCase(f"{fmt}-claims-{w}x{h}{suffix}", liar(w, h), huge=True))
        cases.append(ImageCase(f"png-claims-0x0{suffix}", png_claiming(0, 0)))
        cases.append(ImageCase(f"png-claims-2^32-1{suffix}", png_claiming(2**32 - 1, 2**32 - 1), huge=True))
        other = rng.choice([s for s in IMAGE_SUFFIXES if _encoder(s) != _encoder(suffix)])
        cases.append(ImageCase(f"{other[1:]}-bytes{suffix}", _encode(other, rng)))
        cases.append(ImageCase(f"bomb{suffix}", bomb, huge=True))
    return cases


@dataclass
class ConfigCase:
    name: str
    data: bytes
    env: dict[str, str] = field(default_factory=dict)


def _leaves(tree: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every key path of a nested mapping, sections included."""
    out: list[tuple[str, ...]] = []
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.append((*prefix, key))
            out += _leaves(value, (*prefix, key))
    return out


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def _delete(tree: dict[str, Any], path: tuple[str, ...]) -> None:
    for key in path[:-1]:
        tree = tree[key]
    del tree[path[-1]]


def _alias_bomb(levels: int) -> str:
    """A few hundred bytes of YAML anchors that expand to 9**levels items."""
    names = [f"l{i}" for i in range(levels)]
    lines = [f"  {names[0]}: &{names[0]} [x, x, x, x, x, x, x, x, x]"]
    lines += [f"  {names[i]}: &{names[i]} [" + ", ".join([f"*{names[i - 1]}"] * 9) + "]" for i in range(1, levels)]
    return "bundle: /nonexistent\nlol:\n" + "\n".join(lines) + f"\ncamera: {{name: *{names[-1]}}}\n"


def malformed_configs(rng: random.Random) -> list[ConfigCase]:
    """The example config with each key given wrong values or removed, unknown keys, and broken files."""
    base = yaml.safe_load(EXAMPLE_CONFIG.read_text(encoding="utf-8"))
    base["bundle"] = "/nonexistent/bundle"
    base["device_id"] = "fuzz-pi"
    cases: list[ConfigCase] = []

    def dump(tree: Any) -> bytes:
        return yaml.safe_dump(tree, allow_unicode=True, sort_keys=False).encode("utf-8")

    for path in _leaves(base):
        where = ".".join(path)
        for value in rng.sample(WRONG, 4):
            tree = json.loads(json.dumps(base))
            _set(tree, path, value)
            cases.append(ConfigCase(f"{where}={value!r:.30}", dump(tree)))
        tree = json.loads(json.dumps(base))
        _delete(tree, path)
        cases.append(ConfigCase(f"no {where}", dump(tree)))
    for section in [(), *[(k,) for k, v in base.items() if isinstance(v, dict)]]:
        tree = json.loads(json.dumps(base))
        _set(tree, (*section, "no_such_key"), 1) if section else tree.update({"typo_key": 1})
        cases.append(ConfigCase(f"unknown key in {'.'.join(section) or 'top'}", dump(tree)))
    text = dump(base)
    cases += [
        ConfigCase("empty.yaml", b""),
        ConfigCase("blank.yaml", b"   \n\n\t\n"),
        ConfigCase("null.yaml", b"null\n"),
        ConfigCase("list.yaml", b"- a\n- b\n"),
        ConfigCase("scalar.yaml", b"42\n"),
        ConfigCase("binary.yaml", rng.randbytes(2048)),
        ConfigCase("nul bytes.yaml", b"bundle: /x\0\0\n"),
        ConfigCase("latin-1.yaml", "bundle: /caf\xe9\n".encode("latin-1")),
        ConfigCase("bom.yaml", b"\xef\xbb\xbf" + text),
        ConfigCase("utf-16.yaml", text.decode().encode("utf-16")),
        ConfigCase("cut.yaml", text[: len(text) // 2]),
        ConfigCase("unclosed.yaml", b"camera: {source: folder\n"),
        ConfigCase("tabs.yaml", b"camera:\n\tsource: folder\n"),
        ConfigCase("python tag.yaml", b"bundle: !!python/object/apply:os.system [echo hi]\n"),
        ConfigCase("binary tag.yaml", b"bundle: !!binary aGVsbG8=\ndevice_id: 2001-12-14t21:59:43.10-05:00\n"),
        ConfigCase("complex keys.yaml", b"? [a, b]\n: 1\n"),
        ConfigCase("merge key.yaml", b"<<: 5\n"),
        ConfigCase("duplicate keys.yaml", b"bundle: /a\nbundle: /b\ndevice_id: x\n"),
        ConfigCase("huge int.yaml", b"bundle: /a\nmqtt: {port: 1" + b"0" * 5000 + b"}\n"),
        ConfigCase("huge int.toml", b'bundle = "/a"\n[mqtt]\nport = 1' + b"0" * 5000 + b"\n"),
        ConfigCase("deep lists.yaml", b"bundle: " + b"[" * 3000 + b"]" * 3000 + b"\n"),
        ConfigCase("deep maps.yaml", b"camera: " + b"{a: " * 3000 + b"1" + b"}" * 3000 + b"\n"),
        ConfigCase("shallow deep.yaml", b"camera: {name: " + b"[" * 200 + b"]" * 200 + b"}\nbundle: /a\n"),
        ConfigCase("alias bomb.yaml", _alias_bomb(9).encode()),
        ConfigCase("unicode keys.yaml", "bündle: /a\n\u202ecamera: {}\n".encode()),
        ConfigCase("garbage.toml", rng.randbytes(512)),
        ConfigCase("cut.toml", b'bundle = "/a"\n[camera]\nsource = "fol'),
        ConfigCase("deep.toml", b"bundle = " + b"[" * 3000 + b"]" * 3000 + b"\n"),
        ConfigCase("wrong types.toml", b'bundle = 5\n[camera]\nwidth = "640"\nfps = nan\n[mqtt]\nport = 1e999\n'),
        ConfigCase("yaml as.toml", text),
    ]
    envs = [{"FACEBERRY_MQTT_PORT": "abc"}, {"FACEBERRY_MQTT_PORT": "99999999999999999999"},
            {"FACEBERRY_MQTT_TLS": "maybe"}, {"FACEBERRY_DEVICE_ID": "a/b#"}, {"FACEBERRY_MQTT_HOST": ""},
            {"FACEBERRY_MQTT_PASSWORD_FILE": "/nonexistent/pw"}, {"FACEBERRY_MQTT_CLIENT_ID": "x" * 70000}]
    cases += [ConfigCase(f"env {next(iter(env))}={next(iter(env.values()))[:20]!r}", text, env) for env in envs]
    return cases


# --- bundles --------------------------------------------------------------------------------------------------

@dataclass
class BundleCase:
    name: str
    manifest: dict[str, Any] | bytes
    files: dict[str, bytes | None] = field(default_factory=dict)  # replaced (bytes) or removed (None)
    sign: str = "good"  # manifest.sha256: good | none | wrong | garbage | dir
    rehash: bool = True  # re-checksum replaced files, so the checks behind the sha256 are reached
    refused: bool | None = None  # True: load_bundle must refuse it; None: either is fine
    base: str = "softmax"


def _npz(**arrays: Any) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _npy(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def write_bundle(case: BundleCase, bases: dict[str, Path], dest: Path) -> Path:
    """The case as a bundle directory: unchanged files are symlinks into the base bundle."""
    base = bases[case.base]
    dest.mkdir(parents=True)
    for src in base.iterdir():
        if src.name not in (MANIFEST, MANIFEST_SHA256) and src.name not in case.files:
            (dest / src.name).symlink_to(src.resolve())
    for name, data in case.files.items():
        if data is not None:
            (dest / name).write_bytes(data)
    if isinstance(case.manifest, bytes):
        data = case.manifest
    else:
        manifest = json.loads(json.dumps(case.manifest))
        if case.rehash and isinstance(manifest.get("files"), dict):
            for name, content in case.files.items():
                if content is not None and name in manifest["files"]:
                    manifest["files"][name] = hashlib.sha256(content).hexdigest()
        data = json.dumps(manifest, indent=1).encode()  # NaN and Infinity as JSON's non-standard literals
    (dest / MANIFEST).write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    if case.sign == "good":
        (dest / MANIFEST_SHA256).write_text(f"{digest}  {MANIFEST}\n")
    elif case.sign == "wrong":
        (dest / MANIFEST_SHA256).write_text(f"{hashlib.sha256(b'other').hexdigest()}  {MANIFEST}\n")
    elif case.sign == "garbage":
        (dest / MANIFEST_SHA256).write_bytes(b"\xff\xfe\x00garbage")
    elif case.sign == "dir":
        (dest / MANIFEST_SHA256).mkdir()
    return dest


def _manifest_bytes_cases(rng: random.Random, soft: dict[str, Any]) -> list[BundleCase]:
    good_json = json.dumps(soft).encode()
    raw = [b"", b"{", b"null", b"[]", b"1", b'"x"', b"{}", b"\xef\xbb\xbf" + good_json, b"\xff\xfe" + good_json,
           b"[" * 100000 + b"]" * 100000, b'{"a": ' * 50000 + b"1" + b"}" * 50000]
    raw += [rng.randbytes(n) for n in (1, 100, 5000)]
    raw += [good_json[: rng.randrange(1, len(good_json))] for _ in range(5)]
    return [BundleCase(f"manifest bytes #{i} ({data[:12]!r})", data, refused=True) for i, data in enumerate(raw)]


def _manifest_field_cases(rng: random.Random, manifests: dict[str, dict[str, Any]]) -> list[BundleCase]:
    """Every manifest field of each kind given wrong values or removed; each listed file missing or changed."""
    cases: list[BundleCase] = []
    for kind, manifest in manifests.items():
        for path in _leaves(manifest):
            where = ".".join(path)
            # The free-form parts the device never reads get a smaller share of the sample.
            n = 2 if path[0] in ("metrics", "source") else 6
            for value in rng.sample(WRONG, n):
                tree = json.loads(json.dumps(manifest))
                _set(tree, path, value)
                cases.append(BundleCase(f"{kind} {where}={value!r:.30}", tree, base=kind, refused=None))
            if path[0] not in ("metrics", "source"):
                tree = json.loads(json.dumps(manifest))
                _delete(tree, path)
                cases.append(BundleCase(f"{kind} without {where}", tree, base=kind))
        for name in manifest["files"]:
            cases.append(BundleCase(f"{kind} {name} missing", manifest, {name: None}, base=kind, refused=True))
            cases.append(BundleCase(f"{kind} {name} changed, not re-checksummed", manifest,
                                    {name: rng.randbytes(300)}, rehash=False, base=kind, refused=True))
    return cases


def _acted_on_cases(manifests: dict[str, dict[str, Any]], people: list[str]) -> list[BundleCase]:
    """The signature file, and the numeric fields the device acts on, each out of range (re-signed, so the
    value itself is judged)."""
    soft = manifests["softmax"]
    cases = [BundleCase(f"manifest.sha256 {sign}", soft, sign=sign, refused=sign in ("wrong", "garbage"))
             for sign in ("none", "wrong", "garbage", "dir")]

    def edit(kind: str, path: tuple[str, ...], value: Any, refused: bool | None = True, **kw: Any) -> BundleCase:
        tree = json.loads(json.dumps(manifests[kind]))
        _set(tree, path, value)
        return BundleCase(f"{kind} {'.'.join(path)}={value!r}", tree, base=kind, refused=refused, **kw)

    for value in (0, -5, 0.0, math.nan, math.inf, -math.inf, 1.0000001, 1e308, "0.5", True, None, []):
        cases.append(edit("softmax", ("thresholds", "accept"), value))
    for value in (0, 1, -0.1, math.nan, "0.05", True):
        cases.append(edit("embedding", ("thresholds", "target_far"), value))
    for value in (0, -1, 1, 15, 100000, 112.5, True, "112", math.nan, None):
        cases.append(edit("softmax", ("preprocessing", "input_size"), value))
    for key, value in (("scale", 0), ("scale", math.nan), ("offset", math.inf), ("scale", "x"),
                       ("color_order", "RGBA"), ("alignment", ["x"]), ("alignment", {})):
        cases.append(edit("softmax", ("preprocessing", key), value))
    for value in (0, len(people) - 1, len(people) + 1, -1, str(len(people)), math.nan, len(people) + 0.5):
        cases.append(edit("softmax", ("labels", "count"), value))
    for value in (0, 2, "1", True, 1.5, math.nan):
        cases.append(edit("softmax", ("schema",), value))
    cases.append(edit("softmax", ("preprocessing", "input_size"), 64, refused=False))  # loads; the model refuses
    cases.append(edit("softmax", ("thresholds", "accept"), 1, refused=False))
    return cases


def _file_content_cases(
    rng: random.Random, manifests: dict[str, dict[str, Any]], people: list[str]
) -> list[BundleCase]:
    """labels.txt, the model files and the gallery replaced by damaged content that checks out."""
    soft = manifests["softmax"]
    cases: list[BundleCase] = []
    # labels.txt, re-checksummed: the content itself is judged.
    labels_txt = "\n".join(people).encode() + b"\n"
    for name, data, refused in (("binary", rng.randbytes(200), True), ("invalid UTF-8", b"\xff\xfe\xfa\n" * 5, True),
                                ("duplicates", labels_txt + people[0].encode() + b"\n", True),
                                ("one more", labels_txt + b"Someone Else\n", True), ("empty", b"", True),
                                ("CRLF", labels_txt.replace(b"\n", b"\r\n"), False)):
        cases.append(BundleCase(f"softmax labels.txt {name}", soft, {"labels.txt": data}, refused=refused))
    # Model files replaced by garbage that checks out (the loader must refuse it, not crash).
    for kind in manifests:
        for name in (manifests[kind]["classifier"]["file"], manifests[kind]["detector"]["file"]):
            for what, data in (("empty", b""), ("garbage", rng.randbytes(4096)), ("text", b"TFL3" * 100)):
                cases.append(BundleCase(f"{kind} {name} {what}", manifests[kind], {name: data}, base=kind))
    # Galleries of the wrong shape, type or values (re-checksummed).
    d = len(people)
    names = np.array(people)
    unit = np.eye(d, dtype=np.float32)
    with_nan, with_inf, with_zero = unit.copy(), unit.copy(), unit.copy()
    with_nan[1, 1], with_inf[0, 2], with_zero[2] = np.nan, np.inf, 0
    galleries: list[tuple[str, bytes, bool | None]] = [
        ("garbage", rng.randbytes(1000), True),
        ("empty file", b"", True),
        ("zip garbage", b"PK\x03\x04" + rng.randbytes(500), True),
        ("npy, not npz", _npy(unit), True),
        ("no embeddings", _npz(labels=names), True),
        ("no labels", _npz(embeddings=unit), True),
        ("1-d", _npz(embeddings=unit[0], labels=names), True),
        ("3-d", _npz(embeddings=unit[:, :, None], labels=names), True),
        ("fewer rows", _npz(embeddings=unit[:-1], labels=names), True),
        ("0-d labels", _npz(embeddings=unit, labels=np.array("x")), True),
        ("NaN", _npz(embeddings=with_nan, labels=names), True),
        ("inf", _npz(embeddings=with_inf, labels=names), True),
        ("zero row", _npz(embeddings=with_zero, labels=names), True),
        ("strings", _npz(embeddings=np.array([["a"] * d] * d), labels=names), True),
        ("complex", _npz(embeddings=unit.astype(np.complex64), labels=names), True),
        ("booleans", _npz(embeddings=unit.astype(bool), labels=names), True),
        ("float16", _npz(embeddings=unit.astype(np.float16), labels=names), False),
        ("object (pickle)", _npz(embeddings=np.array([None] * d, dtype=object), labels=names), True),
        ("stranger label", _npz(embeddings=unit, labels=np.array([*people[:-1], "Nobody"])), True),
        ("wrong dimension", _npz(embeddings=np.eye(d, d + 2, dtype=np.float32), labels=names), False),
        ("huge values", _npz(embeddings=unit * 1e30, labels=names), True),
        ("large values", _npz(embeddings=unit * 1e6, labels=names), False),
        ("empty", _npz(embeddings=np.zeros((0, d), np.float32), labels=np.array([], dtype=str)), False),
    ]
    for what, data, refused in galleries:
        cases.append(BundleCase(f"gallery {what}", manifests["embedding"], {"gallery.npz": data}, base="embedding",
                                refused=refused))
    return cases


def malformed_bundles(rng: random.Random, manifests: dict[str, dict[str, Any]], people: list[str]) -> list[BundleCase]:
    cases = (_manifest_bytes_cases(rng, manifests["softmax"]) + _manifest_field_cases(rng, manifests)
             + _acted_on_cases(manifests, people) + _file_content_cases(rng, manifests, people))
    # A name drawn at random may repeat one of the deliberate cases above: the deliberate one, which says
    # what must happen, is kept.
    return list({c.name: c for c in cases}.values())


# --- fixtures ---------------------------------------------------------------------------------------------------

OUR_ERRORS = (BundleError, ModelError, ImageError, ConfigError)


@pytest.fixture(scope="module")
def rng() -> random.Random:
    return random.Random(SEED)


@pytest.fixture(scope="module")
def bases(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz-bases")
    labels = [x for x in (tiny_bundle / "labels.txt").read_text(encoding="utf-8").splitlines() if x.strip()]
    return {"softmax": tiny_bundle, "embedding": embedding_base(tiny_bundle, root / "embedding", labels)}


@pytest.fixture(scope="module")
def bundle_cases(rng: random.Random, bases: dict[str, Path]) -> list[BundleCase]:
    manifests = {kind: json.loads((path / MANIFEST).read_text()) for kind, path in bases.items()}
    people = [x for x in (bases["softmax"] / "labels.txt").read_text().splitlines() if x.strip()]
    return malformed_bundles(rng, manifests, people)


def _one_line(exc: BaseException) -> str:
    message = str(exc)
    assert message.strip(), f"{type(exc).__name__} with an empty message"
    assert "\n" not in message.strip(), f"not one line: {message!r}"
    return message


# --- in-process -------------------------------------------------------------------------------------------------

def test_malformed_images_are_refused_by_load_image_with_an_image_error(rng: random.Random, tmp_path: Path) -> None:
    cases = malformed_images(rng)
    assert len(cases) >= 200
    outcomes: dict[str, str] = {}
    for i, case in enumerate(cases):
        path = tmp_path / f"{i:04d}-{case.name}"
        path.write_bytes(case.data)
        try:
            image = load_image(path)
        except ImageError as exc:
            outcomes[case.name] = _one_line(exc)
            assert exc.reason and str(path) not in exc.reason
            continue
        assert not case.huge, f"{case.name}: decoded although its header claims more than the limit"
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, case.name
        outcomes[case.name] = "decoded"
    # Not vacuous: nearly everything here is broken, and the lying headers are refused by their size.
    assert sum(v != "decoded" for v in outcomes.values()) > 0.8 * len(cases)
    assert all("limit" in outcomes[c.name] for c in cases if c.huge)
    # Paths that are not regular files: never read (a FIFO would block), never a traceback.
    special = tmp_path / "special"
    special.mkdir()
    (special / "dir.jpg").mkdir()
    (special / "dangling.png").symlink_to(special / "nowhere.png")
    os.mkfifo(special / "fifo.jpg")
    for path in [*special.iterdir(), special / "missing.webp"]:
        with pytest.raises(ImageError):
            load_image(path)


@settings(max_examples=200, deadline=None, database=None, derandomize="FACEBERRY_FUZZ_SEED" not in os.environ,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@seed(SEED)  # ignored while derandomized; with FACEBERRY_FUZZ_SEED it names the sample
@given(case=damaged_images())
def test_randomly_damaged_images_are_read_or_refused_in_one_line(
    case: ImageCase, tmp_path: Path, detector_path: Path
) -> None:
    from faceberry.train.crops import CropMaker

    path = Path(tempfile.mkdtemp(dir=tmp_path)) / case.name
    path.write_bytes(case.data)
    try:
        image = load_image(path)
    except ImageError as exc:
        _one_line(exc)
        assert exc.reason and str(path) not in exc.reason
    else:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, case.name
    maker = CropMaker(112, detector_path, cache_dir=path.parent / "cache")
    for run in ("fresh", "cached"):  # a cached refusal must be as harmless as a fresh one
        crop, reason = maker.crop_file(path)
        assert (crop is None) != (reason is None), f"{run} {case.name}: {crop!r}, {reason!r}"


def test_train_crop_maker_skips_every_malformed_image_with_a_reason(
    rng: random.Random, tmp_path: Path, detector_path: Path
) -> None:
    from faceberry.train.crops import CropMaker

    maker = CropMaker(112, detector_path, cache_dir=tmp_path / "cache")
    cases = malformed_images(rng)
    for run in ("fresh", "cached"):  # a cached refusal must be as harmless as a fresh one
        for i, case in enumerate(cases):
            path = tmp_path / f"{i:04d}-{case.name}"
            path.write_bytes(case.data)
            crop, reason = maker.crop_file(path)
            assert (crop is None) != (reason is None), f"{run} {case.name}: {crop!r}, {reason!r}"
            if case.huge:
                assert reason is not None and reason.startswith(UNREADABLE), f"{run} {case.name}: {reason}"


def test_malformed_configs_raise_config_errors_one_line_per_problem(rng: random.Random, tmp_path: Path) -> None:
    cases = malformed_configs(rng)
    assert len(cases) >= 150
    refused = 0
    for i, case in enumerate(cases):
        suffix = ".toml" if case.name.endswith(".toml") else ".yaml"
        path = tmp_path / f"{i:04d}{suffix}"
        path.write_bytes(case.data)
        try:
            load_config(path, env=case.env, log_warnings=False)
        except ConfigError as exc:
            refused += 1
            assert exc.problems and all(p.strip() and "\n" not in p for p in exc.problems), (case.name, exc.problems)
            assert len(str(exc)) < 20000, f"{case.name}: a {len(str(exc))}-character message"
    assert refused > 0.6 * len(cases)
    for name in ("empty.yaml", "binary.yaml", "deep lists.yaml", "deep.toml", "alias bomb.yaml", "huge int.yaml",
                 "huge int.toml"):
        case = next(c for c in cases if c.name == name)
        path = tmp_path / ("x.toml" if name.endswith(".toml") else "x.yaml")
        path.write_bytes(case.data)
        with pytest.raises(ConfigError):
            load_config(path, env={})
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml", env={})
    with pytest.raises(ConfigError):
        load_config(tmp_path, env={})  # a directory


def _pipeline_or_error(bundle: Bundle) -> None:
    from faceberry.device.recognition.pipeline import FacePipeline

    FacePipeline(bundle, num_threads=1)


@pytest.mark.shared
def test_damaged_bundles_raise_bundle_or_model_errors(bundle_cases: list[BundleCase], bases: dict[str, Path],
                                                      tmp_path: Path) -> None:
    assert len(bundle_cases) >= 300
    refused = 0
    built: dict[str, bool] = {}  # a pipeline per distinct manifest the device would act on
    for i, case in enumerate(bundle_cases):
        root = write_bundle(case, bases, tmp_path / f"{i:04d}")
        try:
            bundle = load_bundle(root)
        except BundleError as exc:
            refused += 1
            _one_line(exc)
            assert case.refused is not False, f"{case.name}: refused ({exc})"
            continue
        assert case.refused is not True, f"{case.name}: loaded although it must be refused"
        if case.name.split(" ")[1].startswith(("metrics", "source", "created")):
            continue  # free-form fields: a pipeline per case would add nothing but time
        key = hashlib.sha256((root / MANIFEST).read_bytes() + repr(sorted(case.files)).encode()).hexdigest()
        if key in built:
            continue
        try:
            _pipeline_or_error(bundle)
            built[key] = True
        except (BundleError, ModelError) as exc:
            built[key] = False
            _one_line(exc)
    assert refused > 0.5 * len(bundle_cases)
    assert False in built.values()  # the gallery of the wrong dimension, at least


@pytest.mark.shared
def test_a_gallery_of_the_wrong_dimension_is_refused_when_the_model_loads(
    bundle_cases: list[BundleCase], bases: dict[str, Path], tmp_path: Path
) -> None:
    case = next(c for c in bundle_cases if c.name == "gallery wrong dimension")
    bundle = load_bundle(write_bundle(case, bases, tmp_path / "b"))
    with pytest.raises(ModelError, match=r"gallery holds (\d+)-d embeddings but the embedder gives (?!\1)\d+-d"):
        _pipeline_or_error(bundle)


# --- subprocesses -----------------------------------------------------------------------------------------------

# The cases every CLI must turn into one line, whatever the sample: the manifest's own checksum and each
# range check of issue 11.
ALWAYS = ["manifest.sha256 wrong", "softmax thresholds.accept=0", "softmax thresholds.accept=-5",
          "softmax thresholds.accept=nan", "softmax preprocessing.input_size=0", "softmax labels.count=0",
          "gallery NaN", "gallery zero row", "gallery wrong dimension", "softmax labels.txt binary",
          "manifest bytes #3 (b'[]')", "embedding thresholds.target_far=0"]


@dataclass
class Run:
    name: str
    argv: list[str]
    ok: bool | None = False  # False: must fail with one error line; None: either; True: must succeed
    check: bool = False  # `device check` reports FAIL rows on stdout instead of `error:`


def _run(run: Run) -> tuple[Run, subprocess.CompletedProcess[str] | None]:
    try:
        proc = module("device", *run.argv, env={"FACEBERRY_LOG_LEVEL": "WARNING"},
                      unset=["FACEBERRY_MQTT*", "FACEBERRY_DEVICE_ID"], timeout=SUBPROCESS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return run, None
    return run, proc


def _unreadable(case: ImageCase) -> bool:
    """Whether load_image refuses it (a flipped byte or a cut tail can still decode)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / case.name
        path.write_bytes(case.data)
        try:
            load_image(path)
        except ImageError:
            return True
    return False


def _photos(root: Path, person: str, heldout: Path, hostile: list[ImageCase], good: int) -> Path:
    folder = root / person
    folder.mkdir(parents=True)
    for i, case in enumerate(hostile):
        suffix = next(s for s in IMAGE_SUFFIXES if case.name.endswith(s))
        (folder / f"h{i:02d}{suffix}").write_bytes(case.data)
    for src in sorted((heldout / person).iterdir())[:good]:
        (folder / src.name).symlink_to(src.resolve())
    return root


@pytest.mark.shared
def test_device_cli_turns_malformed_inputs_into_one_error_line(
    rng: random.Random, bundle_cases: list[BundleCase], bases: dict[str, Path], heldout_photos: Path,
    tiny_bundle_people: list[str], tmp_path: Path
) -> None:
    by_name = {c.name: c for c in bundle_cases}
    chosen = [by_name[n] for n in ALWAYS]
    chosen += rng.sample([c for c in bundle_cases if c.refused and c not in chosen], 4)
    bundles = {c.name: write_bundle(c, bases, tmp_path / f"bundle-{i:02d}") for i, c in enumerate(chosen)}
    person = tiny_bundle_people[0]
    images = malformed_images(rng)
    hostile = [c for c in images if c.huge][:3] + rng.sample([c for c in images if not c.huge and _unreadable(c)], 5)
    beside_good = _photos(tmp_path / "beside-good", person, heldout_photos, hostile, good=3)
    only_bad = _photos(tmp_path / "only-bad", person, heldout_photos, hostile, good=0)

    runs: list[Run] = []
    for name, root in bundles.items():
        cfg = tmp_path / f"check-{len(runs)}.yaml"
        cfg.write_text(yaml.safe_dump({"bundle": str(root), "device_id": "fuzz-pi",
                                       "camera": {"source": "folder", "device": str(beside_good)}}))
        runs.append(Run(f"check {name}", ["check", "--config", str(cfg), "--skip", "camera", "--skip", "broker"],
                        check=True))
    configs = {c.name: c for c in malformed_configs(rng)}
    for name in ("binary.yaml", "deep lists.yaml", "alias bomb.yaml", "empty.yaml", "deep.toml",
                 "unknown key in camera", *rng.sample(sorted(configs), 3)):
        cfg = tmp_path / f"config-{len(runs)}{'.toml' if name.endswith('.toml') else '.yaml'}"
        cfg.write_bytes(configs[name].data)
        runs.append(Run(f"check config {name}", ["check", "--config", str(cfg), "--skip", "camera", "--skip", "broker"],
                        check=True))
    for name in ("softmax thresholds.accept=-5", "manifest.sha256 wrong", "softmax preprocessing.input_size=0",
                 "gallery zero row", "gallery wrong dimension", "manifest bytes #3 (b'[]')"):
        runs.append(Run(f"eval {name}", ["eval", "--bundle", str(bundles[name]), "--photos", str(beside_good)]))
    runs.append(Run("eval hostile photos beside good ones", ["eval", "--bundle", str(bases["softmax"]),
                                                             "--photos", str(beside_good), "--quiet"], ok=True))
    runs.append(Run("eval only hostile photos", ["eval", "--bundle", str(bases["softmax"]), "--photos", str(only_bad)]))
    for name in ("gallery wrong dimension", "gallery NaN", "embedding thresholds.target_far=0",
                 "softmax labels.txt binary"):
        runs.append(Run(f"enroll {name}", ["enroll", "--bundle", str(bundles[name]), "--name", "New Person",
                                           "--photos", str(beside_good / person)]))
    softmax, embedding = tmp_path / "softmax-copy", tmp_path / "embedding-copy"
    shutil.copytree(bases["softmax"], softmax)  # enroll may write beside a bundle: never beside the fixture
    shutil.copytree(bases["embedding"], embedding, symlinks=True)
    runs.append(Run("enroll a softmax bundle", ["enroll", "--bundle", str(softmax), "--name", "x",
                                                "--photos", str(beside_good / person)]))
    runs.append(Run("enroll only hostile photos", ["enroll", "--bundle", str(embedding), "--name", "New Person",
                                                   "--photos", str(only_bad / person)]))
    assert len(runs) >= 30

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(_run, runs))
    problems = []
    for run, proc in results:
        if proc is None:
            problems.append(f"{run.name}: no answer within {SUBPROCESS_TIMEOUT_S}s")
            continue
        out = proc.stdout + proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        if "Traceback" in out:
            problems.append(f"{run.name}: traceback\n{proc.stderr[-2000:]}")
        elif run.ok is True and proc.returncode != 0:
            problems.append(f"{run.name}: exit {proc.returncode}: {proc.stderr[-500:]}")
        elif run.ok is False and proc.returncode == 0:
            problems.append(f"{run.name}: exit 0 although it must fail\n{out[-500:]}")
        elif run.ok is False and run.check and "FAIL" not in proc.stdout:
            problems.append(f"{run.name}: no FAIL row\n{out[-500:]}")
        elif run.ok is False and not run.check and len(errors) != 1:
            problems.append(f"{run.name}: {len(errors)} error lines (want 1)\n{proc.stderr[-800:]}")
        elif proc.returncode < 0:
            problems.append(f"{run.name}: killed by signal {-proc.returncode}")
    assert not problems, "\n\n".join(problems)


@pytest.mark.shared
def test_names_of_every_bundle_case_are_unique(bundle_cases: list[BundleCase]) -> None:
    # ALWAYS and the replay of a failure pick cases by name.
    names = [c.name for c in bundle_cases]
    assert len(names) == len(set(names))
    assert set(ALWAYS) <= set(names)

