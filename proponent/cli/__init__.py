"""The ``proponent`` command line.

Commands are registered by role: :mod:`proponent.cli.build` (train, index, verify),
:mod:`proponent.cli.query` (influence, self-influence, serve) and :mod:`proponent.cli.analysis`
(classical, factors, report). Every command exits non-zero with one line
``proponent: error: ...`` on bad input.
"""

from __future__ import annotations

import argparse
import sys

from proponent.cli import analysis, build, query


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="proponent", description="Training-data attribution for VAEs (VAE-TracIn).")
    sub = p.add_subparsers(dest="command", required=True)
    build.register(sub)
    query.register(sub)
    analysis.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        return int(a.func(a) or 0)
    except KeyboardInterrupt:
        print("proponent: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, KeyError, OSError) as e:
        text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        msg = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        print(f"proponent: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
