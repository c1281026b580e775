"""Getting image bytes from a URI (file://, s3://, http(s)://) without letting an
upload event turn modstream into an SSRF proxy, a file reader for the whole disk
or a victim of slow or endless responses.

Every failure is a LoadError whose reason is a DeadLetter reason. This module
does not know about images (no Pillow); decoding lives in common.decode.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import ipaddress
import os
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urljoin, urlsplit
from urllib.request import url2pathname

from common.loaderrors import LoadError

__all__ = ["LoadError", "LoadLimits", "fetch_bytes"]

_CHUNK_BYTES = 64 * 1024
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")
_USER_AGENT = "modstream-fetch/1"

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class LoadLimits:
    """Caps on what one image may cost us to fetch and decode.

    allow_hosts / allow_networks are the only way to reach addresses that are
    refused by default (loopback, private, link-local, ...), e.g. an internal CDN.
    file_roots, when non-empty, confines file:// URIs to those directories.
    """

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    fetch_timeout_s: float = 10.0
    allow_hosts: frozenset[str] = frozenset()
    allow_networks: tuple[str, ...] = ()
    max_redirects: int = 3
    file_roots: tuple[str, ...] = ()
    _networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.max_pixels <= 0:
            raise ValueError("max_bytes and max_pixels must be positive")
        if self.fetch_timeout_s <= 0:
            raise ValueError("fetch_timeout_s must be positive")
        if self.max_redirects < 0:
            raise ValueError("max_redirects must not be negative")
        # Normalised here so that limits built from config lists stay hashable and comparable.
        object.__setattr__(self, "allow_hosts", frozenset(_normalise_host(h) for h in self.allow_hosts))
        object.__setattr__(self, "allow_networks", tuple(self.allow_networks))
        object.__setattr__(self, "file_roots", tuple(self.file_roots))
        networks = tuple(ipaddress.ip_network(cidr, strict=False) for cidr in self.allow_networks)
        object.__setattr__(self, "_networks", networks)

    def permits_address(self, address: IpAddress) -> bool:
        """Whether a connection to this resolved address is allowed (host allowances aside)."""
        address = _unmap(address)
        return not _is_forbidden(address) or any(address in network for network in self._networks)


def fetch_bytes(uri: str, limits: LoadLimits) -> bytes:
    """Return the bytes behind `uri`, never more than limits.max_bytes.

    Raises LoadError: too_large when the object exceeds max_bytes, fetch_failed
    for everything else (refused address, missing object, timeout, HTTP error).
    """
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    if scheme == "file":
        return _fetch_file(uri, limits)
    if scheme == "s3":
        return _fetch_s3(uri, limits)
    if scheme in ("http", "https"):
        return _fetch_http(uri, limits)
    raise LoadError("fetch_failed", f"unsupported URI scheme {scheme!r}")


class _Deadline:
    """Wall-clock budget shared by every step of one fetch (DNS, connects, redirects, reads)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._end = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self._end - time.monotonic())

    def timeout_error(self, what: str) -> LoadError:
        return LoadError("fetch_failed", f"timed out after {self.seconds:g}s fetching {what}")


def _read_capped(
    read_chunk: Callable[[int], bytes], limits: LoadLimits, deadline: _Deadline, what: str
) -> bytes:
    """Drain a chunk reader, failing as soon as the data outgrows max_bytes or the deadline."""
    data = bytearray()
    while chunk := read_chunk(_CHUNK_BYTES):
        data += chunk
        if len(data) > limits.max_bytes:
            raise LoadError("too_large", f"{what} exceeds {limits.max_bytes} bytes")
        if deadline.remaining() <= 0:
            raise deadline.timeout_error(what)
    return bytes(data)


# --- file:// ---------------------------------------------------------------


