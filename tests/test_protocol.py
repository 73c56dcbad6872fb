"""The sans-IO protocol module: parsing, replies and framing, no sockets."""

from __future__ import annotations

import pytest

from broker.cloud import Market
from broker.protocol import (
    CLOSED,
    HELP_TEXT,
    LINE_TOO_LONG,
    MAX_LINE_BYTES,
    NEED_DATA,
    NOT_UTF8,
    UNKNOWN_COMMAND,
    BadRequest,
    Burst,
    GetWorker,
    Help,
    LineReader,
    Ping,
    Quit,
    Release,
    Reply,
    Status,
    parse,
)


def requests(reader: LineReader) -> list[object]:
    out: list[object] = []
    while (event := reader.next_request()) not in (NEED_DATA, CLOSED):
        out.append(event)
    out.append(event)
    return out


def test_seed_get_worker_and_empty_line_both_ask_for_a_worker() -> None:
    """`GET_WORKER` and an empty line are the same request, as in the seed broker."""
    assert GetWorker() == parse(b"GET_WORKER")
    assert GetWorker() == parse(b"")
    assert GetWorker() == parse(b"   ")


def test_commands_are_case_insensitive_arguments_are_not() -> None:
    """Command names match in any case; client ids keep their case."""
    assert GetWorker(client="Bench-1") == parse(b"get_worker client=Bench-1")
    assert Status() == parse(b"status")
    assert Help() == parse(b"Help")
    assert Quit() == parse(b"quit")


def test_get_worker_options_are_parsed_into_a_typed_request() -> None:
    """type, market, wait and client become typed fields."""
    assert GetWorker("c7i.16xlarge", Market.ON_DEMAND, 12.5, "lab:7") == parse(
        b"GET_WORKER type=c7i.16xlarge market=on-demand wait=12.5 client=lab:7"
    )


@pytest.mark.parametrize(
    ("line", "detail"),
    [
        (b"GET_WORKER type=../../etc", "is not an EC2 instance type"),
        (b"GET_WORKER market=cheap", "market must be spot or on-demand"),
        (b"GET_WORKER wait=-1", "wait must be a number of seconds > 0"),
        (b"GET_WORKER wait=nan", "wait must be a number of seconds > 0"),
        (b"GET_WORKER wait=soon", "wait must be a number of seconds > 0"),
        (b"GET_WORKER colour=blue", "unknown argument 'colour'"),
        (b"GET_WORKER type=a.b type=c.d", "type given twice"),
        (b"GET_WORKER client=has/slash", "client must be"),
        (b"GET_WORKER extra", "usage: GET_WORKER"),
        (b"PING", "usage: PING <ip>"),
        (b"PING not-an-ip", "'not-an-ip' is not an IP address"),
        (b"RELEASE 1.2.3.4 5.6.7.8", "usage: RELEASE <ip>"),
        (b"BURST", "usage: BURST <n>"),
        (b"BURST 0", "n must be a whole number from 1 to 100"),
        (b"BURST 101", "n must be a whole number from 1 to 100"),
        (b"BURST -3", "n must be a whole number from 1 to 100"),
        (b"STATUS now", "usage: STATUS"),
    ],
)
def test_bad_arguments_answer_a_usage_error_that_keeps_the_connection(
    line: bytes, detail: str
) -> None:
    """A known command with bad arguments answers `ERROR: usage: ...` and stays open."""
    result = parse(line)
    assert isinstance(result, BadRequest)
    assert result.reply.text.startswith("ERROR: usage: ")
    assert detail in result.reply.text
    assert not result.reply.close


def test_ping_and_release_normalise_the_ip() -> None:
    """The IP argument is validated and normalised."""
    assert Ping("54.214.3.7") == parse(b"PING 54.214.3.7")
    assert Release("10.0.0.1", "a") == parse(b"RELEASE 10.0.0.1 client=a")


def test_burst_takes_a_count() -> None:
    """BURST n carries n."""
    assert Burst(3) == parse(b"BURST 3")


