"""Page throughput of ``sev`` on ``emu`` (MH page path, and the PSP strategy) next to ``plain``,
and the downtime of ``sev-es`` next to ``sev``.

Each variant migrates the same guest whose memory is all written (the
``fill`` workload: every page written once, then the guest halts), so the
first pass moves every page and later passes find nothing.  The variants
run in turn, in a rotating order, several times in one process tree; the
medians and the median of per-round ratios to ``plain`` are reported.
Figures as in :mod:`run_report`: ``rate`` is the report's own (bytes over
the time pages moved), ``wall`` is over the wall time of the moving phases.

The PSP strategy moves pages through the emulated PSP, whose cost model is
an assumption; its parameters are printed with the figures.  With
``sev-es`` among the variants, the medians of downtime (and its parts) are
printed too, with the median of per-round ratios sev-es / sev.

    .venv/bin/python benchmarks/sev_vs_plain.py --memory 1G --repetitions 5
    .venv/bin/python benchmarks/sev_vs_plain.py --variants plain sev sev-psp --mh-queues 2
    .venv/bin/python benchmarks/sev_vs_plain.py --variants sev sev-es --workload dirty:64M --vcpus 4
"""

from __future__ import annotations

import argparse
import statistics

from run_report import migrate


def variant_options(name: str, args: argparse.Namespace) -> list[str]:
    """``vmmig run`` options of one variant."""
    common = ["--platform", "emu", "--memory", args.memory, "--workload", args.workload,
              "--vcpus", str(args.vcpus)]
    if name == "plain":
        return ["--tech", "plain", *common]
    mh = ["--mh-queues", str(args.mh_queues)]
    if name in ("sev", "sev-es"):
        return ["--tech", name, *common, *mh]
    return ["--tech", "sev", "--strategy", "psp", "--psp-latency", str(args.psp_latency),
            "--psp-rate", args.psp_rate, *common]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory", default="1G")
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=["plain", "sev"],
                        choices=["plain", "sev", "sev-psp", "sev-es"])
    parser.add_argument("--workload", default="fill")
    parser.add_argument("--vcpus", type=int, default=1)
    parser.add_argument("--mh-queues", type=int, default=2)
    parser.add_argument("--psp-latency", type=float, default=15.0, help="microseconds")
    parser.add_argument("--psp-rate", default="50M", help="bytes per second")
    args = parser.parse_args()
    variants = list(dict.fromkeys(args.variants))
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
    print(f"\n{args.memory} {args.workload} guest, {args.vcpus} vCPUs, {args.repetitions} "
          "rounds; medians (rate / wall):")
    if "sev-psp" in variants:
        print(f"  PSP model: {args.psp_latency:g} us per command, {args.psp_rate}B/s "
              "(assumptions)")
    for name in variants:
        line = f"  {name:8} " + "  ".join(
            f"{figure} {statistics.median(f[figure] for f in runs[name]):.2f} GB/s"
            for figure in ("rate", "wall"))
        if name != "plain" and "plain" in runs:
            pairs = list(zip(runs[name], runs["plain"], strict=True))
            line += "  of plain: " + "  ".join(
                f"{figure} {statistics.median(v[figure] / p[figure] for v, p in pairs):.2f}"
                for figure in ("rate", "wall"))
        print(line)
    if "sev-es" in runs and "sev" in runs:
        for name in ("sev", "sev-es"):
            print(f"  {name:8} downtime {statistics.median(f['downtime'] for f in runs[name]):.0f}"
                  " ms")
        ratio = statistics.median(es["downtime"] / max(sev["downtime"], 1) for es, sev
                                  in zip(runs["sev-es"], runs["sev"], strict=True))
        print(f"  downtime sev-es / sev: {ratio:.2f} (median of per-round ratios)")


if __name__ == "__main__":
    main()
