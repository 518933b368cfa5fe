"""Before/after of our kernels: two result files of bench_a2a.py, side by side.

    python benchmarks/compare_runs.py BEFORE.json AFTER.json --png out.png

Prints a markdown table of our CUDA-graph round-trip medians (device time, no
host overhead) per shape, dtype, rank count and tokens per rank, with the
speed-up, and draws the same as lines (dashed: before).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def graph_round_trips(path: Path) -> dict[tuple, float]:
    doc = json.loads(path.read_text())
    return {(r["shape"], r["dtype"], r["routing"], r["ep_size"], r["tokens_per_rank"]):
            r["median_us"] for r in doc["rows"]
            if r["impl"] == "a2a_one_sided" and r["op"] == "round_trip" and r["mode"] == "graph"}


def table(before: dict, after: dict, tokens: tuple[int, ...]) -> str:
    lines = ["| shape | dtype | routing | ranks | " + " | ".join(f"{t} tok" for t in tokens) + " |",
             "|" + "---|" * (4 + len(tokens))]
    for key in sorted({k[:4] for k in after}):
        cells = []
        for t in tokens:
            b, a = before.get((*key, t)), after.get((*key, t))
            cells.append(f"{b:.0f} -> {a:.0f} ({b / a:.2f}x)" if b and a else "")
        lines.append("| " + " | ".join(map(str, key)) + " | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(before: dict, after: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({k[:3] for k in after})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for ep in sorted({k[3] for k in after if k[:3] == panel}):
            for data, style, name in ((before, "--", "before"), (after, "-", "after")):
                pts = sorted((k[4], v) for k, v in data.items() if k[:3] == panel and k[3] == ep)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o",
                            markersize=3, label=f"ep={ep} {name}",
                            color="C0" if ep == 1 else "C1")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(" ".join(panel), fontsize=9)
        ax.set_xlabel("tokens per rank")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("round trip, graph replay (us)")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--tokens", default="1,32,256,1024,4096")
    p.add_argument("--png", type=Path, default=None)
    args = p.parse_args(argv)
    before, after = graph_round_trips(args.before), graph_round_trips(args.after)
    print(table(before, after, tuple(int(t) for t in args.tokens.split(","))))
    if args.png:
        plot(before, after, args.png)


if __name__ == "__main__":
    main()
