"""Page throughput of ``plain`` on ``emu`` (vmmig's engine) next to QEMU's own migration.

Both migrate a guest whose memory is all written (the ``fill`` workload:
every page written once, then the guest halts), so the first pass moves
every page in full and later passes find nothing: the figure is how fast
each moves pages.  The two runs alternate, in one process tree, several
times; medians and the median of per-pair ratios are reported.

Two figures per run, each over the same bytes (``ram.transferred``):

- ``rate``: the platform's own measure, bytes over transfer time without
  set-up (QEMU: ``mbps`` of ``query-migrate``, transferred over total - setup
  time; vmmig: over the rounds and stop-and-copy);
- ``wall``: bytes over vmmig's wall time of the moving phases
  (transferring-memory to transferring-cpu-state), set-up included (QEMU's
  ``migrate`` command; emu: the source agent process starting).

    .venv/bin/python benchmarks/throughput_emu_vs_qemu.py --memory 1G --repetitions 5
"""

from __future__ import annotations

import argparse
import statistics

from run_report import migrate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory", default="1G")
    parser.add_argument("--repetitions", type=int, default=5)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"qemu": [], "emu": []}
    for rep in range(args.repetitions):
        # Alternate who goes first, so drift on a shared machine hits both.
        order = ("qemu", "emu") if rep % 2 == 0 else ("emu", "qemu")
        for platform in order:
            runs[platform].append(migrate(
                ["--tech", "plain", "--platform", platform, "--memory", args.memory,
                 "--workload", "fill"], platform))
        pair = {p: runs[p][-1] for p in runs}
        print(f"run {rep + 1}: " + "  ".join(
            f"{p} rate {f['rate']:.2f} GB/s wall {f['wall']:.2f} GB/s "
            f"({f['transferred']:.2f} GB)" for p, f in pair.items()), flush=True)
    print(f"\n{args.memory} fill guest, {args.repetitions} alternating runs, medians:")
    for figure in ("rate", "wall"):
        medians = {p: statistics.median(f[figure] for f in runs[p]) for p in runs}
        ratio = statistics.median(e[figure] / q[figure]
                                  for e, q in zip(runs["emu"], runs["qemu"], strict=True))
        print(f"  {figure:4}: emu {medians['emu']:.2f} GB/s, qemu {medians['qemu']:.2f} GB/s, "
              f"emu/qemu {ratio:.2f}")


if __name__ == "__main__":
    main()
