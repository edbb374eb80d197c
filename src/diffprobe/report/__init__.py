"""The HTML report of a run or an audit: a self-contained folder (index.html, thumbs/, plots/) that opens from
``file://`` with no server and no network."""

from .build import build_report, load, render
from .data import Arm, gather_run, measures

__all__ = ["Arm", "build_report", "gather_run", "load", "measures", "render"]
