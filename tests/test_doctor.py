"""The doctor's pure parts: notification.servers read as Phorge reads it, causes, the report.

``targets`` builds the URLs Phorge builds (``getWebsocketURI`` and
``getURI`` in ``PhabricatorNotificationServerRef``); ``meanings`` turns an
answer into a cause and a fix; ``report`` prints the lines and the JSON.
The network steps are tested against real servers in ``test_doctor_paths.py``.
"""

from __future__ import annotations

import ast
import io
import json
import subprocess
import sys

import pytest

from fastaphlict import cli
from fastaphlict.doctor.handshake import accept_for, parse_head, request_for
from fastaphlict.doctor.meanings import (
    Failure,
    idle_cut,
    status_refusal,
    tls_failure,
    upgrade_refusal,
)
from fastaphlict.doctor.report import STEPS, Check, as_json, as_text, passed
from fastaphlict.doctor.targets import Target, TargetError, from_servers, from_urls
from support import scaled


def entry(kind: str, port: int, protocol: str = "http", **more: object) -> dict[str, object]:
    return {"type": kind, "host": "phorge.example.com", "port": port, "protocol": protocol, **more}


@pytest.mark.parametrize(
    ("path", "instance", "url"),
    [
        (None, None, "wss://phorge.example.com:443/"),
        ("/ws/", None, "wss://phorge.example.com:443/ws/"),
        ("/ws", None, "wss://phorge.example.com:443/ws/"),
        (None, "acme", "wss://phorge.example.com:443/~acme/?instance=acme"),
        ("/ws/", "acme", "wss://phorge.example.com:443/ws/~acme/?instance=acme"),
        ("/ws/", "a b", "wss://phorge.example.com:443/ws/~a b/?instance=a%20b"),
    ],
)
def test_the_client_url_is_the_one_phorge_gives_browsers(
    path: str | None, instance: str | None, url: str
) -> None:
    more = {"path": path} if path is not None else {}
    servers = [entry("client", 443, "https", **more), entry("admin", 22281)]
    client = next(t for t in from_servers(servers, instance) if t.kind == "client")
    assert client.url == url


@pytest.mark.parametrize(
    ("instance", "url", "status"),
    [
        (None, "http://phorge.example.com:22281/", "http://phorge.example.com:22281/status/"),
        (
            "acme",
            "http://phorge.example.com:22281/?instance=acme",
            "http://phorge.example.com:22281/status/?instance=acme",
        ),
    ],
)
def test_the_admin_url_is_the_one_phorges_php_posts_to(
    instance: str | None, url: str, status: str
) -> None:
    (admin, _) = from_servers([entry("client", 22280), entry("admin", 22281)], instance)
    assert (admin.kind, admin.url, admin.at("/status/")) == ("admin", url, status)


def test_disabled_entries_are_skipped_and_admins_come_first() -> None:
    servers = [
        entry("client", 22280),
        entry("client", 22290, disabled=True),
        entry("admin", 22281),
        entry("admin", 22291, disabled=True),
        entry("admin", 22301, disabled=False),
    ]
    assert [(t.kind, t.port) for t in from_servers(servers)] == [
        ("admin", 22281),
        ("admin", 22301),
        ("client", 22280),
    ]


def test_bin_config_gets_output_is_read_database_first() -> None:
    """``bin/config get notification.servers`` prints each source; the database wins."""
    local = [entry("client", 1), entry("admin", 2)]
    database = [entry("client", 3), entry("admin", 4)]

    def printed(local_value: object, database_value: object) -> dict[str, object]:
        return {
            "config": [
                {
                    "key": "notification.servers",
                    "source": source,
                    "value": value,
                    "status": "set" if value is not None else "unset",
                    "errorInfo": None,
                }
                for source, value in (("local", local_value), ("database", database_value))
            ]
        }

    assert [t.port for t in from_servers(printed(local, None))] == [2, 1]
    assert [t.port for t in from_servers(printed(local, database))] == [4, 3]
    with pytest.raises(TargetError, match="not set"):
        from_servers(printed(None, None))


