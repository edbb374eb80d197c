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
