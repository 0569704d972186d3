"""A scripted OpenAI-compatible chat server on 127.0.0.1 for tests (stdlib http.server, one thread).

It answers `POST /v1/chat/completions` like an LLM that follows the prompt: a plain description with
the word count the prompt asks for ("between A and B words"), in short sentences, with `usage`
counted in words. A script injects faults per item: the item is the number after `img` in the
captions (tests write captions such as "img3 a dog runs on the grass"), and each request for that
item (and style) plays the next action of its list; the last action repeats.

Actions: "ok", "429" (with Retry-After), "500", "503", "hang" (answer only after `hang_seconds`,
past the client's timeout), "malformed" (HTTP 200 with a body that is not JSON), "empty_choices",
"short" / "long" (well-formed answers outside the word range), "list" (a bulleted answer),
"401" (echoes the bearer token in the error body, as some servers do), "400" (a request the server
refuses), "empty" (HTTP 200 with an empty answer), "not_json" (HTTP 200, application/json, with bytes
that are not JSON: `NOT_JSON`, an error page behind a NUL byte), "raw:TEXT" (TEXT as the answer; in it
`{auth:FORM}` and `{key:FORM}` become the request's Authorization header or its bare token, encoded as
FORM: plain, b64, b64nopad, b64url, b64urlnopad or url, as servers that echo credentials do).
`refuse_formats` ({"json_schema": 500}) answers requests whose response_format has such a type with
that status, as llama.cpp's server does, before any action is played. Every request is logged with
its item, style, action, arrival time, Authorization header, body and (for answers) the usage it
reported.
"""

import base64
import json
import re
import threading
import urllib.parse
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RANGE = re.compile(r"between (\d+) and (\d+) words")
ITEM = re.compile(r"\bimg(\d+)\b")
ECHO = re.compile(r"\{(auth|key):(plain|b64|b64nopad|b64url|b64urlnopad|url)\}")
# json.loads(bytes) reads a leading NUL byte as UTF-16 and fails on the odd last byte, 0x3e (">").
NOT_JSON = b"\x00<html><body>502 Bad Gateway.</body></html>"


def encode(text: str, form: str) -> str:
    """`text` as a server may echo it: plain, base64 (standard or URL-safe, with or without padding) or URL-encoded."""
    if form == "plain":
        return text
    if form == "url":
        return urllib.parse.quote(text, safe="")
    encoded = (base64.urlsafe_b64encode if form.startswith("b64url") else base64.b64encode)(text.encode()).decode()
    return encoded.rstrip("=") if form.endswith("nopad") else encoded


def child_text(n_words: int) -> str:
    """`n_words` words of short child-like sentences ("The dog is big." = 4, "I see it." = 3)."""
    fours = ["The dog is big.", "A boy can run.", "The sun is hot.", "I see a cat."]
    threes = ["I see it.", "It is red."]
    a = n_words // 4
    while a >= 0 and (n_words - 4 * a) % 3:
        a -= 1
    if a < 0:
        return " ".join(["Dog."] * n_words)
    b = (n_words - 4 * a) // 3
    return " ".join([fours[i % 4] for i in range(a)] + [threes[i % 2] for i in range(b)])


class FakeOpenAIServer:
    def __init__(self, script: dict | None = None, default: str = "ok", latency: float = 0.0, hang_seconds: float = 3.0, retry_after: str = "1",
                 refuse_formats: dict | None = None):
        self.script = script or {}
        self.refuse_formats = refuse_formats or {}
        self.default = default
        self.latency = latency
        self.hang_seconds = hang_seconds
        self.retry_after = retry_after
        self.log: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._seen: dict[tuple, int] = {}
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._httpd.shutdown()
        self._httpd.server_close()

    def requests_for(self, item: str, style: str | None = None) -> list[dict]:
        return [r for r in self.log if r["item"] == item and (style is None or r["style"] == style)]

    def _next_action(self, item: str, style: str) -> str:
        actions = self.script.get(f"{item}/{style}") or self.script.get(item) or [self.default]
        with self._lock:
            n = self._seen.get((item, style), 0)
            self._seen[(item, style)] = n + 1
        return actions[min(n, len(actions) - 1)]

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out as two writes: no 40 ms delayed-ACK stall

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                if self.path.rstrip("/").endswith("/models"):
                    return self._send(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})
                self._send(404, {"error": {"message": "not found"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with server._lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self._answer(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def _answer(self, body):
                text = "\n".join(str(m.get("content", "")) for m in body.get("messages", []))
                found = ITEM.search(text)
                item = found.group(1) if found else "?"
                lo_hi = RANGE.search(text)
                lo, hi = (int(lo_hi.group(1)), int(lo_hi.group(2))) if lo_hi else (20, 25)
                style = {(20, 25): "short", (60, 70): "long"}.get((lo, hi), f"{lo}-{hi}")
                refused = server.refuse_formats.get((body.get("response_format") or {}).get("type"))
                action = "refused" if refused else server._next_action(item, style)
                entry = {"item": item, "style": style, "action": action, "t": time.time(), "auth": self.headers.get("Authorization"), "body": body}
                with server._lock:
                    server.log.append(entry)
                if server.latency:
                    time.sleep(server.latency)
                if refused:
                    return self._send(refused, {"error": {"message": "this response_format is not supported"}})
                if action == "429":
                    return self._send(429, {"error": {"message": "rate limited", "type": "rate_limit"}}, {"Retry-After": server.retry_after})
                if action in ("500", "503"):
                    return self._send(int(action), {"error": {"message": "server error"}})
                if action == "401":
                    token = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
                    return self._send(401, {"error": {"message": f"Incorrect API key provided: {token}", "code": "invalid_api_key"}})
                if action == "400":
                    return self._send(400, {"error": {"message": "this request is not valid", "type": "invalid_request_error"}})
                if action == "not_json":
                    return self._send_raw(200, NOT_JSON, "application/json")
                if action == "malformed":
                    return self._send_raw(200, b'{"id": "x", "choices": [', "application/json")
                if action == "empty_choices":
                    return self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body.get("model"), "choices": []})
                if action == "hang":
                    time.sleep(server.hang_seconds)
                    action = "ok"
                answer = {
                    "ok": child_text((lo + hi) // 2), "short": child_text(max(3, lo - 10)), "long": child_text(hi + 10),
                    "list": "- a dog\n- a ball\n- a boy\n" + child_text(lo), "empty": "",
                }.get(action)
                if answer is None:
                    auth = self.headers.get("Authorization") or ""
                    echoed = {"auth": auth, "key": auth.removeprefix("Bearer ")}
                    answer = ECHO.sub(lambda m: encode(echoed[m.group(1)], m.group(2)), action.removeprefix("raw:"))
                prompt_tokens = len(text.split())
                entry["usage"] = (prompt_tokens, len(answer.split()))
                self._send(200, {
                    "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": body.get("model"),
                    "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": answer}}],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(answer.split()),
                              "total_tokens": prompt_tokens + len(answer.split())},
                })

            def _send(self, status, payload, headers=None):
                self._send_raw(status, json.dumps(payload).encode(), "application/json", headers)

            def _send_raw(self, status, data, content_type, headers=None):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

        return Handler
