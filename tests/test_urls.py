"""Which URLs capfilt fetches (``capfilt.ingest.urls``): decided on the URL's text alone.

Nothing here opens a connection or resolves a name: the check never does, and the tests make sure of it.
"""

from __future__ import annotations

import socket

import pyarrow as pa
import pytest

from capfilt.ingest.urls import check_url, refusals

FLAG_HINT = "--allow-private-addresses lets"
ALWAYS = "refused even with --allow-private-addresses"

# (url, what the reason says without the flag (None: fetched), with the flag: True (fetched), False (the same
# reason) or what the reason says then)
TABLE = [
    # public http(s), in any case, with ports, credentials, odd paths
    ("https://example.com/a.jpg", None, True),
    ("http://images.example.org:8080/a.jpg?x=1#y", None, True),
    ("HTTP://EXAMPLE.COM/A.JPG", None, True),
    ("HtTpS://Example.Com", None, True),
    ("  https://example.com/a.jpg \n", None, True),  # urllib strips surrounding whitespace
    ("https://example.com./a.jpg", None, True),  # a fully qualified public name
    ("https://user:secret@example.com/a.jpg", None, True),
    ("https://example.com/redirect?to=http://127.0.0.1/", None, True),  # only the host counts
    ("https://example.com/@127.0.0.1", None, True),
    ("http://8.8.8.8/a.jpg", None, True),
    ("http://[2606:4700:4700::1111]/a.jpg", None, True),
    ("http://[::ffff:8.8.8.8]/a.jpg", None, True),
    ("https://bücher.example/a.jpg", None, True),
    ("https://xn--bcher-kva.example/a.jpg", None, True),
    ("https://my_host.example.com/a.jpg", None, True),
    ("https://1password.com/a.jpg", None, True),  # a label that starts with a digit is not an address
    ("https://example.com:/a.jpg", None, True),
    # other schemes, and no scheme: never, whatever the flag
    ("file:///etc/passwd", "scheme 'file'", False),
    ("FILE:///etc/passwd", "scheme 'file'", False),
    ("file://localhost/etc/passwd", "scheme 'file'", False),
    ("ftp://example.com/a.jpg", "scheme 'ftp'", False),
    ("data:image/png;base64,iVBORw0KGgo=", "scheme 'data'", False),
    ("javascript:alert(1)", "scheme 'javascript'", False),
    ("gopher://example.com/", "scheme 'gopher'", False),
    ("jar:http://example.com/a.jar!/", "scheme 'jar'", False),
    (" file:///etc/passwd", "scheme 'file'", False),
    ("<URL:file:///etc/passwd>", "scheme 'file'", False),  # urllib unwraps <URL:...>
    ("ht\ttp://example.com/", "scheme 'ht\\ttp'", False),  # urllib does not drop the tab
    ("example.com/a.jpg", "has no scheme", False),
    ("//example.com/a.jpg", "has no scheme", False),
    ("http:/example.com/a.jpg", "names no host", False),
    ("http:///a.jpg", "names no host", False),
    ("http://:80/a.jpg", "names no host", False),
    # loopback, in the forms getaddrinfo and inet_aton accept
    ("http://127.0.0.1/a.jpg", "127.0.0.1 is a loopback address", True),
    ("http://127.0.0.1:8000/a.jpg", "127.0.0.1 is a loopback address", True),
    ("http://127.9.8.7/a.jpg", "127.9.8.7 is a loopback address", True),
    ("http://127.1/a.jpg", "127.1 (127.0.0.1) is a loopback address", True),
    ("http://127.0.1/a.jpg", "127.0.1 (127.0.0.1) is a loopback address", True),
    ("http://2130706433/a.jpg", "2130706433 (127.0.0.1) is a loopback address", True),
    ("http://0x7f000001/a.jpg", "(127.0.0.1) is a loopback address", True),
    ("http://0x7f.0.0.1/a.jpg", "0x7f.0.0.1 (127.0.0.1) is a loopback address", True),
    ("http://0X7F.1/a.jpg", "(127.0.0.1) is a loopback address", True),
    ("http://0177.0.0.1/a.jpg", "0177.0.0.1 (127.0.0.1) is a loopback address", True),
    ("http://017700000001/a.jpg", "(127.0.0.1) is a loopback address", True),
    ("http://127.0.0.1./a.jpg", "(127.0.0.1) is a loopback address", True),
    ("http://%31%32%37.0.0.1/a.jpg", "127.0.0.1 is a loopback address", True),  # urllib unquotes the host
    ("http://\uff11\uff12\uff17\u3002\uff10\u3002\uff10\u3002\uff11/a.jpg", "(127.0.0.1) is a loopback", True),  # IDNA
    ("http://user:pass@127.0.0.1/a.jpg", "127.0.0.1 is a loopback address", True),
    ("http://example.com@127.0.0.1/a.jpg", "127.0.0.1 is a loopback address",  # with the flag: urllib's reading
     "example.com@127.0.0.1 ends in a number but is not a valid IPv4 address"),
    ("http://example.com\\@127.0.0.1/a.jpg", "127.0.0.1 is a loopback address",
     "ends in a number but is not a valid IPv4 address"),
    ("<URL:http://127.0.0.1/a.jpg>", "127.0.0.1 is a loopback address", True),
    ("http://[::1]/a.jpg", "::1 is a loopback address", True),
    ("http://[::1]:8080/a.jpg", "::1 is a loopback address", True),
    ("http://[0:0:0:0:0:0:0:1]/a.jpg", "(::1) is a loopback address", True),
    ("http://[::ffff:127.0.0.1]/a.jpg", "::ffff:127.0.0.1 (127.0.0.1) is a loopback address", True),
    ("http://[::ffff:7f00:1]/a.jpg", "(127.0.0.1) is a loopback address", True),
    ("http://localhost/a.jpg", "localhost is a loopback name", True),
    ("http://LOCALHOST:8000/a.jpg", "localhost is a loopback name", True),
    ("http://localhost./a.jpg", "localhost. is a loopback name", True),
    ("http://images.localhost/a.jpg", "images.localhost is a loopback name", True),
    # private and shared
    ("http://10.0.0.1/a.jpg", "10.0.0.1 is a private address", True),
    ("http://10.1/a.jpg", "10.1 (10.0.0.1) is a private address", True),
    ("http://172.16.5.4/a.jpg", "172.16.5.4 is a private address", True),
    ("http://172.31.255.255/a.jpg", "is a private address", True),
    ("http://192.168.0.1/a.jpg", "192.168.0.1 is a private address", True),
    ("http://3232235521/a.jpg", "(192.168.0.1) is a private address", True),
    ("http://[fd12:3456::1]/a.jpg", "is a private address", True),
    ("http://[::ffff:10.0.0.1]/a.jpg", "(10.0.0.1) is a private address", True),
    ("http://100.64.0.1/a.jpg", "100.64.0.1 is a shared (carrier-grade NAT) address", True),
    # internal names
    ("http://intranet/a.jpg", "intranet is a single-label name", True),
    ("http://printer.local/a.jpg", "printer.local is an internal name under .local", True),
    ("http://db.corp.internal/a.jpg", "is an internal name under .internal", True),
    ("http://nas.home.arpa/a.jpg", "is an internal name under .home.arpa", True),
    ("http://api.default.svc/a.jpg", "is an internal name under .svc", True),
    ("http://kube-dns.kube-system.svc.cluster.local/", "is an internal name under .local", True),
    # link-local and the cloud metadata services: never
    ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a cloud metadata address", False),
    ("http://169.254.170.2/v2/credentials", "169.254.170.2 is a link-local address", False),
    ("http://169.254.1.1/a.jpg", "169.254.1.1 is a link-local address", False),
    ("http://2852039166/", "2852039166 (169.254.169.254) is a cloud metadata address", False),
    ("http://0xa9fea9fe/", "(169.254.169.254) is a cloud metadata address", False),
    ("http://0251.0376.0251.0376/", "(169.254.169.254) is a cloud metadata address", False),
    ("http://169.254.43518/", "(169.254.169.254) is a cloud metadata address", False),
    ("http://[::ffff:169.254.169.254]/", "(169.254.169.254) is a cloud metadata address", False),
    ("http://[::ffff:a9fe:a9fe]/", "(169.254.169.254) is a cloud metadata address", False),
    ("http://[2002:a9fe:a9fe::]/", "(169.254.169.254) is a cloud metadata address", False),  # 6to4
    ("http://[fe80::1]/a.jpg", "fe80::1 is a link-local address", False),
    ("http://[fe80::1%25eth0]/a.jpg", "fe80::1%eth0 (fe80::1) is a link-local address", False),
    ("http://[FE80::A9FE:A9FE%25en0]:80/", "is a link-local address", False),
    ("http://[fd00:ec2::254]/latest/meta-data/", "fd00:ec2::254 is a cloud metadata address", False),
    ("http://100.100.100.200/latest/meta-data/", "100.100.100.200 is a cloud metadata address", False),
    ("http://168.63.129.16/machine", "168.63.129.16 is a cloud metadata address", False),
    ("http://metadata.google.internal/computeMetadata/v1/", "metadata.google.internal is a cloud metadata name",
     False),
    ("http://METADATA.GOOGLE.INTERNAL./computeMetadata/v1/", "is a cloud metadata name", False),
    ("http://metadata/computeMetadata/v1/", "metadata is a cloud metadata name", False),
    ("http://metadata.goog/computeMetadata/v1/", "metadata.goog is a cloud metadata name", False),
    ("http://instance-data/latest/meta-data/", "instance-data is a cloud metadata name", False),
    # unspecified, multicast, reserved and special-purpose: never
    ("http://0.0.0.0/a.jpg", "0.0.0.0 is an unspecified address", False),
    ("http://0/a.jpg", "0 (0.0.0.0) is an unspecified address", False),
    ("http://0.1.2.3/a.jpg", "0.1.2.3 is an unspecified address", False),
    ("http://[::]/a.jpg", ":: is an unspecified address", False),
    ("http://224.0.0.1/a.jpg", "224.0.0.1 is a multicast address", False),
    ("http://[ff02::1]/a.jpg", "ff02::1 is a multicast address", False),
    ("http://240.0.0.1/a.jpg", "240.0.0.1 is a reserved or special-purpose address", False),
    ("http://255.255.255.255/a.jpg", "is a reserved or special-purpose address", False),
    ("http://192.0.2.1/a.jpg", "is a reserved or special-purpose address", False),  # documentation
    ("http://198.18.0.1/a.jpg", "is a reserved or special-purpose address", False),  # benchmarking
    ("http://[2001:db8::1]/a.jpg", "is a reserved or special-purpose address", False),
    ("http://[64:ff9b::7f00:1]/a.jpg", "(127.0.0.1) is a loopback address",  # NAT64
     "64:ff9b::7f00:1 is a reserved or special-purpose address"),
    ("http://[::127.0.0.1]/a.jpg", "(127.0.0.1) is a loopback address",  # IPv4-compatible
     "is a reserved or special-purpose address"),
    # not valid addresses, and hosts no resolver should see
    ("http://127.0.0.1.1/a.jpg", "ends in a number but is not a valid IPv4 address", False),
    ("http://256.0.0.1/a.jpg", "ends in a number but is not a valid IPv4 address", False),
    ("http://08.0.0.1/a.jpg", "ends in a number but is not a valid IPv4 address", False),
    ("http://example.123/a.jpg", "ends in a number but is not a valid IPv4 address", False),
    ("http://[::1/a.jpg", "is not a valid IPv6 address", False),
    ("http://[fe80::zz]/a.jpg", "is not a valid IPv6 address", False),
    ("http://127.0.0.1%20.example.com/a.jpg", "whitespace or control characters", False),
    ("http://127.0.0.1%09example.com/a.jpg", "whitespace or control characters", False),
    ("http://127.0.0.1%00.example.com/a.jpg", "whitespace or control characters", False),
]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """The check must decide on the text alone: any attempt to resolve or connect fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"capfilt.ingest.urls tried the network: {args}")

    for name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "create_connection"):
        monkeypatch.setattr(socket, name, refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.parametrize("url, reason, flag", TABLE, ids=[repr(row[0])[:60] for row in TABLE])
def test_check_url(url, reason, flag):
    refused = check_url(url)
    with_flag = check_url(url, allow_private_addresses=True)
    if reason is None:
        assert refused is None and with_flag is None
        return
    assert refused is not None and refused.startswith("refused: ") and reason in refused, refused
    if flag is True:
        assert FLAG_HINT in refused and with_flag is None, with_flag
    elif flag is False:
        assert with_flag == refused
    else:
        assert with_flag is not None and with_flag.startswith("refused: ") and flag in with_flag, with_flag
    if " is a" in refused and FLAG_HINT not in refused:  # an address or name the flag does not let through
        assert ALWAYS in refused


def test_reasons_name_the_scheme_and_the_flag():
    assert check_url("file:///etc/passwd") == "refused: scheme 'file' (capfilt fetches only http and https URLs)"
    assert check_url("http://127.0.0.1/a.jpg") == (
        "refused: 127.0.0.1 is a loopback address (--allow-private-addresses lets loopback and private addresses "
        "through)")
    assert check_url("http://169.254.169.254/", allow_private_addresses=True) == (
        "refused: 169.254.169.254 is a cloud metadata address (refused even with --allow-private-addresses)")


@pytest.mark.parametrize("url", [None, "", " ", "\t\n"])
def test_empty_urls_are_left_to_img2dataset(url):
    """A row without URL fails at download in img2dataset already; it is not a refusal."""
    assert check_url(url) is None and check_url(url, allow_private_addresses=True) is None


@pytest.mark.parametrize("allow", [False, True])
def test_the_vectorised_check_agrees_with_check_url(allow):
    urls = [url for url, _, _ in TABLE] + [None, "", "https://a.b/", "https://a.localhost:80/", "https://x.lan",
                                           "https://a.b.metadata.goog/", "https://EXAMPLE.INTERNAL/",
                                           "https://example.com\t/", "https://example.com:99999/"]
    expected = [check_url(url, allow) for url in urls]
    assert refusals(pa.array(urls, pa.string()), allow).to_pylist() == expected
    chunked = pa.chunked_array([pa.array(urls[:7], pa.string()), pa.array(urls[7:], pa.string())])
    assert refusals(chunked, allow).to_pylist() == expected
    assert refusals(pa.array([], pa.string()), allow).to_pylist() == []
    assert refusals(pa.array(["https://example.com/"] * 3, pa.large_string()), allow).to_pylist() == [None] * 3


def test_ipv4_forms_read_as_the_c_library_reads_them():
    """Wherever the C library's ``inet_aton`` (a local parse, no lookup) reads an address, capfilt reads the same
    one, so that no spelling of an address slips past as a name."""
    import random

    from capfilt.ingest.urls import _ipv4

    rng = random.Random(0)
    spellings = ["0", "00", "0x", "0x0", "08", "09", "010", "0xff", "0XFF", "0x100", "255", "256", "4294967295",
                 "4294967296", "0xffffffff", "0x100000000", "037777777777", "1e2", "", "-1", "+1"]
    for _ in range(3000):
        parts = rng.randint(1, 5)
        labels = []
        for _ in range(parts):
            value = rng.choice([rng.randint(0, 300), rng.randint(0, 1 << 24), rng.randint(0, 1 << 33)])
            labels.append(rng.choice([str(value), oct(value).replace("0o", "0"), hex(value), hex(value).upper(),
                                      rng.choice(spellings)]))
        text = ".".join(labels)
        try:
            packed = socket.inet_aton(text)
        except OSError:
            continue
        address = _ipv4(text.split("."))
        assert address is not None and address.packed == packed, text


# (url, --allow-network networks, None (fetched) or what the reason says)
NETWORKS = [
    ("http://127.0.0.2:8080/a.jpg", ("127.0.0.2/32",), None),
    ("http://127.0.0.1:8080/a.jpg", ("127.0.0.2/32",), "127.0.0.1 is a loopback address"),  # just that network
    ("http://2130706434/a.jpg", ("127.0.0.2/32",), None),  # 127.0.0.2 in another spelling
    ("http://[::ffff:127.0.0.2]/a.jpg", ("127.0.0.2/32",), None),
    ("http://10.1.2.3/a.jpg", ("10.1.0.0/16",), None),
    ("http://10.2.0.1/a.jpg", ("10.1.0.0/16",), "10.2.0.1 is a private address"),
    ("http://10.2.0.1/a.jpg", ("10.1.0.0/16", "10.2.0.0/16"), None),  # repeatable
    ("http://[fd12:3456::1]/a.jpg", ("fd12:3456::/32",), None),
    ("http://198.18.0.1/a.jpg", ("198.18.0.0/15",), None),  # a reserved range, named on purpose
    ("http://localhost/a.jpg", ("127.0.0.0/8",), "localhost is a loopback name"),  # names: as without it
    ("http://intranet/a.jpg", ("10.0.0.0/8",), "intranet is a single-label name"),
    # refused always, whatever the network names
    ("http://169.254.169.254/", ("169.254.0.0/16",), "169.254.169.254 is a cloud metadata address"),
    ("http://169.254.1.1/", ("0.0.0.0/0",), "169.254.1.1 is a link-local address"),
    ("http://100.100.100.200/", ("100.64.0.0/10",), "100.100.100.200 is a cloud metadata address"),
    ("http://0.0.0.0/", ("0.0.0.0/0",), "0.0.0.0 is an unspecified address"),
    ("http://224.0.0.1/", ("224.0.0.0/4",), "224.0.0.1 is a multicast address"),
    ("http://[fe80::1]/", ("::/0",), "fe80::1 is a link-local address"),
    ("http://[::ffff:169.254.169.254]/", ("::/0", "0.0.0.0/0"), "(169.254.169.254) is a cloud metadata address"),
]


@pytest.mark.parametrize("url, networks, reason", NETWORKS, ids=[f"{row[0]}-{row[1]}"[:60] for row in NETWORKS])
def test_allow_networks_lets_just_those_networks_through(url, networks, reason):
    refused = check_url(url, allow_networks=networks)
    if reason is None:
        assert refused is None
    else:
        assert refused is not None and refused.startswith("refused: ") and reason in refused, refused
    assert refusals(pa.array([url]), allow_networks=networks).to_pylist() == [refused]


def test_refused_address_is_the_one_judge_of_an_address():
    import ipaddress

    from capfilt.ingest.urls import Refusal, refused_address

    loopback = ipaddress.ip_address("127.0.0.1")
    assert refused_address(loopback) == Refusal(loopback, "a loopback address (--allow-private-addresses lets "
                                                          "loopback and private addresses through)")
    assert refused_address(loopback, allow_private_addresses=True) is None
    assert refused_address(loopback, allow_networks=("127.0.0.2/32",)) is not None
    assert refused_address(ipaddress.ip_address("127.0.0.2"), allow_networks=("127.0.0.2/32",)) is None
    mapped = refused_address(ipaddress.ip_address("::ffff:127.0.0.1"))
    assert mapped.address == loopback  # the embedded address is the one judged and named
    assert refused_address(ipaddress.ip_address("8.8.8.8")) is None


@pytest.mark.parametrize("bad", ["nope", "127.0.0.1/8", "10.0.0.0/33", ""])
def test_a_bad_network_is_a_clear_error(bad):
    with pytest.raises(ValueError, match=f"--allow-network '{bad}' is not a network in CIDR form"):
        check_url("https://example.com/", allow_networks=(bad,))
    with pytest.raises(ValueError, match="--allow-network"):
        refusals(pa.array(["https://example.com/"]), allow_networks=(bad,))  # even when no row needs it
