"""Run every benchmark and update docs/benchmarks.md (`make bench`, i.e. `python -m benchmarks.run_all`)."""

from __future__ import annotations

from benchmarks import bench_synth

if __name__ == "__main__":
    bench_synth.main()
