"""Which URLs capfilt fetches: ``http`` and ``https`` URLs to public hosts, nothing else.

A URL list is untrusted input, and its URLs are fetched by img2dataset's workers, which on a cluster sit
inside a private network: next to internal services, and next to the cloud's metadata service
(169.254.169.254 on AWS, GCP, Azure and Oracle; ``metadata.google.internal``), which hands out the
machine's credentials to whoever asks. A list that names such addresses would make capfilt a tool for
server-side request forgery (SSRF). So, before img2dataset sees the list, ``capfilt.ingest.url_list.write_url_list``
refuses (``check_url``; ``refusals`` for a whole column):

- every scheme but ``http`` and ``https`` (``file:``, ``ftp:``, ``data:``, ... and a URL without scheme):
  Python's urllib, which img2dataset's own fetcher uses, would read local files (``file:``) and FTP servers;
- addresses that are not globally routable: loopback (127.0.0.0/8, ``::1``), private (10/8, 172.16/12,
  192.168/16, ``fc00::/7``, the deprecated site-local ``fec0::/10``), shared (100.64.0.0/10, carrier-grade
  NAT), link-local (169.254.0.0/16 with the metadata address, ``fe80::/10``), unspecified (0.0.0.0/8, ``::``:
  connecting there reaches the machine itself), multicast, and every other reserved or special-purpose
  range (``ipaddress``'s ``is_global``), also when written as an IPv4-mapped, IPv4-compatible, NAT64 or
  6to4 IPv6 address that embeds one of them;
- the cloud metadata addresses that are not link-local: ``fd00:ec2::254`` (AWS, IPv6), 100.100.100.200
  (Alibaba Cloud), 168.63.129.16 (Azure's WireServer, a public address);
- names that can only be internal: ``localhost`` and ``*.localhost`` (loopback), single-label names
  (``intranet``, ``metadata``: resolved through the cluster's search domains), names under a suffix that is
  not a public top-level domain and is used for private networks (``.internal``, ``.local``,
  ``.localdomain``, ``.home.arpa``, ``.lan``, ``.intranet``, ``.corp``, ``.home``, ``.private``, ``.svc``),
  and the metadata names ``metadata.google.internal``, ``metadata.goog`` and ``instance-data``.

The host is read from the URL the way urllib reads it (surrounding whitespace and a ``<URL:...>`` wrapper
removed, the scheme in any case, percent-escapes in the host decoded, the port cut at the last colon, IPv6
brackets and zone ids, internationalised names through IDNA, which maps full-width digits and dots to ASCII)
and the way ``urllib.parse.urlsplit`` reads it (the host after the last ``@``); if either reading names a
refused host, the URL is refused. A host that ends in a number is an IPv4 address, in any form
``inet_aton`` accepts (``127.1``, ``2130706433``, ``0x7f.0.0.1``, ``0177.0.0.1``, a trailing dot), and
is refused when it is not a valid one. A host with whitespace or control characters is refused.

``--allow-private-addresses`` (``allow_private_addresses=True``) lets loopback, private and shared
addresses and internal names through: for tests against a local server and for internal mirrors.
Link-local addresses (169.254.169.254 among them), the unspecified address, multicast and reserved
ranges, and the cloud metadata addresses and names stay refused even then. ``--allow-network CIDR``
(``allow_networks``, repeatable) is the narrow form: it lets just the addresses of those networks through
(``127.0.0.2/32`` lets 127.0.0.2 and still refuses 127.0.0.1; ``10.1.0.0/16`` an internal mirror's
subnet; a reserved range such as a test lab's 198.18.0.0/15 only when named), never the cloud metadata,
unspecified, link-local and multicast addresses; names are judged as without it. ``refused_address`` is the one function that judges an address under these flags.

This module judges the URL's TEXT only: it resolves no name and never opens a connection. What the text
cannot show (a public-looking name whose DNS record points at a private or metadata address, such as
``127.0.0.1.nip.io`` or a rebinding domain; a redirect to such an address) is judged where the connection
is made, by ``capfilt.ingest.fetch``, which img2dataset's workers fetch with: it applies ``check_url`` to every
redirect target and ``refused_address`` to every address a name resolves to, and connects to the address
it checked.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Iterable, NamedTuple, Union
from urllib.parse import unquote, unwrap, urlsplit

import pyarrow as pa
import pyarrow.compute as pc

SCHEMES = ("http", "https")
FLAG = "--allow-private-addresses"
NETWORK_FLAG = "--allow-network"

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

# Cloud metadata services outside the link-local range: refused even with the flag.
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254",  # AWS, GCP, Azure, Oracle, OpenStack (link-local: refused anyway)
    "fd00:ec2::254",  # AWS, IPv6
    "100.100.100.200",  # Alibaba Cloud
    "168.63.129.16",  # Azure WireServer (a public address)
))
METADATA_NAMES = frozenset({"metadata.google.internal", "metadata.goog", "metadata", "instance-data",
                            "instance-data.ec2.internal"})
# Suffixes that are not public top-level domains and name hosts of private networks (RFC 6761, 6762, 8375,
# ICANN's .internal, and the undelegated names in wide private use).
INTERNAL_SUFFIXES = ("internal", "local", "localdomain", "home.arpa", "lan", "intranet", "corp", "home",
                     "private", "svc")

_PRIVATE = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7",
                                                   "fec0::/10"))
_SHARED = ipaddress.ip_network("100.64.0.0/10")
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_COMPATIBLE = ipaddress.ip_network("::/96")

_SCHEME = re.compile(r"([^/:]+):(.*)", re.DOTALL)  # urllib's _splittype
_AUTHORITY = re.compile(r"//([^/#?]*)(.*)", re.DOTALL)  # urllib's _splithost
_NUMBER = re.compile(r"[0-9]+|0[xX][0-9a-fA-F]*")  # a label that makes the host an IPv4 address
_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f-\x9f\s]")

_ADDRESS_HINT = f"({FLAG} lets loopback and private addresses through)"
_NAME_HINT = f"({FLAG} lets internal names through)"
_ALWAYS = f"(refused even with {FLAG})"


def check_url(url: str | None, allow_private_addresses: bool = False,
              allow_networks: Iterable[str | IPNetwork] = ()) -> str | None:
    """None when capfilt may fetch ``url``, else why not: ``refused: ...``, naming the scheme or the host.

    An empty URL (None, "", whitespace) is not refused here: img2dataset fails it at download. Nothing is
    resolved and no connection is opened. ``allow_private_addresses`` lets loopback, private and shared
    addresses and internal names through, never link-local (169.254.169.254), unspecified, multicast or
    reserved addresses, nor the cloud metadata addresses and names (see the module's docstring).
    ``allow_networks`` (CIDR strings, ``--allow-network``) lets an address written in the URL through when it
    lies in one of them, unless it is refused always (``refused_address``); names are judged as without it.
    """
    networks = parse_networks(allow_networks)
    if url is None or not url.strip():
        return None
    text = unwrap(url)  # what urllib.request.Request does first: strip, then unwrap '<URL:...>'
    scheme = _SCHEME.fullmatch(text)
    if scheme is None:
        return f"refused: {abridged(text)} has no scheme (capfilt fetches only http and https URLs)"
    name = scheme.group(1).lower()
    if name not in SCHEMES:
        return f"refused: scheme {abridged(name)!r} (capfilt fetches only http and https URLs)"
    for host in _hosts(text, scheme.group(2)):
        if not host:
            return "refused: the URL names no host"
        reason = _check_host(host, allow_private_addresses, networks)
        if reason:
            return reason
    return None


def refusals(urls: pa.Array | pa.ChunkedArray, allow_private_addresses: bool = False,
             allow_networks: Iterable[str | IPNetwork] = ()) -> pa.Array:
    """``check_url`` over a string column: the reason for each refused URL, null for the others.

    The common shape (``http(s)://name.tld[:port]`` followed by ``/``, ``?``, ``#`` or the end, with a
    top-level domain that starts with a letter and is not internal) passes in two vectorised regular
    expressions; ``check_url`` runs only on the other rows.
    """
    networks = parse_networks(allow_networks)  # once, and a bad one fails even when no row needs it
    if isinstance(urls, pa.ChunkedArray):
        urls = urls.combine_chunks()
    if not pa.types.is_string(urls.type):
        urls = urls.cast(pa.string())
    plain = pc.match_substring_regex(urls, _PLAIN, ignore_case=True)
    special = pc.match_substring_regex(urls, _SPECIAL, ignore_case=True)
    fast = pc.fill_null(pc.and_(plain, pc.invert(special)), True)  # a null URL is not refused
    slow = pc.invert(fast)
    result = pa.nulls(len(urls), pa.string())
    rest = pc.filter(urls, slow).to_pylist()
    if not rest:
        return result
    reasons = pa.array([check_url(url, allow_private_addresses, networks) for url in rest], pa.string())
    return pc.replace_with_mask(result, slow, reasons)


_HOST_END = r"(?::[0-9]*)?(?:[/?#]|$)"
_PLAIN = r"^https?://(?:[a-z0-9-]+\.)+[a-z][a-z0-9-]*" + _HOST_END
_SPECIAL = (r"^https?://(?:[a-z0-9.-]*\.)?(?:localhost|metadata\.goog|"
            + "|".join(re.escape(s) for s in INTERNAL_SUFFIXES) + ")" + _HOST_END)


def abridged(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters, ``...`` marking the cut: a URL or host as an error shows it."""
    return text if len(text) <= limit else text[:limit] + "..."


def _hosts(text: str, rest: str) -> list[str]:
    """The host as ``urllib.parse.urlsplit`` reads it, then as urllib.request/http.client connect to it."""
    hosts = []
    try:
        split = urlsplit(text).hostname
    except ValueError:  # a bad IPv6 literal or port: the host below decides
        split = None
    if split is not None:
        hosts.append(unquote(split))
    authority = _AUTHORITY.fullmatch(rest)
    if authority is None:
        return hosts or [""]
    host = unquote(authority.group(1))  # urllib.request.Request._parse
    colon, bracket = host.rfind(":"), host.rfind("]")  # http.client.HTTPConnection._get_hostport
    if colon > bracket:
        port = host[colon + 1:]
        if port:
            try:
                int(port)
            except ValueError:
                return hosts or [""]  # http.client raises InvalidURL: no connection is made
        host = host[:colon]
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    hosts.append(host)
    return hosts


def _check_host(host: str, allow: bool, networks: tuple[IPNetwork, ...]) -> str | None:
    if _CONTROL_OR_SPACE.search(host):
        return "refused: the host holds whitespace or control characters"
    shown = abridged(host)
    if not host.isascii():
        try:  # what socket.getaddrinfo does with a str host: full-width digits and dots become ASCII
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            return None  # getaddrinfo fails the same way: no connection is made
    host = host.lower()
    if ":" in host:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return f"refused: {shown} is not a valid IPv6 address"
        return _check_address(shown, address, allow, networks)
    name = host.rstrip(".")
    if not name:
        return "refused: the URL names no host"
    labels = name.split(".")
    if _NUMBER.fullmatch(labels[-1]):
        address = _ipv4(labels)
        if address is None:
            return f"refused: {shown} ends in a number but is not a valid IPv4 address"
        return _check_address(shown, address, allow, networks)
    if name == "localhost" or name.endswith(".localhost"):
        return _refusal(shown, "a loopback name", _ADDRESS_HINT, allow)
    if name in METADATA_NAMES:
        return _refusal(shown, "a cloud metadata name", None, allow)
    if len(labels) == 1:
        return _refusal(shown, "a single-label name, an internal host found through the search domains",
                        _NAME_HINT, allow)
    for suffix in INTERNAL_SUFFIXES:
        if name.endswith("." + suffix):
            return _refusal(shown, f"an internal name under .{suffix}", _NAME_HINT, allow)
    return None


def _ipv4(labels: list[str]) -> ipaddress.IPv4Address | None:
    """The address ``inet_aton`` reads in ``labels`` (1 to 4 parts: decimal, octal with 0, hex with 0x; the
    last fills the remaining bytes), or None if it reads none."""
    if not 1 <= len(labels) <= 4:
        return None
    values = []
    for label in labels:
        if re.fullmatch(r"0[xX][0-9a-fA-F]*", label):
            values.append(int(label[2:] or "0", 16))
        elif re.fullmatch(r"0[0-7]*", label):
            values.append(int(label, 8))
        elif re.fullmatch(r"[1-9][0-9]*", label):
            values.append(int(label))
        else:
            return None
    *head, last = values
    if any(v > 255 for v in head) or last >= 1 << (8 * (4 - len(head))):
        return None
    number = last
    for i, v in enumerate(head):
        number |= v << (8 * (3 - i))
    return ipaddress.IPv4Address(number)


def refused_address(address: IPAddress, allow_private_addresses: bool = False,
                    allow_networks: Iterable[str | IPNetwork] = ()) -> Refusal | None:
    """None when capfilt may connect to ``address``, else why not: a ``Refusal``, whose ``reason`` reads
    ``a loopback address (--allow-private-addresses lets loopback and private addresses through)``.

    The rules of ``check_url`` for an address (the module's docstring), the one place they are written: the
    URL check applies them to an address written in the URL, ``capfilt.ingest.fetch`` to every address a name
    resolves to. ``allow_networks`` (CIDR strings or networks, ``--allow-network``) lets just the addresses in
    those networks through, whatever else they are, except the ones refused always: the cloud metadata,
    unspecified, link-local and multicast addresses. An IPv6 address that embeds an IPv4 address (mapped,
    compatible, NAT64, 6to4) is refused when the embedded one is, and the refusal names the embedded one.
    """
    networks = parse_networks(allow_networks)
    return _judge(address, allow_private_addresses, networks)


def parse_networks(cidrs: Iterable[str | IPNetwork]) -> tuple[IPNetwork, ...]:
    """``cidrs`` as networks (``127.0.0.2/32``, ``10.1.0.0/16``, ``fd00:1::/64``; a bare address is its /32 or
    /128); a ``ValueError`` that names the bad one and the flag otherwise."""
    if isinstance(cidrs, (str, bytes)):
        raise ValueError(f"{NETWORK_FLAG} takes networks one by one, not the string {cidrs!r}")
    networks = []
    for cidr in cidrs:
        if isinstance(cidr, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            networks.append(cidr)
            continue
        try:
            networks.append(ipaddress.ip_network(str(cidr).strip()))
        except ValueError as error:
            raise ValueError(f"{NETWORK_FLAG} {cidr!r} is not a network in CIDR form (127.0.0.2/32, 10.1.0.0/16, "
                             f"fd00:1::/64): {error}") from None
    return tuple(networks)


class Refusal(NamedTuple):
    """Why an address is refused: the address judged (the one given, or the IPv4 address it embeds) and what it
    is, with the flag that lets it through or ``(refused even with --allow-private-addresses)``."""

    address: IPAddress
    reason: str


def _check_address(shown: str, address: IPAddress, allow: bool, networks: tuple[IPNetwork, ...]) -> str | None:
    refusal = _judge(address, allow, networks)
    if refusal is None:
        return None
    if str(refusal.address) != shown:
        shown = f"{shown} ({refusal.address})"
    return f"refused: {shown} is {refusal.reason}"


def _judge(address: IPAddress, allow: bool, networks: tuple[IPNetwork, ...]) -> Refusal | None:
    if isinstance(address, ipaddress.IPv6Address):
        address = ipaddress.IPv6Address(int(address))  # without its zone id
        if not (address.is_loopback or address.is_unspecified):
            embedded = address.ipv4_mapped or address.sixtofour
            if embedded is None and (address in _NAT64 or address in _COMPATIBLE):
                embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
            if embedded is not None:
                refusal = _judge(embedded, allow, networks)
                if refusal or address.ipv4_mapped:
                    return refusal
    # Refused always, whatever the flags.
    if address in METADATA_ADDRESSES:
        return Refusal(address, f"a cloud metadata address {_ALWAYS}")
    if address.is_unspecified or address in _THIS_NETWORK:
        return Refusal(address, f"an unspecified address, which reaches the machine itself {_ALWAYS}")
    if address.is_link_local:
        return Refusal(address, f"a link-local address, where cloud metadata services answer {_ALWAYS}")
    if address.is_multicast:
        return Refusal(address, f"a multicast address {_ALWAYS}")
    # --allow-network: just those networks, before every other rule.
    if any(address in network for network in networks):
        return None
    if address.is_loopback:
        return _refusal_unless(address, "a loopback address", allow)
    if any(address in network for network in _PRIVATE):
        return _refusal_unless(address, "a private address", allow)
    if address in _SHARED:
        return _refusal_unless(address, "a shared (carrier-grade NAT) address", allow)
    if not address.is_global or address.is_reserved:
        return Refusal(address, f"a reserved or special-purpose address, not globally routable {_ALWAYS}")
    return None


def _refusal_unless(address: IPAddress, what: str, allow: bool) -> Refusal | None:
    """The refusal of an address that ``--allow-private-addresses`` lets through."""
    return None if allow else Refusal(address, f"{what} {_ADDRESS_HINT}")


def _refusal(shown: str, what: str, hint: str | None, allow: bool) -> str | None:
    """The reason, or None where the flag is given and lets this kind through (``hint`` names the flag)."""
    if hint is not None and allow:
        return None
    return f"refused: {shown} is {what} {hint or _ALWAYS}"
