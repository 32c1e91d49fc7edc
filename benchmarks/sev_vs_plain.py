"""Page throughput of ``sev`` on ``emu`` (MH page path, and the PSP strategy) next to ``plain``.

Each variant migrates the same guest whose memory is all written (the
``fill`` workload: every page written once, then the guest halts), so the
first pass moves every page and later passes find nothing.  The variants
run in turn, in a rotating order, several times in one process tree; the
medians and the median of per-round ratios to ``plain`` are reported.
Figures as in :mod:`run_report`: ``rate`` is the report's own (bytes over
the time pages moved), ``wall`` is over the wall time of the moving phases.

The PSP strategy moves pages through the emulated PSP, whose cost model is
an assumption; its parameters are printed with the figures.

    .venv/bin/python benchmarks/sev_vs_plain.py --memory 1G --repetitions 5
    .venv/bin/python benchmarks/sev_vs_plain.py --variants plain sev sev-psp --mh-queues 2
"""

from __future__ import annotations

import argparse
import statistics

from run_report import migrate


def variant_options(name: str, args: argparse.Namespace) -> list[str]:
    """``vmmig run`` options of one variant."""
    common = ["--platform", "emu", "--memory", args.memory, "--workload", "fill"]
    if name == "plain":
        return ["--tech", "plain", *common]
    mh = ["--mh-queues", str(args.mh_queues)]
    if name == "sev":
        return ["--tech", "sev", *common, *mh]
    return ["--tech", "sev", "--strategy", "psp", "--psp-latency", str(args.psp_latency),
            "--psp-rate", args.psp_rate, *common]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory", default="1G")
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=["plain", "sev"],
                        choices=["plain", "sev", "sev-psp"])
    parser.add_argument("--mh-queues", type=int, default=2)
    parser.add_argument("--psp-latency", type=float, default=15.0, help="microseconds")
    parser.add_argument("--psp-rate", default="50M", help="bytes per second")
    args = parser.parse_args()
    variants = ["plain", *[v for v in args.variants if v != "plain"]]
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    for rep in range(args.repetitions):
        # Rotate who goes first, so drift on a shared machine hits every variant.
        order = variants[rep % len(variants):] + variants[:rep % len(variants)]
        for name in order:
            runs[name].append(migrate(variant_options(name, args), name))
        print(f"round {rep + 1}: " + "  ".join(
            f"{v} {runs[v][-1]['rate']:.2f}/{runs[v][-1]['wall']:.2f} GB/s "
            f"(downtime {runs[v][-1]['downtime']:.0f} ms, total {runs[v][-1]['total']:.1f} s)"
            for v in variants), flush=True)
    print(f"\n{args.memory} fill guest, {args.repetitions} rounds; medians (rate / wall):")
    if "sev-psp" in variants:
        print(f"  PSP model: {args.psp_latency:g} us per command, {args.psp_rate}B/s "
              "(assumptions)")
    for name in variants:
        line = f"  {name:8} " + "  ".join(
            f"{figure} {statistics.median(f[figure] for f in runs[name]):.2f} GB/s"
            for figure in ("rate", "wall"))
        if name != "plain":
            pairs = list(zip(runs[name], runs["plain"], strict=True))
            line += "  of plain: " + "  ".join(
                f"{figure} {statistics.median(v[figure] / p[figure] for v, p in pairs):.2f}"
                for figure in ("rate", "wall"))
        print(line)


if __name__ == "__main__":
    main()
