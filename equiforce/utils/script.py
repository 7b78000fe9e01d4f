"""Benchmark scripts end as the CLI's commands do: an equiforce error, a bad value or an unreadable path is one
``error:`` line and exit status 2, not a traceback (``if __name__ == "__main__": run_script(main)``)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn


def run_script(main: Callable[[], Any]) -> NoReturn:
    from pydantic import ValidationError

    from equiforce.errors import EquiforceError

    try:
        status = main()
    except EquiforceError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)
    except ValidationError as err:  # a settings object built from the options
        from equiforce.train.config import format_validation_error

        print(f"error: {format_validation_error(err, Path(sys.argv[0]).name)}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:  # a file or directory that cannot be read or written
        where = f": {err.filename}" if err.filename else ""
        print(f"error: {err.strerror or err}{where}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(status if isinstance(status, int) else 0)
