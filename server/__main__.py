"""`python -m dualcast` and the `dualcast` command's entry point.

It imports nothing but the command itself, inside the interrupt guard: the command's
modules take a good part of a second to import, and a Ctrl-C then ended in a
traceback from the middle of some import instead of a quiet exit 130.
"""

from __future__ import annotations

#: 128 + SIGINT, as a shell reports a command stopped by Ctrl-C (cli.INTERRUPTED too).
INTERRUPTED = 130


def main() -> int:
    try:
        from dualcast.cli import main as command
    except KeyboardInterrupt:
        return INTERRUPTED
    return command()


if __name__ == "__main__":
    raise SystemExit(main())
