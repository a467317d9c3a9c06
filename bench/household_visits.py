"""Per visit through the real daemon (issue 14): strangers named per visit, known visits named right.

    python -m bench.household [--draws N]        # first: draws the households, writes households.json
    python -m bench.household_visits [--draws 2] [--stranger-visits 100] [--known-visits 10]

For the first --draws households of each size (2, 4, 8) of split 0 that bench/household.py drew, this
builds the household's int8 bundle — the bench's embedder with the bench's gallery (faceberry.contract
centroids of the 10 enrolled photos each) and the bench's cohort-calibrated threshold, written with
faceberry.bundle.write_manifest and checked by load_bundle — and runs `python -m device run` on it with
a folder camera, publishing to a real mosquitto, as a door would.

The camera folder holds the household's visits one after the other: a visit is 5 different photos of one
person (the visits the household bench sampled: strangers, then each member with 5+ spare photos), then
12 frames without a face, so the tracker's track ends (tracking.max_age 10, the default) before the next
visit. LFW's photos are 250×250 with the face centred, so one person's photos overlap (IoU ≥ 0.3, the
default) and form one track, which decides after its first tracking.votes_needed (5) frames by
faceberry.contract.visit_decision — the rule the bench applies to the same photos. Every other daemon
setting is the shipped default, except events.cooldown 0 (otherwise a second visit by the same person
inside a minute gives no event, which would hide what is counted here).

Each event carries the file its deciding frame came from, which names the visit. Counted per visit: a
stranger visit is *named* if any event names a person; a known visit is *right* if its events name
exactly its person; a visit with no event at all (its track broke, or a face was missed) is reported
apart; and the daemon's decision is compared with the bench's for the same visit.

Writes bench/results/household-visits[-NAME].json; work under bench/work/household/visits/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench.common import ROOT, LocalBroker, machine, table, write_result
from bench.household import VISIT_FRAMES
from faceberry.contract import ENROLLED_VIEWS, UNKNOWN

GAP_FRAMES = 12  # > tracking.max_age (10): the visit's track is over before the next visit starts
WORK = ROOT / "bench" / "work" / "household"


def household_bundle(template: Path, out: Path, household: dict[str, Any]) -> Path:
    """The bench's embedder with this household's gallery and threshold, as a bundle the daemon loads."""
    from faceberry.bundle import load_bundle, write_manifest

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(template, out)
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("bundle_id", "created", "metrics"):
        manifest.pop(key, None)
    people = household["people"]
    with open(out / manifest["gallery"]["file"], "wb") as fh:
        np.savez(fh, embeddings=np.asarray(household["gallery"], np.float32), labels=np.array(people, dtype=str))
    (out / manifest["labels"]["file"]).write_text("\n".join(people) + "\n", encoding="utf-8")
    manifest["labels"]["count"] = len(people)
    manifest["gallery"]["source"] = "bench/household.py: faceberry.contract.centroid of 10 enrolled photos each"
    manifest["gallery"]["views"] = ENROLLED_VIEWS  # the bench enrols face+mirror, so the daemon takes second looks
    manifest["thresholds"] = {"accept": household["threshold"], "basis": household["threshold_basis"],
                              "source": "bench/household.py: faceberry.cohort.calibrate on the split's cohort"}
    write_manifest(out, manifest, [f for f in manifest["files"] if (out / f).is_file()])
    load_bundle(out)  # what the daemon would refuse, refused here
    return out


def visit_folder(out: Path, visits: list[dict[str, Any]]) -> Path:
    """v0000/f0..f4 (the visit's photos, linked) then v0000/g00..g11 (a faceless grey frame, linked)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    blank = out.parent / "blank.png"
    cv2.imwrite(str(blank), np.full((250, 250, 3), 128, np.uint8))
    for n, visit in enumerate(visits):
        folder = out / f"v{n:04d}"
        folder.mkdir()
        for k, photo in enumerate(visit["photos"]):
            (folder / f"f{k}{Path(photo).suffix.lower()}").symlink_to(photo)
        for g in range(GAP_FRAMES):
            (folder / f"g{g:02d}.png").symlink_to(blank)
    return out


def run_daemon(bundle: Path, frames: Path, state: Path, broker: LocalBroker, device_id: str,
               log_path: Path, timeout: float) -> tuple[list[dict[str, Any]], float, str]:
    """`python -m device run` over the folder until its end; (events received, seconds, log tail)."""
    from bench.memory import Listener

    shutil.rmtree(state, ignore_errors=True)
    config = frames.parent / "config.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "bundle": str(bundle), "device_id": device_id, "state_dir": str(state),
        "camera": {"source": "folder", "device": str(frames), "name": "door"},
        "recognition": {"num_threads": 1},
        "events": {"cooldown": 0},
        "mqtt": {"host": broker.host, "port": broker.port},
        "stats_interval": 60,
    }))
    listener = Listener(broker.host, broker.port, device_id)
    device_python = ROOT / ".venv-device" / "bin" / "python"
    python = str(device_python) if device_python.is_file() else sys.executable
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([python, "-m", "device", "run", "--config", str(config)], cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = -9
    seconds = time.monotonic() - started
    time.sleep(1.0)  # QoS 1 events the broker still holds for the listener
    listener.close()
    tail = log_path.read_text(errors="replace")[-1500:]
    if code != 0:
        sys.exit(f"error: the daemon exited with {code} on {frames}; its log ends:\n{tail}")
    return listener.events, seconds, tail


def score_visits(visits: list[dict[str, Any]], events: list[dict[str, Any]]) -> tuple[dict[str, Any], list[str]]:
    """Per-visit counts from the daemon's events, matched to visits by the deciding frame's file."""
    by_visit: dict[int, list[dict[str, Any]]] = {}
    for e in events:
        src = Path(e.get("source") or "")
        if src.parent.name.startswith("v"):
            by_visit.setdefault(int(src.parent.name[1:]), []).append(e)
    c = {"stranger_visits": 0, "stranger_visits_named": 0, "known_visits": 0, "known_visits_right": 0,
         "known_visits_wrong_person": 0, "visits_without_event": 0, "visits_with_several_tracks": 0,
         "agree_with_bench": 0, "events": len(events)}
    decided: list[str] = []
    for n, visit in enumerate(visits):
        evs = by_visit.get(n, [])
        labels = [e["label"] for e in evs]
        named = {lab for lab in labels if lab != UNKNOWN}
        c["visits_without_event"] += not evs
        c["visits_with_several_tracks"] += len({e["track_id"] for e in evs}) > 1
        daemon = next((e["label"] for e in evs if e.get("previous") is None), "(no event)")
        decided.append(daemon)
        c["agree_with_bench"] += daemon == visit["bench"]
        if visit["known"]:
            c["known_visits"] += 1
            c["known_visits_right"] += named == {visit["truth"]}
            c["known_visits_wrong_person"] += bool(named - {visit["truth"]})
        else:
            c["stranger_visits"] += 1
            c["stranger_visits_named"] += bool(named)
    bench_named = sum(v["bench"] != UNKNOWN for v in visits if not v["known"])
    bench_right = sum(v["bench"] == v["truth"] for v in visits if v["known"])
    c |= {"bench_stranger_visits_named": bench_named, "bench_known_visits_right": bench_right}
    return c, decided


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.household_visits", description=__doc__.split("\n\n")[0])
    ap.add_argument("--draws", type=int, default=2, help="households per size, the bench's first draws (default 2)")
    ap.add_argument("--split", type=int, default=0, help="which of the bench's splits (default 0)")
    ap.add_argument("--stranger-visits", type=int, default=100,
                    help="stranger visits per household, the bench's first ones (default 100)")
    ap.add_argument("--known-visits", type=int, default=10, help="visits per household member (default 10)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds one daemon run may take (default 600)")
    ap.add_argument("--name", default="")
    args = ap.parse_args(argv)
    source = WORK / "households.json"
    if not source.is_file():
        sys.exit(f"error: {source} is absent; run `python -m bench.household` first (it draws the households)")
    households = [h for h in json.loads(source.read_text())["households"]
                  if h["split"] == args.split and h["draw"] < args.draws]
    if not households:
        sys.exit(f"error: {source} has no household of split {args.split}; rerun `python -m bench.household`")
    started = time.monotonic()
    results = []
    with LocalBroker() as broker:
        if broker is None:
            sys.exit("error: mosquitto is not installed; apt install mosquitto (the daemon needs a broker)")
        for h in households:
            tag = f"s{h['split']}-n{h['household']}-d{h['draw']}"
            strangers = [v for v in h["visits"] if not v["known"]][: args.stranger_visits]
            known: list[dict[str, Any]] = []
            for p in h["people"]:
                known += [v for v in h["visits"] if v["known"] and v["truth"] == p][: args.known_visits]
            visits = strangers + known
            out = WORK / "visits" / tag
            bundle = household_bundle(WORK / "bundle", out / "bundle", h)
            frames = visit_folder(out / "frames", visits)
            print(f"{tag}: {len(h['people'])} people, {len(strangers)} stranger + {len(known)} known visits "
                  f"({len(visits) * (VISIT_FRAMES + GAP_FRAMES)} frames) through the daemon …",
                  file=sys.stderr, flush=True)
            events, seconds, _ = run_daemon(bundle.resolve(), frames.resolve(), out / "state", broker,
                                            f"household-{tag}", out / "daemon.log", args.timeout)
            counts, decided = score_visits(visits, events)
            results.append({"tag": tag, "household": h["household"], "draw": h["draw"], "people": h["people"],
                            "threshold": h["threshold"], "seconds": round(seconds, 1), **counts,
                            "visits": [{"truth": v["truth"], "known": v["known"], "bench": v["bench"],
                                        "daemon": d} for v, d in zip(visits, decided, strict=True)]})

    def ratio(a: int, b: int) -> str:
        return f"{a}/{b} ({100 * a / b:.1f}%)" if b else "—"

    rows = []
    for r in results:
        rows.append([r["tag"], ratio(r["stranger_visits_named"], r["stranger_visits"]),
                     ratio(r["bench_stranger_visits_named"], r["stranger_visits"]),
                     ratio(r["known_visits_right"], r["known_visits"]),
                     ratio(r["bench_known_visits_right"], r["known_visits"]),
                     r["visits_without_event"], r["visits_with_several_tracks"],
                     ratio(r["agree_with_bench"], r["stranger_visits"] + r["known_visits"]), f"{r['seconds']:.0f} s"])
    total = {k: sum(r[k] for r in results) for k in ("stranger_visits", "stranger_visits_named", "known_visits",
                                                      "known_visits_right", "bench_stranger_visits_named",
                                                      "bench_known_visits_right", "visits_without_event",
                                                      "visits_with_several_tracks", "agree_with_bench",
                                                      "known_visits_wrong_person")}
    rows.append(["all", ratio(total["stranger_visits_named"], total["stranger_visits"]),
                 ratio(total["bench_stranger_visits_named"], total["stranger_visits"]),
                 ratio(total["known_visits_right"], total["known_visits"]),
                 ratio(total["bench_known_visits_right"], total["known_visits"]),
                 total["visits_without_event"], total["visits_with_several_tracks"],
                 ratio(total["agree_with_bench"], total["stranger_visits"] + total["known_visits"]),
                 f"{sum(r['seconds'] for r in results):.0f} s"])
    print(table(["household", "strangers named (daemon)", "(bench rule)", "known right (daemon)", "(bench rule)",
                 "no event", "split tracks", "daemon = bench", "daemon time"], rows))
    result = {"machine": machine(), "seconds": round(time.monotonic() - started, 1),
              "protocol": {"draws": args.draws, "split": args.split, "stranger_visits": args.stranger_visits,
                           "known_visits": args.known_visits, "frames_per_visit": VISIT_FRAMES,
                           "gap_frames": GAP_FRAMES,
                           "daemon": "python -m device run, folder camera, shipped defaults but events.cooldown 0"},
              "total": total, "households": results}
    path = write_result("household-visits" + (f"-{args.name}" if args.name else ""), result)
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
