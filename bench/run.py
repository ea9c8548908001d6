#!/usr/bin/env python3
"""Switchboard benchmark suite: direct-to-backend, Switchboard, HAProxy (mode tcp) and nginx stream, side by
side on this machine, interleaved over several repetitions, reported as medians and ratios.

    python3 bench/run.py            # full run: 3 repetitions
    python3 bench/run.py --quick    # one short repetition, under 3 minutes
    python3 bench/run.py --scenario pydirector   # 1, 2, 4 CPU-bound backends behind two nodes, to saturation
    python3 bench/run.py --scenario skew         # skewed load: balance per algorithm, counts shared or not
    python3 bench/run.py --scenario paired --before DIR [--rounds N]   # this build against DIR's, wrk rounds
                                                 # alternating, then instructions per request (callgrind)
    python3 bench/run.py --scenario replicas [--quick]   # registration -> frontend open through etcd vs in memory
    python3 bench/run.py --scenario tasks [--quick] [--cpu real]   # CPU tasks on four backends, one hogged: completion
                                                 # times with round robin, least connections, least_load
    python3 bench/run.py --scenario control-plane [--quick]   # the controller at scale: 1,000 services x 10
                                                 # backends to 100 simulated nodes (quick: 200 x 10 to 20)
    python3 bench/run.py --scenario upgrade [--quick]   # three upgrades under load: Switchboard --takeover,
                                                 # HAProxy master-worker reload, nginx reload; errors and gaps

Everything runs on 127.0.0.0/8 and every run is bounded in time. Missing peers and tools (haproxy, nginx
with the stream module, wrk, iperf3) are installed from Debian. Results go to bench/results/ (JSON and SVG)
and the tables are printed as Markdown for BENCHMARKS.md.
"""

# The suite itself is the package bench/suite/, one module per scenario and per concern; this file is its
# entry point, and its docstring the --help text.
from suite.cli import main

if __name__ == "__main__":
    main(__doc__)
