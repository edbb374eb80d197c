"""The VLM judge: asks a vision-language model behind an OpenAI-compatible chat-completions server.

vLLM, Ollama, llama.cpp's server, LM Studio and the reliable-seeds paper's CogVLM2 server all speak this API. Each
question is one request: the image as a base64 PNG data URL plus the question rendered from a named template; the
free-text answer is read by one of the parsers of :mod:`diffprobe.judges.answers` (``strict`` by default,
``rrs-substring`` for parity with the paper). An answer the parser cannot read is an *unparsed* verdict
(``correct=None``, the full answer kept in ``raw``), never a wrong one.

Identity (what keys stored verdicts): the model name, the template text of every kind, the parser and the decoding
parameters (temperature, top_p, max_tokens, image detail). The server URL is left out on purpose: the same model
answers the same from another host or port, so moving a server (or a tunnel) keeps the stored verdicts. The API key
is never part of the identity, a stored verdict, an error message or a log line.

Throughput: ``judge_many`` runs ``concurrency`` requests at once over one ``httpx.Client`` (connections are
reused); every request has a timeout and is retried with exponential backoff on 429, 5xx, timeouts, dropped
connections and malformed bodies (a server's ``Retry-After`` is honoured), then fails with one
:class:`JudgeServerError` naming the URL. Before the first question a preflight checks the server once
(reachable, key accepted, model served, JSON spoken) so a wrong URL fails before anything is stored.
"""

from __future__ import annotations

import base64
import functools
import io
import os
import random
import re
import string
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from email.utils import parsedate_to_datetime
from typing import Any

from PIL import Image

from ..errors import DiffprobeError, InputError
from .answers import DEFAULT_PARSER, get_parser
from .base import RELATION_WORDS, Judge, Question, Verdict
from .questions import plural_of


class JudgeServerError(DiffprobeError):
    """The judge's server cannot be used: unreachable, key refused, model not served, or it keeps failing."""


#: Named question templates. Fields: count -- {plural}, {object} (singular with its attributes), {noun};
#: relation -- {a}, {b} (with an article), {relation}; attribute -- {objects} ("a red book and a gold clock").
TEMPLATES: dict[str, tuple[str, str]] = {  # name -> (question kind, text)
    "rrs-count": ("count", "Answer in one sentence: How many {plural} are in this image?"),
    "number-count": ("count", "How many {plural} are in this image? Answer with a single number."),
    "yes-no-relation": ("relation", "Answer yes or no: Is there {a} {relation} {b} in this image?"),
    "yes-no-attribute": ("attribute", "Answer yes or no: Does this image contain {objects}?"),
}
DEFAULT_TEMPLATES = {"count": "rrs-count", "relation": "yes-no-relation", "attribute": "yes-no-attribute"}
FIELDS = {"count": ("plural", "object", "noun"), "relation": ("a", "b", "relation"), "attribute": ("objects",)}

DEFAULT_API_KEY_ENV = "DIFFPROBE_JUDGE_API_KEY"
DEFAULT_CONCURRENCY = 8
DEFAULT_TIMEOUT = 60.0
DEFAULT_RETRIES = 4
DEFAULT_MAX_TOKENS = 300  # the paper's GPT-4o evaluation; its CogVLM2 mining used 2048
RETRY_STATUSES = frozenset({408, 409, 425, 429}) | frozenset(range(500, 600))
MAX_RETRY_AFTER = 60.0


# --- questions as text --------------------------------------------------------------------------------------

# inflect takes about half a millisecond per plural; a run asks about a few nouns many times
_plural_of = functools.lru_cache(maxsize=4096)(plural_of)


