"""The frame loop on its own: a fake camera (we have no Pi camera here) and a fake pipeline in, a recording
dispatcher out, no broker. What it hands over is the daemon's whole output, so these tests pin it down: the
decisions, the notifications and their order. Then the real outputs behind a real Dispatcher: a frame's walk
through the modules never returns to one it left, and no output holds the loop (nor the loop an output).
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from faceberry.contract import UNKNOWN
from faceberry.device.config import Config
from faceberry.device.loop import FrameLoop
from faceberry.device.memory.corrections import CorrectionFilter, Negatives
from faceberry.device.messaging.dispatcher import (
    Decided,
    Dispatcher,
    FrameDone,
    Reloaded,
    ReloadRequests,
    Started,
    StatsReport,
    Stopping,
    Tick,
)
from tests.plugins.fakes import (
    FakeBundle,
    FakeCapture,
    FakeCommunicator,
    FakePipeline,
    RecordingDispatcher,
    config,
    frames,
)

ROOT = Path(__file__).resolve().parents[1]


def make_loop(cfg: Config, pipeline: Any, dispatcher: Any, n: int, bundles: list[FakeBundle] | None = None,
              reloads: ReloadRequests | None = None) -> FrameLoop:
    versions = iter(bundles or [FakeBundle("b1", ["alice", "bob", UNKNOWN])])

    def loader() -> tuple[str, Any, Any]:
        bundle = next(versions)
        return f"/bundles/{bundle.bundle_id}", bundle, pipeline

    return FrameLoop(cfg, capture=FakeCapture(frames(n)), loader=loader, dispatcher=dispatcher,
                     corrections=CorrectionFilter(Negatives(None), 0.05), reloads=reloads,
                     samples_per_track=3, keep_regions=True)


def test_the_loop_hands_its_decisions_and_notifications_to_the_dispatcher_in_order() -> None:
    out = RecordingDispatcher()
    loop = make_loop(config(), FakePipeline("alice"), out, n=6)
    assert loop.run() == 0

    kinds = [m if isinstance(m, str) else type(m).__name__ for m in out.log]
    # Started and the first stats before the communicator starts (so presence OFFs precede `online`);
    # Stopping before it stops (presence OFF before `offline`); the last stats after it stopped.
    assert kinds[:3] == ["Started", "StatsReport", "start"]
    assert kinds.index("Stopping") < kinds.index("stop") < len(kinds) - 1
    assert kinds[-1] == "StatsReport" and out.log[-1].final is True
    assert out.of(Started)[0].labels == ("alice", "bob")
    assert out.of(Started)[0].bundle.bundle_id == "b1"
    done = out.of(FrameDone)
    assert [f.index for f in done] == [0, 1, 2, 3, 4, 5]
    assert len(out.of(Tick)) >= 6  # every loop turn, frames or not
    # Three votes decide: frame 2 carries the one event; the cooldown keeps the next frames quiet.
    assert [len(f.decided) for f in done] == [0, 0, 1, 0, 0, 0]
    decided: Decided = done[2].decided[0]
    assert decided.event["label"] == "alice" and decided.event["model"] == "b1"
    assert decided.event["device_id"] == "testcam" and decided.event["frames"] == 3
    assert len(decided.samples) == 3 and all(s.region is not None for s in decided.samples)
    # Who is in view: nobody before the decision, alice from then on.
    assert [tuple(s.label for s in f.seen) for f in done] == [(), (), ("alice",), ("alice",), ("alice",), ("alice",)]
    assert loop.events == 1 and loop.frames == 6 and loop.cooldown.suppressed == 0


def test_unknown_faces_make_no_event_when_events_unknown_is_off() -> None:
    out = RecordingDispatcher()
    make_loop(config(unknown=False), FakePipeline(UNKNOWN), out, n=5).run()
    assert all(not f.decided for f in out.of(FrameDone))
    on = RecordingDispatcher()
    make_loop(config(), FakePipeline(UNKNOWN), on, n=5).run()
    assert [d.event["label"] for f in on.of(FrameDone) for d in f.decided] == [UNKNOWN]


def test_a_reload_asked_from_another_thread_is_served_between_frames_and_notified() -> None:
    out = RecordingDispatcher()
    reloads = ReloadRequests()
    loop = make_loop(config(), FakePipeline("alice"), out, n=3, reloads=reloads,
                     bundles=[FakeBundle("b1", ["alice", UNKNOWN]), FakeBundle("b2", ["alice", "carol", UNKNOWN])])
    answer: list[Any] = []
    ticket = reloads.request()
    waiter = threading.Thread(target=lambda: answer.append(reloads.wait(ticket, 30)))
    waiter.start()
    loop.run()
    waiter.join(30)
    assert answer and answer[0].ok and answer[0].bundle_id == "b2"
    reloaded = out.of(Reloaded)
    assert len(reloaded) == 1 and reloaded[0].labels == ("alice", "carol")
    assert loop.bundle_id == "b2"
    # After the loop stopped, nobody serves a request: a waiter is answered None at once, not at its timeout.
    assert reloads.wait(reloads.request(), 30) is None


def test_a_camera_that_fails_at_start_closes_the_communicator_unstarted() -> None:
    out = RecordingDispatcher()
    loop = make_loop(config(), FakePipeline("alice"), out, n=1)

    def broken() -> None:
        raise OSError("no such folder")

    loop.capture.start = broken  # type: ignore[method-assign]
    with pytest.raises(OSError):
        loop.run()
    assert out.log == ["abort"]


# --- the real outputs behind the real dispatcher -------------------------------------------------------------

def wired(tmp_path: Path) -> tuple[FrameLoop, Dispatcher, FakeCommunicator, list[Any]]:
    """The loop with the outputs app.build subscribes for a daemon with everything on (discovery, images,
    snapshots, strangers, remembered faces), on a fake communicator."""
    from faceberry.device.memory.facestore import FaceMemory, FaceStore
    from faceberry.device.memory.strangers import StrangerMemory, StrangerNames
    from faceberry.device.messaging.topics import Topics
    from faceberry.device.outputs import homeassistant as ha
    from faceberry.device.outputs.assistant import Diagnostics, Discovery, Images, Presence
    from faceberry.device.outputs.events import BundleStatusOutput, EventsOutput

    comm = FakeCommunicator()
    topics, publish = Topics("faceberry", "testcam"), comm.publish
    dispatcher = Dispatcher(comm)
    presence = Presence(topics, publish, timeout=30)
    discovery = Discovery(topics, publish, ledger=ha.DiscoveryLedger(None), images=True, commands=True,
                          cpu_temp=False)
    images = Images(topics, publish, enabled=True, discovery=True)
    names = StrangerNames(StrangerMemory(None, 0.5))
    events = EventsOutput(topics, publish, cooldown=60, snapshots=True)
    memory = FaceMemory(FaceStore(tmp_path / "faces"))
    bundle = BundleStatusOutput(topics, publish)
    diagnostics = Diagnostics(topics, publish, cpu_temp=False)
    for kind, handler in ((Started, presence.started), (FrameDone, presence.frame), (Tick, presence.tick),
                          (Stopping, presence.stopping), (Started, discovery.started), (Tick, discovery.tick),
                          (StatsReport, diagnostics.stats), (Started, images.started), (FrameDone, names.frame),
                          (FrameDone, events.frame), (FrameDone, memory.frame), (FrameDone, images.frame),
                          (Started, bundle.started), (Reloaded, bundle.reloaded)):
        dispatcher.subscribe(kind, handler)
    outputs = [presence, discovery, images, names, events, memory, bundle, diagnostics]
    loop = make_loop(config(), FakePipeline(UNKNOWN), dispatcher, n=6)
    return loop, dispatcher, comm, outputs


def test_the_real_outputs_publish_the_decided_event_on_their_own_topics(tmp_path: Path) -> None:
    loop, _, comm, outputs = wired(tmp_path)
    loop.run()
    topics = [t for t, _, _ in comm.sent]
    assert topics.count("faceberry/testcam/events") == 1
    assert "faceberry/testcam/person/unknown" in topics and "faceberry/testcam/snapshot/unknown" in topics
    assert "faceberry/testcam/image/last_unknown" in topics and "faceberry/testcam/bundle" in topics
    event = next(p for t, p, _ in comm.sent if t == "faceberry/testcam/events")
    assert b'"stranger_id":"s-' in event  # the stranger memory named it before the events output published it
    memory = next(o for o in outputs if type(o).__name__ == "FaceMemory")
    assert len(memory.store) == 1 and memory.store.last().stranger_id is not None


def test_nothing_holds_the_loop_and_the_loop_holds_no_output(tmp_path: Path) -> None:
    loop, _, _, outputs = wired(tmp_path)
    output_types = {type(o) for o in outputs}

    def reachable(root: object, depth: int = 3) -> list[object]:
        seen, todo, found = set(), [(root, 0)], []
        while todo:
            obj, d = todo.pop()
            if id(obj) in seen or d > depth:
                continue
            seen.add(id(obj))
            found.append(obj)
            for value in getattr(obj, "__dict__", {}).values():
                if not isinstance(value, (np.ndarray, str, bytes, int, float)):
                    todo.append((value, d + 1))
        return found

    # The loop reaches the dispatcher, but the outputs only through its subscription lists, never as its own.
    assert not any(type(v) in output_types for v in vars(loop).values())
    for output in outputs:
        assert not any(isinstance(o, FrameLoop) for o in reachable(output)), type(output).__name__


def test_a_frame_walks_through_each_module_once(tmp_path: Path) -> None:
    """Every call between two of the daemon's modules while a frame is handled, recorded with a profiler:
    the graph of who called whom has no cycle, so a frame never returns to a module it left (the loop calls
    the dispatcher, the dispatcher the outputs; no output calls back)."""
    loop, _, _, _ = wired(tmp_path)
    loop.capture.start()
    edges: set[tuple[str, str]] = set()

    # A decorator's wrapper (the stores' lock, device/memory/locked.py) is not a step of the frame's path: a call
    # through it is a call from the wrapper's caller to the wrapped function's module.
    wrappers = {"faceberry.device.memory.locked"}

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event != "call" or frame.f_back is None:
            return
        callee = frame.f_globals.get("__name__", "")
        if callee in wrappers:
            return
        back = frame.f_back
        while back is not None and back.f_globals.get("__name__", "") in wrappers:
            back = back.f_back
        if back is None:
            return
        caller = back.f_globals.get("__name__", "")
        if callee != caller and callee.startswith("faceberry.") and caller.startswith("faceberry."):
            edges.add((caller, callee))

    for frame in frames(5):
        sys.setprofile(profile)
        try:
            loop.handle_frame(frame)
        finally:
            sys.setprofile(None)
    assert ("faceberry.device.loop", "faceberry.device.messaging.dispatcher") in edges
    dispatcher = "faceberry.device.messaging.dispatcher"
    assert (dispatcher, "faceberry.device.outputs.events") in edges
    assert (dispatcher, "faceberry.device.memory.strangers") in edges
    outputs = ("faceberry.device.outputs.assistant", "faceberry.device.memory.facestore",
               "faceberry.device.memory.strangers")
    callers_of_outputs = {a for a, b in edges if b in outputs and a != "faceberry.device.loop"}
    assert callers_of_outputs <= {"faceberry.device.messaging.dispatcher"}, edges
    assert not any(b == "faceberry.device.loop" for _, b in edges), edges  # nothing calls back into the loop
    assert cycle(edges) is None, (cycle(edges), sorted(edges))


def cycle(edges: set[tuple[str, str]]) -> list[str] | None:
    """One cycle of the directed graph, or None."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None