@pytest.mark.parametrize(
    ("servers", "message"),
    [
        ({"servers": []}, "JSON list"),
        ([], "no enabled server"),
        ([entry("admin", 1, disabled=True)], "no enabled server"),
        (["x"], "entry 0 is not an object"),
        ([entry("peer", 1)], '"type"'),
        ([entry("admin", "22281")], '"port"'),
        ([entry("admin", 70000)], '"port"'),
        ([entry("admin", 1, "wss")], '"protocol"'),
        ([{**entry("admin", 1), "host": ""}], '"host"'),
        ([entry("client", 1, path=3)], '"path"'),
    ],
)
def test_what_is_not_a_server_list_is_refused_with_the_reason(
    servers: object, message: str
) -> None:
    with pytest.raises(TargetError, match=message):
        from_servers(servers)


def test_urls_on_the_command_line_stand_for_entries() -> None:
    admin, client = from_urls("wss://phorge.example.com/ws/", "http://127.0.0.1:22281/", "acme")
    assert admin == Target("admin", "127.0.0.1", 22281, False, "/?instance=acme")
    assert client.url == "wss://phorge.example.com:443/ws/~acme/?instance=acme"
    (only,) = from_urls("ws://[::1]:22280", None)
    assert (only.url, only.http_url) == ("ws://[::1]:22280/", "http://[::1]:22280/")
    assert client.http_url == "https://phorge.example.com:443/ws/~acme/?instance=acme"
    for bad in (("ftp://x/", None), (None, "ws://x/"), ("wss://x:99999/", None), (None, None)):
        with pytest.raises(TargetError):
            from_urls(*bad)


# -- the handshake, by hand -------------------------------------------------------


