"""`python -m train cohort` as a user meets it (issue 24): every photo given is kept unless --per-person says
otherwise, `--lfw` without a network ends with the fix, not a bare urlopen error, and its download shows its
progress. No TensorFlow, no ../shared."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from faceberry.train.cohort import MIN_PEOPLE, CohortBuildError, download, select_photos
from tests.conftest import ROOT


def _people(n: int, photos: int) -> dict[str, list[Path]]:
    return {f"Person_{i:02d}": [Path(f"Person_{i:02d}/{k}.jpg") for k in range(photos + i % 3)] for i in range(n)}


def test_every_photo_is_read_in_name_order():
    """--per-person caps usable faces while reading (tests/test_cohort.py), so every photo is offered."""
    people = _people(25, 8)
    total = sum(len(v) for v in people.values())
    chosen, dropped = select_photos(people, None)
    assert sum(len(v) for v in chosen.values()) == total and dropped["per_person"] == 0
    assert set(chosen) == set(people) and all(files == people[name] for name, files in chosen.items())


def test_excluded_people_are_left_out_and_counted():
    people = _people(25, 4)
    chosen, dropped = select_photos(people, {"person 03", "Person_07"})
    assert "Person_03" not in chosen and "Person_07" not in chosen and len(chosen) == 23
    assert dropped["excluded_people"] == 2
    assert dropped["excluded"] == len(people["Person_03"]) + len(people["Person_07"])


def test_lfw_without_a_network_ends_with_the_fix(tmp_path: Path):
    # A proxy on a closed port: every download fails at once, as offline.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SCIKIT_LEARN_DATA": str(tmp_path / "sklearn"),
           "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
           "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}
    res = subprocess.run([sys.executable, "-m", "train", "cohort", "--backbone", str(tmp_path / "backbone"), "--lfw"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    err = res.stderr.strip().splitlines()[-1]
    assert err.startswith("error: cannot download LFW (") and "no network?" in err
    assert "use --photos DIR with photos of people not in your household" in err
    assert f"at least {MIN_PEOPLE} people" in err
    assert "Traceback" not in res.stderr


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@pytest.fixture
def www(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, str]]:
    """(folder, its URL): a real HTTP server on a loopback port serving the folder, reached without any proxy."""
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "*")
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_download_writes_the_file_and_shows_its_progress_in_a_log(www, tmp_path: Path, capsys):
    root, url = www
    payload = os.urandom(300_000)
    (root / "lfw-funneled.tgz").write_bytes(payload)
    dest = tmp_path / "lfw_home" / "lfw-funneled.tgz"
    assert download(url + "lfw-funneled.tgz", dest, sha256=_sha256(root / "lfw-funneled.tgz")) == dest
    assert dest.read_bytes() == payload and not dest.with_name(dest.name + ".part").exists()
    err = capsys.readouterr().err
    # Not a terminal: tqdm's lines, at least the last one, over the Content-Length the server gave.
    assert "download lfw-funneled.tgz: 100%" in err and "293k/293k" in err, err


def test_a_damaged_download_is_deleted_and_refused(www, tmp_path: Path, capsys):
    root, url = www
    (root / "lfw-funneled.tgz").write_bytes(os.urandom(1000))
    dest = tmp_path / "lfw-funneled.tgz"
    with pytest.raises(CohortBuildError, match=r"is damaged .*run the command again"):
        download(url + "lfw-funneled.tgz", dest, progress=False, sha256="0" * 64)
    assert list(tmp_path.iterdir()) == [root]
    assert capsys.readouterr().err == ""


def test_lfw_is_downloaded_with_progress_and_unpacked_by_scikit_learns_fetcher(www, tmp_path, monkeypatch, capsys):
    """lfw_folder's own download leaves the archive where the fetcher unpacks it; scikit-learn's LFW addresses
    point at the loopback server (its names and checksums of our files), nothing of ours is replaced."""
    import sklearn.datasets._lfw as lfw
    from sklearn.datasets._base import RemoteFileMetadata

    from faceberry.train.cohort import lfw_folder

    root, url = www
    (tmp_path / "src" / "lfw_funneled" / "Some_One").mkdir(parents=True)
    (tmp_path / "src" / "lfw_funneled" / "Some_One" / "Some_One_0001.jpg").write_bytes(b"not read here")
    with tarfile.open(root / lfw.FUNNELED_ARCHIVE.filename, "w:gz") as tar:
        tar.add(tmp_path / "src" / "lfw_funneled", arcname="lfw_funneled")
    for target in lfw.TARGETS:
        (root / target.filename).write_text("1\n")
    monkeypatch.setattr(lfw, "TARGETS", tuple(RemoteFileMetadata(t.filename, url + t.filename,
                                                                  _sha256(root / t.filename)) for t in lfw.TARGETS))
    archive = lfw.FUNNELED_ARCHIVE.filename
    monkeypatch.setattr(lfw, "FUNNELED_ARCHIVE", RemoteFileMetadata(archive, url + archive, _sha256(root / archive)))
    monkeypatch.setenv("SCIKIT_LEARN_DATA", str(tmp_path / "sklearn"))

    folder = lfw_folder()
    assert folder == tmp_path / "sklearn" / "lfw_home" / "lfw_funneled"
    assert [p.name for p in folder.iterdir()] == ["Some_One"]
    assert not (folder.parent / archive).exists()  # the fetcher deletes the archive once unpacked
    assert f"download {archive}: 100%" in capsys.readouterr().err
