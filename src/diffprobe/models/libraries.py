"""What diffusers and transformers print while a model loads.

By default their log lines, progress bars ("Loading pipeline components", "Loading weights") and Python warnings
are held back while a checkpoint loads, so the user sees diffprobe's own output only. Log records and warnings
that say something about the checkpoint are said again afterwards, once each, through the ``diffprobe`` logger;
notices that concern the libraries themselves (a missing optional backend, a deprecated argument) are dropped.
``diffprobe --verbose`` (or :func:`set_verbose`) leaves the libraries' own output on.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger("diffprobe")

_verbose = False

# Library notices with nothing to act on for a diffprobe user.
_NOISE = re.compile(
    r"requires torchvision|falling back to `\w+Pil`"  # image processors of components diffprobe does not use
    r"|is deprecated|will be removed|deprecat"  # the libraries' API changes, not the user's concern
    r"|are not expected by|are not expected and will be ignored|will be ignored"  # unused config keys
    r"|safety checker"  # diffprobe loads SD without the safety checker on purpose
    r"|No LoRA keys associated to",  # a LoRA of the denoiser only, loaded into a pipeline with text encoders
    re.IGNORECASE,
)


def set_verbose(verbose: bool) -> None:
    """Let diffusers and transformers print their own logs, progress bars and warnings (``--verbose``)."""
    global _verbose
    _verbose = verbose


def is_verbose() -> bool:
    return _verbose


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name.split('.')[0]}: {record.getMessage()}")


@contextmanager
def quiet_libraries(what: str) -> Iterator[None]:
    """Hold back diffusers/transformers output inside the block; afterwards re-say what matters about ``what``."""
    if _verbose:
        yield
        return
    import huggingface_hub.utils as hub_utils
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = (diffusers_logging, transformers_logging)
    bars_on = [lib.is_progress_bar_enabled() for lib in libraries]
    hub_bars_off = hub_utils.are_progress_bars_disabled()
    collect = _Collect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for lib in libraries:
            lib.disable_progress_bar()
            lib.disable_default_handler()
            lib.get_logger().addHandler(collect)
        try:
            yield
        finally:
            for lib, was_on in zip(libraries, bars_on, strict=True):
                lib.get_logger().removeHandler(collect)
                lib.enable_default_handler()
                if was_on:
                    lib.enable_progress_bar()
            if hub_bars_off:  # transformers switches the hub's download bars along with its own
                hub_utils.disable_progress_bars()
    said: set[str] = set()
    notes = collect.messages + [
        f"{w.category.__name__}: {w.message}" for w in caught if not issubclass(w.category, DeprecationWarning)
        and not issubclass(w.category, FutureWarning)
    ]
    for note in notes:
        first = note.strip().splitlines()[0] if note.strip() else ""
        if first and first not in said and not _NOISE.search(first):
            said.add(first)
            logger.warning("warning while loading %s: %s", what, first)
