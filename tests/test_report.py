"""The report without a browser: hostile text renders escaped, grids of large runs are sampled and say so, a single
run reports without comparisons, and Holm / McNemar give hand-computed values."""

from __future__ import annotations

import html as htmllib
import re

import pytest
from PIL import Image
from report_helpers import HOSTILE, hand_made_report

from diffprobe.errors import InputError


def test_hostile_text_renders_as_text(tmp_path):
    from diffprobe.report import render

    index = render(hand_made_report(tmp_path / "data"), tmp_path / "report")
    page = index.read_text(encoding="utf-8")
    assert "<script" not in page  # no script element at all: every <script> of the input is escaped
    assert not re.search(r"<img[^>]*onerror", page)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in page
    assert "{{ 7 * 7 }}" in page  # user text is never read as a template
    long = HOSTILE[-1]
    assert htmllib.escape(long, quote=False) in page  # the 10,000-character prompt, whole, in its <details>
    assert page.count('class="prompt"') == len(HOSTILE)
    # every <img> points at a file of the report folder
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert sources and all((index.parent / s).is_file() for s in sources)
    assert {"plots/scs_distribution.png", "plots/scs_paired.png", "plots/accuracy.png"} <= set(sources)


def test_best_values_and_differences_in_the_summary_table(tmp_path):
    from diffprobe.report.build import summary_table
    from diffprobe.report.data import measures

    report = hand_made_report(tmp_path)
    table = summary_table(report, {a.label: measures(a) for a in report.arms})
    assert [c["title"] for c in table["columns"]] == ["SCS", "accuracy all (%)", "accuracy <i>count</i> (%)"]
    base, arm = table["rows"]
    # SCS means: 60 + mean(0..5) = 62.5 (baseline) and 65.5 (arm); the arm is best
    assert (base["cells"][0]["value"], arm["cells"][0]["value"]) == ("62.50", "65.50")
    assert arm["cells"][0]["best"] and not base["cells"][0]["best"]
    assert arm["cells"][0]["diff"] == "+3.00" and arm["cells"][0]["p"] == "p=0.03, Holm 0.03"
    assert not base["cells"][1]["best"] and not arm["cells"][1]["best"]  # a tie has no best
    assert arm["cells"][2]["value"] == "50.0" and arm["cells"][2]["best"]


def _run_with(tmp_path, n_prompts: int, n_seeds: int):
    """A run store filled directly (no model): tiny images of n_prompts x n_seeds."""
    from diffprobe.spec import RunSpec
    from diffprobe.store import NewSample, create_run

    prompts = [f"prompt {i}" for i in range(n_prompts)]
    spec = RunSpec(prompts=prompts, seeds=list(range(n_seeds)))
    store = create_run(tmp_path / "run", spec)
    items = [NewSample(key=f"{p}|{s}", prompt=p, seed=s, image=Image.new("RGB", (8, 8), (i % 256, s * 20, 0)),
                       guidance={"name": "cfg", "scale": 7.5}, provenance={"versions": {"torch": "x"}})
             for i, p in enumerate(prompts) for s in range(n_seeds)]
    store.add(items)
    store.close()
    return tmp_path / "run"


def test_a_large_run_is_sampled_and_says_so(tmp_path):
    from diffprobe.report import build_report

    run = _run_with(tmp_path, 60, 6)
    index = build_report(run, max_prompts=5, max_seeds=4)
    page = index.read_text(encoding="utf-8")
    assert "Showing 5 of 60 prompts (evenly spaced in run order) and 4 of 6 seeds per prompt" in page
    shown = re.findall(r"<h3>(prompt \d+)</h3>", page)
    assert shown == ["prompt 0", "prompt 15", "prompt 30", "prompt 44", "prompt 59"]
    assert len(list((index.parent / "thumbs").glob("*.jpg"))) == 20
    assert "No scores yet" in page and 'id="comparisons"' not in page  # a single run, not scored


def test_spread_is_even_and_keeps_both_ends():
    from diffprobe.report.build import spread

    assert spread(list(range(10)), 4) == [0, 3, 6, 9]
    assert spread([1, 2], 5) == [1, 2]
    assert spread(list(range(7)), 1) == [0]


def test_report_of_something_that_is_no_run(tmp_path):
    from diffprobe.report import build_report

    with pytest.raises(InputError, match="is not a run directory"):
        build_report(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        build_report(tmp_path / "nothing")


def test_holm_by_hand():
    from diffprobe.metrics.stats import holm

    # sorted 0.01, 0.02, 0.04 -> 3*0.01, max(0.03, 2*0.02), max(0.04, 1*0.04)
    assert holm([0.04, 0.01, None, 0.02]) == pytest.approx([0.04, 0.03, None, 0.04])
    assert holm([0.6, 0.5]) == [1.0, 1.0]
    assert holm([]) == []


def test_mcnemar_by_hand():
    from diffprobe.metrics.stats import mcnemar

    # 5 pairs only B right, 1 only A right: two-sided exact p = 2 * (C(6,0) + C(6,1)) / 2^6 = 14/64
    a = [False] * 5 + [True] + [True, False]
    b = [True] * 5 + [False] + [True, False]
    result = mcnemar(a, b)
    assert (result["b_only_correct"], result["a_only_correct"]) == (5, 1)
    assert result["p"] == pytest.approx(14 / 64)
    assert mcnemar([True, False], [True, False])["p"] == 1.0
    with pytest.raises(InputError):
        mcnemar([True], [True, False])


def test_an_arm_with_some_of_the_prompts_is_not_best_over_all_prompts(tmp_path):
    from diffprobe.report.build import summary_table
    from diffprobe.report.data import measures

    report = hand_made_report(tmp_path)
    arm = report.arms[1]  # the arm with the higher SCS, now holding half of the prompts (as a mined arm would)
    arm.prompts = arm.prompts[:3]
    arm.images = {k: v for k, v in arm.images.items() if k[0] in arm.prompts}
    arm.scores["scs"]["per_prompt"] = arm.scores["scs"]["per_prompt"][:3]
    table = summary_table(report, {a.label: measures(a) for a in report.arms})
    base, partial = table["rows"]
    assert partial["coverage"] == "3 of 6 prompts" and base["coverage"] == ""
    assert partial["cells"][0]["value"] == "64.00"  # 63 + mean(0, 1, 2): higher than the baseline's 62.50 ...
    assert not partial["cells"][0]["best"] and not base["cells"][0]["best"]  # ... but over other prompts
    assert partial["cells"][2]["best"]  # a category's accuracy stays comparable
