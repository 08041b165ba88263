"""How our command-line entry points report a user's mistake: one line naming it, exit code 1,
no traceback around a message that already says what to do (issue 27). `SIGLIP2_TRACEBACK=1`
shows the full traceback. Only ValueError and FileNotFoundError, the errors our code raises
for bad input (paths, keys, values, mismatched checkpoints and tokenizers), are shortened;
anything else is a bug and keeps its traceback."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator

USER_ERRORS = (ValueError, FileNotFoundError)


@contextmanager
def user_errors(prog: str) -> Iterator[None]:
    """Within the block, a `USER_ERRORS` exception prints `<prog>: error: <message>` to stderr
    and exits with code 1 (`SystemExit`), unless SIGLIP2_TRACEBACK is set."""
    try:
        yield
    except Exception as e:
        err = _user_error(e)
        if err is None or os.environ.get("SIGLIP2_TRACEBACK"):
            raise
        print(f"{prog}: error: {err}\n(the full traceback: SIGLIP2_TRACEBACK=1)", file=sys.stderr)
        raise SystemExit(1) from None


def _user_error(e: BaseException) -> BaseException | None:
    """`e` if it is a user error, or the user error a config framework wrapped (Hydra's
    `instantiate` raises its own exception `from` the constructor's ValueError)."""
    if isinstance(e, USER_ERRORS):
        return e
    cause = e.__cause__
    if type(e).__module__.split(".")[0] in ("hydra", "omegaconf") and isinstance(cause, USER_ERRORS):
        return cause
    return None
