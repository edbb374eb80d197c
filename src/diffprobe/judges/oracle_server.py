"""A loopback OpenAI-compatible server that answers questions about shapes-world images with the exact judge.

It reads a chat-completions request the way a VLM server would (the question text and a base64 image), finds the
question by matching the text against the VLM judge's templates, asks :class:`~diffprobe.worlds.shapes.judge.
ShapesJudge`, and replies in a sentence ("There are three red circles in this image.", "Yes, there is.").
It serves ``GET /v1/models``, and has switchable faults (:class:`Faults`): slow replies, 500s, 429s with
Retry-After, bodies that are not JSON, wrong or unparseable answers, dropped connections, dying mid-run, and 401
on a missing or wrong API key. Tests and ``benchmarks/judge_throughput.py`` start it on 127.0.0.1, port 0::

    with OracleServer(model="oracle") as server:
        judge = VLMJudge(server.url, "oracle")

or from a shell: ``python -m diffprobe.judges.oracle_server --port 8000 --delay 0.05``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import re
import socket
import string
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

from .answers import WORD_OF
from .base import RELATION_WORDS, ObjectSpec, Question, Verdict
from .questions import object_spec, plural_of
from .vlm import DEFAULT_TEMPLATES, TEMPLATES, resolve_template

_RELATION_OF = {words: name for name, words in RELATION_WORDS.items()}


@dataclass
class Faults:
    """What the server does wrong. Counters apply to the next N chat requests, in this order of precedence."""

    delay: float = 0.0  # seconds before every chat answer
    drop: int = 0  # close the connection without an answer
    status_500: int = 0  # HTTP 500
    status_429: int = 0  # HTTP 429 with Retry-After: retry_after
    retry_after: str = "0"
    malformed: int = 0  # HTTP 200 with a body that is not JSON
    die_after: int | None = None  # after this many chat answers: drop everything and stop listening
    wrong: bool = False  # count off by one, yes and no swapped
    unparseable: bool = False  # an answer with no count and no yes/no
    not_json: bool = False  # every path answers an HTML page (a web UI, not the API)
    no_models: bool = False  # GET /v1/models is 404 (some servers do not serve it)


@dataclass(frozen=True)
class Asked:
    """One chat request as the server saw it: the question text, a digest of the decoded pixels and the decoding
    parameters it was sent with."""

    text: str
    pixels: str
    params: tuple[tuple[str, Any], ...] = ()


def pixel_digest(image: Image.Image) -> str:
    """sha256 of an image's RGB pixels (its PNG bytes differ between encoders; its pixels do not)."""
    rgb = image.convert("RGB")
    return hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()


def _template_regex(text: str) -> re.Pattern[str]:
    parts, seen = [], set()
    for literal, name, _, _ in string.Formatter().parse(text):
        parts.append(re.escape(literal))
        if name is not None:
            inner = "|".join(map(re.escape, _RELATION_OF)) if name == "relation" else ".+?"
            parts.append(f"(?P={name})" if name in seen else f"(?P<{name}>{inner})")
            seen.add(name)
    return re.compile("^" + "".join(parts) + "$", re.DOTALL)


def _singular(phrase: str) -> str:
    """The singular of a plural noun phrase, as the judge's plural_of would have written it."""
    *head, last = phrase.split()
    for sing in (last[:-1], last[:-2], last[:-3] + "y", last):
        if sing and plural_of(ObjectSpec(sing)) == last:
            return " ".join([*head, sing])
    return phrase


def _objects(phrase: str) -> list[str]:
    return [p for p in re.split(r",\s*|\s+and\s+", phrase) if p]


