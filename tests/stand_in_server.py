"""A stand-in for ``transformers serve`` in the server-lifetime tests (test code): started as
``python stand_in_server.py MODEL --host H --port P --device D``, it answers ``GET /health`` with
200 until it is killed. It loads no model, so it starts in well under a second."""

import argparse
from http.server import BaseHTTPRequestHandler, HTTPServer


class Health(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's naming
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    HTTPServer((a.host, a.port), Health).serve_forever()
