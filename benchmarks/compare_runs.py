"""Before/after of our kernels: two result files of bench_a2a.py, side by side.

    python benchmarks/compare_runs.py BEFORE.json AFTER.json --png out.png

Prints one markdown table per metric found in both files (medians, us, per
shape, dtype, routing, rank count and tokens per rank, with the speed-up
before / after), then the regression check: at the ``--check-tokens`` points
the after/before ratio of the round trip must stay within ``--tolerance``.
Metrics (see bench_a2a.py's docstring for the timing methods):

* ``graph``: round trip, CUDA-graph replay, events as the GPU saw them;
* ``graph_queued``: the same replays with the host held back (device time alone);
* ``kernel_dispatch`` / ``kernel_combine``: profiler kernel time per op and rank;
* ``eager``: round trip, eager calls (host-bound at small batches);
* ``graph_floor``: an empty-kernel graph of the same launch structure (queued);
* ``empty_kernel``: one empty kernel's profiler time.

The PNG draws ``--png-metric`` (default ``graph``) as lines (dashed: before).
``--latency-png`` draws the decode-latency view instead (tuning pass 2): one row
per rank count, columns kernel dispatch / kernel combine / graph round trip
(events) / graph round trip (queued), before vs after, the targets as dashed
horizontal lines and the floors measured in the same run (``empty_kernel_us``,
``floor_queued_us``) as dotted lines; ``--extra-pair B2 A2`` adds a second
before/after pair (thin lines) so the run-to-run drift is visible.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# metric -> (op, mode, field of the row)
METRICS = {
    "graph": ("round_trip", "graph", "median_us"),
    "graph_queued": ("round_trip", "graph", "queued_median_us"),
    "kernel_dispatch": ("dispatch", "kernel", "median_us"),
    "kernel_combine": ("combine", "kernel", "median_us"),
    "eager": ("round_trip", "eager", "median_us"),
    # Floors measured in the same run (same bench code on both sides: they should agree):
    "graph_floor": ("round_trip", "graph", "floor_queued_us"),
    "empty_kernel": ("dispatch", "kernel", "empty_kernel_us"),
}


def load_metric(path: Path, metric: str) -> dict[tuple, float]:
    """``{(shape, dtype, routing, ep_size, tokens): value}`` of our rows for ``metric``."""
    op, mode, field = METRICS[metric]
    doc = json.loads(path.read_text())
    return {(r["shape"], r["dtype"], r["routing"], r["ep_size"], r["tokens_per_rank"]): r[field]
            for r in doc["rows"]
            if r["impl"] == "a2a_one_sided" and r["op"] == op and r["mode"] == mode
            and r.get(field) is not None}


def graph_round_trips(path: Path) -> dict[tuple, float]:
    """Kept for callers of the first version: the ``graph`` metric."""
    return load_metric(path, "graph")


def table(before: dict, after: dict, tokens: tuple[int, ...]) -> str:
    lines = ["| shape | dtype | routing | ranks | " + " | ".join(f"{t} tok" for t in tokens) + " |",
             "|" + "---|" * (4 + len(tokens))]
    for key in sorted({k[:4] for k in after}):
        cells = []
        for t in tokens:
            b, a = before.get((*key, t)), after.get((*key, t))
            cells.append(f"{b:.1f} -> {a:.1f} ({b / a:.2f}x)" if b and a else "")
        lines.append("| " + " | ".join(map(str, key)) + " | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def regression_check(before: dict, after: dict, tokens: tuple[int, ...],
                     tolerance: float) -> tuple[list[str], bool]:
    """One line per point at ``tokens``: after / before, and whether it is within
    ``1 + tolerance``. Returns the lines and whether every point passed."""
    lines, ok = [], True
    for key in sorted(k for k in after if k[4] in tokens and k in before):
        ratio = after[key] / before[key] if before[key] else float("inf")
        passed = ratio <= 1 + tolerance
        ok &= passed
        lines.append(f"{'ok  ' if passed else 'SLOW'} {' '.join(map(str, key[:4]))} "
                     f"{key[4]:>5} tok: {before[key]:9.1f} -> {after[key]:9.1f} us "
                     f"(after/before {ratio:.3f})")
    return lines, ok


def plot(before: dict, after: dict, out: Path, ylabel: str) -> None:
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
    axes[0][0].set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


# (metric, title, floor metric drawn beside it)
LATENCY_PANELS = (
    ("kernel_dispatch", "dispatch kernel (profiler)", "empty_kernel"),
    ("kernel_combine", "combine kernel (profiler)", "empty_kernel"),
    ("graph", "graph round trip (events)", "graph_floor"),
    ("graph_queued", "graph round trip (queued)", "graph_floor"),
)
# (metric, ep_size) -> target, us (tuning pass 2, benchmarks/NOTES.md)
LATENCY_TARGETS = {
    ("kernel_dispatch", 1): 5.0, ("kernel_combine", 1): 5.0,
    ("graph", 1): 11.0, ("graph_queued", 1): 11.0,
    ("graph", 8): 22.0, ("graph_queued", 8): 22.0,
}


def plot_latency(pairs: list[tuple[Path, Path]], out: Path, shape: str = "deepseek_v3",
                 dtype: str = "fp8", routing: str = "uniform", title: str = "before vs after"
                 ) -> None:
    """Rows: rank counts; columns: LATENCY_PANELS. Pair 1 thick, later pairs thin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [{m: (load_metric(b, m), load_metric(a, m)) for m in METRICS} for b, a in pairs]
    eps = sorted({k[3] for k in data[0]["graph"][1] if k[:3] == (shape, dtype, routing)})
    fig, axes = plt.subplots(len(eps), len(LATENCY_PANELS),
                             figsize=(4.0 * len(LATENCY_PANELS), 3.4 * len(eps)), squeeze=False)

    def series(d, ep):
        return sorted((k[4], v) for k, v in d.items() if k[:4] == (shape, dtype, routing, ep))

    for row, ep in enumerate(eps):
        for col, (metric, title, floor) in enumerate(LATENCY_PANELS):
            ax = axes[row][col]
            for i, pair in enumerate(data):
                before, after = pair[metric]
                lw, alpha, tag = (2.0, 1.0, "") if i == 0 else (0.9, 0.6, f" (pair {i + 1})")
                for d, color, name in ((before, "C3", "before"), (after, "C0", "after")):
                    pts = series(d, ep)
                    if pts:
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color=color,
                                lw=lw, alpha=alpha, marker="o", markersize=4 if i == 0 else 2,
                                label=name + tag)
                if i == 0:
                    pts = series(pair[floor][1], ep)
                    if pts:
                        ax.plot([p[0] for p in pts], [p[1] for p in pts],
                                ":" if floor == "empty_kernel" else "-.",
                                color="grey" if floor == "empty_kernel" else "black",
                                lw=1.5, label=("empty kernel" if floor == "empty_kernel"
                                               else "empty-kernel graph (queued)"))
            target = LATENCY_TARGETS.get((metric, ep))
            if target:
                ax.axhline(target, ls="--", color="C2", lw=1.2, label="target")
                ax.annotate(f"target {target:g} us", (0.98, target), xycoords=("axes fraction", "data"),
                            ha="right", va="bottom", fontsize=7, color="C2")
            ticks = sorted({k[4] for k in data[0][metric][1]})
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.set_title(f"{title}, {ep} rank{'s' if ep > 1 else ''}", fontsize=9)
            ax.set_xlabel("tokens per rank")
            ax.grid(True, which="both", alpha=0.3)
        axes[row][0].set_ylabel("us (median)")
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles), fontsize=8)
    fig.suptitle(f"{shape} {dtype} {routing}: {title}"
                 + ("; thin lines: second pair of the same session" if len(pairs) > 1 else ""),
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--tokens", default="1,32,128,256,1024,4096")
    p.add_argument("--metrics", default=",".join(METRICS))
    p.add_argument("--check-tokens", default="128,1024,4096",
                   help="points of the regression check (empty: none)")
    p.add_argument("--check-metric", default="graph_queued",
                   help="metric of the regression check (falls back to graph if absent)")
    p.add_argument("--tolerance", type=float, default=0.03)
    p.add_argument("--png", type=Path, default=None)
    p.add_argument("--png-metric", default="graph")
    p.add_argument("--latency-png", type=Path, default=None,
                   help="decode-latency panels (kernel, graph events, graph queued; targets, floors)")
    p.add_argument("--title", default="before vs after", help="--latency-png's title")
    p.add_argument("--extra-pair", nargs=2, type=Path, action="append", default=[],
                   metavar=("BEFORE", "AFTER"), help="further before/after pair for --latency-png")
    args = p.parse_args(argv)
    tokens = tuple(int(t) for t in args.tokens.split(","))
    for metric in args.metrics.split(","):
        before, after = load_metric(args.before, metric), load_metric(args.after, metric)
        if not before or not after:
            print(f"## {metric}: not in both files\n")
            continue
        op, mode, field = METRICS[metric]
        print(f"## {metric} ({op}, {mode}, {field}; before -> after, us)\n")
        print(table(before, after, tokens) + "\n")
    ok = True
    check_tokens = tuple(int(t) for t in args.check_tokens.split(",") if t)
    if check_tokens:
        metric = args.check_metric
        before, after = load_metric(args.before, metric), load_metric(args.after, metric)
        if not before or not after:
            metric = "graph"
            before, after = load_metric(args.before, metric), load_metric(args.after, metric)
        lines, ok = regression_check(before, after, check_tokens, args.tolerance)
        print(f"## regression check ({metric}, after/before <= {1 + args.tolerance:.2f})\n")
        print("\n".join(lines) or "(no common points)")
        print(f"\nregression check: {'PASS' if ok else 'FAIL'}")
    if args.png:
        plot(load_metric(args.before, args.png_metric), load_metric(args.after, args.png_metric),
             args.png, f"{args.png_metric} (us)")
    if args.latency_png:
        plot_latency([(args.before, args.after), *[tuple(p) for p in args.extra_pair]],
                     args.latency_png, title=args.title)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
