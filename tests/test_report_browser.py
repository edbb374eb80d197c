"""The report in a real browser: headless Chromium (the system's, no browser download) driven by Playwright opens
index.html from file://; no console error, no request beyond file://, every image loaded, every plot present, and
hostile prompts show as text while nothing runs (no dialog, no script element). A screenshot is saved per run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from report_helpers import HOSTILE, hand_made_report

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, timeout=60_000)
        yield chromium
        chromium.close()


def open_report(browser, index: Path, screenshot: Path):
    """Load the page; returns (page, problems) where problems lists console errors, dialogs, page errors and
    requests that leave file://."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
    page.on("request",
            lambda r: None if r.url.startswith(("file://", "data:")) else problems.append(f"request {r.url}"))
    page.goto(index.resolve().as_uri(), wait_until="load", timeout=60_000)
    page.screenshot(path=str(screenshot), full_page=False)
    if keep := os.environ.get("DIFFPROBE_SCREENSHOTS"):  # a folder that outlives pytest's temporary ones
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, Path(keep) / screenshot.name)
    print(f"screenshot: {screenshot}")
    return page, problems


def _broken_images(page) -> list[str]:
    return page.evaluate("Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0))"
                         ".map(i => i.getAttribute('src'))")


def test_hostile_report_loads_cleanly_and_runs_nothing(browser, tmp_path):
    from diffprobe.report import render

    index = render(hand_made_report(tmp_path / "data"), tmp_path / "report")
    page, problems = open_report(browser, index, tmp_path / "hostile.png")
    assert problems == []
    assert page.evaluate("document.images.length") > 0 and _broken_images(page) == []
    plots = page.evaluate("Array.from(document.querySelectorAll('figure img')).map(i => i.getAttribute('src'))")
    assert plots == ["plots/scs_distribution.png", "plots/scs_paired.png", "plots/accuracy.png"]
    assert page.evaluate("document.scripts.length") == 0
    assert page.evaluate("document.querySelectorAll('[onerror]').length") == 0
    titles = page.locator("#grids h3").all_inner_texts()
    assert titles[:2] == HOSTILE[:2]  # shown as the text typed
    assert page.locator("#grids details pre").text_content() == HOSTILE[-1]  # all 10,000 characters
    assert page.locator("header h1").inner_text() == "<script>alert(7)</script> audit"
    page.close()


def test_a_real_run_report_loads_with_every_image(browser, tmp_path):
    from diffprobe.commands.judge import judge_run
    from diffprobe.generate import generate
    from diffprobe.report import build_report
    from diffprobe.spec import build_spec
    from diffprobe.store import open_run

    spec, items, _ = build_spec({"model": "shapes", "prompts": "shapes-eval", "seeds": "0-1",
                                 "sampler": {"steps": 2}, "guidance": {"name": "scfg", "params": {"scale": 3.5}}})
    items = items[:: len(items) // 4][:4]  # one prompt of each category
    spec = spec.model_copy(update={"prompts": [p.text for p in items]})
    generate(spec, tmp_path / "run", prompts=items, batch_size=8, progress=False)
    judge_run(tmp_path / "run", "shapes", progress=False)
    index = build_report(tmp_path / "run")
    page, problems = open_report(browser, index, tmp_path / "run.png")
    assert problems == []
    assert page.evaluate("document.images.length") == 8 + 2  # 4 prompts x 2 seeds, accuracy and guidance plots
    assert _broken_images(page) == []
    marks = page.evaluate("Array.from(document.querySelectorAll('.cell')).map(c => c.className)")
    assert len(marks) == 8 and all(m in ("cell right", "cell wrong") for m in marks)
    with open_run(tmp_path / "run") as store:
        assert {s.prompt for s in store.samples()} == set(page.locator("#grids h3").all_inner_texts())
    page.close()


def test_a_run_with_reliable_seeds_shows_the_heatmap(browser, tiny_reliable, tmp_path):
    from diffprobe.commands.judge import judge_run
    from diffprobe.generate import generate
    from diffprobe.report import build_report
    from diffprobe.spec import build_spec

    file, prompts = tiny_reliable
    spec, items, _ = build_spec({"model": "shapes", "prompts": str(prompts), "seeds": f"reliable:{file}:2",
                                 "sampler": {"steps": 2}, "guidance": {"name": "cfg", "params": {"scale": 3.5}}})
    generate(spec, tmp_path / "run", prompts=items, batch_size=8, progress=False)
    judge_run(tmp_path / "run", "shapes", progress=False)
    index = build_report(tmp_path / "run")
    page, problems = open_report(browser, index, tmp_path / "reliable.png")
    assert problems == []
    assert _broken_images(page) == []
    plots = page.evaluate("Array.from(document.querySelectorAll('figure img')).map(i => i.getAttribute('src'))")
    heatmaps = [p for p in plots if p.startswith("plots/reliability_")]
    assert len(heatmaps) == 1
    figure = page.locator(f'figure:has(img[src="{heatmaps[0]}"])')
    assert "Seed reliability: reliable_seeds.json" in figure.inner_text()
    assert page.evaluate(f"document.querySelector('img[src=\"{heatmaps[0]}\"]').naturalHeight") > 100
    figure.screenshot(path=str(tmp_path / "reliable-heatmap.png"))
    if keep := os.environ.get("DIFFPROBE_SCREENSHOTS"):
        shutil.copy(tmp_path / "reliable-heatmap.png", Path(keep) / "reliable-heatmap.png")
    # 2 prompts x their own 2 mined seeds: every image shown, each column named by its seed or index
    assert page.evaluate("document.querySelectorAll('#grids .cell').length") == 4
    page.close()
