"""Framing, sans-IO: bytes in, request lines out, with a hard limit on line length; a first
line in another protocol (HTTP, TLS, SSH) is refused and the connection closed. Each line is
parsed by `broker.protocol.parse_line`. No sockets, no clock (see protocol.md, "Framing")."""

from __future__ import annotations

import re
from typing import Final

import attrs

from broker.protocol import (
    LINE_TOO_LONG,
    MAX_LINE_BYTES,
    NOT_A_CLIENT_HTTP,
    NOT_A_CLIENT_SSH,
    NOT_A_CLIENT_TLS,
    BadRequest,
    Request,
    parse_line,
)


@attrs.frozen
class NeedData:
    """No complete line buffered: receive more bytes (or EOF) first."""


@attrs.frozen
class Closed:
    """The peer has finished sending and every request it sent has been returned."""


NEED_DATA: Final = NeedData()
CLOSED: Final = Closed()


# What other protocols' clients send first. A line that is not a request in any case; the only
# difference their detection makes is that the connection is closed instead of kept.
_TLS_RECORD_START: Final = b"\x16\x03"  # handshake record, TLS/SSL 3.x (a ClientHello)
_HTTP_REQUEST_LINE: Final = re.compile(
    rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ [^ \t]+ HTTP/[0-9](?:\.[0-9])?[ \t]*"
)
_SSH_BANNER: Final = re.compile(rb"SSH-[0-9]+\.[0-9]+-")


def probe(first_line: bytes) -> BadRequest | None:
    """The refusal for a connection's first line (without LF or CR) if it is another
    protocol's opening (an HTTP request line, an SSH banner, a TLS record); otherwise None."""
    if first_line.startswith(_TLS_RECORD_START):
        return BadRequest(NOT_A_CLIENT_TLS, "tls probe")
    if _HTTP_REQUEST_LINE.fullmatch(first_line):
        return BadRequest(NOT_A_CLIENT_HTTP, "http probe")
    if _SSH_BANNER.match(first_line):
        return BadRequest(NOT_A_CLIENT_SSH, "ssh probe")
    return None


class LineReader:
    """Splits received bytes into request lines, with a hard limit on line length.

    Feed bytes with `receive_data` (`b""` means the peer's EOF); call `next_request` until it
    answers `NEED_DATA` or `CLOSED`. A line over the limit yields a `BadRequest` whose reply
    closes the connection, and nothing more is read after it. So does a first line that is
    another protocol's opening (`probe`); a TLS ClientHello is recognised from its first two
    bytes, without waiting for a line (it has none).
    """

    # Every connection holds one, idle or not: with slots it and its empty buffer are ~140
    # bytes (a __dict__ added ~50 more per connection).
    __slots__ = ("_buffer", "_eof", "_first", "_max", "_poisoned", "_scanned")

    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self._buffer = bytearray()
        self._max = max_line_bytes
        self._eof = False
        self._poisoned = False
        self._first = True
        self._scanned = 0

    def receive_data(self, data: bytes) -> None:
        """Add received bytes; an empty `data` marks the end of the peer's stream."""
        if data:
            self._buffer += data
        else:
            self._eof = True

    def next_request(self) -> Request | BadRequest | NeedData | Closed:
        """The next request, `NEED_DATA`, or `CLOSED` once the peer's EOF has been consumed."""
        if self._poisoned:
            return CLOSED
        if self._first and self._buffer[:1] == _TLS_RECORD_START[:1]:
            if self._buffer.startswith(_TLS_RECORD_START):
                return self._poison(BadRequest(NOT_A_CLIENT_TLS, "tls probe"))
            if len(self._buffer) < len(_TLS_RECORD_START) and not self._eof:
                return NEED_DATA  # one byte so far: wait for the second
        end = self._buffer.find(b"\n", self._scanned)
        if end < 0:
            if len(self._buffer) > self._max + 1:  # +1: room for a CR before the LF
                return self._poison(BadRequest(LINE_TOO_LONG, "line too long"))
            if not self._eof:
                self._scanned = len(self._buffer)
                return NEED_DATA
            if not self._buffer:
                return CLOSED
            end = len(self._buffer)  # an unterminated last line before EOF is a request
        line = bytes(self._buffer[:end]).removesuffix(b"\r")
        del self._buffer[: end + 1]
        self._scanned = 0
        if len(line) > self._max:
            return self._poison(BadRequest(LINE_TOO_LONG, "line too long"))
        if self._first:
            self._first = False
            refusal = probe(line)
            if refusal is not None:
                return self._poison(refusal)
        return parse_line(line)

    def _poison(self, bad: BadRequest) -> BadRequest:
        """Answer `bad` (which closes the connection) and read nothing more."""
        self._poisoned = True
        self._buffer.clear()
        return bad