class QuestionReader:
    """Question text -> :class:`Question`, by matching it against templates (the judge's defaults unless given)."""

    def __init__(self, templates: dict[str, str] | None = None):
        texts = {kind: resolve_template(kind, name) for kind, name in DEFAULT_TEMPLATES.items()}
        texts.update({kind: resolve_template(kind, v) for kind, v in (templates or {}).items()})
        self.patterns = [(kind, _template_regex(text)) for kind, text in texts.items()]
        self.patterns += [(kind, _template_regex(text)) for kind, text in TEMPLATES.values()
                          if text not in texts.values()]

    def read(self, text: str) -> Question | None:
        for kind, pattern in self.patterns:
            m = pattern.match(text.strip())
            if m is None:
                continue
            q = self._question(kind, m.groupdict())
            if q is not None:
                return q
        return None

    @staticmethod
    def _question(kind: str, fields: dict[str, str]) -> Question | None:
        if kind == "count":
            spec = object_spec(fields["object"]) if "object" in fields else \
                object_spec(_singular(fields.get("plural", fields.get("noun", ""))))
            return Question("count", (spec,), count=0) if spec else None
        if kind == "relation":
            specs = [object_spec(fields.get(k, "")) for k in ("a", "b")]
            rel = _RELATION_OF.get(fields.get("relation", ""))
            return Question("relation", tuple(specs), relation=rel) if rel and None not in specs else None  # type: ignore[arg-type]
        specs = [object_spec(p) for p in _objects(fields.get("objects", ""))]
        return Question("attribute", tuple(specs)) if specs and None not in specs else None  # type: ignore[arg-type]


def sentence(question: Question, verdict: Verdict, wrong: bool = False) -> str:
    """The exact judge's finding as a VLM would say it."""
    if question.kind == "count":
        n = int(verdict.answer) + (1 if wrong else 0)
        obj = question.objects[0]
        plural_phrase = plural_of(obj)
        if n == 0:
            return f"There are no {plural_phrase} in this image."
        if n == 1:
            return f"There is one {obj} in this image."
        return f"There are {WORD_OF.get(n, str(n))} {plural_phrase} in this image."
    yes = bool(verdict.correct) != wrong
    return "Yes, there is." if yes else "No, there is not."


class OracleServer:
    """The loopback server (see the module docstring). ``faults`` may be changed while it runs."""

    def __init__(self, model: str = "oracle", *, api_key: str | None = None, templates: dict[str, str] | None = None,
                 faults: Faults | None = None, host: str = "127.0.0.1", port: int = 0, memo: bool = False):
        from ..worlds.shapes.judge import ShapesJudge

        self.model, self.api_key = model, api_key
        self.faults = faults or Faults()
        self.reader = QuestionReader(templates)
        self.judge = ShapesJudge()
        # memo: remember each (image, question) verdict, so a benchmark's timed passes measure latency and HTTP
        # rather than the exact judge's CPU time (which the server's threads share one interpreter lock for)
        self.memo: dict[tuple[str, str], Verdict] | None = {} if memo else None
        self.asked: list[Asked] = []
        self.answered = 0
        self.handler_seconds = 0.0
        self.dead = False
        self.connections = 0  # TCP connections accepted
        self.in_flight = self.max_in_flight = 0  # chat requests being answered at once
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer((host, port), _handler(self))
        self.httpd.daemon_threads = True
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> OracleServer:
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.thread is not None:
            self.httpd.shutdown()
            self.thread.join(timeout=5)
            self.thread = None
        self.httpd.server_close()

    def __enter__(self) -> OracleServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def take(self, name: str) -> bool:
        """Use up one count of fault ``name``; True when it applied."""
        with self.lock:
            left = getattr(self.faults, name)
            if left > 0:
                setattr(self.faults, name, left - 1)
                return True
        return False

    def die(self) -> None:
        self.dead = True
        threading.Thread(target=self.stop, daemon=True).start()

    def answer(self, body: dict[str, Any]) -> str:
        text, image, detail = "", None, None
        for message in body.get("messages", []):
            content = message.get("content")
            for part in content if isinstance(content, list) else [{"type": "text", "text": content or ""}]:
                if part.get("type") == "text":
                    text += part.get("text", "")
                elif part.get("type") == "image_url":
                    url = part.get("image_url", {}).get("url", "")
                    detail = part.get("image_url", {}).get("detail")
                    image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
        pixels = pixel_digest(image) if image is not None else ""
        with self.lock:
            params = tuple(sorted([(k, v) for k, v in body.items() if k not in ("messages", "model")]
                                  + ([("detail", detail)] if detail else [])))
            self.asked.append(Asked(text, pixels, params))
        question = self.reader.read(text)
        if self.faults.unparseable:
            return "I am not sure what this image shows."
        if question is None or image is None:
            return "I cannot answer that about this image."
        verdict = self.memo.get((pixels, text)) if self.memo is not None else None
        if verdict is None:
            verdict = self.judge.judge(image, question)
            if self.memo is not None:
                self.memo[(pixels, text)] = verdict
        return sentence(question, verdict, self.faults.wrong)


