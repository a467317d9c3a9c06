"""Draw the docs' plots from the benchmark results (bench/results/*.json → docs/*.png).

    python -m bench.plots            # after python -m bench.accuracy and bench/speed.py

- docs/bench-accuracy.png: known-person accuracy against the stranger false-accept rate as the
  threshold sweeps, faceberry vs face_recognition, with each system's shipped operating point.
- docs/bench-speed.png: faceberry's milliseconds per frame by stage (1 thread), and frames per second
  of faceberry and face_recognition (HOG detect + encode) on the same decoded frames.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.common import RESULTS, ROOT

DOCS = ROOT / "docs"


def plot_accuracy(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    ours = result.get("faceberry")
    if ours and ours.get("far_curve"):
        x, y = zip(*ours["far_curve"], strict=True)
        c = ours["classifier"]
        backbone = "face backbone" if "--backbone" in ours.get("train_command", "") else "ImageNet MobileNetV2"
        ax.plot([100 * v for v in x], [100 * v for v in y], color="tab:red",
                label=f"faceberry ({backbone}, {c['kind']}, {c['quantization']})")
        ax.scatter([100 * ours["stranger_false_accept_rate"]], [100 * ours["known_accuracy"]], color="tab:red",
                   zorder=3, label="faceberry at its calibrated threshold")
    peer = result.get("face_recognition")
    if peer:
        colours = iter(["tab:blue", "tab:cyan", "tab:green"])
        for name, m in peer["methods"].items():
            colour = next(colours)
            if m.get("far_curve"):
                x, y = zip(*m["far_curve"], strict=True)
                ax.plot([100 * v for v in x], [100 * v for v in y], color=colour, alpha=0.8,
                        label=f"face_recognition {name.split(' ')[0].split('@')[0]}")
            ax.scatter([100 * m["stranger_false_accept_rate"]], [100 * m["known_accuracy"]], color=colour,
                       marker="s", zorder=3, label=f"face_recognition {name.split(' (')[0]}")
    ax.set_xlabel("strangers accepted as someone known (%)")
    ax.set_ylabel("known probes: right person, accepted (%)")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    s = result["protocol"]
    ax.set_title(f"lfw-dev few-shot: {s['known_people']} people × 10 photos, {s['stranger_people']} strangers",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def plot_speed(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {r["threads"]: r for r in result["runs"]}
    run = runs.get(1, result["runs"][0])
    peer = result.get("peer") or {"sets": {}}
    names = list(run["sets"])
    stages = ("decode", "detect", "align", "classify", "publish")
    colours = ("#bbbbbb", "tab:orange", "tab:olive", "tab:red", "tab:purple")
    fig, (left_ax, right_ax) = plt.subplots(1, 2, figsize=(9.0, 3.6), dpi=100, sharey=True)
    ys = list(range(len(names)))
    for i, name in enumerate(names):
        left = 0.0
        for stage, colour in zip(stages, colours, strict=True):
            med = run["sets"][name]["stages"][stage]["median"] or 0.0
            left_ax.barh(i, med, left=left, height=0.6, color=colour, label=stage if i == 0 else None)
            left += med
    left_ax.set_yticks(ys, names, fontsize=8)
    left_ax.set_xlabel(f"faceberry ms per frame, median per stage ({run['threads']} thread)", fontsize=8)
    left_ax.legend(fontsize=7, loc="lower right")
    left_ax.grid(alpha=0.3, axis="x")
    for i, name in enumerate(names):
        if name in peer["sets"]:
            p = peer["sets"][name]
            right_ax.barh(i + 0.2, p["our_fps"], height=0.4, color="tab:red", label="faceberry" if i == 0 else None)
            right_ax.barh(i - 0.2, p["peer_fps"], height=0.4, color="tab:blue",
                          label="face_recognition (HOG + encode)" if i == 0 else None)
            right_ax.text(p["our_fps"], i + 0.2, f" {p['fps_ratio']:g}×", va="center", fontsize=7)
    right_ax.set_xscale("log")
    right_ax.set_xlabel("frames per second on the same decoded frames (log scale)", fontsize=8)
    right_ax.legend(fontsize=7, loc="lower right")
    right_ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accuracy", type=Path, default=RESULTS / "accuracy.json", help="bench/accuracy.py result")
    parser.add_argument("--speed", type=Path, default=RESULTS / "speed.json", help="bench/speed.py result")
    parser.add_argument("--out", type=Path, default=DOCS, help="folder for the PNGs (default docs/)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    done = 0
    if args.accuracy.is_file():
        plot_accuracy(json.loads(args.accuracy.read_text()), args.out / "bench-accuracy.png")
        done += 1
    if args.speed.is_file():
        plot_speed(json.loads(args.speed.read_text()), args.out / "bench-speed.png")
        done += 1
    if not done:
        print("error: no results to plot ; run python -m bench.accuracy and bench/speed.py first", file=sys.stderr)
        return 2
    print(f"wrote {done} plot(s) under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
