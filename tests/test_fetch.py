"""fetch_bytes against a real HTTP server on 127.0.0.1 and real files: the SSRF
guards, redirects, size caps and the total deadline."""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import sys
import threading
import time
import types
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from common.fetch import LoadLimits, fetch_bytes
from common.loaderrors import LoadError

PAYLOAD = bytes(range(256)) * 40  # 10 KiB
DEFAULT = LoadLimits()
SMALL_CAP = 64 * 1024
DRIP_INTERVAL_S = 0.05
SERVER_PATIENCE_S = 60.0  # longer than HOSTILE_TEST_TIMEOUT_S: a client without guards fails
HOSTILE_TEST_TIMEOUT_S = 20


class Handler(BaseHTTPRequestHandler):
    """Routes for every server behaviour the tests need, well-behaved and hostile."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output clean."""

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        route = getattr(self, "route_" + path.strip("/").split("/")[0].replace("-", "_"), None)
        if route is None:
            self.send_error(404)
            return
        # The client hangs up on purpose in some tests (size cap, deadline).
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            route(path, parse_qs(query))

    def reply(self, body: bytes, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def route_image(self, path: str, query: dict[str, list[str]]) -> None:
        self.reply(PAYLOAD)

    def route_echo_host(self, path: str, query: dict[str, list[str]]) -> None:
        self.reply(self.headers["Host"].encode())

    def route_redirect(self, path: str, query: dict[str, list[str]]) -> None:
        self.redirect(query["to"][0])

    def route_chain(self, path: str, query: dict[str, list[str]]) -> None:
        remaining = int(path.rsplit("/", 1)[1])
        self.redirect(str(remaining - 1) if remaining else "/image")  # relative Locations, as servers send

    def route_big_declared(self, path: str, query: dict[str, list[str]]) -> None:
        # Declares a gigabyte but sends 10 bytes and hangs up: a client that does not
        # check Content-Length up front sees a short body (fetch_failed), not too_large.
        self.send_response(200)
        self.send_header("Content-Length", str(10**9))
        self.end_headers()
        self.wfile.write(b"x" * 10)
        self.close_connection = True

    def route_big_chunked(self, path: str, query: dict[str, list[str]]) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.stream_forever(b"%x\r\n%s\r\n" % (1024, b"y" * 1024), pause_s=0.0)

    def route_big_until_close(self, path: str, query: dict[str, list[str]]) -> None:
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        self.stream_forever(b"z" * 1024, pause_s=0.0)

    def route_drip_body(self, path: str, query: dict[str, list[str]]) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(10**6))
        self.end_headers()
        self.stream_forever(b"d", pause_s=DRIP_INTERVAL_S)

    def route_drip_headers(self, path: str, query: dict[str, list[str]]) -> None:
        self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        self.stream_forever(b"h", pause_s=DRIP_INTERVAL_S)

    def stream_forever(self, piece: bytes, pause_s: float) -> None:
        """Send `piece` again and again until the client hangs up (or a long while passes):
        a client that buffers everything, or has no total deadline, hits the test timeout."""
        started = time.monotonic()
        while time.monotonic() - started < SERVER_PATIENCE_S:
            self.wfile.write(piece)
            self.wfile.flush()
            time.sleep(pause_s)


def serve_on_loopback(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """Base URL of a local HTTP server with ``handler``, until the generator is closed."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, name=f"test-{handler.__name__}", daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """Base URL of a local HTTP server, started once for this module."""
    yield from serve_on_loopback(Handler)


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Records every outgoing connection attempt and refuses it, so nothing leaves the machine."""
    attempts: list[tuple[str, int]] = []

    def refuse(address: tuple[str, int], *args: object, **kwargs: object) -> socket.socket:
        attempts.append(address)
        raise ConnectionRefusedError("test: connections are refused")

    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


def local(server: str, **options: Any) -> LoadLimits:
    """Limits that admit the test server: its address and its port."""
    return LoadLimits(allow_hosts=frozenset({"127.0.0.1"}), http_ports=(urlsplit(server).port,), **options)


def failure(uri: str, limits: LoadLimits = DEFAULT) -> LoadError:
    with pytest.raises(LoadError) as caught:
        fetch_bytes(uri, limits)
    return caught.value


# --- LoadError and LoadLimits ------------------------------------------------


def test_load_error_carries_reason_and_detail_through_str_and_pickle() -> None:
    error = LoadError("too_large", "42 bytes")
    assert str(error) == "too_large: 42 bytes"
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.reason, copy.detail) == ("too_large", "42 bytes")
    with pytest.raises(ValueError, match="reason"):
        LoadError("nope", "x")  # type: ignore[arg-type]


