"""What every command-line entry point shares: logging to stderr and one-line errors.

A CaptionerError (something the user can fix) is printed as `error: ...` with exit status 2, never as
a traceback; Ctrl-C exits with 130.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from captioner.errors import CaptionerError


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(message)s", stream=sys.stderr)


def run_main(main: Callable[[], int | None]) -> None:
    try:
        code = main()
    except CaptionerError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
