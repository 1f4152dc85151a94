"""The `sparsebert` logger of the command line: messages to stdout (warnings and errors to stderr)
through tqdm, so that progress bars stay whole; --quiet shows warnings and errors only (and no
bars), --verbose adds debug messages."""
from __future__ import annotations

import logging
import sys

from tqdm.auto import tqdm

LOGGER = "sparsebert"


class TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            tqdm.write(self.format(record), file=stream)
        except Exception:
            self.handleError(record)


def configure(verbosity: int = 0) -> None:
    """verbosity: -1 quiet, 0 normal, 1 verbose."""
    logger = logging.getLogger(LOGGER)
    logger.handlers[:] = [TqdmHandler()]
    logger.handlers[0].setFormatter(logging.Formatter("%(message)s"))
    logger.setLevel({-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}[verbosity])
    logger.propagate = False


def bars_enabled() -> bool:
    """Progress bars follow the logger: hidden when it is quieter than INFO."""
    return logging.getLogger(LOGGER).getEffectiveLevel() <= logging.INFO