def test_limits_validate_and_normalise() -> None:
    with pytest.raises(ValueError):
        LoadLimits(allow_networks=("not-a-cidr",))
    with pytest.raises(ValueError):
        LoadLimits(fetch_timeout_s=0)
    from_config = LoadLimits(allow_hosts={"CDN.Internal."}, allow_networks=["10.8.0.0/16"])  # type: ignore[arg-type]
    assert from_config.allow_hosts == {"cdn.internal"}
    assert hash(from_config) == hash(
        LoadLimits(allow_hosts=frozenset({"cdn.internal"}), allow_networks=("10.8.0.0/16",))
    )


def test_unknown_scheme_is_fetch_failed() -> None:
    for uri in ("ftp://example.com/a.jpg", "gopher://x/", "a.jpg"):
        assert failure(uri).reason == "fetch_failed"


# --- HTTP: who may be reached ----------------------------------------------


def test_local_server_is_refused_by_default(server: str) -> None:
    error = failure(f"{server}/image", LoadLimits(http_ports=(urlsplit(server).port,)))
    assert error.reason == "fetch_failed"
    assert "non-public address 127.0.0.1" in error.detail


@pytest.mark.parametrize(
    "host",
    [
        "169.254.169.254",  # cloud metadata
        "10.0.0.1",
        "192.168.1.1",
        "100.64.0.1",  # carrier-grade NAT
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "[::1]",
        "[::]",
        "[fe80::1]",
        "[fc00::1]",
        "[ff0e::1]",
        "[::ffff:169.254.169.254]",  # IPv4-mapped
        "[64:ff9b::a9fe:a9fe]",  # NAT64 of 169.254.169.254
        "[2002:a9fe:a9fe::1]",  # 6to4 of 169.254.169.254
    ],
)
def test_forbidden_addresses_are_refused_before_any_connection(
    host: str, connections: list[tuple[str, int]]
) -> None:
    error = failure(f"http://{host}/latest/meta-data/")
    assert error.reason == "fetch_failed"
    assert "non-public" in error.detail
    assert connections == []


