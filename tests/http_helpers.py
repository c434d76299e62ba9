"""Loopback HTTP servers for tests that fetch: a quiet handler base, and starting one in a thread."""

from __future__ import annotations

import http.server
import threading


class QuietHandler(http.server.BaseHTTPRequestHandler):
    """`send(status, body)`; no log lines; a client that hangs up is not an error."""

    def send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass

    def handle(self) -> None:
        try:
            super().handle()
        except OSError:  # the client gave up (broken pipe, reset), as it may
            pass


def start_http_server(
    handler: type[QuietHandler], host: str = "127.0.0.1"
) -> http.server.ThreadingHTTPServer:
    """A server on a free port of `host`, answering from a thread of its own; `stop_http_server` ends it.
    OSError if it cannot listen there."""
    httpd = http.server.ThreadingHTTPServer((host, 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return httpd


def stop_http_server(httpd: http.server.ThreadingHTTPServer) -> None:
    httpd.shutdown()
    httpd.server_close()
