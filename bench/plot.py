"""Draw the headline comparisons of a bench/run.py results file as one PNG.

    .venv/bin/python bench/plot.py docs/results/latest.json -o docs/img/benchmarks-summary.png

Three panels from the proxy scenarios (``run.py --only proxies``): aggregate
throughput and CPU-seconds per GiB delivered for hits at 1, 4 and 16 clients
and the 32-client cold herd, and the herd's time to first byte against its
target. Needs matplotlib: ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server

import matplotlib.pyplot as plt  # after the backend is chosen
from matplotlib.axes import Axes

# (scenario, axis label): the groups of bars, left to right.
GROUPS = (
    ("proxy-hit1", "hit\n1 client"),
    ("proxy-hit4", "hit\n4 clients"),
    ("proxy-hit16", "hit\n16 clients"),
    ("proxy-herd", "cold herd\n32 clients"),
)
COLOURS = {
    "imagecache": "#d62728",
    "nginx": "#7f7f7f",
    "Varnish": "#1f77b4",
    "Traffic Server": "#2ca02c",
}
# nginx serves the file itself: the baseline, not a cache.
LEGEND = {"nginx": "nginx sendfile (the origin itself)"}
HERD_TTFB_TARGET = 0.05


class PlotError(Exception):
    """The results file cannot be drawn (missing or not from bench/run.py)."""


def load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PlotError(f"{path}: cannot read a results file: {exc}") from exc
    if not isinstance(data, dict) or not data.get("proxies"):
        raise PlotError(
            f"{path}: no proxy scenarios in it; make one with "
            "bench/run.py --only proxies (or a full run)"
        )
    return data


def subjects_of(entries: list[dict[str, Any]]) -> list[str]:
    """Subjects in the order the run measured them (imagecache first)."""
    seen: list[str] = []
    for e in entries:
        if e["subject"] not in seen:
            seen.append(e["subject"])
    return seen


def bars(
    ax: Axes,
    entries: list[dict[str, Any]],
    key: str,
    ylabel: str,
    title: str,
    fmt: str,
    spread: tuple[str, str] | None = None,
) -> None:
    """One group of bars per scenario, one bar per subject."""
    index = {(e["scenario"], e["subject"]): e for e in entries}
    groups = [(s, label) for s, label in GROUPS if any(e["scenario"] == s for e in entries)]
    names = subjects_of(entries)
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        xs, ys, low, high = [], [], [], []
        for g, (scenario, _) in enumerate(groups):
            e = index.get((scenario, name))
            if e is None or e.get(key) is None:
                continue
            xs.append(g - 0.4 + width * (i + 0.5))
            ys.append(float(e[key]))
            if spread is not None:
                low.append(float(e[key]) - float(e[spread[0]]))
                high.append(float(e[spread[1]]) - float(e[key]))
        yerr = [low, high] if spread is not None else None
        drawn = ax.bar(
            xs,
            ys,
            width,
            label=LEGEND.get(name, name),
            color=COLOURS.get(name),
            yerr=yerr,
            capsize=2,
            error_kw={"elinewidth": 0.8},
        )
        ax.bar_label(drawn, labels=[format(y, fmt) for y in ys], fontsize=7, padding=2)
    ax.set_xticks(range(len(groups)), [label for _, label in groups])
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.margins(y=0.15)


def herd_ttfb(ax: Axes, entries: list[dict[str, Any]]) -> None:
    """The herd's median time to first byte per subject (bars), its worst (markers), the target."""
    herd = [
        e for e in entries if e["scenario"] == "proxy-herd" and e.get("ttfb_median") is not None
    ]
    names = [e["subject"].replace("nginx", "nginx\n(the origin)") for e in herd]
    medians = [float(e["ttfb_median"]) for e in herd]
    colours = [COLOURS.get(e["subject"]) for e in herd]
    drawn = ax.bar(names, medians, color=colours, width=0.6)
    ax.bar_label(drawn, labels=[f"{m:.3f}" for m in medians], fontsize=7, padding=2)
    worst = [float(e["ttfb_worst"]) for e in herd]
    ax.scatter(names, worst, marker="v", color="black", zorder=3, label="worst client")
    ax.axhline(
        HERD_TTFB_TARGET,
        color="#d62728",
        linestyle="--",
        linewidth=1,
        label=f"imagecache's target: median ≤ {HERD_TTFB_TARGET} s",
    )
    # Headroom above the worst client for the legend.
    ax.set_ylim(0, max([*worst, *medians, HERD_TTFB_TARGET]) * 1.3)
    ax.set_ylabel("seconds to the first byte")
    ax.set_title("Cold herd of 32: time to first byte\n(bars: median client)", fontsize=11)
    ax.tick_params(axis="x", labelsize=8)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def title(data: dict[str, Any]) -> str:
    m, cfg = data.get("machine", {}), data.get("config", {})
    size = int(cfg.get("size", 0)) >> 20
    rounds = cfg.get("proxy_reps", "?")
    date = str(data.get("started", ""))[:16].replace("T", " ")
    return (
        f"imagecache against nginx, Varnish and Traffic Server, all in front of one nginx origin\n"
        f"run {date} UTC · {m.get('nproc', '?')} cores {m.get('cpu', '')} · "
        f"kernel {m.get('kernel', '?')} · {size} MiB image · medians of {rounds} round(s)"
    )


def draw(data: dict[str, Any], out: Path) -> None:
    entries: list[dict[str, Any]] = data["proxies"]
    fig, (rate, cpu, ttfb) = plt.subplots(
        1, 3, figsize=(16, 5.6), gridspec_kw={"width_ratios": [1.3, 1.3, 0.9]}
    )
    bars(
        rate,
        entries,
        "mib_s",
        "MiB/s delivered, all clients together",
        "Throughput (higher is better)",
        ".0f",
        spread=("mib_s_low", "mib_s_high"),
    )
    bars(
        cpu,
        entries,
        "cpu_s_per_gib",
        "CPU-seconds per GiB delivered\n(the server's processes, user + system)",
        "CPU cost (lower is better)",
        ".2f",
    )
    rate.legend(fontsize=8, loc="upper left")
    herd_ttfb(ttfb, entries)
    fig.suptitle(title(data), fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a bench/run.py results JSON")
    parser.add_argument(
        "-o", "--output", type=Path, default=Path("docs/img/benchmarks-summary.png")
    )
    args = parser.parse_args(argv)
    try:
        draw(load(args.results), args.output)
    except PlotError as exc:
        print(f"plot.py: {exc}", file=sys.stderr)
        return 2
    print(f"written: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
