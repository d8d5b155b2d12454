"""How an exception raised while serving becomes the error its callers see."""

from __future__ import annotations

import logging

import torch

from loramux.server.errors import InternalError, LoramuxError, OutOfMemory

log = logging.getLogger(__name__)


def as_domain_error(error: BaseException, what: str) -> LoramuxError:
    """Domain errors as they are, running out of memory as a retriable RESOURCE_EXHAUSTED,
    anything else as INTERNAL with a correlation id (logged with the traceback)."""
    if isinstance(error, LoramuxError):
        return error
    if isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error):
        log.error("%s: out of memory", what, exc_info=error)
        return OutOfMemory(
            f"the server ran out of memory for this batch ({what}); retry later or ask for fewer tokens",
            retry_after_s=1.0,
        )
    return InternalError.logged(error, what)
