"""Messages for the terminal. User text (paths, prompts, model and run names) goes into them as plain text: a
``[/]`` or ``[red]`` in it is printed as typed, never read as rich markup."""

from __future__ import annotations

from rich.text import Text


def message(text: str, label: str = "", style: str = "yellow") -> Text:
    """``text`` as plain rich Text (print it with ``console.print``), after an optional ``label`` such as
    ``"warning:"`` shown in ``style``."""
    if not label:
        return Text(text)
    return Text.assemble((label, style), " ", text)


class StageProgress:
    """One progress view for a job of several steps (``with StageProgress(...) as view``): a line for the whole job
    (steps done, elapsed time) and a line for the step at work (its stage, what it works on, images done of its
    total, images/s, ETA). A disabled view (``enabled=False``) draws nothing."""

    def __init__(self, console, steps: int, *, title: str = "audit", enabled: bool = True):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(TextColumn("[bold]{task.fields[stage]:<8}"), TextColumn("{task.description}"),
                                 BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                                 TimeElapsedColumn(), TextColumn("{task.fields[eta]}"), TimeRemainingColumn(),
                                 console=console, disable=not enabled, transient=False)
        self.job = self.progress.add_task(f"{steps} steps", total=steps, stage=title, rate="", eta="")
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
        self.task = progress.add_task(self.what, total=self.total, stage=self.stage, rate="", eta="eta")

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