def _fetch_file(uri: str, limits: LoadLimits) -> bytes:
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise LoadError("fetch_failed", f"file URI names a remote host: {uri}")
    path = url2pathname(parts.path)
    if not os.path.isabs(path):
        raise LoadError("fetch_failed", f"file URI path is not absolute: {uri}")
    # Resolving symlinks costs a syscall per path component under the GIL: only for confinement.
    resolved = os.path.realpath(path) if limits.file_roots else path
    if limits.file_roots and not any(_is_within(resolved, root) for root in limits.file_roots):
        raise LoadError("fetch_failed", f"{path} is outside the allowed file roots")
    try:
        # O_NONBLOCK so that a FIFO planted at the path cannot block us in open().
        fd = os.open(resolved, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise LoadError("fetch_failed", f"cannot open {path}: {exc.strerror}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise LoadError("fetch_failed", f"{path} is not a regular file")
        if info.st_size > limits.max_bytes:
            raise LoadError("too_large", f"{path} has {info.st_size} bytes, limit {limits.max_bytes}")
        with os.fdopen(fd, "rb", closefd=False) as file:
            data = file.read(limits.max_bytes + 1)  # +1: notice a file that grew since fstat
    except OSError as exc:
        raise LoadError("fetch_failed", f"cannot read {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    if len(data) > limits.max_bytes:
        raise LoadError("too_large", f"{path} exceeds {limits.max_bytes} bytes")
    return data


def _is_within(path: str, root: str) -> bool:
    real_root = os.path.realpath(root)
    return os.path.commonpath([path, real_root]) == real_root


# --- s3:// -----------------------------------------------------------------


def _fetch_s3(uri: str, limits: LoadLimits) -> bytes:
    # Keys are taken verbatim: '#' and '?' are legal in S3 keys, so no URL parsing here.
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket or not key:
        raise LoadError("fetch_failed", f"s3 URI needs a bucket and a key: {uri}")
    try:
        from botocore.exceptions import BotoCoreError, ClientError

        client = _s3_client(limits.fetch_timeout_s)
    except ImportError as exc:
        raise LoadError("fetch_failed", "s3:// URIs need boto3: install modstream[s3]") from exc
    deadline = _Deadline(limits.fetch_timeout_s)
    try:
        response = client.get_object(Bucket=bucket, Key=key)
        body = response["Body"]
        try:
            size = response.get("ContentLength")
            if size is not None and size > limits.max_bytes:
                raise LoadError("too_large", f"{uri} has {size} bytes, limit {limits.max_bytes}")
            return _read_capped(body.read, limits, deadline, uri)
        finally:
            body.close()
    except (BotoCoreError, ClientError, OSError) as exc:
        raise LoadError("fetch_failed", f"{uri}: {exc}") from exc


@functools.lru_cache(maxsize=4)
def _s3_client(timeout_s: float) -> Any:
    """One client per timeout: building a client costs milliseconds and clients are thread-safe."""
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=timeout_s, read_timeout=timeout_s, retries={"max_attempts": 2})
    # A fresh Session per client: boto3's default session is not thread-safe.
    return boto3.session.Session().client("s3", config=config)


# --- http:// and https:// --------------------------------------------------


def _fetch_http(uri: str, limits: LoadLimits) -> bytes:
    deadline = _Deadline(limits.fetch_timeout_s)
    url = uri
    for _ in range(limits.max_redirects + 1):
        result = _http_get_once(url, limits, deadline)
        if isinstance(result, bytes):
            return result
        url = result
    raise LoadError("fetch_failed", f"more than {limits.max_redirects} redirects from {_redact(uri)}")


def _http_get_once(url: str, limits: LoadLimits, deadline: _Deadline) -> bytes | str:
    """One request; returns the body, or the next URL when the server redirects."""
    parts = urlsplit(url)
    shown = _redact(url)
    if parts.scheme not in ("http", "https"):
        raise LoadError("fetch_failed", f"refusing redirect to {parts.scheme!r} URL {shown}")
    try:
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise LoadError("fetch_failed", f"invalid port in {shown}") from exc
    if not host:
        raise LoadError("fetch_failed", f"URL has no host: {shown}")
    addresses = _vetted_addresses(host, port, limits, deadline)
    if deadline.remaining() <= 0:
        raise deadline.timeout_error(shown)
    connection_class = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
    connection = connection_class(host, port, addresses, deadline.remaining())
    watchdog = _Watchdog(connection, deadline.remaining())
    try:
        with watchdog:
            target = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~") + (
                f"?{parts.query}" if parts.query else ""
            )
            connection.request("GET", target, headers={"User-Agent": _USER_AGENT, "Connection": "close"})
            response = connection.getresponse()
            if response.status in _REDIRECT_STATUSES:
                location = response.getheader("Location")
                if not location:
                    raise LoadError("fetch_failed", f"HTTP {response.status} without Location from {shown}")
                return urljoin(url, location.strip())
            if not 200 <= response.status < 300:
                raise LoadError("fetch_failed", f"HTTP {response.status} {response.reason} from {shown}")
            declared = response.getheader("Content-Length", "")
            if declared.isdigit() and int(declared) > limits.max_bytes:
                raise LoadError("too_large", f"{shown} declares {declared} bytes, limit {limits.max_bytes}")
            body = _read_capped(response.read1, limits, deadline, shown)
    except (OSError, http.client.HTTPException) as exc:
        if watchdog.fired.is_set() or deadline.remaining() <= 0:
            raise deadline.timeout_error(shown) from exc
        raise LoadError("fetch_failed", f"{shown}: {type(exc).__name__}: {exc}") from exc
    finally:
        connection.close()
    if watchdog.fired.is_set():  # the socket was cut mid-body, so what we read may be truncated
        raise deadline.timeout_error(shown)
    return body


def _vetted_addresses(host: str, port: int, limits: LoadLimits, deadline: _Deadline) -> list[str]:
    """Resolve once and check every address; the caller connects only to these (no rebinding)."""
    addresses = _resolve(host, port, deadline)
    if _normalise_host(host) in limits.allow_hosts:
        return addresses
    for address in addresses:
        if not limits.permits_address(ipaddress.ip_address(address.split("%", 1)[0])):
            raise LoadError("fetch_failed", f"refusing {host}: it resolves to non-public address {address}")
    return addresses


def _resolve(host: str, port: int, deadline: _Deadline) -> list[str]:
    """getaddrinfo bounded by the deadline (the system resolver has its own, longer, timeouts)."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass  # a name, not a literal address
    outcome: list[Any] = []

    def lookup() -> None:
        try:
            outcome.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except (OSError, UnicodeError) as exc:  # UnicodeError: a name IDNA cannot encode
            outcome.append(exc)

    resolver = threading.Thread(target=lookup, name="modstream-resolve", daemon=True)
    resolver.start()
    resolver.join(deadline.remaining())
    if not outcome:
        raise deadline.timeout_error(f"address of {host}")
    if isinstance(outcome[0], Exception):
        raise LoadError("fetch_failed", f"cannot resolve {host}: {outcome[0]}")
    return list(dict.fromkeys(info[4][0] for info in outcome[0]))


def _is_forbidden(address: IpAddress) -> bool:
    """Not globally routable, multicast, or a 6to4/NAT64 wrapper around such an IPv4 address."""
    if not address.is_global or address.is_multicast:
        return True
    if isinstance(address, ipaddress.IPv6Address):
        if address in _NAT64_PREFIX:
            return _is_forbidden(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        if address.sixtofour is not None:
            return _is_forbidden(address.sixtofour)
    return False


def _unmap(address: IpAddress) -> IpAddress:
    """::ffff:a.b.c.d is a.b.c.d on the wire; judge (and allow) it as such."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _normalise_host(host: str) -> str:
    return host.lower().rstrip(".")


def _redact(url: str) -> str:
    """The URL without user:password, for error details that end up in dead letters and logs."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]).geturl()


def _connect_pinned(addresses: list[str], port: int, timeout: float) -> socket.socket:
    """Connect to the first reachable vetted address, never to a fresh DNS answer."""
    last_error: OSError = OSError("no address to connect to")
    for address in addresses:
        try:
            return socket.create_connection((address, port), timeout=timeout)
        except OSError as exc:
            last_error = exc
    raise last_error


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTPConnection that keeps the hostname for the Host header but connects to vetted IPs."""

    def __init__(self, host: str, port: int, addresses: list[str], timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.addresses = addresses
        self.pinned_socket: socket.socket | None = None

    def connect(self) -> None:
        self.sock = self.pinned_socket = _connect_pinned(self.addresses, self.port, self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """As _PinnedHTTPConnection; TLS SNI and certificate checks still use the hostname."""

    def __init__(self, host: str, port: int, addresses: list[str], timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=_tls_context())
        self.addresses = addresses
        self.pinned_socket: socket.socket | None = None

    def connect(self) -> None:
        raw = _connect_pinned(self.addresses, self.port, self.timeout)
        try:
            self.sock = self.pinned_socket = _tls_context().wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """Loading the CA store takes milliseconds: do it once; SSLContext is thread-safe to share."""
    return ssl.create_default_context()


class _Watchdog:
    """Cuts the connection at the deadline. Socket timeouts alone cannot: they restart on
    every received byte, so a server dripping headers or body would never time out."""

    def __init__(self, connection: _PinnedHTTPConnection | _PinnedHTTPSConnection, seconds: float) -> None:
        self.fired = threading.Event()
        self._connection = connection
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        # Held while cutting, so that once __exit__ returns the socket is ours to close
        # and its descriptor number can be reused safely.
        self._lock = threading.Lock()
        self._finished = False

    def _fire(self) -> None:
        with self._lock:
            if self._finished:
                return
            self.fired.set()
            sock = self._connection.pinned_socket
            if sock is None:
                return
            # The plain socket's shutdown, also for TLS: it wakes the blocked reader
            # without touching the SSL object that the reading thread is using.
            # OSError: already closed, nothing left to cut.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._timer.cancel()
        with self._lock:
            self._finished = True
