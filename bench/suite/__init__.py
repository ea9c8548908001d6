"""Switchboard's benchmark suite, run by `python3 bench/run.py` (the entry point, whose docstring is the
--help text). One module per concern, none importing a module that imports it:

- `host`: the repository's paths, logging, bounded commands, installing the peers, building, the machine.
- `processes`: starting processes and reading their READY lines, stopping them, waiting for ports,
  interleaved repetitions, CPU and memory of a process tree.
- `peers`: the suite's loopback address plan and the launchers of the backends, Switchboard, HAProxy and
  nginx `stream`.
- `load`: the load drivers (wrk, iperf3, loadgen).
- `report`: percentiles, the suite's medians and ratios, its Markdown tables.
- `plot`: the SVG charts.
- one module per scenario: `compare` (`--scenario suite`, the default), `pydirector`, `skew`,
  `control_plane`, `paired`, `replicas`, `tasks`, `upgrade`.
- `cli`: the options and the dispatch to a scenario.
"""
