"""Server CPU per request for scripts/perf_analyzer.sh and scripts/transport_gap.sh.

perf_analyzer.sh writes, beside each cell's CSV, a `.cpu` file: the server's
CPU clock ticks over the run, ticks per second, and the run's start and end
(wall seconds). CPU per request is the server's CPU share over the run
divided by perf_analyzer's stable rate (its warm-up windows run at the same
rate)."""


def cpu_us(path, tput):
    """Server CPU µs per request for the cell whose `.cpu` file is `path`."""
    try:
        with open(path) as f:
            ticks, hz, w0, w1 = f.read().split()
        return float(ticks) / float(hz) / (float(w1) - float(w0)) * 1e6 / tput
    except (OSError, ValueError, ZeroDivisionError):
        return float("nan")
