"""The sans-IO protocol module: parsing, replies and framing, no sockets."""

from __future__ import annotations

import ssl
from pathlib import Path

import attrs
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from broker.cloud import Market
from broker.framing import CLOSED, NEED_DATA, Closed, LineReader, NeedData, probe
from broker.protocol import (
    HELP_TEXT,
    LINE_TOO_LONG,
    MAX_ERROR_BYTES,
    MAX_LINE_BYTES,
    NOT_A_CLIENT_HTTP,
    NOT_A_CLIENT_SSH,
    NOT_A_CLIENT_TLS,
    NOT_UTF8,
    UNKNOWN_COMMAND,
    BadRequest,
    Burst,
    Command,
    GetWorker,
    Help,
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


# --- ASCII words, commands and numbers -------------------------------------------------------


def test_words_are_split_on_ascii_space_and_tab_only() -> None:
    """Tabs and runs of blanks separate words; Unicode spaces and control characters do not."""
    assert Ping("1.2.3.4", "a") == parse(b"\t PING\t\t1.2.3.4  client=a \t")
    for separator in ("\u00a0", "\u2003", "\u3000", "\x0b", "\x0c", "\x1c", "\x85", "\u2028"):
        assert reply_of(parse(f"PING{separator}1.2.3.4".encode())) == UNKNOWN_COMMAND
        result = parse(f"PING 1.2.3.4{separator}".encode())
        assert "is not an IP address" in reply_of(result).text


@pytest.mark.parametrize(
    "line",
    [
        b"\x0b\x0c\x1c",
        b"\x00",
        b"\x1d\x1e\x1f\x7f",
        b"\r\r",
        "\u00a0".encode(),
        "\u2028\u3000\u0085".encode(),
        "\u00a0 \t\u2003".encode(),
    ],
)
def test_a_line_of_other_control_characters_or_unicode_spaces_is_an_unknown_command(
    line: bytes,
) -> None:
    """Only the empty line means GET_WORKER; invisible characters are not emptiness."""
    assert reply_of(parse(line)) == UNKNOWN_COMMAND
    reader = LineReader()
    reader.receive_data(b"HELP\n" + line + b"\n")
    assert [Help(), BadRequest(UNKNOWN_COMMAND, "unknown command"), NEED_DATA] == requests(reader)


def test_empty_blank_and_lone_cr_lines_stay_get_worker() -> None:
    """The seed's clients send `\\n`; spaces, tabs and one CR around nothing are the same."""
    for line in (b"", b" ", b"\t", b" \t \t", b"\r", b" \t\r"):
        assert GetWorker() == parse(line)
    reader = LineReader()
    reader.receive_data(b"\n\r\n \t\r\n\t\n")
    assert [GetWorker(), GetWorker(), GetWorker(), GetWorker(), NEED_DATA] == requests(reader)


@pytest.mark.parametrize(
    "line",
    [
        "\u017ftatus",  # long s: str.upper() makes it STATUS
        "QU\u0131T",  # dotless i: str.upper() makes it QUIT
        "\uff33\uff34\uff21\uff34\uff35\uff33",  # fullwidth STATUS
        "GET_WORKER\u200b",  # a zero-width space is part of the word
    ],
)
def test_command_names_are_upper_cased_as_ascii_only(line: str) -> None:
    """No Unicode case folding: a command name is ASCII or unknown."""
    assert reply_of(parse(line.encode())) == UNKNOWN_COMMAND


def test_keys_and_market_are_matched_as_ascii_case_insensitively() -> None:
    """`MARKET=SPOT` is market=spot; the Kelvin sign is not a k."""
    assert GetWorker(market=Market.SPOT, wait=5.0) == parse(b"GET_WORKER MARKET=SPOT Wait=5")
    assert "unknown argument" in reply_of(parse("GET_WORKER mar\u212aet=spot".encode())).text
    market = reply_of(parse("GET_WORKER market=\u0455pot".encode())).text  # Cyrillic dze
    assert "market must be spot or on-demand" in market


@pytest.mark.parametrize(
    "count",
    [
        "\u00b2",  # superscript two: isdigit() is true, int() fails
        "\u0661",  # Arabic-Indic one: isdigit() and int() both accept it
        "\uff13",  # fullwidth three
        "\u0967\u0966",  # Devanagari ten
        "1_0",
        "+3",
        "3.0",
        "0x3",
        "",
    ],
)
def test_burst_count_is_ascii_digits_only(count: str) -> None:
    """BURST takes 1-100 in ASCII digits; other scripts' digits are a usage error."""
    result = parse(f"BURST {count}".encode())
    assert "usage: " in reply_of(result).text
    assert not reply_of(result).close


def test_burst_count_accepts_ascii_digits_with_leading_zeros() -> None:
    """`BURST 007` is 7, as before."""
    assert Burst(7) == parse(b"BURST 007")
    assert Burst(100) == parse(b"BURST 100")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30", 30.0), ("12.5", 12.5), (".5", 0.5), ("5.", 5.0), ("1e3", 1000.0), ("1E-2", 0.01)],
)
def test_wait_accepts_ascii_decimal_numbers(text: str, seconds: float) -> None:
    """wait= takes digits, an optional fraction and an optional exponent."""
    assert GetWorker(wait=seconds) == parse(f"GET_WORKER wait={text}".encode())


