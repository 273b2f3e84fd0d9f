"""Fetching under the address policy (``capfilt.ingest.fetch``), at connect time and at every redirect hop.

Traffic goes to loopback only: servers on 127.0.0.1 and 127.0.0.2 (Linux routes all of 127/8 to ``lo``) and
on ``::1`` where the machine has it. Made-up names reach them through an injected resolver, never DNS or
/etc/hosts. Every server logs the requests it answered, so that a test can assert that a refused target saw
none; every loop in a server is bounded in count and time.
"""

from __future__ import annotations

import importlib
import io
import pickle
import socket
import ssl
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from capfilt.ingest.download import DownloadSettings, PolicyDownloader, download, fetching_with, install_fetcher
from capfilt.ingest.fetch import DISALLOWED, USER_AGENT, FetchError, FetchPolicy, ImageFetcher, TableResolver, fetch
from capfilt.ingest.urls import check_url
from loopback import Handler, LoopbackHTTP, QuietServer, keep_proxies_away

LOOPBACK_HINT = "a loopback address (--allow-private-addresses lets loopback and private addresses through)"
ONLY_2 = ("127.0.0.2/32",)  # --allow-network 127.0.0.2/32: 127.0.0.2 passes, 127.0.0.1 stays refused


def jpeg(colour=(200, 30, 30), size=(32, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


class Server(LoopbackHTTP):
    """An HTTP/1.1 server on ``host`` in a thread: answers ``routes`` (path -> function of the handler), 404
    elsewhere, and logs each request's path and User-Agent in ``requests`` and ``agents``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None):
        self.routes: dict = {}
        self.requests: list[str] = []
        self.agents: list[str] = []
        routes, requests, agents = self.routes, self.requests, self.agents

        class Routed(Handler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 - the stdlib's name
                requests.append(self.path)
                agents.append(self.headers.get("User-Agent", ""))
                route = routes.get(self.path.split("?")[0])
                if route is None:
                    self.send_error(404, "Not Found")
                else:
                    route(self)

        kind = type("Server", (QuietServer,), {"address_family": socket.AF_INET6 if ":" in host else socket.AF_INET})
        self.server = kind((host, port), Routed)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.host = f"[{host}]" if ":" in host else host
        self.url = f"{'https' if tls else 'http'}://{self.host}:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        # LoopbackHTTP's __init__ is not called: the server is built here, on any host and with TLS; entering and
        # leaving (start, shutdown) are LoopbackHTTP's.


class Listener:
    """A plain TCP listener that answers nothing; ``accepts()`` counts the connections that reached it."""

    def __init__(self, host: str = "127.0.0.1"):
        self.socket = socket.create_server((host, 0))
        self.port = self.socket.getsockname()[1]

    def accepts(self) -> int:
        self.socket.setblocking(False)
        count = 0
        for _ in range(100):  # a connect completes in the kernel's backlog, accepted or not
            try:
                connection, _ = self.socket.accept()
            except BlockingIOError:
                break
            connection.close()
            count += 1
        return count

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.socket.close()


# --- routes ---------------------------------------------------------------------------------------------------

def image(body: bytes = b"\xff\xd8 an image \xff\xd9", headers: dict | None = None):
    def route(h):
        h.send_response(200)
        h.send_header("Content-Type", "image/jpeg")
        h.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            h.send_header(name, value)
        h.end_headers()
        h.wfile.write(body)
    return route


def redirect(location: str, status: int = 302):
    def route(h):
        h.send_response(status)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()
    return route


def chunked(chunks: int, size: int):
    def route(h):
        h.send_response(200)
        h.send_header("Content-Type", "image/jpeg")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        for _ in range(chunks):
            h.wfile.write(b"%x\r\n%s\r\n" % (size, b"x" * size))
        h.wfile.write(b"0\r\n\r\n")
    return route


def until_close(size: int):
    """No length: the body ends when the connection does."""
    def route(h):
        h.send_response(200)
        h.send_header("Content-Type", "image/jpeg")
        h.send_header("Connection", "close")
        h.end_headers()
        h.wfile.write(b"x" * size)
        h.close_connection = True
    return route


def announced(length: int, sent: int, hold_s: float = 0.0):
    """Announces ``length`` bytes, sends ``sent`` of them, holds the connection ``hold_s``, then ends it."""
    def route(h):
        h.send_response(200)
        h.send_header("Content-Type", "image/jpeg")
        h.send_header("Content-Length", str(length))
        h.end_headers()
        h.wfile.write(b"x" * sent)
        time.sleep(hold_s)
        h.close_connection = True
    return route


def drip(headers_too: bool, every_s: float = 0.2, most: int = 50):
    """One byte every ``every_s`` (at most ``most`` of them): of the body, or of an endless header line."""
    def route(h):
        if headers_too:
            h.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        else:
            h.send_response(200)
            h.send_header("Content-Type", "image/jpeg")
            h.send_header("Content-Length", str(most))
            h.end_headers()
        for _ in range(most):
            try:
                h.wfile.write(b"x")
            except OSError:  # the client gave up
                break
            time.sleep(every_s)
        h.close_connection = True
    return route


def stall(seconds: float):
    def route(h):
        time.sleep(seconds)
        image()(h)
    return route


# --- fixtures ---------------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    keep_proxies_away(monkeypatch)
    monkeypatch.setenv("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset's albumentations would ask PyPI on import


@pytest.fixture
def local():
    with Server("127.0.0.1") as server:
        yield server


@pytest.fixture
def second():
    with Server("127.0.0.2") as server:
        yield server


@pytest.fixture
def listener():
    with Listener() as counting:
        yield counting


def fails(url: str, policy: FetchPolicy, **options) -> str:
    with pytest.raises(FetchError) as error:
        fetch(url, policy, **options)
    return str(error.value)


# --- the policy itself ------------------------------------------------------------------------------------------

def test_the_policy_is_frozen_picklable_and_checked_where_built():
    policy = FetchPolicy(allow_networks=["127.0.0.2", " 10.1.0.0/16 "],
                         resolver=TableResolver({"a.example": "127.0.0.1"}))
    assert policy.allow_networks == ("127.0.0.2/32", "10.1.0.0/16")  # canonical, a tuple
    assert pickle.loads(pickle.dumps(policy)) == policy
    assert pickle.loads(pickle.dumps(ImageFetcher(policy))) == ImageFetcher(policy)
    assert pickle.loads(pickle.dumps(FetchPolicy())).resolver is socket.getaddrinfo
    with pytest.raises(AttributeError):
        policy.max_redirects = 9
    for bad in ("not-a-network", "127.0.0.1/8", "10.0.0.0/33"):
        with pytest.raises(ValueError, match=f"--allow-network '{bad}' is not a network in CIDR form"):
            FetchPolicy(allow_networks=(bad,))
    with pytest.raises(ValueError, match="one by one"):
        FetchPolicy(allow_networks="127.0.0.2/32")
    for field, value in (("max_redirects", -1), ("max_body_bytes", 0), ("total_seconds", 0),
                         ("total_seconds", float("nan"))):
        with pytest.raises(ValueError, match=field):
            FetchPolicy(**{field: value})


def test_the_table_resolver_reads_literals_and_never_asks_dns():
    resolver = TableResolver({"Img.Example.": ["127.0.0.2", "::1"]})
    assert [entry[4][0] for entry in resolver("img.example", 80)] == ["127.0.0.2", "::1"]
    assert resolver("0x7f.1", 80, 0, socket.SOCK_STREAM)[0][4] == ("127.0.0.1", 80)  # as inet_aton reads it
    with pytest.raises(socket.gaierror):
        resolver("unknown.example", 80)


# --- connecting: names resolved once, every address checked ------------------------------------------------------

def test_a_public_looking_name_that_resolves_to_loopback_is_refused_without_a_connection(listener, local):
    policy = FetchPolicy(resolver=TableResolver({"cdn.example": "127.0.0.1"}))
    error = fails(f"http://cdn.example:{listener.port}/a.jpg", policy)
    assert error == f"refused: cdn.example resolves to 127.0.0.1, {LOOPBACK_HINT}"
    assert listener.accepts() == 0
    # --allow-private-addresses lets it through: the same name is fetched.
    local.routes["/a.jpg"] = image(b"the bytes")
    allowed = FetchPolicy(allow_private_addresses=True, resolver=TableResolver({"cdn.example": "127.0.0.1"}))
    assert fetch(f"http://cdn.example:{local.port}/a.jpg", allowed) == b"the bytes"
    assert local.requests == ["/a.jpg"]


def test_every_address_of_a_name_is_checked_before_any_connection(listener):
    """One refused address among allowed ones refuses the name: no connection, not even to the allowed one."""
    with Listener("127.0.0.2") as allowed:
        policy = FetchPolicy(allow_networks=ONLY_2, resolver=TableResolver({"two.example": ["127.0.0.2", "127.0.0.1"]}))
        assert fails(f"http://two.example:{allowed.port}/", policy).startswith(
            "refused: two.example resolves to 127.0.0.1, a loopback address")
        assert allowed.accepts() == 0 and listener.accepts() == 0


@pytest.mark.parametrize("address, reason", [
    ("169.254.169.254", "169.254.169.254, a cloud metadata address (refused even with --allow-private-addresses)"),
    ("::ffff:169.254.169.254", " (169.254.169.254), a cloud metadata address"),  # the embedded address named
    ("0.0.0.0", "0.0.0.0, an unspecified address"),
    ("fe80::1", "fe80::1, a link-local address"),
])
def test_names_of_addresses_refused_always_stay_refused_with_every_flag(address, reason):
    """Refused before any connection is attempted (nothing is sent to these addresses)."""
    policy = FetchPolicy(allow_private_addresses=True, allow_networks=("0.0.0.0/0", "::/0"),
                         resolver=TableResolver({"meta.example": address}))
    error = fails("http://meta.example/latest/meta-data/", policy)
    assert error.startswith("refused: meta.example resolves to ") and reason in error, error


class Rebinding:
    """A resolver whose answer changes: ``answers[i]`` on call i (the last one from then on); counts its calls."""

    def __init__(self, *answers: str):
        self.answers, self.calls = answers, []

    def __call__(self, host, port, family=0, kind=0, proto=0, flags=0):
        self.calls.append(host)
        answer = self.answers[min(len(self.calls), len(self.answers)) - 1]
        return TableResolver({host: answer})(host, port)


@pytest.fixture
def same_port():
    """Servers on 127.0.0.2 and on 127.0.0.1 at the same port: a second lookup would reach the other one."""
    for _ in range(10):  # the port free on 127.0.0.2 may be taken on 127.0.0.1
        with Server("127.0.0.2") as first:
            try:
                other = Server("127.0.0.1", port=first.port)
            except OSError:
                continue
            with other:
                yield first, other
            return
    pytest.skip("no port free on both 127.0.0.1 and 127.0.0.2")


def test_a_name_is_resolved_once_and_the_connection_goes_to_the_checked_address(same_port):
    first, other = same_port
    first.routes["/img"] = other.routes["/img"] = image(b"from 127.0.0.2")
    resolver = Rebinding("127.0.0.2", "127.0.0.1")
    policy = FetchPolicy(allow_networks=ONLY_2, resolver=resolver)
    assert fetch(f"http://rebind.example:{first.port}/img", policy) == b"from 127.0.0.2"
    assert resolver.calls == ["rebind.example"]  # once: no second lookup between the check and the connection
    assert first.requests == ["/img"] and other.requests == []


def test_each_hop_resolves_its_host_again_and_is_checked_again(same_port):
    first, other = same_port
    first.routes["/hop"] = redirect("/img")
    first.routes["/img"] = other.routes["/img"] = image()
    resolver = Rebinding("127.0.0.2", "127.0.0.1")
    error = fails(f"http://rebind.example:{first.port}/hop", FetchPolicy(allow_networks=ONLY_2, resolver=resolver))
    assert error == (f"refused: redirect to http://rebind.example:{first.port}/img: rebind.example resolves to "
                     f"127.0.0.1, {LOOPBACK_HINT}")
    assert resolver.calls == ["rebind.example", "rebind.example"]  # once per hop
    assert first.requests == ["/hop"] and other.requests == []


# --- redirects ----------------------------------------------------------------------------------------------------

def test_a_redirect_chain_is_followed_and_every_hop_logged(local):
    local.routes.update({"/a": redirect("/b", 302), "/b": redirect(f"{local.url}/c", 307),
                         "/c": redirect("d", 308), "/d": redirect("/img?x=1", 301), "/img": image(b"at last")})
    assert fetch(f"{local.url}/a", FetchPolicy(allow_private_addresses=True)) == b"at last"
    assert local.requests == ["/a", "/b", "/c", "/d", "/img?x=1"]


def test_allow_networks_lets_just_that_network_through_at_every_hop(second, local):
    second.routes.update({"/img": image(b"allowed"), "/away": redirect(f"{local.url}/img")})
    local.routes["/img"] = image(b"must not be fetched")
    policy = FetchPolicy(allow_networks=ONLY_2)
    assert check_url(f"{second.url}/img", allow_networks=ONLY_2) is None  # the list check agrees
    assert fetch(f"{second.url}/img", policy) == b"allowed"
    error = fails(f"{second.url}/away", policy)
    assert error == f"refused: redirect to {local.url}/img: 127.0.0.1 is {LOOPBACK_HINT}"
    assert second.requests == ["/img", "/away"] and local.requests == []
    assert fails(f"{local.url}/img", policy) == f"refused: 127.0.0.1 is {LOOPBACK_HINT}"  # the first hop too
    assert local.requests == []


def redirect_targets(local: Server, ftp_port: int, v6_port: int) -> list[tuple[str, str]]:
    """(a redirect target, what the refusal says): loopback in literal forms, other schemes, a made-up name."""
    port = local.port
    return [
        (f"http://127.0.0.1:{port}/x", f"127.0.0.1 is {LOOPBACK_HINT}"),
        (f"http://2130706433:{port}/x", "2130706433 (127.0.0.1) is a loopback address"),
        (f"http://0x7f.1:{port}/x", "0x7f.1 (127.0.0.1) is a loopback address"),
        (f"http://[::ffff:127.0.0.1]:{port}/x", "::ffff:127.0.0.1 (127.0.0.1) is a loopback address"),
        (f"http://[::1]:{v6_port}/x", "::1 is a loopback address"),
        (f"http://localhost:{port}/x", "localhost is a loopback name"),
        (f"http://LOCALHOST.:{port}/x", "localhost. is a loopback name"),
        (f"http://made-up.example:{port}/x", f"made-up.example resolves to 127.0.0.1, {LOOPBACK_HINT}"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a cloud metadata address"),
        (f"ftp://127.0.0.1:{ftp_port}/x.jpg", "scheme 'ftp' (capfilt fetches only http and https URLs)"),
        ("file:///etc/passwd", "scheme 'file'"),
        ("data:image/jpeg;base64,/9j/4AAQ", "scheme 'data'"),
        ("gopher://127.0.0.1/", "scheme 'gopher'"),
    ]


@pytest.mark.parametrize("status", [302, 307, 308])
def test_redirects_to_refused_targets_fail_before_any_connection(status, second, local, listener):
    resolver = TableResolver({"made-up.example": "127.0.0.1"})
    policy = FetchPolicy(allow_networks=ONLY_2, resolver=resolver)
    v6 = Server("::1") if ipv6_loopback() else None
    with v6 or Listener():
        targets = redirect_targets(local, listener.port, v6.port if v6 else 9)
        for i, (target, reason) in enumerate(targets):
            second.routes[f"/{i}"] = redirect(target, status)
            error = fails(f"{second.url}/{i}", policy)
            assert error.startswith(f"refused: redirect to {target}: ") and reason in error, (target, error)
            assert "refused:" not in error[len("refused: "):], error  # said once
        assert second.requests == [f"/{i}" for i in range(len(targets))]
        assert local.requests == [] and listener.accepts() == 0 and (v6 is None or v6.requests == [])


def test_other_schemes_stay_refused_with_the_flags(local, listener):
    policy = FetchPolicy(allow_private_addresses=True, allow_networks=("127.0.0.0/8",))
    for target in (f"ftp://127.0.0.1:{listener.port}/x.jpg", "file:///etc/passwd", "data:,x"):
        local.routes["/to"] = redirect(target)
        assert fails(f"{local.url}/to", policy).startswith(f"refused: redirect to {target}: scheme ")
    assert listener.accepts() == 0


def test_too_many_redirects(local):
    local.routes.update({f"/hop/{i}": redirect(f"/hop/{i + 1}") for i in range(10)})
    local.routes["/hop/3"] = image(b"three redirects away")
    policy = FetchPolicy(allow_private_addresses=True, max_redirects=3)
    assert fetch(f"{local.url}/hop/0", policy) == b"three redirects away"  # exactly max_redirects: fine
    local.requests.clear()
    local.routes["/hop/3"] = redirect("/hop/4")
    assert fails(f"{local.url}/hop/0", policy) == "too many redirects (more than 3)"
    assert local.requests == ["/hop/0", "/hop/1", "/hop/2", "/hop/3"]  # the fifth URL is not asked for
    local.routes["/loop"] = redirect("/loop")
    assert "redirect" in fails(f"{local.url}/loop", FetchPolicy(allow_private_addresses=True))


# --- the body and the time ------------------------------------------------------------------------------------

def test_a_body_over_the_limit_fails(local):
    policy = FetchPolicy(allow_private_addresses=True, max_body_bytes=1000)
    local.routes.update({"/exact": image(b"x" * 1000), "/announced": announced(10**9, 10, hold_s=3.0),
                         "/chunked": chunked(10, 300), "/small-chunks": chunked(3, 300),
                         "/until-close": until_close(5000), "/short": until_close(999)})
    assert len(fetch(f"{local.url}/exact", policy)) == 1000
    start = time.monotonic()
    assert fails(f"{local.url}/announced", policy) == "body larger than 1000 bytes"
    assert time.monotonic() - start < 1.5  # refused from its Content-Length, not after reading or waiting
    assert fails(f"{local.url}/chunked", policy) == "body larger than 1000 bytes"
    assert len(fetch(f"{local.url}/small-chunks", policy)) == 900
    assert fails(f"{local.url}/until-close", policy) == "body larger than 1000 bytes"
    assert len(fetch(f"{local.url}/short", policy)) == 999
    assert "50000000" in str(FetchPolicy().max_body_bytes)


def test_a_body_cut_short_fails(local):
    local.routes["/cut"] = announced(5000, 10)
    assert fails(f"{local.url}/cut", FetchPolicy(allow_private_addresses=True)) == \
        "the connection ended after 10 of 5000 bytes"


@pytest.mark.parametrize("headers_too", [False, True], ids=["body", "headers"])
def test_a_dripping_server_is_cut_at_the_total_time(local, headers_too):
    local.routes["/drip"] = drip(headers_too)
    policy = FetchPolicy(allow_private_addresses=True, total_seconds=1.5)
    start = time.monotonic()
    assert fails(f"{local.url}/drip", policy, timeout=5) == "took longer than 1.5 s in all"
    assert 1.4 < time.monotonic() - start < 3.0


def test_the_per_read_timeout_still_holds(local):
    local.routes["/stall"] = stall(3.0)
    start = time.monotonic()
    with pytest.raises(OSError, match="timed out"):  # the socket's own error, as with urllib

        fetch(f"{local.url}/stall", FetchPolicy(allow_private_addresses=True), timeout=0.5)
    assert time.monotonic() - start < 2.0


def test_http_errors_read_as_urllib_writes_them(local):
    assert fails(f"{local.url}/missing", FetchPolicy(allow_private_addresses=True)) == "HTTP Error 404: Not Found"


# --- img2dataset's download_image, kept as it was ---------------------------------------------------------------

def test_the_image_fetcher_keeps_img2datasets_agent_opt_outs_and_result(local):
    from img2dataset import downloader

    local.routes.update({"/img": image(b"pixels"), "/noai": image(b"pixels", {"X-Robots-Tag": "noai"})})
    fetcher = ImageFetcher(FetchPolicy(allow_private_addresses=True))
    key, stream, error = fetcher((7, f"{local.url}/img"), 5, "img2dataset", {"noai"})
    assert (key, stream.read(), error) == (7, b"pixels", None)
    assert fetcher((8, f"{local.url}/noai"), 5, "img2dataset", {"noai"}) == (8, None, DISALLOWED)
    assert fetcher((9, f"{local.url}/noai"), 5, None, None)[2] is None  # no opt-outs asked for
    refused = ImageFetcher()((10, f"{local.url}/img"), 5, None, None)  # the default policy
    assert refused == (10, None, f"refused: 127.0.0.1 is {LOOPBACK_HINT}")
    assert fetcher((11, None), 5, None, None) == (11, None, "the row has no URL")
    # img2dataset's own fetch of the same URL sends the same User-Agent and gives the same result.
    original = downloader.download_image((7, f"{local.url}/img"), 5, "img2dataset", {"noai"})
    assert original[2] is None and original[1].read() == b"pixels"
    assert original[0] == 7 and downloader.download_image((8, f"{local.url}/noai"), 5, "img2dataset", {"noai"})[2] \
        == DISALLOWED
    assert local.agents[0] == local.agents[-2] and local.agents[0].startswith(USER_AGENT + " (compatible; img2dataset;")


# --- HTTPS: the certificate is verified against the name, not the address connected to -------------------------

@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for img.example (its own CA): (certificate file, key file)."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import datetime

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "img.example")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("img.example")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    folder = tmp_path_factory.mktemp("tls")
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return str(folder / "cert.pem"), str(folder / "key.pem")


def test_https_verifies_the_certificate_against_the_name_and_sends_it_for_sni(certificate, monkeypatch):
    import capfilt.ingest.fetch as fetch_module

    cert, key = certificate
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    names = []
    server_context.sni_callback = lambda connection, name, context: names.append(name)
    resolver = TableResolver({"img.example": "127.0.0.1", "other.example": "127.0.0.1"})
    policy = FetchPolicy(allow_private_addresses=True, resolver=resolver)
    with Server("127.0.0.1", tls=server_context) as server:
        server.routes["/img"] = image(b"over tls")
        # The system's CAs do not know this certificate: refused, as urllib would.
        with pytest.raises(ssl.SSLCertVerificationError, match="CERTIFICATE_VERIFY_FAILED"):
            fetch(f"https://img.example:{server.port}/img", policy)
        # Trusting it, the name it was issued for is fetched, through the pinned address ...
        trusting = ssl.create_default_context(cafile=cert)
        monkeypatch.setattr(fetch_module, "_TLS", [trusting])
        assert fetch(f"https://img.example:{server.port}/img", policy) == b"over tls"
        # ... and another name at the same address is not: the name is what is checked, not the address.
        with pytest.raises(ssl.SSLCertVerificationError, match="other.example"):
            fetch(f"https://other.example:{server.port}/img", policy)
    assert names == ["img.example", "img.example", "other.example"]
    assert server.requests == ["/img"]


# --- the seam into img2dataset ----------------------------------------------------------------------------------

class Recorder:
    """Stands in for img2dataset's Downloader: built with its arguments, called with a shard, it answers with the
    shard and the fetch function img2dataset's threads would call."""

    def __init__(self, **arguments):
        self.arguments = arguments

    def __call__(self, row):
        from img2dataset import downloader

        return row, downloader.download_image


def test_the_downloader_is_swapped_for_the_call_only_and_installs_the_fetcher_once(monkeypatch):
    from img2dataset import downloader

    main = importlib.import_module("img2dataset.main")
    original_class, original_fetch = main.Downloader, downloader.download_image
    monkeypatch.setattr(downloader, "download_image", original_fetch)  # restored after the test
    policy = FetchPolicy(allow_networks=ONLY_2)
    with pytest.raises(RuntimeError, match="inside"):
        with fetching_with(policy):
            assert main.Downloader.func is PolicyDownloader and main.Downloader.args == (original_class, policy)
            raise RuntimeError("inside")
    assert main.Downloader is original_class

    wrapped = pickle.loads(pickle.dumps(PolicyDownloader(Recorder, policy, thread_count=2)))  # as a worker has it
    assert wrapped.downloader.arguments == {"thread_count": 2}
    assert wrapped(("00000", "shard")) == (("00000", "shard"), ImageFetcher(policy))
    installed = downloader.download_image
    install_fetcher(policy)
    assert downloader.download_image is installed  # once per process for one policy
    install_fetcher(FetchPolicy())
    assert downloader.download_image == ImageFetcher(FetchPolicy())  # another policy replaces it


def test_a_changed_img2dataset_fails_the_download_rather_than_fetch_without_the_policy(monkeypatch):
    from img2dataset import downloader

    monkeypatch.setattr(downloader, "download_image", lambda row, timeout, headers: None)
    with pytest.raises(RuntimeError, match="cannot apply its fetch policy"):
        install_fetcher(FetchPolicy())


def test_download_settings_carry_the_policy():
    settings = DownloadSettings(allow_private_addresses=True, allow_networks=["127.0.0.2"], max_body_bytes=10,
                                total_seconds=2.5)
    assert settings.allow_networks == ("127.0.0.2/32",)
    assert settings.fetch_policy() == FetchPolicy(allow_private_addresses=True, allow_networks=("127.0.0.2/32",),
                                                  max_body_bytes=10, total_seconds=2.5)
    assert DownloadSettings().fetch_policy() == FetchPolicy()
    with pytest.raises(ValueError, match="--allow-network"):
        DownloadSettings(allow_networks=("nope",))


# --- end to end: img2dataset's multiprocessing distributor, spawned workers ------------------------------------

def test_download_enforces_the_policy_in_img2datasets_workers(second, local, listener, tmp_path):
    from img2dataset.downloader import Downloader

    main = importlib.import_module("img2dataset.main")

    picture = jpeg()
    second.routes.update({"/ok.jpg": image(picture), "/to-loopback": redirect(f"{local.url}/ok.jpg"),
                          "/to-ftp": redirect(f"ftp://127.0.0.1:{listener.port}/x.jpg", 307),
                          "/big.jpg": announced(200_000, 10)})
    local.routes["/ok.jpg"] = image(picture)
    rows = [
        (f"{second.url}/ok.jpg", "fine", None),
        (f"{second.url}/to-loopback", "redirected to loopback",
         f"refused: redirect to {local.url}/ok.jpg: 127.0.0.1 is {LOOPBACK_HINT}"),
        (f"{local.url}/ok.jpg", "loopback itself", f"refused: 127.0.0.1 is {LOOPBACK_HINT}"),
        (f"{second.url}/to-ftp", "redirected to ftp", f"refused: redirect to ftp://127.0.0.1:{listener.port}/x.jpg: "
                                                      "scheme 'ftp' (capfilt fetches only http and https URLs)"),
        (f"{second.url}/big.jpg", "too big", "body larger than 100000 bytes"),
    ]
    url_list = tmp_path / "list.parquet"
    pq.write_table(pa.table({"url": [r[0] for r in rows], "caption": [r[1] for r in rows]}), url_list)
    settings = DownloadSettings(processes=1, threads=2, samples_per_shard=10, allow_networks=ONLY_2,
                                max_body_bytes=100_000, timeout=5, total_seconds=10)
    start = time.monotonic()
    folder = download(url_list, tmp_path / "shards", settings)
    assert time.monotonic() - start < 60
    shard = {row["caption"]: row for row in pq.read_table(f"{folder}/00000.parquet").to_pylist()}
    for url, caption, error in rows:
        if error is None:
            assert shard[caption]["status"] == "success", shard[caption]
        else:
            assert shard[caption]["status"] == "failed_to_download" and shard[caption]["error_message"] == error
    assert local.requests == [] and listener.accepts() == 0
    assert sorted(second.requests) == ["/big.jpg", "/ok.jpg", "/to-ftp", "/to-loopback"]
    assert main.Downloader is Downloader  # img2dataset's own again


def test_the_command_line_passes_the_policy_to_the_list_check_the_download_and_the_record(tmp_path, monkeypatch):
    import json

    from capfilt import cli
    from capfilt.ingest import datasets
    from capfilt.recipes import bootstrap as recipe
    from capfilt.ingest import download as download_module

    url_list = tmp_path / "urls.tsv"
    url_list.write_text("http://127.0.0.2:8080/a.jpg\ta\nhttp://127.0.0.1:8080/b.jpg\tb\n")
    seen = []
    monkeypatch.setattr(download_module, "download",
                        lambda url_list, folder, settings, extra, **kw: seen.append(settings))
    folder = tmp_path / "out" / "shards"
    args = cli.bootstrap_parser().parse_args(["--data", str(url_list), "--allow-network", "127.0.0.2/32",
                                              "--allow-network", "10.1.0.0/16", "--total-timeout", "5",
                                              "--max-body-bytes", "1000000"])
    recipe.prepare_download(datasets.resolve(str(url_list)), folder, cli.download_settings_from_args(args))
    assert seen[0].fetch_policy() == FetchPolicy(allow_networks=("127.0.0.2/32", "10.1.0.0/16"),
                                                 max_body_bytes=1_000_000, total_seconds=5.0)
    canonical = pq.read_table(recipe.beside(folder, recipe.URL_LIST_SUFFIX)).to_pylist()
    assert [row["capfilt_error"] for row in canonical] == [None, f"refused: 127.0.0.1 is {LOOPBACK_HINT}"]
    record = json.loads(recipe.beside(folder, recipe.SOURCE_SUFFIX).read_text())
    assert record["allow_networks"] == ["127.0.0.2/32", "10.1.0.0/16"]
    assert not {"max_body_bytes", "total_seconds"} & set(record)  # limits decide at download, as --timeout does
    # No networks are not recorded (a folder recorded before the flag existed still matches); a bad network
    # is a usage error.
    defaults = cli.bootstrap_parser().parse_args(["--data", str(url_list)])
    recipe.prepare_download(datasets.resolve(str(url_list)), tmp_path / "other" / "shards",
                            cli.download_settings_from_args(defaults))
    assert "allow_networks" not in json.loads(recipe.beside(tmp_path / "other" / "shards", recipe.SOURCE_SUFFIX).read_text())
    bad = cli.bootstrap_parser().parse_args(["--data", str(url_list), "--allow-network", "nope"])
    with pytest.raises(cli.UsageError, match="--allow-network 'nope'"):
        cli.download_settings_from_args(bad)
