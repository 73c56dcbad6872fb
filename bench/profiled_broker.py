"""`compute-broker` with a cProfile switch: SIGUSR1 starts profiling, SIGUSR2 stops and writes
the stats to the file named first on the command line, so start-up is left out.

    python bench/profiled_broker.py STATS_FILE serve --config FILE ...

Used by bench/request_profile.py (`--tool cprofile`).
"""

from __future__ import annotations

import cProfile
import signal
import sys
from typing import Any

from broker.cli import main

if __name__ == "__main__":
    profiler = cProfile.Profile()
    stats_file = sys.argv[1]

    def start(*_: Any) -> None:
        profiler.enable()

    def stop(*_: Any) -> None:
        profiler.disable()
        profiler.dump_stats(stats_file)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    sys.exit(main(sys.argv[2:]))