@pytest.mark.parametrize(
    "text",
    [
        "\u0663",  # Arabic-Indic three: float() takes it
        "\uff11\uff12",  # fullwidth 12: float() takes it
        "\u00b2",
        "1_000",
        "+5",
        "inf",
        "Infinity",
        "nan",
        "0x10",
        "1e999",  # finite digits, infinite value
        "0",
        "1e-999",  # rounds to 0
        "",
        ".",
        "e3",
    ],
)
def test_wait_refuses_anything_else(text: str) -> None:
    """Forms float() would take but protocol.md does not list are a usage error."""
    reply = reply_of(parse(f"GET_WORKER wait={text}".encode()))
    assert "wait must be a number of seconds > 0" in reply.text


@pytest.mark.parametrize(
    "word", ["\u0661.\u0662.\u0663.\u0664", "fe80::1%eth0", "fe80::1%\u00e9", "1.2.3.4\u200b"]
)
def test_ip_arguments_are_ascii_without_a_scope(word: str) -> None:
    """PING and RELEASE take an ASCII IPv4 or IPv6 address, never an IPv6 scope id."""
    for command in ("PING", "RELEASE"):
        assert "is not an IP address" in reply_of(parse(f"{command} {word}".encode())).text


def test_reply_escapes_control_characters_so_it_stays_one_line() -> None:
    """Whatever a reply's text holds, its bytes are printable ASCII and one LF."""
    assert Reply("a\nb\tc\x00\x7f").to_bytes() == b"a\\x0ab\\x09c\\x00\\x7f\n"
    assert Reply.error("bad \x00 \u2028 \U0001f600").to_bytes() == (
        b"ERROR: bad \\x00 \\U0001f600\n"
    )


def test_error_replies_are_cut_to_the_documented_bound() -> None:
    """An ERROR line is at most MAX_ERROR_BYTES + LF, ending in `...`, never half an escape."""
    for reason, last in [
        ("x" * 10_000, b"xx"),
        ("\u00e9" * 3_000, b"\\xe9"),
        ("a" + "\U0001f600" * 1_000, b"\\U0001f600"),
    ]:
        data = Reply.error(reason).to_bytes()
        assert len(data) <= MAX_ERROR_BYTES + 1
        assert data.endswith(last + b"...\n")
    assert Reply.error("x" * (MAX_ERROR_BYTES - 7)).to_bytes().endswith(b"xx\n")


# --- strangers: HTTP, TLS and SSH on the first line ------------------------------------------


