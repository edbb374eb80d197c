"""What the experiment scripts share: running a command the way a user does, timing resumable stages, and
writing the report with the settings it came from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def run(*argv: str) -> None:
    """One Python command line (``-m module ...``) in a subprocess, the way a user runs it; its output goes to ours."""
    print("$ " + " ".join(argv), flush=True)
    subprocess.run([sys.executable, *argv], check=True, env=os.environ.copy())


def cli(*argv: str) -> None:
    """One diffprobe command in a subprocess (the way a user runs it); its output goes to ours."""
    print("$ diffprobe " + " ".join(argv), flush=True)
    subprocess.run([sys.executable, "-m", "diffprobe.cli", *argv], check=True, env=os.environ.copy())


class Timer:
    """Wall seconds per stage, accumulated across resumed runs in OUT/timing.json."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def run(self, name: str, fn: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.data[name] = round(self.data.get(name, 0.0) + time.perf_counter() - t0, 1)
            self.path.write_text(json.dumps(self.data, indent=1) + "\n")


def write_report(out: Path, result: dict[str, Any], settings: Any, markdown: Any) -> str:
    """Add the script's arguments (``settings``, an argparse namespace) and the stage times to ``result``, write
    ``OUT/report.json`` and ``OUT/report.md`` (``markdown(result)``) and print the Markdown."""
    result["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(settings).items()}
    if (out / "timing.json").is_file():
        result["timing"] = json.loads((out / "timing.json").read_text())
    (out / "report.json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    (out / "report.md").write_text(text)
    print(text, flush=True)
    return text
