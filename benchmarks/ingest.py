"""Ingest throughput: PETS09-S2L1 (MOT ground truth, 480x360 video) -> person crops.

Prints crops per second and peak memory. Usage: .venv/bin/python benchmarks/ingest.py [--every N]
"""
from __future__ import annotations

import argparse
import time

from _common import isolate, peak_rss_mb

isolate("ingest")

from core.data import store  # noqa: E402
from core.config import shared_data  # noqa: E402
from core.services.ingest import ingest  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--every", type=int, default=1, help="keep every Nth frame of each track")
    a = ap.parse_args()
    seq = shared_data() / "mot" / "PETS09-S2L1"
    if not seq.exists():
        raise SystemExit(f"real data not available: {seq}")
    store.get_dataset("bench", create=True)  # start the database outside the timing
    t0 = time.perf_counter()
    report = ingest(seq, "mot", "bench", every_n=a.every)
    dt = time.perf_counter() - t0
    print(f"PETS09-S2L1 every {a.every}: {report.added} crops, {report.videos} video sample, "
          f"{len(report.problems)} skipped in {dt:.1f} s")
    print(f"ingest rate: {report.added / dt:.0f} crops/s (decode + crop + conditions + JPEG + FiftyOne write)")
    print(f"peak memory: {peak_rss_mb():.0f} MB")
    store.delete_dataset("bench")


if __name__ == "__main__":
    main()
