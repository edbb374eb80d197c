"""Messages for the terminal. User text (paths, prompts, model and run names) goes into them as plain text: a
``[/]`` or ``[red]`` in it is printed as typed, never read as rich markup."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text


def message(text: str, label: str = "", style: str = "yellow") -> Text:
    """``text`` as plain rich Text (print it with ``console.print``), after an optional ``label`` such as
    ``"warning:"`` shown in ``style``."""
    if not label:
        return Text(text)
    return Text.assemble((label, style), " ", text)


@contextmanager
def resumable(console, kept: str, resume: str = "run the same command to resume") -> Iterator[None]:
    """Ctrl-C inside the block prints ``interrupted: <kept>; <resume>`` and exits 130 instead of a traceback. Use it
    around work whose finished part is stored (``kept`` says where) and that the same command continues."""
    try:
        yield
    except KeyboardInterrupt:
        console.print(message(f"interrupted: {kept}; {resume}"))
        sys.exit(130)


class EtaColumn(ProgressColumn):
    """``eta 0:01:23`` for a task whose ``eta`` field is true (from its rate); nothing for the others."""

    def render(self, task) -> Text:
        if not task.fields.get("eta") or task.finished:
            return Text("")
        left = task.time_remaining
        if left is None:
            return Text("eta -:--:--", style="progress.remaining")
        minutes, seconds = divmod(int(left), 60)
        hours, minutes = divmod(minutes, 60)
        return Text(f"eta {hours}:{minutes:02d}:{seconds:02d}", style="progress.remaining")


class StageProgress:
    """One progress view for a job of several steps (``with StageProgress(...) as view``): a line for the whole job
    (steps done, elapsed time) and a line for the step at work (its stage, what it works on, images done of its
    total, images/s, ETA). A disabled view (``enabled=False``) draws nothing."""

    def __init__(self, console, steps: int, *, title: str = "audit", enabled: bool = True):
        self.progress = Progress(TextColumn("[bold]{task.fields[stage]:<8}"), TextColumn("{task.description}"),
                                 BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                                 TimeElapsedColumn(), EtaColumn(), console=console, disable=not enabled,
                                 transient=False)
        # The job's line has no ETA: its steps (generating an arm, embedding it) differ too much in length.
        self.job = self.progress.add_task(f"{steps} steps", total=steps, stage=title, rate="", eta=False)
        self.enabled = enabled

    def __enter__(self) -> StageProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def skip(self, steps: int = 1) -> None:
        """Steps that will not run (a measure skipped for every arm)."""
        self.progress.advance(self.job, steps)

    def step(self, stage: str, what: str, total: int):
        """A context manager for one step; it yields the callable that counts images done."""
        return _Step(self, stage, what, total)


class _Step:
    def __init__(self, view: StageProgress, stage: str, what: str, total: int):
        self.view, self.stage, self.what, self.total = view, stage, what, total

    def __enter__(self):
        progress = self.view.progress
        self.task = progress.add_task(self.what, total=self.total, stage=self.stage, rate="", eta=True)

        def advance(n: int) -> None:
            progress.advance(self.task, n)
            task = progress.tasks[progress.task_ids.index(self.task)]
            if task.speed:
                progress.update(self.task, rate=f"{task.speed:.2f} images/s")

        return advance

    def __exit__(self, *exc) -> None:
        progress = self.view.progress
        progress.remove_task(self.task)
        if exc[0] is None:
            progress.advance(self.view.job, 1)
