"""Plots and the README table from benchmark JSON files.

    python benchmarks/plot_results.py benchmarks/results/<machine>/*.json

Writes one PNG per (shape, dtype, routing) next to each JSON: time vs tokens
per rank, one line per implementation, one panel per op. ``--readme`` rewrites
the table between the markers in README.md.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARK_BEGIN = "<!-- bench-table:begin -->"
MARK_END = "<!-- bench-table:end -->"
OPS = ("dispatch", "combine", "round_trip")


def label(row) -> str:
    mode = "" if row["mode"] == "eager" else f" ({row['mode']})"
    return f"{row['impl']} ep={row['ep_size']}{mode}"


def plot_file(path: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc = json.loads(path.read_text())
    groups = defaultdict(list)
    for row in doc["rows"]:
        groups[(row["shape"], row["dtype"], row["routing"])].append(row)
    written = []
    for (shape, dtype, routing), rows in sorted(groups.items()):
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=False)
        names = sorted({label(r) for r in rows})
        colors = {n: plt.cm.tab10(i % 10) for i, n in enumerate(names)}
        for ax, op in zip(axes, OPS):
            lines = defaultdict(list)
            for row in rows:
                if row["op"] == op:
                    lines[label(row)].append((row["tokens_per_rank"], row["median_us"]))
            for name, points in sorted(lines.items()):
                points.sort()
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name,
                        color=colors[name])
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(op)
            ax.set_xlabel("tokens per rank")
            ax.set_ylabel("median time (us)")
            ax.grid(True, which="both", alpha=0.3)
        for ax in axes:
            ax.legend(fontsize=7)
        fig.suptitle(f"{shape} {dtype} {routing} - {doc['gpu']} x{doc['world_size']} "
                     f"(limit {doc['limit_kind']} {doc['limit_gbps']} GB/s)")
        fig.tight_layout()
        out = path.with_name(f"{path.stem}_{shape}_{dtype}_{routing}.png")
        fig.savefig(out, dpi=90)
        plt.close(fig)
        written.append(out)
    return written


def table(paths: list[Path]) -> str:
    """Round-trip median microseconds, one row per (machine, shape, dtype, routing,
    tokens), one column per implementation / rank count / mode."""
    cells: dict[tuple, dict[str, float]] = defaultdict(dict)
    columns: set[str] = set()
    for path in paths:
        doc = json.loads(path.read_text())
        machine = f"{doc['gpu'].replace('NVIDIA ', '')} x{doc['world_size']}"
        for row in doc["rows"]:
            if row["op"] != "round_trip":
                continue
            key = (machine, row["shape"], row["dtype"], row["routing"], row["tokens_per_rank"])
            column = label(row)
            cells[key][column] = row["median_us"]
            columns.add(column)
    ordered = sorted(columns, key=lambda c: (not c.startswith("a2a_one_sided"), c))
    lines = ["| machine | shape | dtype | routing | tokens/rank | " + " | ".join(ordered) + " |",
             "|" + "---|" * (5 + len(ordered))]
    for key in sorted(cells):
        values = [f"{cells[key][c]:.0f}" if c in cells[key] else "" for c in ordered]
        lines.append("| " + " | ".join(map(str, key)) + " | " + " | ".join(values) + " |")
    return ("Round trip, median microseconds (lower is better); `(graph)` = CUDA-graph "
            "replay, others eager.\n\n" + "\n".join(lines))


def update_readme(text: str) -> None:
    readme = ROOT / "README.md"
    content = readme.read_text()
    start, end = content.index(MARK_BEGIN), content.index(MARK_END)
    readme.write_text(content[: start + len(MARK_BEGIN)] + "\n" + text + "\n" + content[end:])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--readme", action="store_true", help="rewrite the README table")
    args = parser.parse_args(argv)
    for path in args.files:
        for png in plot_file(path):
            print(png)
    if args.readme:
        update_readme(table(args.files))


if __name__ == "__main__":
    main()
