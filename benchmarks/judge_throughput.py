"""Throughput of the VLM judge against the loopback oracle server (run in a separate process).

(a) 1,000 shapes-world images, the server waiting a fixed 50 ms before each answer (a stand-in for a model's
    latency): images/s at concurrency 1 and at concurrency 8, and their ratio. The server remembers its verdicts
    and an untimed pass fills that memory, so the timed passes measure latency, HTTP and our client, not the exact
    judge's CPU time (a real VLM server computes on its GPU, in parallel).
(b) The same images with no delay at concurrency 1: wall time per request, and our own overhead per request
    (wall time minus the time the server spent answering, which it reports at /v1/stats).
Both check that the verdicts agree with the exact shapes judge.

Run: ``python benchmarks/judge_throughput.py`` (``--images 200`` for a quicker run).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from contextlib import contextmanager

import httpx

from diffprobe.commands.judge import default_batch_size
from diffprobe.judges.vlm import VLMJudge
from diffprobe.worlds.shapes.grammar import CATEGORIES, make_scene
from diffprobe.worlds.shapes.judge import ShapesJudge
from diffprobe.worlds.shapes.render import render


@contextmanager
def oracle_server(delay: float):
    """The oracle server in its own process (so it does not share our interpreter lock); yields its URL."""
    proc = subprocess.Popen([sys.executable, "-m", "diffprobe.judges.oracle_server", "--port", "0", "--memo",
                             "--delay", str(delay)], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if " at " not in line:
            raise RuntimeError(f"the oracle server did not start: {line!r}")
        yield line.rsplit(" at ", 1)[1].strip()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def images_and_questions(n: int):
    made = [make_scene("eval", CATEGORIES[i % len(CATEGORIES)], i // len(CATEGORIES)) for i in range(n)]
    return [render(scene, 64) for scene, _ in made], [prompt.question for _, prompt in made]


def judge_all(url: str, concurrency: int, images, questions) -> tuple[float, float, list[bool | None]]:
    """Seconds to judge every image in the batches ``diffprobe judge`` would send, the seconds the server spent
    answering them, and the verdicts."""
    judge = VLMJudge(url, "oracle", concurrency=concurrency)
    judge.preflight()  # once, outside the clock
    batch = default_batch_size(judge)
    verdicts = []
    served = server_seconds(url)
    t0 = time.perf_counter()
    for start in range(0, len(images), batch):
        verdicts += judge.judge_many(images[start:start + batch], questions[start:start + batch])
    seconds = time.perf_counter() - t0
    judge.close()
    return seconds, server_seconds(url) - served, [v.correct for v in verdicts]


def server_seconds(url: str) -> float:
    return httpx.get(f"{url}/stats").json()["handler_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--delay", type=float, default=0.05, help="server delay per answer in (a), seconds")
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    images, questions = images_and_questions(args.images)
    exact = [ShapesJudge().judge(im, q).correct for im, q in zip(images, questions, strict=True)]

    with oracle_server(args.delay) as url:
        judge_all(url, args.concurrency, images, questions)  # fills the server's memory
        t1, _, v1 = judge_all(url, 1, images, questions)
        tn, _, vn = judge_all(url, args.concurrency, images, questions)
    agree = v1 == exact and vn == exact
    print(f"(a) {args.images} images, server delay {args.delay * 1e3:.0f} ms per answer")
    print(f"    concurrency 1: {args.images / t1:.1f} images/s   concurrency {args.concurrency}: "
          f"{args.images / tn:.1f} images/s   ratio: {t1 / tn:.2f}x   verdicts agree with the exact judge: {agree}")

    with oracle_server(0.0) as url:
        judge_all(url, args.concurrency, images, questions)
        t0, served, v0 = judge_all(url, 1, images, questions)
    print(f"(b) {args.images} images, no server delay, concurrency 1")
    print(f"    {t0 / args.images * 1e3:.2f} ms per request wall, of which the server answering "
          f"{served / args.images * 1e3:.2f} ms; our overhead {(t0 - served) / args.images * 1e3:.2f} ms per "
          f"request (PNG encoding, HTTP, parsing); agree: {v0 == exact}")


if __name__ == "__main__":
    main()