def test_the_accept_is_rfc_6455s() -> None:
    """The example of RFC 6455, section 1.3."""
    assert accept_for("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_the_upgrade_request_is_a_browsers() -> None:
    target = Target("client", "phorge.example.com", 443, True, "/ws/~acme/?instance=acme")
    request = request_for(target, "a2V5", "https://phorge.example.com").decode()
    assert request.startswith("GET /ws/~acme/?instance=acme HTTP/1.1\r\n")
    assert "Host: phorge.example.com\r\n" in request  # the default port is left out
    assert "Origin: https://phorge.example.com\r\n" in request
    assert request.endswith("\r\n\r\n")
    other = Target("client", "h", 8443, True, "/")
    assert "Host: h:8443\r\n" in request_for(other, "a2V5", None).decode()
    assert "Origin" not in request_for(other, "a2V5", None).decode()


def test_a_response_head_is_parsed_or_refused() -> None:
    code, headers = parse_head(b"HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\n\r\n")
    assert (code, headers) == (404, {"content-type": "text/html"})
    with pytest.raises(Failure, match="not an HTTP answer"):
        parse_head(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")


# -- what an answer means ----------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "content_type", "body", "says"),
    [
        (200, "text/html", b"<html>Phorge</html>", "proxy served a page"),
        (501, "text/plain", b"HTTP/501 Use Websockets\n", "does not forward Upgrade"),
        (400, "text/plain", b"", "without its Upgrade or Connection header"),
        (426, "text/plain", b"", "without its Upgrade or Connection header"),
        (404, "text/html", b"not found", "the path /ws/ is not mapped"),
        (403, "text/plain", b"origin not allowed\n", "accepts only listed Origins"),
        (502, "text/html", b"bad gateway", "could not reach the notification server"),
        (301, "text/html", b"", "redirect"),
        (418, "text/plain", b"", "instead of 101"),
    ],
)
def test_each_answer_to_the_upgrade_has_its_meaning(
    status: int, content_type: str, body: bytes, says: str
) -> None:
    cause, fix = upgrade_refusal(status, content_type, body, "/ws/?instance=acme", None)
    assert cause.startswith(f"HTTP {status}") and says in cause
    assert fix


def test_proxy_fixes_name_the_readmes_nginx_section() -> None:
    for status in (200, 501, 400, 404):
        _, fix = upgrade_refusal(status, "text/html", b"", "/ws/", None)
        assert 'the README\'s "Behind nginx" section' in fix


@pytest.mark.parametrize(
    ("message", "says"),
    [
        ("self-signed certificate", "not trusted"),
        ("unable to get local issuer certificate", "not trusted"),
        ("Hostname mismatch, certificate is not valid for 'x'.", "does not name"),
        ("certificate has expired", "expired"),
        (None, "handshake failed"),
    ],
)
def test_each_tls_failure_has_its_meaning(message: str | None, says: str) -> None:
    cause, fix = tls_failure("phorge.example.com", message, "WRONG_VERSION_NUMBER")
    assert says in cause and fix


@pytest.mark.parametrize(
    ("status", "body", "says"),
    [
        (501, b"HTTP/501 Use Websockets\n", "client port"),
        (403, b"forbidden", "allow-list"),
        (404, b"", "not a notification server's admin port"),
        (500, b"", "instead of 200"),
    ],
)
def test_each_status_answer_has_its_meaning(status: int, body: bytes, says: str) -> None:
    cause, _ = status_refusal(status, body)
    assert says in cause


# -- the report ---------------------------------------------------------------------

CHECKS = [
    Check("admin http://127.0.0.1:22281/", "status", True, "version 8, 0 tabs open, in 1.0 ms"),
    Check("admin http://127.0.0.1:22281/", "broker", None, "skipped: no broker"),
    Check(
        "client wss://phorge.example.com:443/ws/",
        "upgrade",
        False,
        None,
        "HTTP 501: the proxy does not forward Upgrade.",
        "forward it.",
    ),
]


@pytest.mark.parametrize(
    ("after", "says"),
    [(1.0, "cuts every tab, in the foreground too"), (60.0, "cuts only background tabs")],
)
def test_an_idle_cut_is_weighed_against_the_browsers_15_s_ping(after: float, says: str) -> None:
    cause, fix = idle_cut(after)
    assert f"cut after {after:.1f} s without traffic" in cause
    assert "browsers ping every 15 s" in cause and says in cause
    assert "proxy_read_timeout" in fix


def test_the_report_is_a_line_per_step_and_a_summary() -> None:
    text = as_text(CHECKS)
    assert text.splitlines() == [
        "✓ admin http://127.0.0.1:22281/           status    version 8, 0 tabs open, in 1.0 ms",
        "\u2013 admin http://127.0.0.1:22281/           broker    skipped: no broker",
        "✗ client wss://phorge.example.com:443/ws/ upgrade: "
        "HTTP 501: the proxy does not forward Upgrade. Fix: forward it.",
        "1 of 2 checks failed, 1 skipped",
    ]
    assert as_text(CHECKS[:2]).splitlines()[-1] == "all 1 checks passed, 1 skipped"


def test_the_json_report_has_the_documented_shape() -> None:
    report = as_json(CHECKS)
    assert report["ok"] is False
    assert [c["ok"] for c in report["checks"]] == [True, None, False]
    assert set(report["checks"][2]) == {"target", "step", "ok", "figure", "cause", "fix"}
    assert json.loads(json.dumps(report)) == report
    assert as_json(CHECKS[:2])["ok"] is True and passed(CHECKS[:2])


def test_step_names_are_the_documented_ones() -> None:
    assert STEPS == (
        "dns", "tcp", "tls", "upgrade", "origin", "subscribe", "delivery", "replay", "idle",
        "status", "broker", "cluster",
    )  # fmt: skip
    with pytest.raises(AssertionError):
        Check("x", "websocket", True)


# -- the command line ----------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["doctor"],
        ["doctor", "--servers", "-", "--client-url", "ws://x/"],
        ["doctor", "--client-url", "ws://x/", "--timeout", "0"],
        ["doctor", "--client-url", "ws://x/", "--idle", "-1"],
        ["doctor", "--servers", "/nonexistent/servers.json"],
        ["doctor", "--bogus"],
    ],
)
def test_usage_mistakes_exit_2_with_one_line(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip()


@pytest.mark.parametrize(
    "url", ["ftp://alice:s3cret@phorge.example.com/", "alice:s3cret@phorge.example.com/ws/"]
)
def test_a_bad_url_is_echoed_without_its_password(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["doctor", "--client-url", url]) == 2
    err = capsys.readouterr().err
    assert "s3cret" not in err and "alice" not in err
    assert "***@phorge.example.com" in err


def test_servers_that_are_not_json_exit_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("[{"))
    assert cli.main(["doctor", "--servers", "-"]) == 2
    assert "is not JSON" in capsys.readouterr().err


def test_the_doctor_is_a_client_of_the_protocol_only() -> None:
    """It imports none of the server's modules: it checks Node Aphlict as it checks ours."""
    code = (
        "import sys, fastaphlict.doctor; "
        "print(sorted(m for m in sys.modules if m.startswith('fastaphlict.')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=scaled(30)
    )
    assert done.returncode == 0, done.stderr
    loaded = ast.literal_eval(done.stdout)
    assert loaded and all(name.startswith("fastaphlict.doctor") for name in loaded), loaded
