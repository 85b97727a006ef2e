"""Draw a bench/edge.py results file: link bytes, time to the last client, clients served.

    .venv/bin/python bench/edge_plot.py docs/results/edge-256mib.json -o docs/img/edge-storm.png

Three panels, one group of bars per scenario and one bar per subject (the
first round of each): the bytes that crossed the link over the image's size,
the time until the last client had the whole image over the physical bound
(image / link rate), both with the issue's target as a line, and the share of
clients that got the right bytes. A subject with no client served has no bar
in the middle panel. Needs matplotlib: ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server

import matplotlib.pyplot as plt  # after the backend is chosen

COLOURS = {
    "imagecache": "#d62728",
    "imagecache-glance": "#ff9896",
    "nginx": "#7f7f7f",
    "varnish": "#1f77b4",
    "glance-cache": "#2ca02c",
}


def draw(result: dict[str, Any], out: Path) -> None:
    rows = [r for r in result["rows"] if r.get("round", 1) == 1]
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    subjects = list(dict.fromkeys(r["subject"] for r in rows))
    panels = (
        ("link_ratio", "link bytes / image", 1.01),
        ("last_ratio", "last client / physical bound", 1.1),
        ("ok_share", "clients with the right bytes", None),
    )
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    width = 0.8 / max(len(subjects), 1)
    for ax, (key, title, target) in zip(axes, panels, strict=True):
        for i, subject in enumerate(subjects):
            xs, ys = [], []
            for x, scenario in enumerate(scenarios):
                row = next(
                    (r for r in rows if r["scenario"] == scenario and r["subject"] == subject),
                    None,
                )
                if row is None:
                    continue
                value = row["clients_ok"] / row["clients"] if key == "ok_share" else row[key]
                if value is not None:
                    xs.append(x + (i - (len(subjects) - 1) / 2) * width)
                    ys.append(value)
            ax.bar(xs, ys, width, label=subject, color=COLOURS.get(subject))
        if target is not None:
            ax.axhline(target, color="black", linestyle="--", linewidth=1, label="target")
        ax.set_xticks(range(len(scenarios)), scenarios)
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"edge boot storm: {result['size_mib']} MiB image, {result['clients']} clients, "
        f"{result['link_mbit']:g} Mbit/s, {result['rtt_ms']:g} ms RTT "
        f"(bound {result['bound_s']} s)"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    draw(json.loads(args.results.read_text()), args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