def fake_dns(monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[str]]) -> list[str]:
    """Resolve the given names to the given addresses; returns the names looked up."""
    lookups: list[str] = []

    def getaddrinfo(host: str, port: int, *args: object, **kwargs: object) -> list[tuple[Any, ...]]:
        lookups.append(host)
        return [
            (
                socket.AF_INET6 if ":" in address else socket.AF_INET,
                socket.SOCK_STREAM,
                6,
                "",
                (address, port),
            )
            for address in answers[host]
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return lookups


def test_public_host_is_resolved_once_and_connected_by_pinned_address(
    monkeypatch: pytest.MonkeyPatch, connections: list[tuple[str, int]]
) -> None:
    lookups = fake_dns(monkeypatch, {"cdn.example.test": ["93.184.215.14"]})
    error = failure("http://cdn.example.test/a.jpg")
    assert error.reason == "fetch_failed"
    assert lookups == ["cdn.example.test"]
    assert connections == [("93.184.215.14", 80)]


def test_name_with_any_private_address_is_refused(
    monkeypatch: pytest.MonkeyPatch, connections: list[tuple[str, int]]
) -> None:
    fake_dns(monkeypatch, {"sneaky.example.test": ["93.184.215.14", "10.0.0.5"]})
    assert "10.0.0.5" in failure("https://sneaky.example.test/a.jpg").detail
    assert connections == []


def test_unresolvable_name_is_fetch_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    # "a..b" fails IDNA encoding before any query leaves the machine.
    error = failure("http://a..b/a.jpg")
    assert error.reason == "fetch_failed"
    assert error.detail.startswith("cannot resolve a..b")

    def nxdomain(*args: object, **kwargs: object) -> list[Any]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", nxdomain)
    assert "cannot resolve" in failure("http://no-such-host.example.test/a.jpg").detail


def test_allow_hosts_admits_a_local_server(server: str) -> None:
    assert fetch_bytes(f"{server}/image", local(server)) == PAYLOAD


def test_allow_networks_admits_a_local_server(server: str) -> None:
    limits = LoadLimits(allow_networks=("127.0.0.0/8",), http_ports=(urlsplit(server).port,))
    assert fetch_bytes(f"{server}/image", limits) == PAYLOAD


def test_host_header_keeps_the_name_while_connecting_to_its_address(server: str) -> None:
    port = urlsplit(server).port
    limits = LoadLimits(allow_hosts=frozenset({"localhost"}), http_ports=(port,))
    assert fetch_bytes(f"http://localhost:{port}/echo-host", limits) == f"localhost:{port}".encode()


# --- HTTP: redirects --------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "expected_detail"),
    [
        ("http://169.254.169.254/latest/meta-data/", "non-public"),
        ("http://localhost:{port}/image", "non-public"),  # same server, but not by an allowed name
        ("file:///etc/passwd", "refusing redirect to 'file'"),
    ],
)
def test_redirect_to_a_forbidden_target_is_refused(server: str, target: str, expected_detail: str) -> None:
    port = urlsplit(server).port
    target = target.format(port=port)
    limits = LoadLimits(allow_hosts=frozenset({"127.0.0.1"}), http_ports=(port, 80))
    error = failure(f"{server}/redirect?to={target}", limits)
    assert error.reason == "fetch_failed"
    assert expected_detail in error.detail


def test_redirects_are_followed_up_to_the_limit(server: str) -> None:
    three = local(server, max_redirects=3)
    assert fetch_bytes(f"{server}/chain/2", three) == PAYLOAD
    error = failure(f"{server}/chain/2", local(server, max_redirects=2))
    assert "more than 2 redirects" in error.detail


# --- HTTP: size, time, status -----------------------------------------------


@pytest.mark.timeout(HOSTILE_TEST_TIMEOUT_S)
@pytest.mark.parametrize("route", ["big-declared", "big-chunked", "big-until-close"])
def test_oversized_body_is_cut_off(server: str, route: str) -> None:
    limits = local(server, max_bytes=SMALL_CAP)
    assert failure(f"{server}/{route}", limits).reason == "too_large"


@pytest.mark.timeout(HOSTILE_TEST_TIMEOUT_S)
@pytest.mark.parametrize("route", ["drip-body", "drip-headers"])
def test_slow_drip_is_cut_off_by_the_total_deadline(server: str, route: str) -> None:
    # Each byte arrives well within any per-read timeout; only a total deadline stops this.
    limits = local(server, fetch_timeout_s=0.5)
    error = failure(f"{server}/{route}", limits)
    assert error.reason == "fetch_failed"
    assert "timed out" in error.detail


def test_http_error_status_is_fetch_failed(server: str) -> None:
    error = failure(f"{server}/missing", local(server))
    assert error.reason == "fetch_failed"
    assert "404" in error.detail


def test_credentials_in_the_url_stay_out_of_the_detail(server: str) -> None:
    port = urlsplit(server).port
    error = failure(f"http://user:secret@127.0.0.1:{port}/missing", local(server))
    assert "secret" not in error.detail


# --- file:// -------------------------------------------------------------------


def in_root(root: Path, **options: Any) -> LoadLimits:
    return LoadLimits(file_roots=(str(root),), **options)


def test_file_is_read_below_a_root(tmp_path: Path) -> None:
    (tmp_path / "sub dir").mkdir()
    image = tmp_path / "sub dir" / "a b.jpg"
    image.write_bytes(PAYLOAD)
    assert fetch_bytes(image.as_uri(), in_root(tmp_path)) == PAYLOAD


