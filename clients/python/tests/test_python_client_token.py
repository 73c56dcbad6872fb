"""The Python client's token: AUTH first on each connection, its errors, and never a leak.

Against AuthBroker (pyclient_support), a loopback stand-in that serves a connection only after
`AUTH <TOKEN>`: what is tested here is the client's side of the exchange.
"""

from __future__ import annotations

import logging
import os
import pickle
import stat
from pathlib import Path

import pytest
from pyclient_support import (
    AUTH_REQUIRED,
    HANG,
    STUB_IP,
    STUB_STATUS,
    TOKEN,
    TOKEN_NOT_ACCEPTED,
    AuthBroker,
    cli_env,
    run_cli,
    wait_until,
)

from compute_broker_client import (
    AuthError,
    BrokerClient,
    BrokerError,
    BrokerProtocolError,
    BrokerTimeout,
    LimitError,
)

WRONG_TOKEN = "Wr0ng-token-" + "x" * 20


def _client(broker: AuthBroker, **kwargs: object) -> BrokerClient:
    options: dict[str, object] = {"timeout": 2.0, "retry_backoff": 0.01, "client_id": "tester"}
    options.update(kwargs)
    return BrokerClient(broker.host, broker.port, **options)  # type: ignore[arg-type]


def _texts(exc: BaseException) -> str:
    """Everything an exception shows: str, repr, args, and its message and line if it has them."""
    parts = [str(exc), repr(exc), repr(exc.args)]
    parts += [str(getattr(exc, name, "")) for name in ("message", "line")]
    return "\n".join(parts)


# -- AUTH on each connection ------------------------------------------------------------------


def test_right_token_is_sent_first_on_every_connection(auth_stub: AuthBroker) -> None:
    """With a token, each request's connection sends `AUTH <token>` first, then is served."""
    client = _client(auth_stub, token=TOKEN)
    assert client.get_worker() == STUB_IP
    assert client.status() == STUB_STATUS
    client.release(STUB_IP)
    assert auth_stub.lines == [
        f"AUTH {TOKEN}",
        "GET_WORKER client=tester",
        f"AUTH {TOKEN}",
        "STATUS",
        f"AUTH {TOKEN}",
        f"RELEASE {STUB_IP} client=tester",
    ]


def test_no_token_raises_auth_error_that_says_what_to_set(auth_stub: AuthBroker) -> None:
    """Without a token the broker's `ERROR: auth required` raises AuthError, a BrokerError."""
    with pytest.raises(AuthError) as caught:
        _client(auth_stub).get_worker()
    exc = caught.value
    assert isinstance(exc, BrokerError)
    assert (exc.line, exc.message, exc.token_sent) == (AUTH_REQUIRED, "auth required", False)
    assert "COMPUTE_BROKER_TOKEN" in str(exc)
    assert auth_stub.lines == ["GET_WORKER client=tester"]


def test_wrong_token_raises_auth_error_and_sends_no_request(auth_stub: AuthBroker) -> None:
    """A refused AUTH raises AuthError; the request is never sent on that connection."""
    with pytest.raises(AuthError) as caught:
        _client(auth_stub, token=WRONG_TOKEN).get_worker()
    exc = caught.value
    assert (exc.line, exc.token_sent) == (TOKEN_NOT_ACCEPTED, True)
    assert str(exc) == "auth required (token not accepted) (the broker did not accept the token)"
    assert WRONG_TOKEN not in _texts(exc)
    assert auth_stub.lines == [f"AUTH {WRONG_TOKEN}"]


