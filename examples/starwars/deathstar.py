#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""The deathstar of the Star Wars demo: a small HTTP/1.1 service with the
API of Cilium's getting-started guide.

    POST /v1/request-landing  -> 200 "Ship landed"
    PUT  /v1/exhaust-port     -> 503 "Panic: deathstar exploded"
    GET  /v1/                 -> 200 the API, one line per call
    GET  /healthz             -> 200 "ok"

Listens on [::]:PORT (default 80), IPv6 and IPv4, keep-alive, one thread per
connection. Usage: deathstar.py [PORT]
"""
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

API = "POST /v1/request-landing\nPUT /v1/exhaust-port\nGET /v1/\n"


class Deathstar(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "deathstar/1"

    def reply(self, status, body):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def drain(self):
        length = int(self.headers.get("Content-Length") or 0)
        while length > 0:
            chunk = self.rfile.read(min(length, 65536))
            if not chunk:
                break
            length -= len(chunk)

    def do_POST(self):
        self.drain()
        if self.path == "/v1/request-landing":
            self.reply(200, "Ship landed\n")
        else:
            self.reply(404, "not found\n")

    def do_PUT(self):
        self.drain()
        if self.path == "/v1/exhaust-port":
            self.reply(503, "Panic: deathstar exploded\n")
        else:
            self.reply(404, "not found\n")

    def do_GET(self):
        if self.path == "/v1/":
            self.reply(200, API)
        elif self.path == "/healthz":
            self.reply(200, "ok\n")
        else:
            self.reply(404, "not found\n")

    def log_message(self, *args):
        pass


class DualStack(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 80
    DualStack(("::", port), Deathstar).serve_forever()