def tls_client_hello() -> bytes:
    """The ClientHello Python's own TLS client sends (binary, with no LF at its end)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="broker.lab")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:  # it waits for the server's hello, having sent its own
        return outgoing.read()
    raise AssertionError("a TLS handshake cannot finish without a server")


def test_probe_replies_are_exactly_these_lines() -> None:
    """One ERROR line naming the protocol, and the connection closes."""
    assert NOT_A_CLIENT_HTTP.to_bytes() == (
        b"ERROR: not a compute-broker client (HTTP); see protocol.md\n"
    )
    assert NOT_A_CLIENT_TLS.to_bytes() == (
        b"ERROR: not a compute-broker client (TLS); see protocol.md\n"
    )
    assert NOT_A_CLIENT_SSH.to_bytes() == (
        b"ERROR: not a compute-broker client (SSH); see protocol.md\n"
    )
    assert NOT_A_CLIENT_HTTP.close and NOT_A_CLIENT_TLS.close and NOT_A_CLIENT_SSH.close


def test_protocol_md_quotes_the_refusals_and_the_error_bound() -> None:
    """protocol.md's table of other protocols shows the lines the broker sends, and its reply
    sizes the bound Reply.error keeps."""
    text = (Path(__file__).resolve().parent.parent / "protocol.md").read_text()
    for reply in (NOT_A_CLIENT_HTTP, NOT_A_CLIENT_TLS, NOT_A_CLIENT_SSH):
        assert f"| `{reply.text}` |" in text
    assert f"cut to {MAX_ERROR_BYTES} bytes ending in `...`" in text
    assert f"fits in {MAX_ERROR_BYTES + 1} bytes" in text


@pytest.mark.parametrize(
    "request_line",
    [
        b"GET / HTTP/1.1",
        b"GET /metrics HTTP/1.1",
        b"HEAD /healthz HTTP/1.0",
        b"POST /api?x=1 HTTP/1.1",
        b"PUT /x HTTP/1.1",
        b"DELETE /x HTTP/1.1",
        b"OPTIONS * HTTP/1.1",
        b"CONNECT broker.lab:443 HTTP/1.1",
        b"PRI * HTTP/2.0",
        b"GET http://broker.lab:9000/ HTTP/1.1",
        b"PROPFIND /dav/ HTTP/1.1",
        b"GET / HTTP/2",
    ],
)
def test_an_http_scrape_is_refused_once_and_launches_nothing(request_line: bytes) -> None:
    """A first line `METHOD target HTTP/x.y` ends the connection: the empty line after the
    headers (a GET_WORKER) is never served."""
    reader = LineReader()
    reader.receive_data(request_line + b"\r\nHost: broker.lab:9000\r\nAccept: */*\r\n\r\n")
    assert [BadRequest(NOT_A_CLIENT_HTTP, "http probe"), CLOSED] == requests(reader)
    reader.receive_data(b"GET_WORKER\n")
    assert reader.next_request() == CLOSED


def test_an_http_request_line_without_lf_before_eof_is_refused_too() -> None:
    """`printf 'GET / HTTP/1.0' | nc -N`: the unterminated last line is checked as well."""
    reader = LineReader()
    reader.receive_data(b"GET / HTTP/1.0")
    assert reader.next_request() == NEED_DATA
    reader.receive_data(b"")
    assert [BadRequest(NOT_A_CLIENT_HTTP, "http probe"), CLOSED] == requests(reader)


@pytest.mark.parametrize(
    "banner", [b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13", b"SSH-1.99-Cisco-1.25", b"SSH-2.0-x"]
)
def test_an_ssh_banner_is_refused_once(banner: bytes) -> None:
    """An SSH client's identification string gets one ERROR line and the end."""
    reader = LineReader()
    reader.receive_data(banner + b"\r\n\x00\x00\x05\xdc\x06\x14\n\n")
    assert [BadRequest(NOT_A_CLIENT_SSH, "ssh probe"), CLOSED] == requests(reader)


def test_a_tls_client_hello_is_refused_from_its_first_two_bytes() -> None:
    """A ClientHello has no LF at its end, and LF bytes inside it are no line ends: the
    reader answers at once, and only once."""
    hello = tls_client_hello()
    assert hello[:2] == b"\x16\x03"
    for record in (hello, b"\x16\x03\x01\x00\x0a\n\n\n\n\n\n\n\n\n\n"):
        reader = LineReader()
        reader.receive_data(record)
        assert [BadRequest(NOT_A_CLIENT_TLS, "tls probe"), CLOSED] == requests(reader)


def test_a_tls_record_arriving_byte_by_byte_is_refused_at_its_second_byte() -> None:
    """0x16 alone waits for the next byte; 0x16 0x03 is TLS."""
    reader = LineReader()
    reader.receive_data(b"\x16")
    assert reader.next_request() == NEED_DATA
    reader.receive_data(b"\x03")
    assert [BadRequest(NOT_A_CLIENT_TLS, "tls probe"), CLOSED] == requests(reader)