def test_file_uris_are_refused_without_roots(tmp_path: Path) -> None:
    image = tmp_path / "a.jpg"
    image.write_bytes(PAYLOAD)
    for uri in (image.as_uri(), "file:///etc/passwd", "file:///proc/self/environ"):
        error = failure(uri)
        assert error.reason == "fetch_failed"
        assert error.detail.endswith("not allowed")


def test_file_over_the_cap_is_too_large(tmp_path: Path) -> None:
    image = tmp_path / "a.jpg"
    image.write_bytes(b"x" * 11)
    error = failure(image.as_uri(), in_root(tmp_path, max_bytes=10))
    assert error.reason == "too_large"
    assert "exceeds 10 bytes" in error.detail  # the limit, not the file's size
    assert fetch_bytes(image.as_uri(), in_root(tmp_path, max_bytes=11)) == b"x" * 11


def test_refusals_say_nothing_about_the_file(tmp_path: Path) -> None:
    """Missing, outside, a link, a folder, a FIFO: one answer, so events cannot probe the disk."""
    root, outside = tmp_path / "uploads", tmp_path / "secret"
    root.mkdir()
    outside.mkdir()
    (root / "ok.jpg").write_bytes(PAYLOAD)
    (outside / "key.pem").write_bytes(b"secret" * 1000)
    (root / "link.jpg").symlink_to(outside / "key.pem")
    (root / "linked-dir").symlink_to(outside)
    (root / "inner-link.jpg").symlink_to(root / "ok.jpg")
    os.mkfifo(root / "pipe")  # opening it for reading would block forever without a writer
    limits = in_root(root)
    assert fetch_bytes((root / "ok.jpg").as_uri(), limits) == PAYLOAD
    refused = [outside / "key.pem", outside / "missing.jpg", root / "missing.jpg", root / "link.jpg",
               root / "linked-dir" / "key.pem", root / "inner-link.jpg", root / "pipe", root,
               root / "sub" / "missing.jpg"]
    details = set()
    for path in refused:
        error = failure(path.as_uri(), limits)
        assert error.reason == "fetch_failed"
        details.add(error.detail.removeprefix(path.as_uri()))
    for uri in (f"file://{root}/../secret/key.pem", f"file://{root}/./../secret/key.pem",
                "file://fileserver/share/a.jpg", "file:relative.jpg", f"file://{root}/ok.jpg?x=1"):
        error = failure(uri, limits)
        assert error.reason == "fetch_failed"
        details.add(error.detail.removeprefix(uri))
    assert details == {": not allowed"}


