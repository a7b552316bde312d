"""The demo's picture: the synthetic world's floor plan, the robot's path, and where the evidence of
an answer says the robot was, next to where the ground truth says it was (matplotlib PNG)."""

from __future__ import annotations

from pathlib import Path


def plot_evidence(episode, seconds: float, question: str, evidence: list[tuple[float, tuple | None, float]],
                  truth: tuple[float, tuple] | None, out: Path) -> Path:
    """evidence: (seconds into the episode, pose or None, weight), strongest first; truth: (seconds,
    pose) of the last frame that showed what was asked about, or None."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from livevlm_ros.tools.synthetic_world import ROOM_SIZE, ROOM_XY

    fig, ax = plt.subplots(figsize=(7, 6))
    for room, (cx, cy) in ROOM_XY.items():
        h = ROOM_SIZE / 2
        ax.add_patch(plt.Rectangle((cx - h, cy - h), ROOM_SIZE, ROOM_SIZE, fill=False, color="0.6"))
        ax.text(cx, cy + h - 0.6, room, ha="center", color="0.4")
    ts = [k / 10 for k in range(int(seconds * 10))]
    path = [episode.pose(t) for t in ts]
    ax.scatter([p[0] for p in path], [p[1] for p in path], s=2, c=ts, cmap="viridis", label="robot path (colour: time)")
    known = [(t, p, w) for t, p, w in evidence if p is not None]
    if known:
        ax.scatter([p[0] for _, p, _ in known], [p[1] for _, p, _ in known], s=[60 + 600 * w for *_, w in known],
                   facecolors="none", edgecolors="red", linewidths=2, label="evidence (size: weight)")
        for t, p, _ in known:
            ax.annotate(f"{t:.1f}s", (p[0], p[1]), textcoords="offset points", xytext=(6, 6), color="red")
    if truth is not None:
        t, p = truth
        ax.scatter([p[0]], [p[1]], marker="x", s=120, c="black", label=f"last seen (truth, {t:.1f}s)")
    ax.set_aspect("equal")
    ax.set_xlabel("x (m, map)")
    ax.set_ylabel("y (m, map)")
    ax.set_title(question)
    ax.legend(loc="lower right", fontsize=8)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out