def test_a_lone_0x16_byte_is_an_ordinary_unknown_command() -> None:
    """Only 0x16 0x03 is TLS; 0x16 followed by LF or EOF is just a line."""
    reader = LineReader()
    reader.receive_data(b"\x16\nHELP\n")
    assert [BadRequest(UNKNOWN_COMMAND, "unknown command"), Help(), NEED_DATA] == requests(reader)
    reader = LineReader()
    reader.receive_data(b"\x16")
    reader.receive_data(b"")
    assert [BadRequest(UNKNOWN_COMMAND, "unknown command"), CLOSED] == requests(reader)


def test_only_the_first_line_is_checked_for_probes() -> None:
    """After a first request, an HTTP, SSH or TLS-looking line is just an unknown command."""
    reader = LineReader()
    reader.receive_data(b"HELP\nGET / HTTP/1.1\nSSH-2.0-x\n\x16\x03\x01\nSTATUS\n")
    unknown = BadRequest(UNKNOWN_COMMAND, "unknown command")
    assert [Help(), unknown, unknown, unknown, Status(), NEED_DATA] == requests(reader)


@pytest.mark.parametrize(
    "line",
    [
        b"GET_WORKER",
        b"",
        b"GET / HTTP",  # no version: HTTP/0.9 at most, an unknown command
        b"GET  /  HTTP/1.1",  # not a request line: HTTP uses single spaces
        b"SSH-2.0",  # no dash after the version
        b"ssh-2.0-x",  # SSH banners are upper case
        b"RELEASE 1.2.3.4",
    ],
)
def test_ordinary_first_lines_are_not_probes(line: bytes) -> None:
    """Near misses are served as usual and keep the connection open."""
    assert probe(line) is None
    reader = LineReader()
    reader.receive_data(line + b"\nHELP\n")
    first, second, rest = requests(reader)
    assert not isinstance(first, BadRequest) or not first.reply.close
    assert (Help(), NEED_DATA) == (second, rest)


# --- no input reaches an exception -----------------------------------------------------------


_NAMES = [
    *(name.encode() for name in ("GET_WORKER", "get_worker", "PING", "RELEASE", "STATUS")),
    *(name.encode() for name in ("BURST", "HELP", "QUIT", "Quit", "\u017ftatus", "QU\u0131T")),
    *(b"GET", b"SSH-2.0-x", b"\x16\x03", b""),
]
_KEYS = [b"type", b"market", b"wait", b"client", b"TYPE", "mar\u212aet".encode(), b""]
_VALUES = [b"c7i.8xlarge", b"spot", b"on-demand", b"1.2.3.4", b"::1", b"fe80::1%x", b"1e3"]
_SEPARATORS = [b" ", b"\t", b"  ", b" \t", "\u00a0".encode(), b"\x0b"]
# Non-ASCII characters that Python's str methods take for ASCII-like ones: digits of every
# script (isdigit, int, float), Unicode spaces (split, strip), and letters whose case mapping is
# ASCII (upper, lower); with the ASCII a request is made of, and any character at all.
_TRICKY = [
    char
    for char in map(chr, range(0x80, 0x10000))
    if not 0xD800 <= ord(char) < 0xE000
    and (char.isdigit() or char.isspace() or char.upper().isascii() or char.lower().isascii())
]
_CHARACTERS = st.one_of(
    st.sampled_from(_TRICKY), st.sampled_from("0123456789.:%=-_+eE"), st.characters(codec="utf-8")
)
_WORDS = st.one_of(
    st.text(_CHARACTERS, min_size=1, max_size=3).map(str.encode),
    st.sampled_from(_VALUES),
    st.builds(
        lambda key, value: key + b"=" + value,
        st.sampled_from(_KEYS),
        st.one_of(st.sampled_from(_VALUES), st.text(_CHARACTERS, max_size=4).map(str.encode)),
    ),
    st.binary(max_size=4),
)
# Requests shaped like the real ones: a command, then a few words after separators.
_REQUESTS = st.builds(
    lambda name, rest, tail: name + b"".join(sep + word for sep, word in rest) + tail,
    st.sampled_from(_NAMES),
    st.lists(st.tuples(st.sampled_from(_SEPARATORS), _WORDS), max_size=2),
    st.sampled_from([b"", b"\r", b" ", b"\t\r"]),
)
_LONG = st.integers(MAX_LINE_BYTES - 4, MAX_LINE_BYTES + 4).map(lambda n: b"x" * n)
_LINES = st.one_of(_REQUESTS, _REQUESTS, st.binary(max_size=40), _LONG)
_FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_result(result: object, line: bytes | None = None) -> None:
    """A parse result is a Command or a BadRequest whose reply is one short ASCII line; a
    Command comes only from a line of printable ASCII, spaces and tabs (and one final CR)."""
    assert isinstance(result, Command | BadRequest)
    if line is not None and not isinstance(result, BadRequest):
        assert all(0x20 <= byte < 0x7F or byte == 0x09 for byte in line.removesuffix(b"\r"))
    if isinstance(result, BadRequest):
        data = result.reply.to_bytes()
        assert data.isascii()
        assert data.endswith(b"\n")
        assert b"\n" not in data[:-1] and b"\r" not in data
        assert all(0x20 <= byte < 0x7F for byte in data[:-1])
        assert len(data) <= MAX_ERROR_BYTES + 1
        assert data.startswith(b"ERROR")
    else:
        for value in attrs.asdict(result).values():
            assert not isinstance(value, str) or value.isascii()


