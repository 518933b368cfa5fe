"""Bar chart of ``latency_session.sh``'s ``host.json``: eager host time per round trip.

    python benchmarks/plot_host.py RESULTS/host.json --png RESULTS/host.png [--target 25]
    python benchmarks/plot_host.py RESULTS/eager_ab/host_*.json --png RESULTS/eager_ab.png

``host.json`` maps each measuring process (``before``, ``after``, ``after_2``) to
``host_overhead.py``'s fields; a file holding those fields itself (one
``host_overhead.py --json`` output) is one process named by its file stem. One
group of bars per process, in the order given: the round trip
(``dispatch`` + ``combine``), the same with ``combine(out=...)``, the two planned
and the two general ops alone, our Python alone, and one trivial torch op (the
dispatcher + launch floor). Every bar is host wall clock, median of 5
(``host_overhead.py``); the host's speed moves between processes (the trivial op
bar shows how much), so compare bars within a group first.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BARS = (  # (field, label)
    ("host_us_per_round_trip", "round trip"),
    ("host_us_out_given", "round trip, combine(out=)"),
    ("raw_planned_us", "planned ops alone"),
    ("raw_general_us", "general ops alone"),
    ("python_only_us", "our Python alone"),
    ("torch_op_floor_us", "one trivial torch op"),
)


def plot(host: dict[str, dict], png: Path, target_us: float | None, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(host)
    width = 0.8 / len(BARS)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for i, (field, name) in enumerate(BARS):
        values = [host[r].get(field) for r in runs]
        xs = [j + (i - (len(BARS) - 1) / 2) * width for j in range(len(runs))]
        shown = [(x, v) for x, v in zip(xs, values) if v is not None]
        bars = ax.bar([x for x, _ in shown], [v for _, v in shown], width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    if target_us is not None:
        ax.axhline(target_us, color="k", linestyle="--", linewidth=1,
                   label=f"round-trip target {target_us:g} us")
    ax.set_xticks(range(len(runs)), runs)
    ax.set_ylabel("host time, us (median of 5)")
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("inputs", type=Path, nargs="+", help="host.json or host_overhead.py JSON files")
    p.add_argument("--png", type=Path, required=True)
    p.add_argument("--target", type=float, default=25.0, help="round-trip target, us (0: none)")
    p.add_argument("--title", default="eager host time per round trip, 1 token, fp8, one rank")
    args = p.parse_args(argv)
    host = {}
    for path in args.inputs:
        doc = json.loads(path.read_text())
        host.update({path.stem: doc} if "host_us_per_round_trip" in doc else doc)
    plot(host, args.png, args.target or None, args.title)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
