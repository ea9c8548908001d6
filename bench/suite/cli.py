"""The command line: options, the scenario each `--scenario` runs and how its result is printed, the
results written to bench/results/ (JSON, and SVG for the suite and skew)."""

import argparse
import json
import time

from .compare import suite
from .control_plane import control_plane, cp_markdown
from .host import RESULTS
from .paired import paired, paired_markdown
from .plot import svg_bars, svg_skew
from .processes import raise_nofile
from .pydirector import pydirector
from .replicas import replicas, replicas_markdown
from .report import markdown
from .skew import skew
from .tasks import tasks, tasks_markdown
from .upgrade import upgrade, upgrade_markdown


def main(description):
    """Parses the command line (`description` is its --help text), runs the scenario chosen, writes its
    results to bench/results/ and prints its table."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one short repetition (under 3 minutes)")
    parser.add_argument("--reps", type=int, help="repetitions of the suite (default 3; 1 with --quick)")
    parser.add_argument("--levers", action="store_true",
                        help="also run Switchboard with one lever off each (--workers 1, --splice-pipes 0)")
    parser.add_argument("--before", metavar="DIR",
                        help="with --levers: a directory with an earlier build's controller and agent, run as switchboard-before")
    parser.add_argument("--variants", metavar="NAMES",
                        help="with --levers: only these lever variants, comma-separated ('' for none: just --before)")
    parser.add_argument("--scenario", choices=["suite", "pydirector", "skew", "control-plane", "paired", "replicas", "tasks",
                                                   "upgrade"],
                        default="suite")
    parser.add_argument("--rounds", type=int, default=10, help="paired: wrk rounds per build and kind")
    parser.add_argument("--cpu", choices=["emulated", "real"], default="emulated",
                        help="tasks: backends with an emulated core each (default), or burning this machine's CPU")
    for key in ("services", "backends", "nodes", "changes"):
        parser.add_argument(f"--{key}", type=int, help=f"control-plane: {key} (overrides the size of the run)")
    args = parser.parse_args()
    raise_nofile()
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    as_json = lambda result: json.dumps(result, indent=2)
    scenarios = {"skew": (skew, as_json), "control-plane": (control_plane, cp_markdown),
                 "replicas": (replicas, replicas_markdown), "paired": (paired, paired_markdown),
                 "pydirector": (pydirector, as_json), "tasks": (tasks, tasks_markdown),
                 "upgrade": (upgrade, upgrade_markdown)}
    if args.scenario in scenarios:
        run_scenario, render = scenarios[args.scenario]
        result = run_scenario(args)
        (RESULTS / f"{args.scenario}-{stamp}.json").write_text(json.dumps(result, indent=2))
        if args.scenario == "skew":
            svg_skew(result, RESULTS / "skew.svg")
        print(render(result))
        return
    results = suite(args)
    (RESULTS / f"suite-{stamp}.json").write_text(json.dumps(results, indent=2))
    svg_bars(results, RESULTS / "ratios.svg")
    print(markdown(results))
