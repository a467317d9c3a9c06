"""bench/same_decisions.py's comparison: the check issue 22's refactor is held to must fail on a changed label, refuse
runs over different bundles, and pass two identical records (the recording itself runs the real CLIs: minutes)."""

from __future__ import annotations

import copy

from bench.same_decisions import compare


def _record() -> dict:
    return {
        "bundle": {"files": {"manifest.json": "ab", "gallery.npz": "cd"}, "thresholds": {"accept": 0.95}},
        "eval": {"photos": {"a/1.jpg": {"label": "a", "score": 0.97}, "s/1.jpg": {"label": "unknown", "score": 0.9}},
                 "skipped": []},
        "daemon": {"photos": {"a/1.jpg": [{"label": "a", "score": 0.97, "bbox": [1, 2, 3, 4]}],
                              "g/pair.jpg": [{"label": "unknown", "score": 0.88, "bbox": [0, 0, 9, 9]},
                                             {"label": "a", "score": 0.96, "bbox": [20, 0, 29, 9]}]},
                   "topics": ["faceberry/x/events"]},
    }


def test_identical_records_pass_and_a_score_drift_is_reported_not_failed(capsys):
    before = _record()
    after = copy.deepcopy(before)
    after["eval"]["photos"]["a/1.jpg"]["score"] = 0.9701
    assert compare(before, after) == 0
    out = capsys.readouterr().out
    assert "| eval | 2 | 2 | 0.0001 | 0 |" in out and "SAME DECISIONS" in out


def test_a_changed_label_or_a_lost_event_fails(capsys):
    before = _record()
    after = copy.deepcopy(before)
    after["daemon"]["photos"]["g/pair.jpg"][1]["label"] = "unknown"
    assert compare(before, after) == 1
    assert "g/pair.jpg: ['unknown', 'a'] → ['unknown', 'unknown']" in capsys.readouterr().out
    after = copy.deepcopy(before)
    del after["daemon"]["photos"]["a/1.jpg"]
    assert compare(before, after) == 1
    assert "a/1.jpg: ['a'] → no decision" in capsys.readouterr().out


def test_runs_over_different_bundle_files_are_refused(capsys):
    before = _record()
    after = copy.deepcopy(before)
    after["bundle"]["files"]["gallery.npz"] = "ef"
    assert compare(before, after) == 2
    assert "same bundle files" in capsys.readouterr().err
