"""Fetching one URL safely: the address policy applied where the connection is made, at every redirect hop.

``capfilt.ingest.urls`` judges a URL's text before img2dataset sees the list. The text cannot show what a name
resolves to (``127.0.0.1.nip.io``, a rebinding domain), nor where a server redirects (a public image host
answering ``302 Location: http://169.254.169.254/``). So img2dataset's workers fetch with this module instead
of ``urllib.request.urlopen`` (``ImageFetcher``, put in place by ``capfilt.ingest.download``), and per URL
(``FetchPolicy``, the same flags as the URL check):

- Every hop's URL (the first, then each redirect target) is judged by ``urls.check_url`` before anything is
  sent: only ``http`` and ``https``, no internal names, no refused literal address. A redirect to ``ftp:``,
  ``file:``, ``data:`` or a refused host fails (``refused: redirect to URL: REASON``) without a connection.
- The host of each hop is resolved ONCE, with the policy's resolver (``socket.getaddrinfo``), and every address
  of the answer is judged by ``urls.refused_address``; if one is refused the URL fails (``refused: NAME
  resolves to ADDRESS, a loopback address (...)``), since which of them a connection would reach is not ours
  to know. The socket then connects to the addresses that were checked, in the answer's order: nothing is
  resolved a second time, so a name whose answer changes between the check and the connection (DNS
  rebinding) cannot slip through.
- HTTPS verifies the certificate (the system's CAs, as urllib does) against the NAME, and sends the name
  for SNI: connecting to the checked address does not weaken TLS.
- Redirects (301, 302, 303, 307, 308; as GET, the only method img2dataset uses) are followed up to
  ``max_redirects`` times; one more fails with ``too many redirects``.
- The body: a ``Content-Length`` above ``max_body_bytes`` fails before a byte of it is read; a body without
  one (chunked, or up to the connection's end) is read in chunks and fails once past the limit.
- Time: ``total_seconds`` bounds a URL in all (resolving, connecting, TLS, headers and body of every hop),
  also against a server that sends one byte at a time; img2dataset's ``timeout`` still bounds each connection
  attempt and each read.
- Errors are short, stable texts (``body larger than 50000000 bytes``, ``took longer than 30 s in all``,
  ``HTTP Error 404: Not Found`` as urllib writes it); img2dataset stores them in ``error_message``.

Left to the network and the machine:

- Proxies: none. The environment's ``http_proxy``/``https_proxy`` are ignored, because a proxy resolves
  names itself, out of reach of this check. A cluster that must fetch through a proxy needs a proxy that
  enforces the same policy.
- IPv6 scoped addresses: link-local addresses (``fe80::/10``, the only ones a scope id selects an interface
  for) are refused, so no scope id is ever used; a resolver's answer is connected to as it is given.
- The resolver's own time: ``getaddrinfo`` cannot be interrupted; its time counts against ``total_seconds``
  (a hop that would start after the deadline fails), but one lookup is bounded only by the system resolver's
  timeouts (``/etc/resolv.conf``: ``timeout``, ``attempts``).
- Where packets go: routes, firewalls, a NAT64 gateway (NAT64 and other IPv6 forms that embed a refused IPv4
  address are refused). Blocking the metadata address and internal networks for the download workers at the
  network level (a firewall rule, IMDSv2 with a hop limit of 1) is still worth doing: a second wall.
"""

from __future__ import annotations

import heapq
import http.client
import io
import ipaddress
import itertools
import os
import socket
import ssl
import string
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence
from urllib.parse import quote, unwrap, urljoin, urlsplit

from capfilt.ingest.urls import abridged, check_url, parse_networks, refused_address

# img2dataset's User-Agent (downloader.download_image), with its token appended the same way.
USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
USER_AGENT_TOKEN = " (compatible; {token}; +https://github.com/rom1504/img2dataset)"
DISALLOWED = "Use of image disallowed by X-Robots-Tag directive"  # img2dataset's text for an opt-out
REDIRECTS = (301, 302, 303, 307, 308)  # the statuses urllib follows
CHUNK_BYTES = 1 << 16  # the body is read in chunks of this size
_SHOWN_URL = 120  # characters of a URL an error shows


