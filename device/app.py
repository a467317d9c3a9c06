"""The composition root: the one place the daemon's parts are built from the config and wired together.

`build(cfg)` builds, in this order: the topics; the pipeline (the bundle cfg.bundle points to, one for every
camera); a capture per camera; the outbox and the MQTT communicator; the memory stores (recent faces,
strangers, corrections) in state_dir; the dispatcher, and the outputs subscribed to it in the order a
frame's decisions reach them; the command runner on the communicator's command topic; and the frame loop
(device/loop.py), which gets the captures, the pipeline, the dispatcher and nothing else of the above.
`App.run` runs the loop.

Subscription order is part of the behaviour: the stranger memory gives an unknown event its stranger id
before the events output publishes it, and the face memory stores it after, with that id.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from faceberry.bundle import Bundle, load_bundle
from faceberry.device import __version__
from faceberry.device.capture.camera import Capture, open_source
from faceberry.device.config import DEFAULT_STATE_DIR, Config
from faceberry.device.loop import FrameLoop
from faceberry.device.memory.corrections import CorrectionFilter, Negatives
from faceberry.device.memory.facestore import FaceMemory, FaceStore
from faceberry.device.memory.strangers import StrangerMemory, StrangerNames
from faceberry.device.messaging.command_runner import CommandRunner, Enroll
from faceberry.device.messaging.dispatcher import (
    Dispatcher,
    FrameDone,
    Publish,
    Reloaded,
    ReloadRequests,
    Started,
    StatsReport,
    Stopping,
    Tick,
)
from faceberry.device.messaging.library import EnrollEmbeddings, Library
from faceberry.device.messaging.mqtt import MqttError, MqttPublisher
from faceberry.device.messaging.outbox import Outbox, OutboxError, StateDirError, default_state_dir
from faceberry.device.messaging.stranger_sync import StrangerSync
from faceberry.device.messaging.topics import Topics
from faceberry.device.ops.notify import Notifier
from faceberry.device.outputs import homeassistant as ha
from faceberry.device.outputs.assistant import Diagnostics, Discovery, Images, Presence
from faceberry.device.outputs.events import BundleStatusOutput, EventsOutput
from faceberry.device.outputs.state import DeviceState
from faceberry.device.recognition.pipeline import FacePipeline

log = logging.getLogger(__name__)


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def state_dir(cfg: Config) -> Path:
    """The directory for the outbox and what is remembered: `state_dir` from the config.

    The default (/var/lib/faceberry, created by the systemd unit's StateDirectory=) is not writable for
    a user trying the daemon from a shell; then $STATE_DIRECTORY or ~/.local/state/faceberry is used,
    with a warning naming it. A state_dir set explicitly and not writable is an error: silently putting
    the events somewhere else would hide them from whoever looks in the configured place.
    """
    configured = Path(cfg.state_dir)
    if _writable_dir(configured):
        return configured
    if configured == DEFAULT_STATE_DIR:
        fallback = default_state_dir()
        if _writable_dir(fallback):
            log.warning("state_dir %s is not writable (not started by the systemd unit?): the outbox is kept in "
                        "%s instead; set state_dir to choose", configured, fallback)
            return fallback
    raise StateDirError(f"state_dir {configured} is not writable by this user; create it for the service user "
                        "(the systemd unit's StateDirectory= does) or set state_dir to a writable directory")


def open_outbox(cfg: Config) -> Outbox:
    settings = cfg.mqtt.outbox
    # One file per device_id: two configs sharing a state_dir must not replay each other's messages.
    return Outbox(state_dir(cfg) / f"outbox-{cfg.device_id}.sqlite3", max_messages=settings.max_messages,
                  max_bytes=settings.max_bytes, sync=settings.sync)


def load_pipeline(cfg: Config) -> tuple[str, Bundle, FacePipeline]:
    """Resolve cfg.bundle (the `current` link of a versions store) and load it; raises on any problem.

    The link is resolved once, here: the pipeline then reads the version it was built from even if
    `current` is switched meanwhile.
    """
    path = os.path.realpath(cfg.bundle)
    bundle = load_bundle(path)  # verifies the manifest, every checksum and every range
    pipeline = FacePipeline(bundle, num_threads=cfg.recognition.num_threads,
                            min_face_size=cfg.detection.min_face_size,
                            score_threshold=cfg.detection.score_threshold)
    if cfg.recognition.threshold is not None:
        pipeline.classifier.threshold = cfg.recognition.threshold
    return path, bundle, pipeline


def enroller(cfg: Config, lock: threading.Lock) -> Enroll:
    """`enroll(name, folder)` into cfg.bundle, as `device enroll` does (a command names a face). `lock`: held by
    every enrolment of this daemon (commands, the library): two at once would each switch `current` to a
    version without the other's person."""
    def enroll_crops(name: str, folder: Path) -> dict[str, Any]:
        from faceberry.device.recognition.enroll import enroll  # loaded only when a command names someone

        with lock:
            return enroll(Path(cfg.bundle), name, folder, min_photos=1, min_face_size=cfg.detection.min_face_size,
                          num_threads=cfg.recognition.num_threads)
    return enroll_crops


def library_enroller(cfg: Config) -> EnrollEmbeddings:
    """`enroll(label, embeddings)` into cfg.bundle: the label's entry set to the centroid of the embeddings the
    shared library computed for them (the caller holds the enrolment lock)."""
    def enroll_embeddings(name: str, embeddings: Any) -> dict[str, Any]:
        from faceberry.device.recognition.enroll import enroll

        return enroll(Path(cfg.bundle), name, Path(), num_threads=cfg.recognition.num_threads, embeddings=embeddings,
                      merge=False)
    return enroll_embeddings


def unenroller(cfg: Config, lock: threading.Lock | None = None) -> Callable[[str], dict[str, Any]]:
    """`unenroll(name)` from cfg.bundle (a person forgotten); `lock`: taken here (a command), or None when the
    caller holds it (the library)."""
    def unenroll_name(name: str) -> dict[str, Any]:
        from faceberry.device.recognition.enroll import unenroll

        if lock is None:
            return unenroll(Path(cfg.bundle), name)
        with lock:
            return unenroll(Path(cfg.bundle), name)
    return unenroll_name


def gallery_rows(bundle_path: Callable[[], str]) -> Callable[[str], Any]:
    """The gallery rows of a label in the bundle `bundle_path()` names (None: not enrolled)."""
    def rows(label: str) -> Any:
        import numpy as np

        from faceberry.bundle import BundleError, load_bundle

        try:
            bundle = load_bundle(bundle_path(), verify=False)
        except (BundleError, OSError) as exc:
            log.warning("library: cannot read the bundle's gallery (%s)", exc)
            return None
        keep = [i for i, lbl in enumerate(bundle.gallery_labels or []) if lbl == label]
        return np.asarray(bundle.gallery_embeddings, dtype=np.float32)[keep] if keep else None
    return rows


def embedder_of(bundle_path: Callable[[], str]) -> Callable[[], str | None]:
    """The sha256 of the classifier file of the bundle `bundle_path()` names (what library entries carry)."""
    def embedder() -> str | None:
        import json

        try:
            manifest = json.loads((Path(bundle_path()) / "manifest.json").read_text(encoding="utf-8"))
            return manifest["files"][manifest["classifier"]["file"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("library: cannot read the bundle's embedder (%s)", exc)
            return None
    return embedder


def open_library(cfg: Config, topics: Topics, publisher: MqttPublisher, memory_dir: Path | None,
                 reloads: ReloadRequests, lock: threading.Lock, negatives: Negatives | None = None) -> Library:
    """The shared library, subscribed to every device's entries (paho's thread only queues them)."""
    library = Library(topics, publisher.publish,
                      state=memory_dir / f"library-{cfg.device_id}.json" if memory_dir else None,
                      enroll=library_enroller(cfg), reloads=reloads,
                      embedder=embedder_of(lambda: os.path.realpath(cfg.bundle)), enroll_lock=lock,
                      unenroll=unenroller(cfg), gallery=gallery_rows(lambda: os.path.realpath(cfg.bundle)),
                      negatives=negatives)
    publisher.subscribe(topics.library_filter, library.receive)
    return library


def open_strangers(cfg: Config, memory_dir: Path | None, threshold: float) -> StrangerMemory | None:
    """The stranger memory in state_dir (memory.strangers; None: off, or no state_dir)."""
    if memory_dir is None or not cfg.memory.strangers:
        return None
    return StrangerMemory(memory_dir / f"strangers-{cfg.device_id}.npz", threshold, cfg.memory.max_strangers,
                          cfg.memory.stranger_retention)


def share_strangers(cfg: Config, topics: Topics, publisher: MqttPublisher, dispatcher: Dispatcher,
                    strangers: StrangerMemory | None, faces: FaceStore | None) -> StrangerSync | None:
    """The stranger memory shared with every device (library.strangers; None: off, or no stranger memory),
    subscribed to every device's strangers (paho's thread only queues them), a worker of the dispatcher. A
    stranger another device forgot takes its recent faces here with it."""
    if strangers is None or not cfg.library.strangers:
        return None
    sync = StrangerSync(topics, publisher.publish, strangers, embedder_of(lambda: os.path.realpath(cfg.bundle)),
                        forgotten=faces.forget if faces is not None else None)
    publisher.subscribe(topics.strangers_filter, sync.receive)
    dispatcher.workers.append(sync)
    return sync.attach()


@dataclass
class App:
    """The built daemon. `loop` is what runs; the rest is kept for the tests and the stats."""

    loop: FrameLoop
    dispatcher: Dispatcher
    publisher: MqttPublisher
    topics: Topics
    faces: FaceStore | None
    strangers: StrangerMemory | None
    negatives: Negatives
    commands: CommandRunner | None
    discovery: Discovery | None

    def run(self, max_frames: int = 0) -> int:
        return self.loop.run(max_frames=max_frames)


def subscribe_status(dispatcher: Dispatcher, topics: Topics, publish: Publish, library: Library | None) -> None:
    """The retained bundle topic, and the state `faceberry fleet status` reads (device/outputs/state.py):
    both published with or without Home Assistant."""
    bundle_status = BundleStatusOutput(topics, publish)
    dispatcher.subscribe(Started, bundle_status.started)
    dispatcher.subscribe(Reloaded, bundle_status.reloaded)
    state = DeviceState(topics, publish, software=__version__,
                        library=(lambda: dict(library.state.ids)) if library is not None else None)
    dispatcher.subscribe(FrameDone, state.frame)
    dispatcher.subscribe(StatsReport, state.stats)


def build(cfg: Config, *, publisher: MqttPublisher | None = None, notifier: Notifier | None = None) -> App:
    """Everything the daemon is, from the config, in this order. Raises what loading the bundle, opening
    the camera or the outbox raises (the CLI turns each into its exit code)."""
    hass, mem = cfg.homeassistant, cfg.memory
    discovery_on = bool(cfg.events.homeassistant)
    # 1. Topics: the only place topic strings are assembled.
    topics = Topics(cfg.events.topic_prefix, cfg.device_id, cfg.events.homeassistant_prefix)
    # 2. The pipeline, first: a bundle that cannot serve stops here, before anything is opened.
    path, bundle, pipeline = load_pipeline(cfg)
    first = iter([(path, bundle, pipeline)])

    def loader() -> tuple[str, Bundle, FacePipeline]:
        # The loop's first load is the one above; every later one (a reload) reads cfg.bundle again.
        return next(first, None) or load_pipeline(cfg)

    # 3. The captures, one per camera, each its own thread and queue (started by the loop).
    captures = [(camera.name, Capture(open_source(camera), camera.queue_size, fps=camera.fps,
                                      reopen_max_s=float(camera.reopen_max_s),
                                      max_outage_s=float(camera.max_outage_s)))
                for camera in cfg.all_cameras]
    # 4. The outbox and the MQTT communicator: every output publishes through it.
    if publisher is None:
        try:
            outbox = open_outbox(cfg)
        except OutboxError as exc:
            raise MqttError(str(exc)) from exc
        publisher = MqttPublisher(cfg.mqtt, cfg.device_id, cfg.events.topic_prefix, cfg.mqtt_password,
                                  outbox=outbox, summary_interval=cfg.stats_interval, topics=topics)
    publish = publisher.publish
    # 5. Memory, in state_dir.
    try:
        memory_dir: Path | None = state_dir(cfg)
    except OutboxError as exc:
        log.warning("nothing is remembered across restarts (faces, strangers, corrections): %s", exc)
        memory_dir = None
    commands_on = bool(hass.commands)
    negatives = Negatives(memory_dir / f"negatives-{cfg.device_id}.json" if memory_dir else None)
    faces = None
    if memory_dir is not None and (commands_on or mem.strangers):
        faces = FaceStore(memory_dir / f"faces-{cfg.device_id}", mem.max_faces, mem.max_age)
    strangers = open_strangers(cfg, memory_dir, pipeline.classifier.threshold)
    # 6. The dispatcher and its subscribers, in the order a frame's decisions reach them.
    reloads = ReloadRequests()
    dispatcher = Dispatcher(publisher)
    cpu_temp = ha.cpu_temperature() is not None
    presence = discovery = None
    if discovery_on:
        presence = Presence(topics, publish, timeout=hass.presence_timeout)
        dispatcher.subscribe(Started, presence.started)
        dispatcher.subscribe(FrameDone, presence.frame)
        dispatcher.subscribe(Tick, presence.tick)
        dispatcher.subscribe(Reloaded, presence.reloaded)
        dispatcher.subscribe(Stopping, presence.stopping)
        publisher.before_status(presence.now)
        discovery = Discovery(topics, publish, ledger=ha.DiscoveryLedger(
            memory_dir / f"discovery-{cfg.device_id}.json" if memory_dir else None),
            images=bool(hass.images), commands=commands_on, cpu_temp=cpu_temp, library=bool(cfg.library.share),
            announce=publisher.announce)
        dispatcher.subscribe(Started, discovery.started)
        dispatcher.subscribe(Tick, discovery.tick)
        dispatcher.subscribe(Reloaded, discovery.reloaded)
        publisher.on_connect(discovery.publish_all)  # paho's thread: it only writes to the outbox
        publisher.subscribe(topics.ha_status, discovery.ha_status)
        diagnostics = Diagnostics(topics, publish, cpu_temp=cpu_temp)
        dispatcher.subscribe(StatsReport, diagnostics.stats)
    images = Images(topics, publish, enabled=bool(hass.images), discovery=discovery_on)
    dispatcher.subscribe(Started, images.started)
    if strangers is not None:
        names = StrangerNames(strangers)
        dispatcher.subscribe(FrameDone, names.frame)  # before the events output: the event carries its id
        dispatcher.subscribe(Reloaded, names.reloaded)
    events = EventsOutput(topics, publish, cooldown=cfg.events.cooldown, snapshots=cfg.events.snapshots)
    dispatcher.subscribe(FrameDone, events.frame)
    dispatcher.subscribe(Reloaded, events.reloaded)
    if faces is not None:
        dispatcher.subscribe(FrameDone, FaceMemory(faces).frame)  # after the stranger memory named the face
    dispatcher.subscribe(FrameDone, images.frame)
    # 7. Commands in: paho routes the command topic to the runner, which runs them on its own thread.
    #    The shared library (library.share): every device's enrolments, applied on its own thread.
    runner, enroll_lock = None, threading.Lock()
    library = (open_library(cfg, topics, publisher, memory_dir, reloads, enroll_lock, negatives)
               if cfg.library.share else None)
    dispatcher.workers.extend([library] if library is not None else [])
    #    Shared strangers (library.strangers): every device's stranger identities, adopted on their own thread.
    stranger_sync = share_strangers(cfg, topics, publisher, dispatcher, strangers, faces)
    subscribe_status(dispatcher, topics, publish, library)
    if commands_on:
        runner = CommandRunner(topics, publish, max_bytes=hass.command_max_bytes, faces=faces, strangers=strangers,
                               negatives=negatives, reloads=reloads, enroll=enroller(cfg, enroll_lock),
                               clear_images=images.clear, scratch=memory_dir, library=library,
                               unenroll=unenroller(cfg, enroll_lock))
        publisher.subscribe(topics.command, runner.receive)
        dispatcher.workers.append(runner)

    def memory_stats() -> dict[str, Any] | None:
        """What is remembered and how commands went (None: nothing on)."""
        if not (commands_on or faces or strangers or len(negatives)):
            return None
        return {"faces": len(faces) if faces is not None else 0,
                "strangers": len(strangers) if strangers is not None else 0, "corrections": len(negatives),
                **(runner.stats() if runner is not None else {"commands_accepted": 0, "commands_refused": 0}),
                **(library.stats if library is not None else {}),
                **(stranger_sync.stats if stranger_sync is not None else {})}

    dispatcher.add_stats("memory", memory_stats)
    # 8. The loop: capture in, decisions out to the dispatcher; nothing else.
    status_path = None
    if memory_dir is not None:
        status_path = memory_dir / f"status-{cfg.device_id}.json"
    else:
        log.warning("no status file for `faceberry status`: no state_dir is writable")
    keep_samples = faces is not None or strangers is not None or bool(hass.images)
    loop = FrameLoop(cfg, captures=captures, loader=loader, dispatcher=dispatcher,
                     corrections=CorrectionFilter(negatives, mem.negative_margin), reloads=reloads,
                     notifier=notifier, status_path=status_path,
                     samples_per_track=mem.crops_per_face if keep_samples else 0, keep_regions=faces is not None)
    return App(loop, dispatcher, publisher, topics, faces, strangers, negatives, runner, discovery)
