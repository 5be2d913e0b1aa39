"""HTTP fetching with the crawl's safety rules: bounded, retried, SSRF-guarded.

Every request connects to an IP address that was resolved and checked here (so a second DNS
answer cannot swap in a private address between the check and the connect), follows redirects
by hand (re-checking each hop), streams the body under a byte cap, and retries only failures
that may pass on a second try (connection errors, 5xx; timeouts only with
``crawl.retry_timeouts``).
"""

from __future__ import annotations

import collections
import http.client
import ipaddress
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import ConnectTimeoutError, HTTPError, NewConnectionError, ProtocolError

from pipeline.config import CrawlConfig

_CHUNK = 64 * 1024
_REDIRECTS = (301, 302, 303, 307, 308)
# A redirect's or an error's body is read to its end (so that its connection can serve the next
# request) only while it stays this short and arrives within one read timeout.
_DRAIN_BYTES = 64 * 1024


class FetchError(Exception):
    """A URL that could not be fetched; ``kind`` is the short reason recorded in the manifest."""

    def __init__(self, kind: str, message: str, http_status: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.http_status = http_status
        self.drained = False  # an HTTP error whose body was read to its end


class _Retryable(FetchError):
    pass


@dataclass
class FetchResult:
    data: bytes
    http_status: int
    final_url: str


def is_public_address(ip: str) -> bool:
    """True only for globally routable unicast addresses: False for loopback, private,
    link-local (cloud metadata), carrier-grade NAT (100.64/10), documentation, multicast,
    reserved and unspecified ones."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_global and not (
        addr.is_private
        or addr.is_loopback
        or addr.is_link_local
        or addr.is_multicast
        or addr.is_reserved
        or addr.is_unspecified
    )


def robots_opt_out(header_values: list[str], opt_outs: list[str]) -> str | None:
    """The first opt-out directive found in X-Robots-Tag values, or None.

    Values may name a user agent first ("otherbot: noindex"); any directive counts, whatever
    agent it names, which errs on the side of the site owner.
    """
    wanted = {o.lower() for o in opt_outs}
    for value in header_values:
        for token in value.lower().replace(":", ",").replace(" ", ",").split(","):
            if token.strip() in wanted:
                return token.strip()
    return None


class Fetcher:
    """Fetches URLs for one crawl task; thread-safe, keeps connections alive per host."""

    def __init__(self, cfg: CrawlConfig, getaddrinfo=socket.getaddrinfo) -> None:
        self.cfg = cfg
        self._getaddrinfo = getaddrinfo  # the system resolver; tests pass their own answers
        # (scheme, host, address, port) -> idle kept-alive connections, least recently used first
        self._idle: collections.OrderedDict[tuple, list[HTTPConnection]] = collections.OrderedDict()
        self._n_idle = 0
        # (host, port) -> (address or the lookup's error, expiry on the monotonic clock)
        self._dns: dict[tuple[str, int], tuple[str | FetchError, float]] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            for conns in self._idle.values():
                for conn in conns:
                    conn.close()
            self._idle.clear()
            self._n_idle = 0

    def fetch(self, url: str) -> FetchResult:
        """Download one URL, retrying transient failures with exponential backoff."""
        attempt = 0
        while True:
            try:
                return self._follow_redirects(url)
            except _Retryable as exc:
                gives_up = exc.kind == "timeout" and not self.cfg.retry_timeouts
                if gives_up or attempt >= self.cfg.retries:
                    raise FetchError(exc.kind, str(exc), exc.http_status) from None
                time.sleep(self.cfg.backoff_s * (2**attempt))
                attempt += 1

    def _follow_redirects(self, url: str) -> FetchResult:
        seen = {url}
        for _ in range(self.cfg.max_redirects + 1):
            status, headers, body = self._request(url)
            if status in _REDIRECTS:
                location = headers.get("location")
                if not location:
                    raise FetchError("http_error", f"HTTP {status} without Location", status)
                url = urljoin(url, location)
                if url in seen:
                    raise FetchError("redirect_loop", f"redirect loop at {url}", status)
                seen.add(url)
                continue
            return FetchResult(body, status, url)
        raise FetchError("too_many_redirects", f"more than {self.cfg.max_redirects} redirects")

    def _request(self, url: str) -> tuple[int, urllib3.HTTPHeaderDict, bytes]:
        scheme, host, port, path = _split_url(url)
        ip = self.resolve(host, port)
        key = (scheme, host, ip, port)
        headers = {"User-Agent": self.cfg.user_agent, "Host": _host_header(host, port, scheme)}
        while True:
            conn, reused = self._connection(key)
            try:
                if not reused:
                    conn.connect()
                    conn.timeout = self.cfg.read_timeout_s  # connect had its own timeout
                conn.request("GET", path, headers=headers, preload_content=False)
                resp = conn.getresponse()
            except BaseException as exc:
                conn.close()
                if reused and isinstance(exc, (ConnectionError, http.client.HTTPException)):
                    continue  # the server closed an idle connection: not the URL's failure
                # urllib3 makes "connection refused" a kind of connect timeout: it is not one
                timed_out = isinstance(exc, (TimeoutError, ConnectTimeoutError))
                if timed_out and not isinstance(exc, NewConnectionError):
                    raise _Retryable("timeout", f"timeout: {exc}") from None
                if isinstance(exc, (OSError, http.client.HTTPException, HTTPError)):
                    raise _Retryable("connection_error", f"connection error: {exc}") from None
                raise
            break
        try:
            body, clean = self._read_body(resp)
        except BaseException as exc:
            self._release(key, conn, resp, isinstance(exc, FetchError) and exc.drained)
            raise
        self._release(key, conn, resp, clean)
        return resp.status, resp.headers, body

    def _release(self, key: tuple, conn: HTTPConnection, resp, clean: bool) -> None:
        """Keep the connection for the host's next request only if its response was read to the
        end (an image, or a short redirect or error body: a crawl meets many 404s on one host)
        and it is still open (http.client drops the socket of a response that closes the
        connection: HTTP/1.0, "Connection: close"). A half-read one is never used again."""
        if clean and conn.sock is not None and resp.length_remaining in (0, None):
            self._keep(key, conn)
        else:
            resp.close()  # its file object holds the socket open past conn.close()
            conn.close()

    def _read_body(self, resp: urllib3.BaseHTTPResponse) -> tuple[bytes, bool]:
        """The body, and whether it was read to its end (the connection can be reused)."""
        status = resp.status
        if status in _REDIRECTS or status >= 400:
            drained = self._drain(resp)
            if status in _REDIRECTS:
                return b"", drained
            kind = _Retryable if status >= 500 else FetchError
            error = kind("http_error", f"HTTP {status}", status)
            error.drained = drained
            raise error
        if self.cfg.respect_robots_header:
            directive = robots_opt_out(
                resp.headers.getlist("x-robots-tag"), self.cfg.robots_opt_outs
            )
            if directive:
                raise FetchError("robots_opt_out", f"X-Robots-Tag: {directive}", status)
        declared = resp.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.cfg.max_bytes:
            raise FetchError("too_large", f"Content-Length {declared} > max_bytes", status)
        chunks, size = [], 0
        # The read timeout bounds each wait; this bounds a server that drips bytes forever.
        deadline = time.monotonic() + self.cfg.total_timeout_s
        try:
            while chunk := resp.read1(_CHUNK):  # whatever has arrived, not a full chunk
                if time.monotonic() > deadline:
                    raise FetchError(
                        "timeout", f"body took longer than {self.cfg.total_timeout_s} s", status
                    )
                size += len(chunk)
                if size > self.cfg.max_bytes:
                    raise FetchError(
                        "too_large", f"body exceeds max_bytes={self.cfg.max_bytes}", status
                    )
                chunks.append(chunk)
        except (TimeoutError, ProtocolError, HTTPError, OSError) as exc:
            kind = "timeout" if "timed out" in str(exc).lower() else "connection_error"
            raise _Retryable(kind, f"{kind} while reading body: {exc}", status) from None
        return b"".join(chunks), True

    def _drain(self, resp: urllib3.BaseHTTPResponse) -> bool:
        """Read and drop a redirect's or an error's body if it is short and quick; True when it
        ended. A long or slow one is abandoned (its connection is then closed) rather than read
        to the end: a hostile server's 404 can drip bytes forever."""
        declared = resp.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > _DRAIN_BYTES:
            return False
        deadline = time.monotonic() + self.cfg.read_timeout_s
        size = 0
        try:
            while chunk := resp.read1(_CHUNK):
                size += len(chunk)
                if size > _DRAIN_BYTES or time.monotonic() > deadline:
                    return False
        except (TimeoutError, ProtocolError, HTTPError, OSError):
            return False
        return True

    def resolve(self, host: str, port: int) -> str:
        """The checked address to connect to for (host, port).

        Answers, failures included, are cached for ``dns_cache_ttl_s`` (a crawl hits the same
        hosts over and over; without a cache the resolver is flooded and starts failing). Every
        request checks the address it will connect to, cached or not, and connects to exactly
        that address: a host that re-resolves to a private address after its entry expires or
        changes (DNS rebinding) is refused on that request.
        """
        now = time.monotonic()
        with self._lock:
            cached = self._dns.get((host, port))
        if cached is None or cached[1] <= now:
            cached = (self._lookup(host, port), now + self.cfg.dns_cache_ttl_s)
            with self._lock:
                self._dns[(host, port)] = cached
        answer = cached[0]
        if isinstance(answer, FetchError):
            raise FetchError(answer.kind, str(answer))
        if not self.cfg.allow_private_networks and not is_public_address(answer):
            raise FetchError("blocked_address", f"{host} resolves to non-public address {answer}")
        return answer

    def _lookup(self, host: str, port: int) -> str | FetchError:
        try:
            infos = self._getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            return FetchError("dns_error", f"cannot resolve {host}: {exc}")
        if not infos:
            return FetchError("dns_error", f"no address for {host}")
        return str(infos[0][4][0])

    def _connection(self, key: tuple) -> tuple[HTTPConnection, bool]:
        """An idle kept-alive connection to ``key`` (and True), or a new, unconnected one."""
        with self._lock:
            idle = self._idle.get(key)
            while idle:
                conn = idle.pop()
                self._n_idle -= 1
                if conn.is_connected:  # not closed by the server meanwhile
                    return conn, True
                conn.close()
        scheme, host, ip, port = key
        timeout = self.cfg.connect_timeout_s
        if scheme == "https":
            # Connect to the checked address; verify the certificate against the host name.
            conn = HTTPSConnection(
                ip, port, timeout=timeout, server_hostname=host, assert_hostname=host,
                cert_reqs="CERT_REQUIRED",
            )  # fmt: skip
        else:
            conn = HTTPConnection(ip, port, timeout=timeout)
        return conn, False

    def _keep(self, key: tuple, conn: HTTPConnection) -> None:
        """Keeps ``conn`` for the next request to its host: at most ``threads_per_task`` idle
        connections in all, the least recently used closed first (a crawl over many hosts
        must not hold a socket open per host it has seen)."""
        with self._lock:
            self._idle.setdefault(key, []).append(conn)
            self._idle.move_to_end(key)
            self._n_idle += 1
            while self._n_idle > self.cfg.threads_per_task:
                oldest = next(iter(self._idle))
                stale = self._idle[oldest]
                stale.pop(0).close()
                self._n_idle -= 1
                if not stale:
                    del self._idle[oldest]


def _split_url(url: str) -> tuple[str, str, int, str]:
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise FetchError("bad_url", f"malformed URL {url!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise FetchError(
            "bad_scheme", f"scheme {scheme or '(none)'!r} not allowed: http/https only"
        )
    if not parts.hostname:
        raise FetchError("bad_url", f"malformed URL {url!r}: no host")
    port = port or (443 if scheme == "https" else 80)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return scheme, parts.hostname, port, path


def _host_header(host: str, port: int, scheme: str) -> str:
    default = 443 if scheme == "https" else 80
    name = f"[{host}]" if ":" in host else host
    return name if port == default else f"{name}:{port}"