def test_a_token_echoed_by_the_broker_is_hidden(auth_stub: AuthBroker) -> None:
    """A reply that quotes the token reaches no exception text: it reads `<token>`."""
    auth_stub.auth_reply = f"ERROR: auth required (token not accepted: {WRONG_TOKEN})"
    with pytest.raises(AuthError) as refused:
        _client(auth_stub, token=WRONG_TOKEN).status()
    assert refused.value.line == "ERROR: auth required (token not accepted: <token>)"
    assert WRONG_TOKEN not in _texts(refused.value)

    auth_stub.auth_reply = None
    auth_stub.respond = lambda line: f"ERROR: Unknown command {TOKEN} here"
    with pytest.raises(BrokerError) as failed:
        _client(auth_stub, token=TOKEN).help()
    assert failed.value.message == "Unknown command <token> here"
    assert TOKEN not in _texts(failed.value)

    auth_stub.auth_reply = f"{TOKEN} OK?"
    with pytest.raises(BrokerProtocolError) as odd:
        _client(auth_stub, token=TOKEN).help()
    assert "unexpected AUTH reply" in str(odd.value)
    assert TOKEN not in _texts(odd.value)


def test_broker_without_auth_raises_auth_error_saying_so(auth_stub: AuthBroker) -> None:
    """A broker older than tokens answers AUTH `ERROR: Unknown command`: AuthError says why."""
    auth_stub.auth_reply = "ERROR: Unknown command"
    with pytest.raises(AuthError, match="predates tokens"):
        _client(auth_stub, token=TOKEN).help()


def test_silence_after_auth_is_a_timeout(auth_stub: AuthBroker) -> None:
    """A broker that never answers AUTH: BrokerTimeout within `timeout`, naming AUTH."""
    auth_stub.auth_reply = HANG
    with pytest.raises(BrokerTimeout, match=r"did not answer AUTH within 0\.3s"):
        _client(auth_stub, token=TOKEN, timeout=0.3).help()


def test_auth_error_pickles_with_its_fields() -> None:
    """AuthError survives pickling (e.g. raised in a multiprocessing worker)."""
    exc = AuthError("auth required", AUTH_REQUIRED, token_sent=True)
    copy = pickle.loads(pickle.dumps(exc))
    assert (type(copy), copy.message, copy.line, copy.token_sent, str(copy)) == (
        AuthError,
        exc.message,
        exc.line,
        True,
        str(exc),
    )


def test_limit_reply_raises_limit_error(auth_stub: AuthBroker) -> None:
    """`ERROR: limit: ...` raises LimitError, a BrokerError, with the broker's reason."""
    auth_stub.respond = lambda line: "ERROR: limit: max_requests_per_second (20) exceeded"
    with pytest.raises(LimitError) as caught:
        _client(auth_stub, token=TOKEN).status()
    assert isinstance(caught.value, BrokerError)
    assert caught.value.message == "limit: max_requests_per_second (20) exceeded"


# -- where the token comes from, and what it may be -----------------------------------------