_LOOKALIKE_PLACES = [
    "{}",
    "{}STATUS",
    "STAT{}S",
    "QUIT{}",
    "PING{}1.2.3.4",
    "GET_WORKER{}client=a",
    "GET_WORKER client=a{}",
    "GET_WORKER mar{}et=spot",
    "GET_WORKER market={}",
    "GET_WORKER wait={}",
    "GET_WORKER wait=1{}",
    "BURST {}",
    "BURST 1{}",
    "PING 1.2.3.{}",
    "RELEASE ::{}",
]


@pytest.mark.parametrize("place", _LOOKALIKE_PLACES)
def test_no_lookalike_character_is_taken_for_ascii(place: str) -> None:
    """Every non-ASCII digit, space or ASCII-case-mapped letter, as or in a command name,
    separator, key, number or IP, is an error line: never an exception, never a request."""
    for char in _TRICKY:
        line = place.format(char).encode()
        result = parse(line)
        assert isinstance(result, BadRequest), (line, result)
        check_result(result, line)


@_FUZZ
@given(line=_LINES)
@example(line="BURST \u00b2".encode())  # once an exception: isdigit() but not int()
@example(line="BURST \u0661".encode())  # once BURST 1
@example(line=b"\x0b\x0c\x1c")  # once GET_WORKER
def test_parse_answers_every_input_with_a_command_or_an_error_line(line: bytes) -> None:
    """No line reaches an exception; probes are never requests the broker would serve."""
    check_result(parse(line), line)
    refusal = probe(line)
    if refusal is not None:
        assert isinstance(parse(line), BadRequest)
        check_result(refusal)


@_FUZZ
@given(
    chunks=st.lists(st.one_of(_LINES, st.binary(max_size=64)).filter(bool), max_size=8),
    eof=st.booleans(),
)
def test_line_reader_answers_every_byte_stream(chunks: list[bytes], eof: bool) -> None:
    """Any bytes in any chunks yield Commands, BadRequests, NEED_DATA and CLOSED only, and a
    closing BadRequest or a consumed EOF is the end."""
    reader = LineReader()
    ended = False
    for chunk in [*chunks, *([b""] if eof else [])]:
        reader.receive_data(chunk)
        for _ in range(len(chunk) + 3):  # a request needs at least one byte; bounded
            event = reader.next_request()
            if ended:
                assert event == CLOSED
            if isinstance(event, NeedData | Closed):
                ended = ended or isinstance(event, Closed)
                break
            check_result(event)
            ended = isinstance(event, BadRequest) and event.reply.close
        else:
            pytest.fail("next_request never asked for more data")
    assert reader.next_request() in (NEED_DATA, CLOSED)


def reply_of(result: object) -> Reply:
    assert isinstance(result, BadRequest), result
    return result.reply
