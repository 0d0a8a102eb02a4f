"""What both data-tool CLIs share: the progress bar and the exit codes for errors and signals.

Exit codes: 0 done, 2 bad input (one-paragraph message naming the file and the fix, never a
traceback), 130 interrupted by Ctrl-C, 143 stopped by SIGTERM. An interrupted or failed run writes
nothing (see :mod:`data_tools.run_output`): the previous output of the prefix stays as it was.
"""

from __future__ import annotations

import signal
import sys
import time
from typing import Callable, Optional

from longcat_megatron.errors import UserInputError


class Terminated(BaseException):
    """Raised in the main thread when SIGTERM arrives, so cleanup (``finally``) runs."""


def _on_sigterm(signum, frame):
    raise Terminated()


def run_tool(body: Callable[[], str]) -> int:
    """Run ``body`` (returns the text to print) and map errors and signals to exit codes."""
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        text = body()
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # writing outputs: disk full, permissions, ...
        where = f" '{exc.filename}'" if exc.filename else ""
        print(f"error: cannot write{where}: {exc.strerror or exc}. Free space or fix permissions and re-run; "
              "nothing was written (the previous output, if any, is unchanged).", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C): nothing was written; the previous output, if any, is unchanged",
              file=sys.stderr)
        return 130
    except Terminated:
        print("stopped by SIGTERM: nothing was written; the previous output, if any, is unchanged",
              file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(text)
    return 0


class Progress:
    """A tqdm bar over input bytes (None total for gzip/pipes) with a rate postfix, or nothing."""

    def __init__(self, enabled: bool, total: Optional[int], desc: str):
        self._bar = None
        self._start = time.monotonic()
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total or None, unit="B", unit_scale=True, desc=desc, file=sys.stderr,
                             dynamic_ncols=True)

    def update(self, nbytes: int, **rates: float) -> None:
        if self._bar is None:
            return
        elapsed = max(time.monotonic() - self._start, 1e-9)
        self._bar.update(nbytes)
        self._bar.set_postfix_str(" ".join(f"{k}/s={v / elapsed:,.0f}" for k, v in rates.items()), refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