def test_a_root_given_through_a_link_still_confines(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a.jpg").write_bytes(PAYLOAD)
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    limits = in_root(tmp_path / "alias")
    assert fetch_bytes((tmp_path / "alias" / "a.jpg").as_uri(), limits) == PAYLOAD
    assert fetch_bytes((tmp_path / "real" / "a.jpg").as_uri(), limits) == PAYLOAD


def test_a_directory_swapped_for_a_link_after_the_check_is_not_followed(tmp_path: Path) -> None:
    """The race a resolve-then-open-by-name reader loses: we open relative to the root's descriptor."""
    root, outside = tmp_path / "uploads", tmp_path / "secret"
    (root / "day").mkdir(parents=True)
    outside.mkdir()
    (root / "day" / "a.jpg").write_bytes(PAYLOAD)
    (outside / "a.jpg").write_bytes(b"secret")
    limits = in_root(root)
    assert fetch_bytes((root / "day" / "a.jpg").as_uri(), limits) == PAYLOAD
    (root / "day" / "a.jpg").unlink()
    (root / "day").rmdir()
    (root / "day").symlink_to(outside)
    assert failure((root / "day" / "a.jpg").as_uri(), limits).detail.endswith("not allowed")


def test_a_file_deleted_between_listing_and_reading_is_fetch_failed(tmp_path: Path) -> None:
    limits = in_root(tmp_path)
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                (tmp_path / "flicker.jpg").write_bytes(PAYLOAD)
                (tmp_path / "flicker.jpg").unlink()

    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    try:
        for _ in range(300):
            with contextlib.suppress(LoadError):  # either outcome is fine; any other exception is not
                # A read racing write_bytes may see any prefix of the payload, never other bytes.
                assert PAYLOAD.startswith(fetch_bytes((tmp_path / "flicker.jpg").as_uri(), limits))
    finally:
        stop.set()
        thread.join()


# --- hostile URIs: every one is a LoadError, nothing else escapes ------------------


@pytest.mark.parametrize(
    "uri",
    [
        "file:///tmp/a%00b.jpg",
        "file:///tmp/a\x00b.jpg",
        "file://[/x",
        "file://[::1/x",
        "file:///%ff%fe.jpg",
        "file://" + "/a" * 5000,
        "http://[::1/x",
        "https://[::1]:99999/x",
        "http://[v1.x]/x",
        "http://a\x00b/x",
        "http://exa mple.com/x",
        "http://" + "a" * 300 + ".com/x",
        "http://\udcff.com/x",
        "http://:80/x",
        "http:///x",
        "s3://",
        "s3:///",
        "\x00://x",
        "",
    ],
)
def test_unparsable_uris_are_fetch_failed(uri: str, tmp_path: Path, connections: list[tuple[str, int]]) -> None:
    error = failure(uri, in_root(tmp_path))
    assert error.reason == "fetch_failed"
    assert connections == []


@pytest.mark.parametrize(
    "host",
    [
        "[::7f00:1]",  # IPv4-compatible 127.0.0.1
        "[::ffff:0:7f00:1]",  # IPv4-translated 127.0.0.1
        "[::ffff:127.0.0.1]",  # IPv4-mapped
        "[64:ff9b:1::1]",  # local-use NAT64
        "[64:ff9b::7f00:1]",  # NAT64 of 127.0.0.1
        "[2002:7f00:1::1]",  # 6to4 of 127.0.0.1
        "[fec0::1]",  # deprecated site-local
        "[2001:db8::1]",
        "[2001::1]",  # Teredo
        "[3fff::1]",
        "[5f00::1]",
        "[100::1]",
        "192.88.99.1",  # 6to4 relay anycast
        "192.0.0.170",  # NAT64 discovery
        "198.18.0.1",
        "255.255.255.255",
        "127.1",  # inet_aton shorthand: the resolver turns it into 127.0.0.1
        "2130706433",  # 127.0.0.1 as one number
    ],
)
def test_special_purpose_addresses_are_refused(host: str, connections: list[tuple[str, int]]) -> None:
    error = failure(f"http://{host}/a.jpg")
    assert error.reason == "fetch_failed"
    assert "non-public" in error.detail
    assert connections == []


def test_public_embedded_ipv4_is_judged_as_the_ipv4_address(connections: list[tuple[str, int]]) -> None:
    for host in ("[::ffff:93.184.215.14]", "[64:ff9b::5db8:d70e]"):
        assert "non-public" not in failure(f"http://{host}/a.jpg").detail
    assert len(connections) == 2


@pytest.mark.parametrize("uri", ["http://93.184.215.14:22/a.jpg", "https://93.184.215.14:8443/a.jpg",
                                 "http://93.184.215.14:443/a.jpg"])
def test_only_allowed_ports_are_reached(uri: str, connections: list[tuple[str, int]]) -> None:
    error = failure(uri)
    if uri.endswith(":443/a.jpg"):  # 443 is allowed for http too; the refused connection is the test's
        assert connections == [("93.184.215.14", 443)]
        return
    assert "port" in error.detail and "not allowed" in error.detail
    assert connections == []
    wider = LoadLimits(http_ports=(22, 80, 443, 8443))
    failure(uri, wider)
    assert len(connections) == 1


class HostileHandler(BaseHTTPRequestHandler):
    """Answers that the standard library chokes on, one route each."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output clean."""

    def do_GET(self) -> None:
        headers = {
            "/redirect-bad-ipv6": [("Location", "http://[::1")],
            "/redirect-null": [("Location", "http://a\x00b/")],
            "/redirect-file": [("Location", "file:///etc/passwd")],
            "/redirect-port": [("Location", "http://127.0.0.1:1/x")],
            "/length-text": [("Content-Length", "ten")],
            "/length-huge": [("Content-Length", "9" * 4400)],
            "/length-negative": [("Content-Length", "-5")],
            "/length-unicode": [("Content-Length", "\u00b2")],
        }[self.path]
        status = 302 if self.path.startswith("/redirect") else 200
        self.wfile.write(f"HTTP/1.1 {status} X\r\n".encode())
        for name, value in headers:
            self.wfile.write(f"{name}: {value}\r\n".encode("utf-8", "surrogateescape"))
        self.wfile.write(b"Connection: close\r\n\r\nbody")
        self.close_connection = True


@pytest.fixture(scope="module")
def hostile_server() -> Iterator[str]:
    yield from serve_on_loopback(HostileHandler)


@pytest.mark.parametrize(
    ("route", "reason"),
    [
        ("redirect-bad-ipv6", "fetch_failed"),
        ("redirect-null", "fetch_failed"),
        ("redirect-file", "fetch_failed"),
        ("redirect-port", "fetch_failed"),
        ("length-huge", "too_large"),
    ],
)
def test_hostile_answers_are_load_errors(hostile_server: str, route: str, reason: str) -> None:
    assert failure(f"{hostile_server}/{route}", local(hostile_server)).reason == reason


@pytest.mark.parametrize("route", ["length-text", "length-negative", "length-unicode"])
def test_a_content_length_that_is_no_number_is_ignored(hostile_server: str, route: str) -> None:
    assert fetch_bytes(f"{hostile_server}/{route}", local(hostile_server)) == b"body"


# --- s3:// -----------------------------------------------------------------------


def test_s3_without_boto3_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)
    monkeypatch.setitem(sys.modules, "botocore.exceptions", None)
    error = failure("s3://bucket/key.jpg")
    assert error.reason == "fetch_failed"
    assert "modstream[s3]" in error.detail


