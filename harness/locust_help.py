"""`python -m harness.locust_help`: Locust's `--help` with the `--llm-*` options in it.

Locust 2.47 prints `locust -f FILE --help` before it imports FILE, so the options a
locustfile's plugin adds (ours, through `init_command_line_parser`) never appear there.
This builds the parser Locust builds after the import, with the plugin loaded, and prints
its help: the same options, defaults and help text a run parses.
"""
from __future__ import annotations

import sys


def main() -> int:
    import harness.plugin  # noqa: F401  (registers the option listeners)
    from locust.argument_parser import get_parser

    parser = get_parser()
    parser.prog = "locust -f locustfiles/chat.py"
    parser.print_help(sys.stdout)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
