"""An HTTP proxy on 127.0.0.1 in front of an S3 endpoint that injects faults (not a test module).

boto3 talks to the proxy exactly as to S3 (``AWS_ENDPOINT_URL``); the proxy forwards each request
to the real (moto) server unless a rule says otherwise. Rules match a substring of the (unquoted)
request target (``/bucket/key``, or ``/bucket?list-type=2&prefix=…`` for a listing) and,
optionally, the method:

* :meth:`FaultProxy.fail` — the next ``len(faults)`` matching requests get those faults, in order:
  ``"slowdown"`` (503 SlowDown), ``"503"``, ``"500"`` (InternalError), ``"reset"`` (the TCP
  connection is reset before any response), ``"corrupt"`` (the real response with one byte of
  the body flipped), ``"stall"`` (the real response, after :attr:`FaultProxy.stall_seconds` of
  silence — a hung connection); later requests pass through;
* :meth:`FaultProxy.deny` — every matching request gets 403 AccessDenied (a permanent error).

Moto itself enforces bucket policies only in its IAM-authentication mode, which is switched on
process-wide (``INITIAL_NO_AUTH_ACTION_COUNT`` read at import) and needs IAM users — so access
denied comes from this proxy: a real 403 response in S3's XML error format, parsed by botocore
like any other.

``requests`` counts every request seen per ``(method, path)``, so tests can assert that a
request was retried (or was not).
"""
from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

_ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "503": (503, "ServiceUnavailable", "Service is unable to handle request."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "403": (403, "AccessDenied", "Access Denied"),
}
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection"}


class FaultProxy:
    def __init__(self, upstream: str):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.requests: Counter = Counter()
        self.stall_seconds = 3.0
        self._rules: list[dict] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                body = self._body()
                path = unquote(self.path.split("?", 1)[0])
                fault = proxy._take(self.command, unquote(self.path))
                with proxy._lock:
                    proxy.requests[(self.command, path)] += 1
                if fault == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault == "stall":
                    time.sleep(proxy.stall_seconds)
                if fault in _ERRORS:
                    status, code, message = _ERRORS[fault]
                    xml = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{message}</Message>"
                           f"<Resource>{path}</Resource><RequestId>fault-proxy</RequestId></Error>").encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(xml)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(xml)
                    return
                status, headers, data = proxy._forward(self.command, self.path, dict(self.headers), body)
                if fault == "corrupt" and data:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in _HOP_BY_HOP:
                        self.send_header(k, v)
                length = dict((k.lower(), v) for k, v in headers).get("content-length", "0")
                self.send_header("Content-Length", length if self.command == "HEAD" else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", ""):
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    # -- rules ---------------------------------------------------------------------------------
    def fail(self, match: str, faults: list[str], method: str | None = None) -> None:
        """The next ``len(faults)`` requests whose target contains ``match`` get ``faults`` in order."""
        with self._lock:
            self._rules.append({"match": match, "method": method, "faults": list(faults)})

    def deny(self, match: str, method: str | None = None) -> None:
        """Every request whose target contains ``match`` gets 403 AccessDenied."""
        with self._lock:
            self._rules.append({"match": match, "method": method, "faults": None})

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()
            self.requests.clear()

    def count(self, match: str, method: str | None = None) -> int:
        """Requests seen whose path (without the query) contains ``match``."""
        with self._lock:
            return sum(n for (m, p), n in self.requests.items() if match in p and method in (None, m))

    def _take(self, method: str, path: str) -> str | None:
        with self._lock:
            for rule in self._rules:
                if rule["match"] in path and rule["method"] in (None, method):
                    if rule["faults"] is None:
                        return "403"
                    if rule["faults"]:
                        return rule["faults"].pop(0)
        return None

    # -- plumbing ------------------------------------------------------------------------------
    def _forward(self, method: str, target: str, headers: dict, body: bytes):
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            headers = {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP}
            if body or method in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            conn.request(method, target, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.getheaders(), data
        finally:
            conn.close()

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