def _handler(server: OracleServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, so clients can reuse connections

        def setup(self) -> None:
            super().setup()
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle stall per reply
            with server.lock:
                server.connections += 1

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def _send(self, status: int, body: bytes | dict[str, Any], headers: dict[str, str] | None = None,
                  content_type: str = "application/json") -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout): nothing to answer
                self.close_connection = True

        def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
            self._send(status, {"error": {"message": message, "type": "error", "code": status}}, headers)

        def _drop(self) -> None:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        def _gate(self) -> bool:
            """False when the request has been answered by a fault or the key check."""
            if server.dead:
                self._drop()
                return False
            if server.faults.not_json:
                self._send(200, b"<html><body>Web UI</body></html>", content_type="text/html")
                return False
            if server.api_key is not None and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                self._error(401, "invalid or missing API key")
                return False
            return True

        def do_GET(self) -> None:
            if not self._gate():
                return
            if self.path.rstrip("/") == "/v1/models" and not server.faults.no_models:
                self._send(200, {"object": "list", "data": [{"id": server.model, "object": "model",
                                                             "owned_by": "diffprobe"}]})
            elif self.path.rstrip("/") == "/v1/stats":
                with server.lock:
                    self._send(200, {"asked": len(server.asked), "answered": server.answered,
                                     "handler_seconds": server.handler_seconds})
            else:
                self._error(404, f"no route {self.path}")

        def do_POST(self) -> None:
            with server.lock:
                server.in_flight += 1
                server.max_in_flight = max(server.max_in_flight, server.in_flight)
            try:
                self._post()
            finally:
                with server.lock:
                    server.in_flight -= 1

        def _post(self) -> None:
            start = time.perf_counter()
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if not self._gate():
                return
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._error(404, f"no route {self.path}")
                return
            body = json.loads(raw or b"{}")
            if body.get("model") != server.model:
                self._error(404, f"The model `{body.get('model')}` does not exist.")
                return
            faults = server.faults
            if faults.delay:
                time.sleep(faults.delay)
            if server.take("drop"):
                self._drop()
                return
            if server.take("status_500"):
                self._error(500, "internal error")
                return
            if server.take("status_429"):
                self._error(429, "rate limited", {"Retry-After": faults.retry_after})
                return
            if server.take("malformed"):
                self._send(200, b'{"choices": [{"message": ')
                return
            content = server.answer(body)
            reply = {"id": f"chatcmpl-{len(server.asked)}", "object": "chat.completion", "created": int(time.time()),
                     "model": server.model, "choices": [{"index": 0, "finish_reason": "stop",
                                                         "message": {"role": "assistant", "content": content}}]}
            self._send(200, reply)
            with server.lock:
                server.answered += 1
                server.handler_seconds += time.perf_counter() - start - faults.delay
                dying = faults.die_after is not None and server.answered >= faults.die_after
            if dying:
                server.die()

    return Handler


__all__ = ["Asked", "Faults", "OracleServer", "QuestionReader", "main", "pixel_digest", "sentence"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Loopback OpenAI-compatible server answering with the exact "
                                                 "shapes judge.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model", default="oracle")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before every chat answer")
    parser.add_argument("--memo", action="store_true", help="remember verdicts: a repeated question about the "
                        "same image is answered without judging it again")
    args = parser.parse_args(argv)
    server = OracleServer(args.model, faults=Faults(delay=args.delay), host=args.host, port=args.port,
                          memo=args.memo)
    print(f"serving model {args.model!r} at {server.url}", flush=True)
    try:
        server.httpd.serve_forever(poll_interval=0.05)
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()


if __name__ == "__main__":
    main()