def test_token_defaults_to_the_environment(
    auth_stub: AuthBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """COMPUTE_BROKER_TOKEN is the default (blanks around it dropped); token="" sends none."""
    monkeypatch.setenv("COMPUTE_BROKER_TOKEN", f" {TOKEN}\n")
    client = _client(auth_stub)
    assert client.has_token
    assert client.get_worker() == STUB_IP
    with pytest.raises(AuthError):
        _client(auth_stub, token="").get_worker()
    assert auth_stub.lines == [
        f"AUTH {TOKEN}",
        "GET_WORKER client=tester",
        "GET_WORKER client=tester",
    ]


def test_empty_environment_variable_means_no_token(
    auth_stub: AuthBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An empty COMPUTE_BROKER_TOKEN sends no AUTH."""
    monkeypatch.setenv("COMPUTE_BROKER_TOKEN", "")
    assert not _client(auth_stub).has_token


@pytest.mark.parametrize(
    "bad",
    [
        "short-15-chars!",
        "x" * 257,
        "two words here, both long",
        "x" * 16 + "\nBURST 100",
        "tökén-with-non-ascii",
    ],
)
def test_bad_token_is_refused_without_quoting_it(bad: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A token that is not 16-256 printable ASCII raises ValueError that does not show it."""
    with pytest.raises(ValueError, match="16-256 printable ASCII") as given:
        BrokerClient("127.0.0.1", 9, token=bad)
    assert bad.strip() not in _texts(given.value)
    monkeypatch.setenv("COMPUTE_BROKER_TOKEN", bad)
    with pytest.raises(ValueError, match=r"^COMPUTE_BROKER_TOKEN must be") as from_env:
        BrokerClient("127.0.0.1", 9)
    assert bad.strip() not in _texts(from_env.value)


def test_repr_hides_the_token() -> None:
    """repr(client) says a token is set, never which."""
    client = BrokerClient("127.0.0.1", 9000, client_id="c", token=TOKEN)
    assert (
        repr(client) == "BrokerClient(host='127.0.0.1', port=9000, client_id='c', token=<hidden>)"
    )
    assert TOKEN not in repr(vars(client))
    assert "token" not in repr(BrokerClient("127.0.0.1", 9000, client_id="c"))


# -- worker(): keep-alive and release carry the token --------------------------------------


def test_worker_block_authenticates_every_ping_and_release(auth_stub: AuthBroker) -> None:
    """worker()'s GET_WORKER, keep-alive PINGs and RELEASE each come after an AUTH."""
    client = _client(auth_stub, token=TOKEN)
    with client.worker(keepalive=0.02) as ip:
        auth_stub.wait_for(lambda lines: sum(line.startswith("PING") for line in lines) >= 2)
    lines = auth_stub.wait_for(lambda lines: lines[-1].startswith("RELEASE"))
    assert lines[1::2] == [
        "GET_WORKER client=tester.1",
        *[f"PING {ip} client=tester.1"] * (len(lines) // 2 - 2),
        f"RELEASE {ip} client=tester.1",
    ]
    assert set(lines[::2]) == {f"AUTH {TOKEN}"}


def test_revoked_token_is_logged_without_the_token(
    auth_stub: AuthBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """A token refused mid-block stops the keep-alive; the log lines never show the token."""
    client = _client(auth_stub, token=TOKEN)
    with caplog.at_level(logging.DEBUG, "compute_broker_client"), client.worker(keepalive=0.02):
        auth_stub.token = WRONG_TOKEN  # the operator rotated the tokens
        wait_until(lambda: "stopping pings" in caplog.text, 5.0, "the keep-alive to stop")
    messages = [record.getMessage() for record in caplog.records]
    assert any("token not accepted" in m and "stopping pings" in m for m in messages)
    assert any("releasing worker" in m and "token not accepted" in m for m in messages)
    assert TOKEN not in caplog.text


def test_keepalive_goes_on_after_a_limit_refusal(
    auth_stub: AuthBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """A PING refused under a limit is logged as passing; the next PING still goes out."""
    refused: list[str] = []

    def limited(line: str) -> str:
        if line.startswith("PING") and not refused:
            refused.append(line)
            return "ERROR: limit: max_requests_per_second (20) exceeded; slow down"
        return "OK" if line.startswith(("PING", "RELEASE")) else STUB_IP

    auth_stub.respond = limited
    client = _client(auth_stub, token=TOKEN)
    with caplog.at_level(logging.WARNING, "compute_broker_client"), client.worker(keepalive=0.02):
        auth_stub.wait_for(lambda lines: sum(line.startswith("PING") for line in lines) >= 2)
    assert any("trying again later" in r.getMessage() for r in caplog.records)


# -- the command line -----------------------------------------------------------------------


def _at(broker: AuthBroker) -> list[str]:
    return ["--host", broker.host, "--port", str(broker.port)]


def test_cli_token_option_environment_and_file(auth_stub: AuthBroker, tmp_path: Path) -> None:
    """--token, $COMPUTE_BROKER_TOKEN and --token-file each send AUTH and get served."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    runs = [
        run_cli(*_at(auth_stub), "--token", TOKEN, "help"),
        run_cli(*_at(auth_stub), "help", env=cli_env(COMPUTE_BROKER_TOKEN=TOKEN)),
        run_cli(*_at(auth_stub), "--token-file", str(token_file), "help"),
    ]
    assert [(r.returncode, r.stderr) for r in runs] == [(0, "")] * 3
    assert auth_stub.lines == [f"AUTH {TOKEN}", "HELP"] * 3


def test_cli_option_wins_over_the_environment(auth_stub: AuthBroker) -> None:
    """--token replaces $COMPUTE_BROKER_TOKEN."""
    env = cli_env(COMPUTE_BROKER_TOKEN=WRONG_TOKEN)
    assert run_cli(*_at(auth_stub), "--token", TOKEN, "help", env=env).returncode == 0
    assert auth_stub.lines == [f"AUTH {TOKEN}", "HELP"]


def test_cli_refused_token_exits_5_without_printing_it(auth_stub: AuthBroker) -> None:
    """A token the broker refuses exits 5 with the broker's line; the token is not printed."""
    result = run_cli(*_at(auth_stub), "status", env=cli_env(COMPUTE_BROKER_TOKEN=WRONG_TOKEN))
    assert (result.returncode, result.stdout) == (5, "")
    assert result.stderr.splitlines()[0] == TOKEN_NOT_ACCEPTED
    assert WRONG_TOKEN not in result.stderr


def test_cli_missing_token_exits_5_saying_what_to_set(auth_stub: AuthBroker) -> None:
    """No token where the broker wants one exits 5 and names $COMPUTE_BROKER_TOKEN."""
    result = run_cli(*_at(auth_stub), "get")
    assert result.returncode == 5
    assert "COMPUTE_BROKER_TOKEN" in result.stderr


@pytest.mark.parametrize("where", ["option", "environment", "file"])
def test_cli_bad_token_is_a_usage_error_that_hides_it(
    where: str, auth_stub: AuthBroker, tmp_path: Path
) -> None:
    """A malformed token exits 2 before anything is sent, and stderr does not show it."""
    bad = "short-secret"
    token_file = tmp_path / "token"
    token_file.write_text(bad)
    token_file.chmod(0o600)
    args = {
        "option": ["--token", bad],
        "environment": [],
        "file": ["--token-file", str(token_file)],
    }[where]
    env = cli_env(COMPUTE_BROKER_TOKEN=bad) if where == "environment" else cli_env()
    result = run_cli(*_at(auth_stub), *args, "help", env=env)
    assert result.returncode == 2
    assert "16-256 printable ASCII" in result.stderr
    assert bad not in result.stderr
    assert auth_stub.lines == []


def test_cli_token_file_open_to_others_is_warned_about(
    auth_stub: AuthBroker, tmp_path: Path
) -> None:
    """A --token-file that group or others may read is used, with a warning and the fix."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o644)
    result = run_cli(*_at(auth_stub), "--token-file", str(token_file), "help")
    assert result.returncode == 0
    assert f"run: chmod 600 {token_file}" in result.stderr
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o644  # warned, not changed


def test_cli_unreadable_token_file_is_a_usage_error(tmp_path: Path) -> None:
    """A --token-file that cannot be read exits 2 naming the file."""
    missing = tmp_path / "nope"
    result = run_cli("--host", "127.0.0.1", "--token-file", str(missing), "help")
    assert result.returncode == 2
    assert f"cannot read {missing}" in result.stderr


def test_cli_token_and_token_file_exclude_each_other(tmp_path: Path) -> None:
    """--token and --token-file together are a usage error."""
    result = run_cli("--token", TOKEN, "--token-file", str(tmp_path / "t"), "help")
    assert result.returncode == 2
    assert "not allowed with argument" in result.stderr


def test_cli_help_warns_that_a_command_line_token_is_visible() -> None:
    """--help tells users that --token shows in ps and what to use instead."""
    result = run_cli("--help")
    text = " ".join(result.stdout.split())
    assert "other users of this machine can see a command line (ps, /proc)" in text
    assert "prefer $COMPUTE_BROKER_TOKEN or --token-file" in text