def _article(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def question_fields(question: Question) -> dict[str, str]:
    """The values a template of the question's kind can use."""
    if question.kind == "count":
        obj = question.objects[0]
        return {"plural": _plural_of(obj), "object": str(obj), "noun": obj.noun}
    if question.kind == "relation":
        a, b = question.objects
        return {"a": _article(str(a)), "b": _article(str(b)), "relation": RELATION_WORDS[question.relation or ""]}
    phrases = [_article(str(o)) for o in question.objects]
    objects = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return {"objects": objects}


def template_fields(text: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]


def resolve_template(kind: str, value: str) -> str:
    """A template name (:data:`TEMPLATES`) or a template text with ``{fields}`` -> the checked template text."""
    if kind not in FIELDS:
        raise InputError(f"unknown question kind {kind!r} for a template; use one of {', '.join(FIELDS)}")
    if value in TEMPLATES:
        named_kind, text = TEMPLATES[value]
        if named_kind != kind:
            raise InputError(f"template {value!r} is for {named_kind} questions, not {kind}")
        return text
    if "{" not in value:
        names = ", ".join(n for n, (k, _) in TEMPLATES.items() if k == kind)
        raise InputError(f"unknown {kind} template {value!r}; use a name ({names}) or a text with fields such as "
                         + ", ".join("{" + f + "}" for f in FIELDS[kind]))
    try:
        fields = template_fields(value)
    except ValueError as err:
        raise InputError(f"{kind} template {value!r} is not a valid template ({err}); write fields as {{name}} "
                         "and a literal brace as {{ or }}") from None
    bad = [f for f in fields if f not in FIELDS[kind]]
    if bad or not fields:
        raise InputError(f"{kind} template {value!r} uses {', '.join(map(repr, bad)) or 'no field'}; "
                         f"{kind} templates can use " + ", ".join("{" + f + "}" for f in FIELDS[kind]))
    return value


def parse_template_option(option: str) -> tuple[str, str]:
    """``"count=number-count"`` or ``"count=How many {plural}?"`` -> (kind, value)."""
    kind, sep, value = option.partition("=")
    if not sep or kind.strip() not in FIELDS or not value.strip():
        raise InputError(f"--template {option!r}: write KIND=NAME or KIND=TEXT with KIND one of "
                         f"{', '.join(FIELDS)} (e.g. count=number-count)")
    return kind.strip(), value.strip()


# --- the judge ----------------------------------------------------------------------------------------------


def _png_data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class _Transient(Exception):
    """A failure worth retrying; ``wait`` is the server's Retry-After, if it gave one."""

    def __init__(self, what: str, wait: float | None = None):
        super().__init__(what)
        self.what, self.wait = what, wait


class VLMJudge(Judge):
    """Judge by asking a VLM over the OpenAI-compatible chat-completions API (see the module docstring)."""

    name = "vlm"

    def __init__(self, url: str | None = None, model: str | None = None, *,
                 templates: Mapping[str, str] | None = None, parser: str = DEFAULT_PARSER,
                 temperature: float = 0.0, top_p: float | None = None, max_tokens: int = DEFAULT_MAX_TOKENS,
                 detail: str | None = None, concurrency: int = DEFAULT_CONCURRENCY,
                 timeout: float = DEFAULT_TIMEOUT, retries: int = DEFAULT_RETRIES, backoff: float = 0.5,
                 api_key_env: str = DEFAULT_API_KEY_ENV, sleep: Callable[[float], Any] | None = None):
        if not url:
            raise InputError("the vlm judge needs the server's URL: --judge-url http://HOST:PORT/v1")
        if not model:
            raise InputError("the vlm judge needs a model name: --judge-model NAME (as the server lists it at "
                             "GET /v1/models)")
        if not re.match(r"^https?://[^/\s]+", url):
            raise InputError(f"--judge-url {url!r} is not an http(s) URL; give e.g. http://127.0.0.1:8000/v1")
        self.url = re.sub(r"/chat/completions/?$", "", url.rstrip("/"))
        self.model = model
        self.templates = {kind: resolve_template(kind, name) for kind, name in DEFAULT_TEMPLATES.items()}
        for kind, value in (templates or {}).items():
            self.templates[kind] = resolve_template(kind, value)
        self.parser = get_parser(parser)
        if not 0.0 <= temperature <= 2.0:
            raise InputError(f"--temperature must be between 0 and 2, got {temperature}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {top_p}")
        if max_tokens < 1:
            raise InputError(f"max_tokens must be at least 1, got {max_tokens}")
        if detail not in (None, "low", "high", "auto"):
            raise InputError(f"--image-detail must be low, high or auto, got {detail!r}")
        if concurrency < 1:
            raise InputError(f"--concurrency must be at least 1, got {concurrency}")
        if not timeout > 0:
            raise InputError(f"--timeout must be more than 0 seconds, got {timeout}")
        if retries < 0:
            raise InputError(f"retries must be 0 or more, got {retries}")
        if not api_key_env or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", api_key_env):
            raise InputError(f"--api-key-env {api_key_env!r} is not an environment variable name")
        self.temperature, self.top_p, self.max_tokens, self.detail = temperature, top_p, max_tokens, detail
        self.concurrency, self.timeout, self.retries, self.backoff = concurrency, timeout, retries, backoff
        self.api_key_env = api_key_env
        self.sleep = sleep  # None: wait on the abort event, so a failed batch stops its retries at once
        self._key = os.environ.get(api_key_env) or None
        self._client: Any = None
        self._checked = False
        self._lock = threading.Lock()
        self._abort = threading.Event()

    # identity and text ------------------------------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model, "templates": dict(sorted(self.templates.items())),
                "parser": self.parser.name, "temperature": self.temperature, "top_p": self.top_p,
                "max_tokens": self.max_tokens, "detail": self.detail}

    def question_text(self, question: Question) -> str:
        return self.templates[question.kind].format(**question_fields(question))

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    # HTTP -------------------------------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        import httpx

        with self._lock:
            if self._client is None:
                headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
                limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
                self._client = httpx.Client(base_url=self.url + "/", headers=headers, limits=limits,
                                            timeout=httpx.Timeout(self.timeout, connect=min(self.timeout, 10.0)))
            return self._client

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def _send(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One HTTP exchange; a failure worth retrying raises :class:`_Transient`, one that is not raises
        :class:`JudgeServerError` (key refused, model unknown, bad request)."""
        import httpx

        where = f"{self.url}/{path}"
        try:
            response = self.client.request(method, path, json=body)
        except httpx.TimeoutException:
            raise _Transient(f"no answer within {self.timeout:g} s") from None
        except httpx.TransportError as err:
            raise _Transient(f"connection failed ({type(err).__name__}: {self._scrub(str(err)) or 'dropped'})") \
                from None
        status = response.status_code
        if status in (401, 403):
            raise JudgeServerError(self._key_message(where, status))
        if 300 <= status < 400:
            raise JudgeServerError(f"the judge server at {where} redirects (HTTP {status}) to "
                                   f"{response.headers.get('location', 'another address')}; pass that base URL "
                                   "with --judge-url")
        if status in RETRY_STATUSES:
            raise _Transient(f"HTTP {status}", _retry_after(response.headers.get("retry-after")))
        if status >= 400:
            raise JudgeServerError(self._client_error(where, status, response.text))
        try:
            return response.json()
        except ValueError:
            raise _Transient(f"an answer that is not JSON ({self._snippet(response.text)})") from None

    def _snippet(self, text: str) -> str:
        text = self._scrub(" ".join(text.split()))
        return repr(text[:120] + ("..." if len(text) > 120 else ""))

    def _key_message(self, where: str, status: int) -> str:
        if self._key is None:
            return (f"the judge server at {where} wants an API key (HTTP {status}); put it in the environment "
                    f"variable {self.api_key_env} (or name another with --api-key-env)")
        return (f"the judge server at {where} refused the API key from ${self.api_key_env} (HTTP {status}); "
                f"check the key, or name the variable that holds it with --api-key-env")

    def _client_error(self, where: str, status: int, text: str) -> str:
        detail = self._snippet(text)
        if status == 404 and "model" in text.lower():
            return (f"the judge server at {where} does not serve model {self.model!r} (HTTP 404: {detail}); "
                    "pass a model it lists at GET /v1/models with --judge-model")
        if status == 404:
            return (f"the judge server has no {where} (HTTP 404); --judge-url should be the OpenAI-compatible "
                    "base URL, usually ending in /v1 (e.g. http://127.0.0.1:8000/v1)")
        return f"the judge server at {where} rejected the request (HTTP {status}: {detail})"

    def _with_retries(self, method: str, path: str, body: dict[str, Any] | None, retries: int) -> Any:
        last = ""
        for attempt in range(retries + 1):
            if self._abort.is_set():
                raise JudgeServerError(f"stopped asking {self.url}: another request to it failed")
            try:
                return self._send(method, path, body)
            except _Transient as err:
                last = err.what
                if attempt == retries:
                    break
                delay = err.wait if err.wait is not None else self.backoff * 2 ** attempt * (1 + random.random())
                (self.sleep or self._abort.wait)(min(delay, MAX_RETRY_AFTER))
        tries = f"{retries + 1} tries" if retries else "1 try"
        raise JudgeServerError(f"the judge server at {self.url}/{path} failed ({tries}; last: {last}); check that "
                               "it is running and its log, then run the same command again (stored verdicts "
                               "are kept)")

    def _chat_body(self, text: str, data_url: str, max_tokens: int | None = None) -> dict[str, Any]:
        image: dict[str, Any] = {"url": data_url}
        if self.detail:
            image["detail"] = self.detail
        body: dict[str, Any] = {
            "model": self.model, "temperature": self.temperature, "max_tokens": max_tokens or self.max_tokens,
            "messages": [{"role": "user", "content": [{"type": "text", "text": text},
                                                      {"type": "image_url", "image_url": image}]}]}
        if self.top_p is not None:
            body["top_p"] = self.top_p
        return body

    def _content(self, reply: Any, path: str) -> str:
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            content = None
        if not isinstance(content, str):
            raise JudgeServerError(f"the judge server at {self.url}/{path} answered JSON that is not a "
                                   f"chat-completions reply (no choices[0].message.content: "
                                   f"{self._snippet(str(reply))}); is --judge-url an OpenAI-compatible /v1 URL?")
        return self._scrub(content)

    def ask(self, image: Image.Image, text: str) -> str:
        """The model's answer to one question about one image (with retries)."""
        reply = self._with_retries("POST", "chat/completions", self._chat_body(text, _png_data_url(image)),
                                   self.retries)
        return self._content(reply, "chat/completions")

    # preflight --------------------------------------------------------------------------------------------

    def preflight(self) -> None:
        """Check the server: reachable, key accepted, model served (GET /models where served), chat answers in
        JSON (one tiny question, retried like any other). Raises one :class:`JudgeServerError` naming the URL and
        the fix. Runs by itself before the judge's first question."""
        import httpx

        try:
            response = self.client.get("models")
        except httpx.TransportError as err:
            raise JudgeServerError(f"cannot reach the judge server at {self.url} ({type(err).__name__}); start "
                                   "it (e.g. 'vllm serve MODEL' or 'ollama serve') or fix --judge-url") from None
        if response.status_code in (401, 403):
            raise JudgeServerError(self._key_message(f"{self.url}/models", response.status_code))
        if response.status_code == 200:
            try:
                listing = response.json()
            except ValueError:
                raise JudgeServerError(f"the judge server at {self.url}/models answered something that is not "
                                       f"JSON ({self._snippet(response.text)}); --judge-url should be the "
                                       "OpenAI-compatible base URL, usually ending in /v1") from None
            served = [m.get("id") for m in listing.get("data", []) if isinstance(m, dict)] \
                if isinstance(listing, dict) else []
            if served and self.model not in served:
                raise JudgeServerError(f"the judge server at {self.url} does not serve model {self.model!r}; it "
                                       f"serves: {', '.join(map(str, served))}; pass one with --judge-model")
        # /models may be missing (some servers); the chat endpoint must work either way.
        probe = Image.new("RGB", (32, 32), (255, 255, 255))
        body = self._chat_body("Answer yes or no: is this image white?", _png_data_url(probe), 8)
        self._content(self._with_retries("POST", "chat/completions", body, self.retries), "chat/completions")
        with self._lock:
            self._checked = True

    def check(self) -> None:
        self._ensure_checked()

    def _ensure_checked(self) -> None:
        with self._lock:
            if self._checked:
                return
        self.preflight()

    # judging ----------------------------------------------------------------------------------------------

    def verdict(self, question: Question, answer: str) -> Verdict:
        """Read one answer with the judge's parser."""
        if question.kind == "count":
            read = self.parser.count_verdict(answer, question.count or 0)
        else:
            read = self.parser.yes_no_verdict(answer, True)
        if read.correct is None:
            return Verdict(None, answer, f"unparsed ({self.parser.name} parser): {read.reason}: {answer!r}", answer)
        said = "yes" if read.parsed is True else "no" if read.parsed is False else str(read.parsed)
        return Verdict(read.correct, said if read.parsed is not None else answer,
                       f"{read.reason} ({self.parser.name} parser); the model said {answer!r}", answer)

    def judge(self, image: Image.Image, question: Question) -> Verdict:
        self._ensure_checked()
        return self.verdict(question, self.ask(image, self.question_text(question)))

    def judge_many(self, images: list[Image.Image], questions: list[Question]) -> list[Verdict]:
        if len(images) != len(questions):
            raise InputError(f"{len(images)} images but {len(questions)} questions")
        if not images:
            return []
        self._ensure_checked()
        texts = [self.question_text(q) for q in questions]
        self._abort.clear()
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(images)), thread_name_prefix="vlm-judge")
        try:
            futures = [pool.submit(self.ask, im, t) for im, t in zip(images, texts, strict=True)]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in futures if f in done and f.exception() is not None), None)
            if failed is not None:
                raise failed.exception()  # type: ignore[misc]
        except BaseException:  # a failed request or Ctrl-C: the other workers stop retrying, nothing is stored
            self._abort.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return [self.verdict(q, f.result()) for q, f in zip(questions, futures, strict=True)]


__all__ = ["DEFAULT_API_KEY_ENV", "DEFAULT_TEMPLATES", "FIELDS", "JudgeServerError", "TEMPLATES", "VLMJudge",
           "parse_template_option", "question_fields", "resolve_template", "template_fields"]
