"""A small proxy in front of the tests' real S3 server (SeaweedFS, tests/seaweed.py) that
counts the object bytes served and can inject faults (both on loopback only)."""

from __future__ import annotations

import http.client
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional

DROP = "drop"
TRUNCATE = "truncate"
CHUNKED = "chunked"
CHUNKED_SHORT = "chunked-short"
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


class S3Proxy:
    """Forwards every request to the S3 server at `upstream_port`; counts GET body bytes; optional fault hook.

    `fault(method, path, headers)` may return (status, body) or (status, body, headers) to
    answer instead of S3, DROP to close the connection without answering (after reading
    the request), TRUNCATE to relay S3's answer but cut its body in half and close the
    connection, or CHUNKED (CHUNKED_SHORT) to relay its answer in chunked encoding (only
    the first half of its body, ended cleanly).
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.get_bytes = 0
        self.requests = []  # (method, path)
        self.fault: Optional[Callable] = None
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _relay(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy.lock:
                    proxy.requests.append((self.command, self.path))
                    fault = proxy.fault
                answer = fault(self.command, self.path, self.headers) if fault else None
                if answer == DROP:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if answer is not None and answer not in (TRUNCATE, CHUNKED, CHUNKED_SHORT):
                    status, payload, *extra = answer
                    self.send_response(status)
                    for name, value in (extra[0] if extra else {}).items():
                        self.send_header(name, value)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":  # a HEAD answer has no body on the wire
                        self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                payload = response.read()
                conn.close()
                if self.command == "GET":
                    with proxy.lock:
                        proxy.get_bytes += len(payload)
                self.send_response(response.status)
                for k, v in response.getheaders():
                    if k.lower() not in HOP_HEADERS and k.lower() != "content-length":
                        self.send_header(k, v)
                if answer in (CHUNKED, CHUNKED_SHORT) and self.command == "GET":
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    sent = payload[:len(payload) // 2] if answer == CHUNKED_SHORT else payload
                    for at in range(0, len(sent), 100):
                        piece = sent[at:at + 100]
                        self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                    self.wfile.write(b"0\r\n\r\n")
                    return
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload[:len(payload) // 2] if answer == TRUNCATE else payload)
                if answer == TRUNCATE:
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):  # clients killed mid-request: expected
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def reset(self) -> None:
        with self.lock:
            self.get_bytes = 0
            self.requests = []

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def error_xml(code: str, message: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
            f"<Message>{message}</Message><RequestId>test</RequestId></Error>").encode()