@dataclass(frozen=True)
class FetchPolicy:
    """What a worker may fetch, per URL; frozen and picklable, so that it travels to every worker process."""

    allow_private_addresses: bool = False  # --allow-private-addresses: loopback, private, shared and internal names
    allow_networks: tuple[str, ...] = ()  # --allow-network CIDR: just these networks (capfilt.ingest.urls.refused_address)
    max_redirects: int = 5  # redirects followed per URL; image hosts and CDNs use one or two
    max_body_bytes: int = 50_000_000  # a larger body fails: far above any real image, bounds memory per thread
    # Per URL in all (every hop, from resolving to the last body byte): what one slow or dripping server can cost a
    # download thread. A real image of a few MB arrives well within it on any working link.
    total_seconds: float = 30.0
    # (host, port, family, type) -> getaddrinfo's answer; picklable (a module function or a top-level class).
    resolver: Callable[..., list] = socket.getaddrinfo

    def __post_init__(self):
        # Canonical text of each network (a bare address becomes its /32 or /128); a bad one is a ValueError now.
        networks = parse_networks(self.allow_networks)
        object.__setattr__(self, "allow_networks", tuple(str(network) for network in networks))
        object.__setattr__(self, "_networks", networks)
        if self.max_redirects < 0:
            raise ValueError(f"max_redirects must be 0 or more, not {self.max_redirects}")
        if self.max_body_bytes <= 0:
            raise ValueError(f"max_body_bytes must be positive, not {self.max_body_bytes}")
        if not self.total_seconds > 0:
            raise ValueError(f"total_seconds must be positive, not {self.total_seconds}")


class TableResolver:
    """A resolver that answers from a table (name -> addresses) and reads IP literals itself; it never asks DNS.

    For tests (made-up names mapped to 127.0.0.x, without /etc/hosts) and for pinning names to addresses. A
    name not in the table fails as an unknown name does. Picklable: it travels in a ``FetchPolicy``.
    """

    def __init__(self, table: Mapping[str, str | Sequence[str]]):
        self.table = {name.lower().rstrip("."): (addresses,) if isinstance(addresses, str) else tuple(addresses)
                      for name, addresses in table.items()}

    def __call__(self, host: str, port: int, family: int = 0, kind: int = 0, proto: int = 0, flags: int = 0) -> list:
        addresses = self.table.get(host.lower().rstrip("."))
        if addresses is None:  # an address written out (in any form inet_aton reads), never a lookup
            return socket.getaddrinfo(host, port, family, kind or socket.SOCK_STREAM, proto,
                                      flags | socket.AI_NUMERICHOST)
        answer = []
        for address in map(ipaddress.ip_address, addresses):
            kind = socket.AF_INET6 if address.version == 6 else socket.AF_INET
            sockaddr = (str(address), port, 0, 0) if address.version == 6 else (str(address), port)
            answer.append((kind, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr))
        return answer

    def __eq__(self, other):
        return isinstance(other, TableResolver) and other.table == self.table

    def __hash__(self):
        return hash(tuple(sorted(self.table.items())))

    def __repr__(self):
        return f"TableResolver({self.table!r})"


class FetchError(Exception):
    """A URL that was not fetched, with a short, stable reason."""


class _Refused(Exception):
    """A hop's host or address is refused: the reason without ``refused:`` (the hop adds its prefix)."""


# --- the deadline ---------------------------------------------------------------------------------------------

class _Watch:
    """One socket under the watchdog: ``expired`` once the watchdog shut it down."""

    __slots__ = ("deadline", "sock", "expired")

    def __init__(self, deadline: float, sock: socket.socket):
        self.deadline, self.sock, self.expired = deadline, sock, False


class _Watchdog:
    """Shuts down the sockets of fetches past their deadline: one daemon thread per process, started on first use.

    Why a watchdog rather than socket timeouts alone: a timeout bounds each read, not their sum, and http.client
    reads the status line, the headers and a chunked body in many reads this module cannot reach; a server that
    sends one byte per read would hold a thread for as long as it likes. Shutting a socket down ends whatever
    read or connect is blocked on it (in http.client and ssl alike) and makes every later one fail at once.
    The watchdog holds its own duplicate of each socket (``dup``): it shuts the connection down through it,
    also after TLS took over the original, and never touches a descriptor the fetch has closed.
    """

    def __init__(self):
        self._lock = threading.Condition()
        self._pid: int | None = None
        self._heap: list[tuple[float, int]] = []  # (deadline, id), earliest first
        self._live: dict[int, _Watch] = {}  # the watches not released yet
        self._ids = itertools.count()

    def watch(self, sock: socket.socket, deadline: float) -> tuple[int, _Watch]:
        with self._lock:
            if self._pid != os.getpid():  # first use in this process (a forked worker inherits no thread)
                self._pid, self._heap, self._live = os.getpid(), [], {}
                threading.Thread(target=self._run, name="capfilt-fetch-watchdog", daemon=True).start()
            token, watch = next(self._ids), _Watch(deadline, sock.dup())
            self._live[token] = watch
            heapq.heappush(self._heap, (deadline, token))
            self._lock.notify()
        return token, watch

    def release(self, token: int) -> None:
        with self._lock:
            watch = self._live.pop(token, None)
        if watch is not None:
            watch.sock.close()

    def _run(self) -> None:
        with self._lock:
            while True:
                while self._heap and self._heap[0][1] not in self._live:
                    heapq.heappop(self._heap)  # released before its deadline
                if not self._heap:
                    self._lock.wait()
                    continue
                wait = self._heap[0][0] - time.monotonic()
                if wait > 0:
                    self._lock.wait(wait)
                    continue
                watch = self._live.pop(heapq.heappop(self._heap)[1])
                watch.expired = True
                try:
                    watch.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # not connected yet, or already closed by the peer
                watch.sock.close()


