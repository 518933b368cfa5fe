"""Plots and the suite table (docs/benchmarks.md) from benchmark JSON files.

    python benchmarks/plot_results.py benchmarks/results/<machine>/*.json

Writes one PNG per (shape, dtype, routing) next to each JSON: time vs tokens
per rank, one line per implementation, one panel per op. ``--table`` rewrites
the table between the markers in docs/benchmarks.md. ``--round-trip OUT.png`` draws one
picture of the round trip from all the files given (repeated runs of one
configuration: the median of the runs, bars from the fastest to the slowest),
titled with the machine, commit, date and command, each line naming its timing
method (the README's plot):

    python benchmarks/plot_results.py --round-trip docs/round_trip.png \
        benchmarks/results/<machine>/<run>/after_*.json
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
MODE_STYLES = {"eager": ("-", "o"), "graph": ("--", "s"), "kernel": (":", "^")}


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
        # One colour per implementation and rank count, one line style per timing
        # mode: more than ten series share tab10's colours otherwise.
        series = sorted({(r["impl"], r["ep_size"]) for r in rows})
        colors = {s: plt.cm.tab10(i % 10) for i, s in enumerate(series)}
        for ax, op in zip(axes, OPS):
            lines = defaultdict(list)
            for row in rows:
                if row["op"] == op:
                    lines[(label(row), row["impl"], row["ep_size"], row["mode"])].append(
                        (row["tokens_per_rank"], row["median_us"]))
            for (name, impl, ep, mode), points in sorted(lines.items()):
                points.sort()
                style = MODE_STYLES.get(mode, ("-", "o"))
                ax.plot([p[0] for p in points], [p[1] for p in points], linestyle=style[0],
                        marker=style[1], label=name, color=colors[(impl, ep)])
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


def table(paths: list[Path], tokens: tuple[int, ...] = (1, 128, 1024, 4096),
          routings: tuple[str, ...] = ("uniform",)) -> str:
    """Round-trip median microseconds at a few batch sizes, one row per (machine,
    shape, dtype, routing, tokens), one column per implementation / rank count /
    mode, and our speed-up over each baseline at the same rank count and mode.

    Left out to keep it short: skewed routing (in the JSON and plots) and our eager
    times with several logical ranks in one process (their host work is serialised
    there, which no real deployment does)."""
    cells: dict[tuple, dict[str, float]] = defaultdict(dict)
    columns: set[str] = set()
    for path in paths:
        doc = json.loads(path.read_text())
        machine = f"{doc['gpu'].replace('NVIDIA ', '')} x{doc['world_size']}"
        for row in doc["rows"]:
            if (row["op"] != "round_trip" or row["tokens_per_rank"] not in tokens
                    or row["routing"] not in routings
                    or (row["impl"] == "a2a_one_sided" and row["mode"] == "eager"
                        and row["ep_size"] > doc["world_size"])):
                continue
            key = (machine, row["shape"], row["dtype"], row["routing"], row["tokens_per_rank"])
            column = label(row)
            cells[key][column] = row["median_us"]
            columns.add(column)
    ordered = sorted(columns, key=lambda c: (not c.startswith("a2a_one_sided"), c))
    ours = [c for c in ordered if c.startswith("a2a_one_sided")]
    pairs = [(o, b) for b in ordered if not b.startswith("a2a_one_sided") for o in ours
             if o.split(" ", 1)[1] == b.split(" ", 1)[1]]
    ratio_names = [f"{b.split(' ')[0]} / ours{' (graph)' if '(graph)' in b else ''}"
                   for _, b in pairs]
    lines = ["| machine | shape | dtype | routing | tokens/rank | "
             + " | ".join(ordered + ratio_names) + " |",
             "|" + "---|" * (5 + len(ordered) + len(pairs))]
    for key in sorted(cells):
        row = cells[key]
        values = [f"{row[c]:.0f}" if c in row else "" for c in ordered]
        values += [f"{row[b] / row[o]:.2f}x" if o in row and b in row and row[o] else ""
                   for o, b in pairs]
        lines.append("| " + " | ".join(map(str, key)) + " | " + " | ".join(values) + " |")
    return ("Round trip (dispatch + combine), median microseconds, lower is better; `(graph)` "
            "= CUDA-graph replay, others eager; `X / ours` = X's time over ours at the same "
            "rank count and mode (above 1x: ours is faster); uniform routing. Full data "
            "(dispatch and combine apart, skewed routing, p99, bandwidth): the JSON files and "
            "plots under `benchmarks/results/`.\n\n" + "\n".join(lines))


# Round-trip series: (label, mode, value of a row); kernel time adds the
# dispatch and combine rows of one point.
_RT_SERIES = (
    ("graph replay, device time (queued)", "graph", "queued_median_us"),
    ("graph replay, events (host gaps included)", "graph", "median_us"),
    ("kernel time (CUPTI, dispatch + combine)", "kernel", "median_us"),
    ("eager, events (host enqueue included)", "eager", "median_us"),
)
_RT_STYLES = dict(zip((name for name, _, _ in _RT_SERIES),
                      (("-", "s"), ("--", "D"), (":", "^"), ("-.", "o"))))


def round_trip_points(docs: list[dict]) -> dict[tuple, dict[int, list[float]]]:
    """``{(impl, ep_size, series label): {tokens: [one value per run]}}``.

    Eager rows of several logical ranks in one process are left out (their host
    work is serialised there, which no deployment does), as in :func:`table`."""
    points: dict[tuple, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for doc in docs:
        kernel: dict[tuple, float] = defaultdict(float)
        for row in doc["rows"]:
            logical = row["ep_size"] > doc["world_size"]
            for name, mode, field in _RT_SERIES:
                if row["mode"] != mode or field not in row or row[field] is None:
                    continue
                if mode == "eager" and logical and row["impl"] == "a2a_one_sided":
                    continue
                if mode == "kernel" and row["op"] in ("dispatch", "combine"):
                    kernel[(row["impl"], row["ep_size"], name, row["tokens_per_rank"])] += \
                        row[field]
                elif mode != "kernel" and row["op"] == "round_trip":
                    points[(row["impl"], row["ep_size"], name)][row["tokens_per_rank"]].append(
                        row[field])
        for (impl, ep, name, tokens), value in kernel.items():
            points[(impl, ep, name)][tokens].append(value)
    return points


def plot_round_trip(paths: list[Path], out: Path) -> Path:
    """One round-trip picture from repeated runs of one configuration."""
    import statistics

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs = [json.loads(p.read_text()) for p in paths]
    first = docs[0]
    configs = {(r["shape"], r["dtype"], r["routing"]) for d in docs for r in d["rows"]}
    if len(configs) != 1:
        raise ValueError(f"--round-trip takes runs of one (shape, dtype, routing); got "
                         f"{sorted(configs)}")
    (shape, dtype, routing), = configs
    commits = sorted({d.get("commit") or "unknown" for d in docs})
    fig, ax = plt.subplots(figsize=(9, 5.2))
    series = round_trip_points(docs)
    colors = {key: plt.cm.tab10(i % 10) for i, key in enumerate(
        sorted({(impl, ep) for impl, ep, _ in series}))}
    for (impl, ep, name), by_tokens in sorted(series.items()):
        tokens = sorted(by_tokens)
        mid = [statistics.median(by_tokens[t]) for t in tokens]
        low = [m - min(by_tokens[t]) for m, t in zip(mid, tokens)]
        high = [max(by_tokens[t]) - m for m, t in zip(mid, tokens)]
        ranks = (f"{ep} logical ranks on 1 GPU" if ep > first["world_size"]
                 else f"{ep} rank{'s' if ep > 1 else ''}")
        line, marker = _RT_STYLES[name]
        ax.errorbar(tokens, mid, yerr=[low, high], linestyle=line, marker=marker,
                    capsize=2, color=colors[(impl, ep)], label=f"{impl}, {ranks}: {name}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens per rank")
    ax.set_ylabel("round trip, dispatch + combine (us, median)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(f"{first['gpu']} x{first['world_size']}, torch {first['torch']}, commit "
                 f"{', '.join(commits)}, {first['date'][:10]}\n{shape} {dtype} dispatch "
                 f"({'bf16' if dtype == 'fp8' else dtype} combine), {routing} routing, "
                 f"{len(docs)} run(s): median, bars = range", fontsize=9)
    fig.text(0.01, 0.005, "benchmarks/bench_a2a.py " + first["command"].split(
        "bench_a2a.py", 1)[-1].split(" --out")[0].strip(), fontsize=6, alpha=0.7)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def update_table(text: str, doc: Path = ROOT / "docs" / "benchmarks.md") -> None:
    """Replace the suite table between the markers in ``doc``."""
    content = doc.read_text()
    start, end = content.index(MARK_BEGIN), content.index(MARK_END)
    doc.write_text(content[: start + len(MARK_BEGIN)] + "\n" + text + "\n" + content[end:])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--table", action="store_true",
                        help="rewrite the suite table in docs/benchmarks.md")
    parser.add_argument("--round-trip", type=Path, metavar="OUT.png",
                        help="only draw one round-trip picture of all FILES (runs of one "
                             "configuration) to OUT.png")
    args = parser.parse_args(argv)
    if args.round_trip is not None:
        print(plot_round_trip(args.files, args.round_trip))
        return
    for path in args.files:
        for png in plot_file(path):
            print(png)
    if args.table:
        update_table(table(args.files))


if __name__ == "__main__":
    main()
