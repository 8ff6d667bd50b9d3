"""A small authoritative DNS server on 127.0.0.1 for tests: UDP and TCP on one port.

Answers TXT, A, AAAA and MX records from dicts the test fills (`txt`, `a`, `aaaa`,
`mx`: (preference, exchange) pairs; an exchange of "." is a null MX); names it knows
with no record of the asked type get NODATA, others NXDOMAIN. UDP answers larger
than 512 octets (or the query's EDNS size) are truncated (TC), as a real server
does, so resolvers retry over TCP. Faults are scripted here, on the peer:
`mode = "servfail"` answers SERVFAIL, `mode = "drop"` reads queries and never answers.
It runs in threads, so the synchronous code under test may block on it.
"""

from __future__ import annotations

import errno
import socket
import socketserver
import struct
import threading
from types import TracebackType
from typing import Literal

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from dns.rdtypes.ANY.MX import MX
from dns.rdtypes.ANY.TXT import TXT
from dns.rdtypes.IN.A import A
from dns.rdtypes.IN.AAAA import AAAA

Mode = Literal["answer", "servfail", "drop"]


class DnsServer:
    def __init__(self, *, ttl: int = 300) -> None:
        #: name (any case, trailing dot or not) -> TXT values; split into 255-octet strings
        self.txt: dict[str, list[str]] = {}
        self.a: dict[str, list[str]] = {}
        self.aaaa: dict[str, list[str]] = {}
        self.mx: dict[str, list[tuple[int, str]]] = {}
        self.ttl = ttl
        self.mode: Mode = "answer"
        #: (transport, name, type) of every query received, in order
        self.queries: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        self._servers: list[socketserver.BaseServer] = []
        self._threads: list[threading.Thread] = []
        self.port = 0

    @property
    def address(self) -> str:
        """The `[dns] nameservers` entry for this server."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> DnsServer:
        udp, tcp = _bind_pair()
        udp.dns = self  # type: ignore[attr-defined]
        tcp.dns = self  # type: ignore[attr-defined]
        self.port = udp.server_address[1]
        self._servers = [udp, tcp]
        for server in self._servers:
            thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join()
        self._servers, self._threads = [], []

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def count(self, name: str, transport: str | None = None) -> int:
        """How many queries for `name` arrived (over `transport`, when given)."""
        wanted = name.rstrip(".").lower()
        with self._lock:
            return sum(
                1
                for t, n, _ in self.queries
                if n == wanted and (transport is None or t == transport)
            )

    def answer(self, wire: bytes, transport: str, max_size: int) -> bytes | None:
        """The response to one query, or None to stay silent."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        with self._lock:
            self.queries.append((transport, name, dns.rdatatype.to_text(question.rdtype)))
        if self.mode == "drop":
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if self.mode == "servfail":
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        txt = {k.rstrip(".").lower(): v for k, v in self.txt.items()}
        a = {k.rstrip(".").lower(): v for k, v in self.a.items()}
        aaaa = {k.rstrip(".").lower(): v for k, v in self.aaaa.items()}
        mx = {k.rstrip(".").lower(): v for k, v in self.mx.items()}
        if name not in txt and name not in a and name not in aaaa and name not in mx:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif question.rdtype == dns.rdatatype.TXT and name in txt:
            rdatas = [TXT(dns.rdataclass.IN, dns.rdatatype.TXT, _strings(v)) for v in txt[name]]
            response.answer.append(dns.rrset.from_rdata_list(question.name, self.ttl, rdatas))
        elif question.rdtype == dns.rdatatype.A and name in a:
            addrs = [A(dns.rdataclass.IN, dns.rdatatype.A, v) for v in a[name]]  # type: ignore[no-untyped-call]
            response.answer.append(dns.rrset.from_rdata_list(question.name, self.ttl, addrs))
        elif question.rdtype == dns.rdatatype.AAAA and name in aaaa:
            v6 = [AAAA(dns.rdataclass.IN, dns.rdatatype.AAAA, v) for v in aaaa[name]]  # type: ignore[no-untyped-call]
            response.answer.append(dns.rrset.from_rdata_list(question.name, self.ttl, v6))
        elif question.rdtype == dns.rdatatype.MX and name in mx:
            exchanges = [
                MX(dns.rdataclass.IN, dns.rdatatype.MX, pref, dns.name.from_text(host))
                for pref, host in mx[name]
            ]
            response.answer.append(dns.rrset.from_rdata_list(question.name, self.ttl, exchanges))
        if query.edns >= 0:
            max_size = max(max_size, query.payload)
        try:
            return response.to_wire(max_size=max_size)
        except dns.exception.TooBig:  # RFC 1035 §4.2.1: truncate and set TC
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.AA | dns.flags.TC
            return truncated.to_wire()


def _strings(value: str) -> list[bytes]:
    data = value.encode("ascii")
    return [data[i : i + 255] for i in range(0, len(data), 255)] or [b""]


class _UdpHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        wire, sock = self.request
        reply = self.server.dns.answer(wire, "udp", 512)  # type: ignore[attr-defined]
        if reply is not None:
            sock.sendto(reply, self.client_address)


class _TcpHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        while True:
            head = _recv_exactly(sock, 2)
            if head is None:
                return
            wire = _recv_exactly(sock, struct.unpack("!H", head)[0])
            if wire is None:
                return
            reply = self.server.dns.answer(wire, "tcp", 65535)  # type: ignore[attr-defined]
            if reply is not None:
                sock.sendall(struct.pack("!H", len(reply)) + reply)


def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


class _Udp(socketserver.ThreadingMixIn, socketserver.UDPServer):
    daemon_threads = True


class _Tcp(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


def _bind_pair() -> tuple[_Udp, _Tcp]:
    """A UDP and a TCP server on the same free port (resolvers retry TCP on the UDP port)."""
    for _ in range(50):
        udp = _Udp(("127.0.0.1", 0), _UdpHandler)
        try:
            tcp = _Tcp(("127.0.0.1", udp.server_address[1]), _TcpHandler)
        except OSError as exc:
            udp.server_close()
            if exc.errno != errno.EADDRINUSE:
                raise
            continue
        return udp, tcp
    raise RuntimeError("no free port for both UDP and TCP on 127.0.0.1")
