"""The ``otlp-middleware`` command: a local OTLP receiver and viewers for pprof files.

    otlp-middleware receive [--host 127.0.0.1] [--port 4318] [--output-dir received]
    otlp-middleware top FILE [-n 20]
    otlp-middleware flamegraph FILE -o out.html

Each subcommand lives in its own module, imported only when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module, help)
_COMMANDS = {
    "receive": ("otlp_middleware._receiver", "run a local OTLP/HTTP profiles receiver"),
    "top": ("otlp_middleware._view", "print the top functions of a pprof file"),
    "flamegraph": ("otlp_middleware._view", "write a self-contained flame graph HTML page"),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="otlp-middleware", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in _COMMANDS.items():
        module = importlib.import_module(module_name)
        sp = sub.add_parser(name, help=help_text)
        getattr(module, f"add_{name}_arguments")(sp)
    args = parser.parse_args(argv)
    module = importlib.import_module(_COMMANDS[args.command][0])
    return int(getattr(module, f"run_{args.command}")(args))


if __name__ == "__main__":
    sys.exit(main())
