"""A scripted OpenAI-compatible endpoint for the rehearsal: the explainer, refiner, categorizer and scorer.

``python -m mmsae.rehearsal.server --port 18431`` serves ``POST /v1/chat/completions`` on 127.0.0.1
(``GET /health`` and ``GET /v1/models`` too) until it is stopped (SIGTERM or SIGINT). No model runs:
each request is recognised by the prompt the workflow sent and answered in the format that role's
parser reads, with a content chosen deterministically from a hash of the request, so a rerun gets the
same answers:

* explainer (:mod:`mmsae.explain.prompts`): a sentence and an ``[EXPLANATION]: <concept>`` line
  (every eighth request ``Unable to produce descriptions``, which the workflow keeps as no explanation);
* refiner (:mod:`mmsae.evaluate.refine`): the concept as a phrase of at most five words;
* categorizer: one of the categories the prompt lists, by the phrase's words;
* scorer (:mod:`mmsae.evaluate.scoring_prompts`): in batch mode a bracketed 0/1 list with one entry
  per ``Example i:`` of the request; in logprob mode ``1`` or ``0`` and, when asked for, the
  ``top_logprobs`` of both.

The answers are plausible in form only; they carry no information about the features.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import signal
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from mmsae.evaluate.refine import CATEGORY_PROMPT, REFINE_PROMPT
from mmsae.explain.prompts import UNABLE

IMAGE_CONCEPTS = ["cat fur", "blue sky", "red brick wall", "grass blades", "shiny metal", "dark background",
                  "round coins", "printed text", "the rocket body", "green eyes", "foam on coffee"]
TEXT_CONCEPTS = ["words about numbers", "the end of a sentence", "question words", "punctuation marks",
                 "names of places"]
CATEGORY_WORDS = {"sky": "scene", "background": "scene", "coffee": "object", "coins": "object", "rocket": "object",
                  "eyes": "part", "body": "part", "fur": "texture", "wall": "texture", "text": "texture",
                  "metal": "material", "grass": "material", "foam": "material", "red": "colour", "blue": "colour"}
UNABLE_EVERY = 8

_EXAMPLE = re.compile(r"Example (\d+):")


def _hash(obj) -> int:
    return int(hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12], 16)


def _text_of(content) -> str:
    """A message's text: the string, or its text parts joined."""
    if isinstance(content, str):
        return content
    return "\n".join(p.get("text", "") for p in content or [] if p.get("type") == "text")


def _filled(template: str, field: str, text: str) -> str | None:
    """The value of ``{field}`` when ``text`` is ``template`` formatted with it (the package's own prompt,
    each occurrence of the field the same), else None."""
    parts = [re.escape(p) for p in template.split("{" + field + "}")]
    m = re.fullmatch(parts[0] + "(.*?)" + r"\1".join(parts[1:]), text, re.S)
    return m.group(1) if m else None


def _has_image(messages: list[dict]) -> bool:
    return any(isinstance(m.get("content"), list) and any(p.get("type") == "image_url" for p in m["content"])
               for m in messages)


def answer(body: dict) -> tuple[str, dict[str, float] | None]:
    """The reply to one chat-completions request body.

    Returns:
        ``(content, probabilities)``: ``probabilities`` is ``{"1": p, "0": 1 - p}`` for a logprob-mode
        scorer request that asked for ``logprobs``, else None.
    """
    messages = body.get("messages") or []
    system = " ".join(_text_of(m.get("content")) for m in messages if m.get("role") == "system")
    last = _text_of(messages[-1].get("content")) if messages else ""
    h = _hash(messages)
    if "Reply with a list in square brackets" in system:  # scorer, batch mode
        n = len(_EXAMPLE.findall(last))
        return "[" + ",".join(str((h >> i) & 1) for i in range(n)) + "]", None
    if "Reply with the single character 1 or 0" in system:  # scorer, logprob mode
        p = 0.05 + 0.9 * ((h % 1000) / 999)
        return ("1" if p >= 0.5 else "0"), ({"1": p, "0": 1 - p} if body.get("logprobs") else None)
    if "[EXPLANATION]:" in last:  # explainer
        if h % UNABLE_EVERY == 0:
            return f"The highlighted parts share nothing I can name.\n[EXPLANATION]: {UNABLE.capitalize()}", None
        concepts = IMAGE_CONCEPTS if _has_image(messages) else TEXT_CONCEPTS
        concept = concepts[h % len(concepts)]
        return f"Looking at the marked parts, they all show {concept}.\n[EXPLANATION]: {concept}", None
    description = _filled(REFINE_PROMPT, "explanation", last)
    if description is not None:  # refiner
        return " ".join(description.strip().rstrip(".").split()[:5]).lower(), None
    phrase = _filled(CATEGORY_PROMPT, "phrase", last)
    if phrase is not None:  # categorizer
        words = re.findall(r"[a-z]+", phrase.lower())
        return next((CATEGORY_WORDS[w] for w in words if w in CATEGORY_WORDS), "object"), None
    return "I cannot tell.", None


def completion(body: dict) -> dict:
    """The chat-completions response object for ``body``."""
    content, probs = answer(body)
    choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}
    if probs is not None:
        top = [{"token": t, "logprob": math.log(p), "bytes": list(t.encode())}
               for t, p in sorted(probs.items(), key=lambda kv: -kv[1])]
        choice["logprobs"] = {"content": [{**top[0], "top_logprobs": top}]}
    n_in = sum(len(_text_of(m.get("content")).split()) for m in body.get("messages") or [])
    n_out = len(content.split())
    return {"id": f"rehearsal-{_hash(body) % 10**9}", "object": "chat.completion", "created": 0,
            "model": body.get("model", "rehearsal"), "choices": [choice],
            "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet: the workflow's logs say what was asked
        pass

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _send(self, code: int, obj: dict):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802 - http.server's naming
        if self.path.rstrip("/") == "/health":
            self._send(200, {"status": "ok"})
        elif self.path.rstrip("/") == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": "rehearsal", "object": "model", "owned_by": "mmsae"}]})
        else:
            self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send(404, {"error": {"message": f"no route {self.path}"}})
            return
        self._send(200, completion(body))


def serve(host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """Start the endpoint in a daemon thread; ``server.server_address[1]`` is its port (``port`` 0 = a free one).

    Raises:
        OSError: the port is taken.
    """
    server = ThreadingHTTPServer((host, port), _Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args(argv)
    try:
        server = serve(args.host, args.port)
    except OSError as e:
        print(f"rehearsal server: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    print(f"rehearsal server: http://{args.host}:{server.server_address[1]}/v1", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
