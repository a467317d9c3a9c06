"""The benchmark scripts' plumbing: --help works, the accuracy split is deterministic and disjoint,
and the peer's scoring and calibration count what they claim. Nothing here is timed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import accuracy, protocol
from device.classifier import UNKNOWN

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.name for p in (ROOT / "bench").glob("*.py") if p.stem not in ("__init__", "common"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_bench_script_explains_itself(script):
    # As the docs run them: a module of the bench package, from the repository root (no sys.path patching).
    proc = subprocess.run([sys.executable, "-m", f"bench.{Path(script).stem}", "--help"], capture_output=True,
                          text=True, cwd=ROOT, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout and "--" in proc.stdout


def test_no_bench_script_patches_sys_path():
    for path in sorted((ROOT / "bench").glob("*.py")):
        assert "sys.path.insert" not in path.read_text(), f"{path.name} patches sys.path"


def _fake_people(root: Path, counts: dict[str, int]) -> Path:
    for person, n in counts.items():
        (root / person).mkdir(parents=True)
        for i in range(n):
            (root / person / f"{person}_{i:04d}.jpg").write_bytes(b"x")
    return root


def test_split_is_deterministic_disjoint_and_follows_the_protocol(tmp_path):
    counts = {f"known{i}": 20 + 3 * i for i in range(4)} | {f"other{i}": 10 + i for i in range(7)}
    source = _fake_people(tmp_path / "faces", counts)
    a = protocol.make_split(source, seed=0)
    b = protocol.make_split(source, seed=0)
    c = protocol.make_split(source, seed=1)
    assert a.to_dict() == b.to_dict() and a.fingerprint() == b.fingerprint()
    assert c.fingerprint() != a.fingerprint()
    assert sorted(a.train) == [f"known{i}" for i in range(4)]
    for person in a.train:
        assert len(a.train[person]) == 10
        assert len(a.test[person]) == counts[person] - 10
        assert not set(a.train[person]) & set(a.test[person])
    assert not set(a.negatives) & set(a.strangers)
    assert set(a.negatives) | set(a.strangers) == {f"other{i}" for i in range(7)}
    assert len(a.negatives) == round(7 * 0.5)


def test_materialised_split_matches_its_json(tmp_path):
    source = _fake_people(tmp_path / "faces", {"alice": 21, "bob": 20, "carol": 11, "dave": 12})
    split = protocol.make_split(source, seed=3)
    dirs = protocol.materialise(split, tmp_path / "split")
    saved = json.loads((tmp_path / "split" / "split.json").read_text())
    assert saved["fingerprint"] == split.fingerprint()
    for role in ("train", "test", "negatives", "strangers"):
        on_disk = {p.parent.name + "/" + p.name for p in dirs[role].glob("*/*")}
        assert on_disk == {rel for files in saved[role].values() for rel in files}
    assert sorted(p.name for p in dirs["eval"].iterdir()) == sorted([*split.test, *split.strangers])
    assert all((dirs["eval"] / person).is_dir() for person in split.test)


def test_peer_scoring_recounts():
    refs = (np.array([[0.0, 0.0], [1.0, 0.0]]), ["a", "b"])
    enc = {"p1": {"faces": 1, "encoding": [0.1, 0.0]}, "p2": {"faces": 1, "encoding": [0.95, 0.0]},
           "p3": {"faces": 1, "encoding": [0.5, 0.9]}, "p4": {"faces": 0, "encoding": None},
           "s1": {"faces": 1, "encoding": [0.2, 0.1]}, "s2": {"faces": 1, "encoding": [5.0, 5.0]}}
    probe_sets = [("a", Path("p1"), True), ("a", Path("p2"), True), ("b", Path("p3"), True), ("a", Path("p4"), True),
                  ("x", Path("s1"), False), ("x", Path("s2"), False)]
    probes = accuracy._score_probes(enc, refs, probe_sets, tolerance=0.6)
    assert [p["predicted"] for p in probes] == ["a", "b", UNKNOWN, "(no face)", "a", UNKNOWN]
    summary = accuracy.summarise_probes(probes)
    assert summary["known_accuracy"] == pytest.approx(1 / 4)  # p1 only; p2 wrong, p3 rejected, p4 no face
    assert summary["stranger_false_accept_rate"] == pytest.approx(1 / 2)
    assert summary["no_face_rate"] == pytest.approx(1 / 6)


@pytest.mark.parametrize("target", [0.0, 0.02, 0.1, 0.5])
def test_calibrated_distance_accepts_at_most_the_target_share(target):
    d = np.random.default_rng(1).uniform(0.3, 0.9, 500)
    tol = accuracy.calibrate_distance(d, target)
    accepted = int(np.sum(d <= tol))
    assert accepted <= target * len(d)
    assert accepted >= target * len(d) - 1  # and not needlessly strict


def test_far_curve_is_monotonic_and_spans_its_range():
    rng = np.random.default_rng(2)
    probes = [{"known": True, "faces": 1, "truth": "a", "best": "a", "score": float(s)}
              for s in rng.uniform(0.4, 1, 50)]
    probes += [{"known": True, "faces": 0, "truth": "a", "best": "(no face)", "score": 0.0}]
    probes += [{"known": False, "faces": 1, "truth": UNKNOWN, "best": "a", "score": float(s)}
               for s in rng.uniform(0, 0.7, 80)]
    curve = accuracy.far_curve(probes)
    fars, accs = zip(*curve, strict=True)
    assert list(fars) == sorted(fars) and list(accs) == sorted(accs)
    top = max(p["score"] for p in probes if not p["known"])
    assert curve[0] == [0.0, pytest.approx(sum(1 for p in probes[:50] if p["score"] > top) / 51)]
    lowest = min(p["score"] for p in probes if not p["known"])
    assert curve[-1][0] == 1.0
    assert curve[-1][1] == pytest.approx(sum(1 for p in probes[:50] if p["score"] >= lowest) / 51)