def test_unknown_command_replies_exactly_as_the_seed() -> None:
    """The seed's byte-exact reply for unknown commands."""
    result = parse(b"FROB 1 2")
    assert isinstance(result, BadRequest)
    assert result.reply.to_bytes() == b"ERROR: Unknown command\n"
    assert result.reply == UNKNOWN_COMMAND


def test_non_utf8_line_gets_an_error_and_the_connection_stays_open() -> None:
    """Invalid UTF-8 is answered, not fatal."""
    result = parse(b"GET_WORKER \xff\xfe")
    assert isinstance(result, BadRequest)
    assert result.reply == NOT_UTF8
    assert not result.reply.close


def test_reply_bytes_are_one_ascii_line() -> None:
    """Error reasons are flattened to one line and non-ASCII is escaped."""
    assert Reply.error("a\nb\r\n c").to_bytes() == b"ERROR: a b c\n"
    assert Reply.ok("caf\u00e9").to_bytes() == b"OK caf\\xe9\n"
    assert Reply("54.214.0.1").to_bytes() == b"54.214.0.1\n"
    assert HELP_TEXT.startswith("OK commands: GET_WORKER")


def test_reader_splits_lines_across_arbitrary_chunks_and_accepts_crlf() -> None:
    """Bytes arriving one at a time still make whole requests; CRLF works."""
    reader = LineReader()
    data = b"PING 1.2.3.4\r\nSTATUS\nGET_WORKER\n"
    seen: list[object] = []
    for i in range(len(data)):
        reader.receive_data(data[i : i + 1])
        seen.extend(event for event in requests(reader) if event is not NEED_DATA)
    assert [Ping("1.2.3.4"), Status(), GetWorker()] == seen


def test_pipelined_requests_come_out_in_order() -> None:
    """Several lines in one packet are separate requests, in order."""
    reader = LineReader()
    reader.receive_data(b"STATUS\nHELP\n\n")
    assert [Status(), Help(), GetWorker(), NEED_DATA] == requests(reader)


def test_eof_without_any_bytes_is_not_a_request() -> None:
    """A connection that closes silently (a port check) asks for nothing."""
    reader = LineReader()
    reader.receive_data(b"")
    assert requests(reader) == [CLOSED]


def test_unterminated_last_line_before_eof_is_a_request() -> None:
    """`printf GET_WORKER | nc -N` works: the partial line at EOF counts."""
    reader = LineReader()
    reader.receive_data(b"STATUS\nGET_WORKER")
    assert [Status(), NEED_DATA] == requests(reader)
    reader.receive_data(b"")
    assert [GetWorker(), CLOSED] == requests(reader)


def test_line_at_the_limit_is_accepted_one_byte_over_is_refused_and_closes() -> None:
    """1024 bytes is a line; 1025 is `ERROR: line too long` and the end of the connection."""
    ok_line = b"PING 1.2.3.4 " + b" " * (MAX_LINE_BYTES - 13)
    assert len(ok_line) == MAX_LINE_BYTES
    reader = LineReader()
    reader.receive_data(ok_line + b"\r\n")
    assert [Ping("1.2.3.4"), NEED_DATA] == requests(reader)

    reader = LineReader()
    reader.receive_data(ok_line + b"x\nSTATUS\n")
    first = reader.next_request()
    assert isinstance(first, BadRequest)
    assert first.reply == LINE_TOO_LONG
    assert first.reply.close
    assert reader.next_request() == CLOSED


def test_endless_line_without_newline_is_cut_off_before_it_is_buffered_whole() -> None:
    """A peer streaming bytes with no LF is refused once past the limit, not buffered forever."""
    reader = LineReader()
    reader.receive_data(b"G" * 600)
    assert reader.next_request() == NEED_DATA
    reader.receive_data(b"G" * 600)
    result = reader.next_request()
    assert isinstance(result, BadRequest)
    assert result.reply.close