class FakeBody:
    """The part of botocore's StreamingBody that fetch uses."""

    def __init__(self, data: bytes) -> None:
        self._data, self.closed = data, False

    def read(self, amount: int) -> bytes:
        chunk, self._data = self._data[:amount], self._data[amount:]
        return chunk

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake_s3(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """boto3 is an optional extra, absent here: stand in for the three names fetch uses."""
    objects: dict[str, Any] = {}

    class Client:
        def get_object(self, Bucket: str, Key: str) -> dict[str, Any]:
            size, body = objects[f"{Bucket}/{Key}"]
            return {"ContentLength": size, "Body": body}

    session = types.SimpleNamespace(client=lambda *args, **kwargs: Client())
    boto3 = types.ModuleType("boto3")
    boto3.session = types.SimpleNamespace(Session=lambda: session)
    config = types.ModuleType("botocore.config")
    config.Config = lambda **kwargs: kwargs
    exceptions = types.ModuleType("botocore.exceptions")
    exceptions.BotoCoreError = type("BotoCoreError", (Exception,), {})
    exceptions.ClientError = type("ClientError", (Exception,), {})
    monkeypatch.setitem(sys.modules, "boto3", boto3)
    monkeypatch.setitem(sys.modules, "botocore.config", config)
    monkeypatch.setitem(sys.modules, "botocore.exceptions", exceptions)
    from common import fetch

    fetch._s3_client.cache_clear()
    yield objects
    fetch._s3_client.cache_clear()


def test_s3_object_is_read_and_capped(fake_s3: dict[str, Any]) -> None:
    fake_s3["b/ok.jpg"] = (len(PAYLOAD), FakeBody(PAYLOAD))
    assert fetch_bytes("s3://b/ok.jpg", LoadLimits()) == PAYLOAD
    declared = FakeBody(b"x")
    fake_s3["b/declared.jpg"] = (10**9, declared)
    assert failure("s3://b/declared.jpg").reason == "too_large"
    assert declared.closed
    undeclared = FakeBody(b"y" * (SMALL_CAP + 1))
    fake_s3["b/undeclared.jpg"] = (None, undeclared)
    assert failure("s3://b/undeclared.jpg", LoadLimits(max_bytes=SMALL_CAP)).reason == "too_large"
    assert failure("s3://bucket-only").reason == "fetch_failed"
