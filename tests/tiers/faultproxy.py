"""A small threaded HTTP proxy for tests: in front of an S3 endpoint, it injects faults.

Two ways to reach it:
- reverse: the client's endpoint_url is ``proxy.url``; requests are relayed to the upstream;
- forward: the client uses it as its HTTP proxy (botocore ``proxies``); the request line carries
  the absolute URL the SDK built, so tests see the Host and path a real store would. A
  virtual-hosted request (``bucket.host``) is rewritten to path-style for the upstream (moto).

Every request is recorded (method, target, headers) before any fault. Faults apply to the next
``times`` requests that ``match``:
- ``"503"``: answer 503 with an S3 ``SlowDown`` XML error body;
- ``"reset"``: read the request, then reset the connection (RST) without an answer;
- ``"reset_after_upstream"``: relay the request, then reset instead of answering (the answer is
  lost: the store did the work);
- ``"reset_mid_body"``: relay, send the head and half the body, then reset;
- ``"slow"``: wait ``delay_s`` before relaying;
- ``"down"``: reset this request and every connection and request for ``down_s`` seconds.
``down_for(s)`` / ``up()`` switch the down state directly; ``strip_headers`` drops request
headers before relaying (a store that ignores If-None-Match). Answers are buffered whole: this
is for tests with shards of a few MiB, not for benchmarks.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO
from urllib.parse import urlsplit

HOP_BY_HOP = frozenset({
    "connection", "proxy-connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
    "proxy-authorization", "expect", "host", "content-length",
})

SLOW_DOWN_XML = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>FAULTPROXY</RequestId>"
    b"<HostId>faultproxy</HostId></Error>"
)


@dataclass
class Request:
    method: str
    target: str  # as sent: a path, or an absolute URL in forward mode
    headers: dict[str, str]  # lower-case names

    @property
    def host(self) -> str:
        return self.headers.get("host", "")

    @property
    def query(self) -> str:
        return urlsplit(self.target).query

    def is_upload_part(self) -> bool:
        return self.method == "PUT" and "partNumber=" in self.query

    def is_get(self) -> bool:
        return self.method == "GET" and "range" in self.headers

    def is_chunk_put(self) -> bool:
        """A PUT of one chunk object of a shard (``rank-NNNNNN.shard.cNNNNNN``)."""
        return self.method == "PUT" and ".shard.c" in urlsplit(self.target).path

    def is_chunk_get(self) -> bool:
        return self.method == "GET" and ".shard.c" in urlsplit(self.target).path


@dataclass
class Fault:
    kind: str
    times: int = 1
    match: Callable[[Request], bool] = field(default=lambda r: True)
    delay_s: float = 0.0
    down_s: float = 0.0
    hits: int = 0


class FaultProxy:
    def __init__(self, upstream_url: str, bucket: str = "") -> None:
        u = urlsplit(upstream_url)
        self.upstream_host = u.hostname or "127.0.0.1"
        self.upstream_port = u.port or 80
        self.bucket = bucket
        self.strip_headers: set[str] = set()
        self.records: list[Request] = []
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._conns: set[socket.socket] = set()
        self._closed = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name="faultproxy", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- control ----------------------------------------------------------------------------
    def add(self, kind: str, times: int = 1, match: Callable[[Request], bool] | None = None,
            delay_s: float = 0.0, down_s: float = 0.0) -> Fault:
        assert kind in ("503", "reset", "reset_after_upstream", "reset_mid_body", "slow", "down"), kind
        fault = Fault(kind, times, match or (lambda r: True), delay_s, down_s)
        with self._lock:
            self._faults.append(fault)
        return fault

    def down_for(self, seconds: float) -> None:
        with self._lock:
            self._down_until = time.monotonic() + seconds

    def up(self) -> None:
        with self._lock:
            self._down_until = 0.0
            self._faults = [f for f in self._faults if f.kind != "down"]

    def is_down(self) -> bool:
        with self._lock:
            return time.monotonic() < self._down_until

    def requests(self, pred: Callable[[Request], bool] | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self.records if pred is None or pred(r)]

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            _close_quietly(c)

    # -- serving ----------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            if self.is_down():
                _reset(conn)
                continue
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _take_fault(self, req: Request) -> Fault | None:
        with self._lock:
            for f in self._faults:
                if f.hits < f.times and f.match(req):
                    f.hits += 1
                    if f.kind == "down":
                        self._down_until = time.monotonic() + f.down_s
                    return f
        return None

    def _serve(self, conn: socket.socket) -> None:
        rfile = conn.makefile("rb")
        upstream: http.client.HTTPConnection | None = None
        try:
            while True:
                line = rfile.readline(65537)
                if not line:
                    return
                if line in (b"\r\n", b"\n"):
                    continue
                method, target, _version = line.decode("latin-1").split()
                raw_headers: list[tuple[str, str]] = []
                while True:
                    h = rfile.readline(65537)
                    if h in (b"\r\n", b"\n", b""):
                        break
                    name, _, value = h.decode("latin-1").partition(":")
                    raw_headers.append((name.strip(), value.strip()))
                headers = {k.lower(): v for k, v in raw_headers}
                if self.is_down():
                    _reset(conn, rfile)
                    return
                if headers.get("expect", "").lower() == "100-continue":
                    conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = _read_body(rfile, headers)
                req = Request(method, target, headers)
                with self._lock:
                    self.records.append(req)
                fault = self._take_fault(req)
                kind = fault.kind if fault else ""
                if kind in ("down", "reset"):
                    _reset(conn, rfile)
                    return
                if kind == "503":
                    payload = b"" if method == "HEAD" else SLOW_DOWN_XML
                    conn.sendall(
                        b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                        + f"Content-Length: {len(payload)}\r\nx-amz-request-id: FAULTPROXY\r\n\r\n".encode()
                        + payload
                    )
                    continue
                if kind == "slow" and fault is not None:
                    time.sleep(fault.delay_s)
                path = self._upstream_path(target, headers)
                out_headers = [(k, v) for k, v in raw_headers
                               if k.lower() not in HOP_BY_HOP and k.lower() not in self.strip_headers]
                for attempt in (1, 2):
                    try:
                        if upstream is None:
                            upstream = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=60)
                        upstream.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
                        upstream.putheader("Host", f"{self.upstream_host}:{self.upstream_port}")
                        for k, v in out_headers:
                            upstream.putheader(k, v)
                        if body or "content-length" in headers or "transfer-encoding" in headers:
                            upstream.putheader("Content-Length", str(len(body)))
                        upstream.endheaders(body or None)
                        resp = upstream.getresponse()
                        data = resp.read()
                        break
                    except (OSError, http.client.HTTPException):
                        if upstream is not None:
                            upstream.close()
                        upstream = None
                        if attempt == 2:
                            raise
                if resp.will_close and upstream is not None:
                    upstream.close()
                    upstream = None
                if kind == "reset_after_upstream":
                    _reset(conn, rfile)
                    return
                head = [f"HTTP/1.1 {resp.status} {resp.reason}"]
                for k, v in resp.getheaders():
                    if k.lower() not in HOP_BY_HOP:
                        head.append(f"{k}: {v}")
                length = resp.getheader("Content-Length", "0") if method == "HEAD" else str(len(data))
                head.append(f"Content-Length: {length}")
                wire = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
                if kind == "reset_mid_body":
                    conn.sendall(wire + data[: len(data) // 2])
                    _reset(conn, rfile)
                    return
                conn.sendall(wire + (b"" if method == "HEAD" else data))
                if headers.get("connection", "").lower() == "close":
                    return
        except (OSError, ValueError, http.client.HTTPException):
            return
        finally:
            if upstream is not None:
                upstream.close()
            with self._lock:
                self._conns.discard(conn)
            rfile.close()
            _close_quietly(conn)

    def _upstream_path(self, target: str, headers: dict[str, str]) -> str:
        if not target.startswith(("http://", "https://")):
            return target
        u = urlsplit(target)
        path = u.path or "/"
        host = u.hostname or ""
        if self.bucket and host.startswith(self.bucket + "."):  # virtual-hosted -> path-style
            path = f"/{self.bucket}{path}"
        return path + (f"?{u.query}" if u.query else "")


def _read_body(rfile: BinaryIO, headers: dict[str, str]) -> bytes:
    read, readline = rfile.read, rfile.readline
    if headers.get("transfer-encoding", "").lower() == "chunked":
        parts: list[bytes] = []
        while True:
            size = int(readline(65537).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while readline(65537) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            parts.append(read(size))
            readline(65537)
    n = int(headers.get("content-length", "0") or 0)
    data: bytes = read(n) if n else b""
    if len(data) != n:
        raise ValueError("client closed mid-body")
    return data


def _reset(conn: socket.socket, rfile: BinaryIO | None = None) -> None:
    """Close with RST (SO_LINGER 0), the way a crashed or refusing server looks to a client."""
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    if rfile is not None:
        rfile.close()  # the socket's fd closes only when its makefile is closed too
    _close_quietly(conn)


def _close_quietly(conn: socket.socket) -> None:
    try:
        conn.close()
    except OSError:
        pass