_WATCHDOG = _Watchdog()
_TLS: list[ssl.SSLContext] = []  # one default context per process, made on first use (loading the CAs costs)


def _tls_context() -> ssl.SSLContext:
    if not _TLS:
        context = ssl.create_default_context()  # what urllib and http.client use: CERT_REQUIRED, check_hostname
        context.set_alpn_protocols(["http/1.1"])
        _TLS.append(context)
    return _TLS[0]


# --- one URL ---------------------------------------------------------------------------------------------------

class _Connection(http.client.HTTPConnection):
    """http.client's connection, with the socket opened by ``connect`` (resolve once, check, pin)."""

    def __init__(self, host: str, port: int, timeout: float, connect: Callable[..., socket.socket]):
        super().__init__(host, port, timeout=timeout)
        self._create_connection = connect  # http.client calls it with ((host, port), timeout, source_address)


class _TLSConnection(http.client.HTTPSConnection):
    """The same over TLS: ``HTTPSConnection.connect`` wraps the pinned socket with server_hostname=host."""

    def __init__(self, host: str, port: int, timeout: float, connect: Callable[..., socket.socket]):
        super().__init__(host, port, timeout=timeout, context=_tls_context())
        self._create_connection = connect


class _Fetch:
    """The state of one URL: its policy, its deadline, the sockets under the watchdog."""

    def __init__(self, policy: FetchPolicy, timeout: float, user_agent: str):
        self.policy, self.user_agent = policy, user_agent
        self.deadline = time.monotonic() + policy.total_seconds
        self.timeout = min(float(timeout), policy.total_seconds)  # each connection attempt and each read
        self.watches: list[tuple[int, _Watch]] = []  # the sockets of the current hop under the watchdog
        self.shut_down = False  # whether the watchdog shut down a socket of this URL

    @property
    def expired(self) -> bool:
        return self.shut_down or any(w.expired for _, w in self.watches) or time.monotonic() >= self.deadline

    def too_long(self) -> FetchError:
        return FetchError(f"took longer than {self.policy.total_seconds:g} s in all")

    def release(self) -> None:
        """Take the sockets of the hops so far from the watchdog (a hop's connection is closed)."""
        for token, watch in self.watches:
            _WATCHDOG.release(token)
            self.shut_down = self.shut_down or watch.expired
        self.watches = []

    def open(self, url: str) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse, str]:
        """The connection and the response whose headers are read, after redirects, and the URL that gave it."""
        policy = self.policy
        for hop in range(policy.max_redirects + 1):
            prefix = "refused: " if hop == 0 else f"refused: redirect to {abridged(url, _SHOWN_URL)}: "
            reason = check_url(url, policy.allow_private_addresses, policy._networks)
            if reason is not None:
                raise FetchError(prefix + reason.removeprefix("refused: "))
            parts = urlsplit(unwrap(url))  # check_url judged this reading of the host too
            kind = _TLSConnection if parts.scheme.lower() == "https" else _Connection
            connection = kind(parts.hostname, parts.port or kind.default_port, self.timeout, self.connect)
            try:
                connection.putrequest("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
                connection.putheader("User-Agent", self.user_agent)
                connection.putheader("Connection", "close")
                connection.endheaders()
                response = connection.getresponse()
            except _Refused as refused:
                connection.close()
                raise FetchError(prefix + str(refused)) from None
            except BaseException:
                connection.close()
                raise
            location = response.getheader("Location")
            if response.status not in REDIRECTS or not location:
                return connection, response, url
            connection.close()
            self.release()
            # urllib's reading of Location: characters a URL cannot hold quoted, then relative to this URL
            url = urljoin(url, quote(location.strip(), encoding="iso-8859-1", safe=string.punctuation))
        raise FetchError(f"too many redirects (more than {policy.max_redirects})")

    def connect(self, address: tuple[str, int], timeout=None, source_address=None) -> socket.socket:
        """Resolve ``host`` once, refuse it if any of its addresses is refused, connect to those addresses."""
        host, port = address
        if self.expired:
            raise self.too_long()
        answer = self.policy.resolver(host, port, 0, socket.SOCK_STREAM)
        for *_, sockaddr in answer:
            resolved = ipaddress.ip_address(sockaddr[0])
            refusal = refused_address(resolved, self.policy.allow_private_addresses, self.policy._networks)
            if refusal is not None:
                shown = str(resolved) if refusal.address == resolved else f"{resolved} ({refusal.address})"
                raise _Refused(f"{host} resolves to {shown}, {refusal.reason}")
        error: OSError = OSError(f"{host} resolves to no address")
        for family, kind, proto, _, sockaddr in answer:  # as socket.create_connection, over the checked answer
            if self.expired:
                raise self.too_long()
            sock = socket.socket(family, kind, proto)
            self.watches.append(_WATCHDOG.watch(sock, self.deadline))
            try:
                sock.settimeout(min(self.timeout, max(self.deadline - time.monotonic(), 0.001)))
                sock.connect(sockaddr)
                sock.settimeout(self.timeout)
                return sock
            except OSError as failed:
                error = failed
                sock.close()
        raise error


@dataclass
class Opened:
    """A response whose headers are read (after redirects); ``body()`` reads the body within the limits."""

    url: str  # the URL that answered (the last hop)
    status: int
    headers: http.client.HTTPMessage
    _response: http.client.HTTPResponse
    _fetch: _Fetch

    def body(self) -> io.BytesIO:
        """The body (at position 0); ``FetchError`` past ``max_body_bytes``, past the deadline, or cut short."""
        limit = self._fetch.policy.max_body_bytes
        too_large = FetchError(f"body larger than {limit} bytes")
        length = self._response.length  # Content-Length as http.client read it; None: chunked or up to the end
        if length is not None and length > limit:
            raise too_large
        body = io.BytesIO()
        while True:  # each pass reads at least a byte or ends; the watchdog bounds the time
            chunk = self._response.read(min(CHUNK_BYTES, limit + 1 - body.tell()))
            if not chunk:
                break
            body.write(chunk)
            if body.tell() > limit:
                raise too_large
        if any(watch.expired for _, watch in self._fetch.watches):  # a socket shut down reads as the body's end
            raise self._fetch.too_long()
        if self._response.length:  # http.client stops at an early end of a Content-Length body without a word
            raise FetchError(f"the connection ended after {body.tell()} of {length} bytes")
        body.seek(0)
        return body


@contextmanager
def opened(url: str, policy: FetchPolicy = FetchPolicy(), timeout: float = 10.0,
           user_agent: str = USER_AGENT) -> Iterator[Opened]:
    """``with opened(url, policy) as response:`` the 2xx response to ``url`` under ``policy``, its headers read.

    ``timeout`` (img2dataset's) bounds each connection attempt and each read, ``policy.total_seconds`` the
    whole, the body's read included. Raises ``FetchError`` for a refusal, a limit, the deadline or a status
    other than 2xx (``HTTP Error 404: Not Found``, as urllib writes it), else what the socket, TLS or
    http.client raised (``timed out``, ``[Errno 111] Connection refused``).
    """
    if url is None or not url.strip():
        raise FetchError("the row has no URL")
    state = _Fetch(policy, timeout, user_agent)
    connection = None
    try:
        try:
            connection, response, final = state.open(url)
            if not 200 <= response.status < 300:
                raise FetchError(f"HTTP Error {response.status}: {response.reason}")  # urllib's HTTPError text
            yield Opened(final, response.status, response.headers, response, state)
        except FetchError:
            raise
        except Exception:
            if state.expired:  # whatever broke (a socket shut down mid-read, a timeout), the deadline passed
                raise state.too_long() from None
            raise
    finally:
        if connection is not None:
            connection.close()
        state.release()


def fetch(url: str, policy: FetchPolicy = FetchPolicy(), timeout: float = 10.0,
          user_agent: str = USER_AGENT) -> bytes:
    """The body of ``url`` under ``policy`` (``opened`` and ``Opened.body``)."""
    with opened(url, policy, timeout, user_agent) as response:
        return response.body().getvalue()


@dataclass(frozen=True)
class ImageFetcher:
    """img2dataset's ``downloader.download_image`` under ``policy``: the same arguments and result.

    ``(key, BytesIO, None)`` or ``(key, None, error)``; img2dataset's User-Agent (with its token) and its
    ``X-Robots-Tag`` opt-outs (``img2dataset.downloader.is_disallowed``, before the body is read).
    """

    policy: FetchPolicy = FetchPolicy()

    def __call__(self, row, timeout, user_agent_token, disallowed_header_directives):
        from img2dataset.downloader import is_disallowed

        key, url = row
        user_agent = USER_AGENT + (USER_AGENT_TOKEN.format(token=user_agent_token) if user_agent_token else "")
        try:
            with opened(url, self.policy, timeout, user_agent) as response:
                if disallowed_header_directives and is_disallowed(response.headers, user_agent_token,
                                                                  disallowed_header_directives):
                    return key, None, DISALLOWED
                return key, response.body(), None
        except Exception as error:  # img2dataset records every failure as the row's error_message
            return key, None, str(error) or type(error).__name__
