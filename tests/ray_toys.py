"""Toy workers for the Ray backend tests, in a module of their own so that Ray workers import nothing heavy."""

from __future__ import annotations

import os
from pathlib import Path


class Squares:
    """Squares each number of a batch; a number in ``die_on`` ends the worker's process (once per marker file,
    or every time when ``always``)."""

    def __init__(self, die_on: int | None = None, marker: str | None = None, always: bool = False,
                 setup_error: str | None = None):
        self.die_on, self.marker, self.always, self.setup_error = die_on, marker, always, setup_error

    def setup(self):
        if self.setup_error:
            raise RuntimeError(self.setup_error)
        return {"pid": os.getpid()}

    def run(self, batch):
        if self.die_on in batch and (self.always or not Path(self.marker).exists()):
            if self.marker:
                Path(self.marker).touch()
            os._exit(1)
        return [x * x for x in batch]
