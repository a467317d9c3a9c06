"""`device check`'s config step: every problem of the file on its own line, warnings shown with the report."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from faceberry.device.ops import check
from faceberry.errors import EXIT_FAILURE, EXIT_OK

SKIP_ALL = ["bundle", "camera", "broker"]


def run_check(config: Path) -> tuple[int, list[str]]:
    out = io.StringIO()
    code = check.run(argparse.Namespace(config=str(config), timeout=1.0, skip=SKIP_ALL), out=out)
    return code, out.getvalue().splitlines()


def test_every_config_problem_gets_its_own_line(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("bundle: /b\nmqtt: {keepalive: 70000, port: 0}\nevents: {homeassistant_prefix: 'ha/#'}\n")
    code, lines = run_check(config)
    assert code == EXIT_FAILURE
    assert lines[0].startswith("config  FAIL  ") and len(lines) == 4, lines
    assert [line.split()[0] for line in lines[1:3]] == ["FAIL", "FAIL"]
    problems = " ".join(lines[:3])
    for key in ("mqtt.keepalive", "mqtt.port", "events.homeassistant_prefix"):
        assert key in problems
    assert all(str(config) in line for line in lines[:3])
    assert lines[3] == "bundle, camera and broker not checked: fix the config first"


def test_warnings_are_shown_under_an_ok_config(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("bundle: /b\ndevice_id: front-door\n")
    code, lines = run_check(config)
    assert code == EXIT_OK  # a warning is not a failure: the daemon can run
    assert lines[0].startswith("config  OK    device front-door") and "state /var/lib/faceberry" in lines[0]
    assert lines[1].split(None, 1)[0] == "WARN" and "knock each other off the broker" in lines[1]
    assert lines[2:] == ["bundle  SKIP", "camera  SKIP", "broker  SKIP"]


def test_a_clean_config_has_no_warning_lines(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("bundle: /b\ndevice_id: hall-3\n")
    code, lines = run_check(config)
    assert code == EXIT_OK and len(lines) == 4 and lines[0].startswith("config  OK")


# --- what `run` would refuse or never use ---------------------------------------------------------------------

def empty_gallery_bundle(root: Path, detector: Path) -> Path:
    """An embedding bundle whose gallery has 0 rows while labels.txt names 16 people (issue 21)."""
    import numpy as np

    from faceberry.bundle import write_manifest
    from faceberry.preprocess import Preprocessing
    from tests.plugins.bundles import make_loadable_bundle

    make_loadable_bundle(root, detector)
    np.savez(root / "gallery.npz", embeddings=np.zeros((0, 16), np.float32), labels=np.array([], dtype=str))
    write_manifest(root, {
        "classifier": {"file": "classifier.tflite", "kind": "embedding", "quantization": "float32"},
        "detector": {"file": "face_detection_short_range.tflite"},
        "labels": {"file": "labels.txt", "count": 16},
        "gallery": {"file": "gallery.npz"},
        "preprocessing": Preprocessing(input_size=128).to_dict(),
        "thresholds": {"accept": 0.9, "target_far": 0.01},
    }, ["classifier.tflite", "face_detection_short_range.tflite", "labels.txt", "gallery.npz"])
    return root


def test_an_empty_gallery_is_refused_by_check_but_enroll_can_still_open_it(tmp_path: Path, detector_path: Path) -> None:
    from faceberry.bundle import load_bundle

    bundle = empty_gallery_bundle(tmp_path / "bundle", detector_path)
    assert load_bundle(bundle).gallery_labels == []  # enroll opens it to add the first person: the fix
    config = tmp_path / "c.yaml"
    config.write_text(f"bundle: {bundle}\ndevice_id: hall-3\nstate_dir: {tmp_path / 'state'}\n")
    out = io.StringIO()
    code = check.run(argparse.Namespace(config=str(config), timeout=1.0, skip=["camera", "broker"]), out=out)
    lines = out.getvalue().splitlines()
    assert code == EXIT_FAILURE
    bundle_line = next(line for line in lines if line.startswith("bundle "))
    assert bundle_line.startswith("bundle  FAIL") and "gallery is empty" in bundle_line, lines
    assert "faceberry enroll" in bundle_line and "every face would be 'unknown'" in bundle_line


def test_the_camera_holder_hint_is_not_given_for_a_missing_camera_library(tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("picamera2") is not None:
        import pytest

        pytest.skip("picamera2 is installed here")
    config = tmp_path / "c.yaml"
    config.write_text(f"bundle: /b\ndevice_id: hall-3\ncamera: {{source: picamera2}}\nstate_dir: {tmp_path}\n")
    out = io.StringIO()
    code = check.run(argparse.Namespace(config=str(config), timeout=1.0, skip=["bundle", "broker"]), out=out)
    camera = next(line for line in out.getvalue().splitlines() if line.startswith("camera "))
    assert code == EXIT_FAILURE and camera.startswith("camera  FAIL") and "picamera2 is not installed" in camera
    assert "holds the camera" not in camera and "faceberry.service" not in camera


def test_a_state_dir_run_could_not_use_fails_the_check(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    for state_dir, reason in [("/dev/null", "kernel's /dev file system"), ("/proc/x", "kernel's /proc file system"),
                              (str(afile), "exists and is not a directory"),
                              (str(afile / "below"), "not a directory")]:
        config = tmp_path / "c.yaml"
        config.write_text(f"bundle: /b\ndevice_id: hall-3\nstate_dir: {state_dir}\n")
        code, lines = run_check(config)
        assert code == EXIT_FAILURE and lines[0].startswith("config  FAIL") and reason in lines[0], lines
        assert "state_dir" in lines[0] and len([x for x in lines if "FAIL" in x]) == 1, lines
    # A directory that does not exist yet is fine when it can be made; nothing is created by the check.
    config = tmp_path / "c.yaml"
    config.write_text(f"bundle: /b\ndevice_id: hall-3\nstate_dir: {tmp_path / 'new' / 'state'}\n")
    code, lines = run_check(config)
    assert code == EXIT_OK and lines[0].startswith("config  OK") and not (tmp_path / "new").exists()


# --- several cameras: each checked, each on its own line --------------------------------------------------------

def check_cameras(tmp_path: Path, names: list[str]) -> tuple[int, list[str]]:
    cameras = ", ".join(f"{{name: {name}, source: folder, device: '{tmp_path / name}'}}" for name in names)
    config = tmp_path / "c.yaml"
    config.write_text(f"bundle: /b\ndevice_id: hall-3\nstate_dir: {tmp_path / 'state'}\ncameras: [{cameras}]\n")
    out = io.StringIO()
    code = check.run(argparse.Namespace(config=str(config), timeout=5.0, skip=["bundle", "broker"]), out=out)
    return code, out.getvalue().splitlines()


def test_every_camera_is_checked_and_a_bad_one_is_named(tmp_path: Path) -> None:
    from tests.plugins.files import write_frame

    write_frame(tmp_path / "front")  # "back" has no folder: unplugged, renamed, a typo in the config
    code, lines = check_cameras(tmp_path, ["front", "back"])
    cameras = [line for line in lines if line.startswith("camera ")]
    assert code == EXIT_FAILURE and len(cameras) == 2, lines
    assert cameras[0].startswith("camera  OK    front: ") and "got a 64×48 frame" in cameras[0], lines
    assert cameras[1].startswith("camera  FAIL  back: ") and str(tmp_path / "back") in cameras[1], lines
    # The bad camera failed alone: the good one ahead of it and the checks after still ran and said so.
    assert lines[-1] == "broker  SKIP" and "front" not in cameras[1]


def test_every_camera_good_is_ok(tmp_path: Path) -> None:
    from tests.plugins.files import write_frame

    for name in ("front", "back", "garage"):
        write_frame(tmp_path / name)
    code, lines = check_cameras(tmp_path, ["front", "back", "garage"])
    cameras = [line for line in lines if line.startswith("camera ")]
    assert code == EXIT_OK, lines
    assert [line.split()[:3] for line in cameras] == [["camera", "OK", f"{n}:"] for n in ("front", "back", "garage")]
    # Skipping the camera check skips every camera, said once.
    out = io.StringIO()
    check.run(argparse.Namespace(config=str(tmp_path / "c.yaml"), timeout=1.0, skip=SKIP_ALL), out=out)
    assert out.getvalue().splitlines()[-3:] == ["bundle  SKIP", "camera  SKIP", "broker  SKIP"]
