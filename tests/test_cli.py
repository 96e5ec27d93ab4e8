"""The command line: Aphlict's flags, clean errors, logging, hand-over to the server."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import fastaphlict
from fastaphlict import cli
from fastaphlict.config import Config, LogConfig, Settings
from support import as_options, scaled

SRC = Path(__file__).resolve().parent.parent / "src"
ENV_VARS = ("APHLICT_CONFIG", "CLIENT_PORT", "ADMIN_PORT", "LISTEN_ADDR")

GOOD: dict[str, Any] = {
    "servers": [
        {"type": "client", "port": 22280, "listen": "0.0.0.0"},
        {"type": "admin", "port": 22281, "listen": "127.0.0.1"},
    ],
}


def write_config(path: Path, data: object) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m fastaphlict`` from the source tree, with a clean environment."""
    base = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    pythonpath = os.pathsep.join(p for p in (str(SRC), base.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "fastaphlict", *args],
        env={**base, "PYTHONPATH": pythonpath, **env},
        capture_output=True,
        text=True,
        timeout=scaled(30),
        check=False,
    )


def assert_test_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Configuration test OK.\n"


def assert_clean_failure(result: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert result.returncode == 1
    assert result.stderr.startswith("fastaphlict: ")
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def good_config(tmp_path: Path) -> str:
    return write_config(tmp_path / "aphlict.custom.json", GOOD)


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Keep the caller's environment out, and undo any logging set-up."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    root = logging.getLogger()
    handlers_before = list(root.handlers)
    levels_before = {name: logging.getLogger(name).level for name in ("fastaphlict", "picows")}
    yield
    for handler in root.handlers[:]:
        if handler not in handlers_before:
            root.removeHandler(handler)
            handler.close()
    for name, level in levels_before.items():
        logging.getLogger(name).setLevel(level)


#: Keyword options the fake server's run() received, newest last.
OPTIONS: list[dict[str, object]] = []


@pytest.fixture
def fake_server(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Config, bool]]:
    """Stand in for fastaphlict.server: record each run() and log one line."""
    calls: list[tuple[Config, bool]] = []

    def run(settings: Settings, **options: object) -> int:
        calls.append((settings.config, settings.debug))
        OPTIONS.append({**as_options(settings), **options})
        servers = len(settings.config.servers)
        logging.getLogger("fastaphlict.server").info("serving %d servers", servers)
        return 0

    module = types.ModuleType("fastaphlict.server")
    module.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fastaphlict.server", module)
    return calls


# -- the real process --------------------------------------------------------------


def test_test_flag_with_good_file_prints_ok(good_config: str) -> None:
    assert_test_ok(run_cli("--test", f"--config={good_config}"))


def test_test_equals_true_as_phorge_launcher_passes_it(good_config: str) -> None:
    assert_test_ok(run_cli(f"--config={good_config}", "--test=true"))


def test_config_accepts_a_separate_argument(good_config: str) -> None:
    assert_test_ok(run_cli("--config", good_config, "--test"))


def test_test_uses_aphlict_config_from_environment(good_config: str) -> None:
    assert_test_ok(run_cli("--test", APHLICT_CONFIG=good_config))


def test_test_without_any_arguments_checks_environment_defaults() -> None:
    assert_test_ok(run_cli("--test"))


def test_bad_config_fails_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    path = write_config(tmp_path / "bad.json", {"servers": [{"type": "client", "port": 1}]})
    assert_clean_failure(run_cli("--test=true", f"--config={path}"), "administrative servers")


def test_unreadable_config_fails_without_traceback(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.json")
    assert_clean_failure(run_cli("--test", "--config", missing), missing)


def test_bad_environment_port_fails_naming_the_variable() -> None:
    assert_clean_failure(run_cli("--test", CLIENT_PORT="http"), "CLIENT_PORT")


def test_help_mentions_every_flag() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in ("--config", "--test", "--debug", "APHLICT_CONFIG", "CLIENT_PORT"):
        assert flag in result.stdout


def test_help_names_the_doctor_and_the_doctor_has_its_own_help() -> None:
    assert "fastaphlict doctor [options]" in run_cli("--help").stdout
    result = run_cli("doctor", "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: fastaphlict doctor")
    for option in ("--servers", "--client-url", "--admin-url", "--origin", "--ca-file"):
        assert option in result.stdout
    for option in ("--instance", "--idle", "--timeout", "--json"):
        assert option in result.stdout


def test_cli_does_not_import_the_server_until_it_serves() -> None:
    # --help and --test must work before the compiled extension is built.
    code = "import sys, fastaphlict.cli; sys.exit('fastaphlict.server' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(SRC)},
        capture_output=True,
        timeout=scaled(30),
        check=False,
    )
    assert result.returncode == 0, result.stderr


# -- main() in-process ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "debug"),
    [
        ([], False),
        (["--debug"], True),
        (["--debug=1"], True),
        (["--debug=true"], True),
        (["--debug=0"], False),
        (["--debug=false"], False),
    ],
)
def test_debug_flag_is_passed_to_the_server(
    fake_server: list[tuple[Config, bool]], good_config: str, flags: list[str], debug: bool
) -> None:
    assert cli.main([f"--config={good_config}", *flags]) == 0
    [(config, passed_debug)] = fake_server
    assert passed_debug is debug
    assert config.source == good_config


def test_test_false_means_serve(fake_server: list[tuple[Config, bool]], good_config: str) -> None:
    assert cli.main([f"--config={good_config}", "--test=false"]) == 0
    assert len(fake_server) == 1


def test_test_does_not_start_the_server(
    fake_server: list[tuple[Config, bool]], good_config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--test=1", f"--config={good_config}"]) == 0
    assert fake_server == []
    assert capsys.readouterr().out == "Configuration test OK.\n"


def test_unknown_boolean_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--test=maybe"]) == 2
    assert "--test" in capsys.readouterr().err


def test_help_returns_zero_instead_of_exiting(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    assert "usage: fastaphlict" in capsys.readouterr().out


def test_log_file_gets_its_directory_and_timestamped_lines(
    fake_server: list[tuple[Config, bool]], tmp_path: Path
) -> None:
    log_path = tmp_path / "var" / "log" / "aphlict.log"
    path = write_config(tmp_path / "c.json", {**GOOD, "logs": [{"path": str(log_path)}]})
    assert cli.main([f"--config={path}"]) == 0
    for handler in logging.getLogger().handlers:
        handler.flush()
    lines = log_path.read_text().splitlines()
    pattern = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO fastaphlict\.server: serving 2 servers"
    assert any(re.fullmatch(pattern, line) for line in lines), lines


def test_log_directory_that_cannot_be_created_fails_the_config_test(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a-file").write_text("")
    bad_log = str(tmp_path / "a-file" / "aphlict.log")
    path = write_config(tmp_path / "c.json", {**GOOD, "logs": [{"path": bad_log}]})
    assert cli.main(["--test", f"--config={path}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastaphlict: Failed to create directory")
    assert 'index "0"' in err


def test_setup_logging_twice_does_not_double_handlers(tmp_path: Path) -> None:
    logs = (LogConfig(str(tmp_path / "a.log")), LogConfig(str(tmp_path / "b.log")))
    config = Config(servers=(), logs=logs)
    root = logging.getLogger()
    before = len(root.handlers)
    cli.setup_logging(config, debug=False)
    cli.setup_logging(config, debug=True)
    assert len(root.handlers) == before + 3  # stderr plus one per log file


def test_picows_is_quiet_unless_debug() -> None:
    config = Config(servers=())
    cli.setup_logging(config, debug=False)
    assert logging.getLogger("picows").level == logging.WARNING
    assert logging.getLogger("fastaphlict").level == logging.INFO
    cli.setup_logging(config, debug=True)
    assert logging.getLogger("picows").level == logging.DEBUG
    assert logging.getLogger("fastaphlict").level == logging.DEBUG


def test_missing_server_module_fails_cleanly(
    monkeypatch: pytest.MonkeyPatch, good_config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "fastaphlict.server", None)
    assert cli.main([f"--config={good_config}"]) == 1
    assert capsys.readouterr().err.startswith("fastaphlict: cannot load the server")


def test_os_error_from_the_server_exits_one(
    monkeypatch: pytest.MonkeyPatch, good_config: str
) -> None:
    def run(settings: Settings, **options: object) -> int:
        raise OSError(98, "Address already in use")

    module = types.ModuleType("fastaphlict.server")
    module.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fastaphlict.server", module)
    assert cli.main([f"--config={good_config}"]) == 1


def test_server_exit_status_is_returned(monkeypatch: pytest.MonkeyPatch, good_config: str) -> None:
    module = types.ModuleType("fastaphlict.server")
    module.run = lambda settings, **options: 3  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fastaphlict.server", module)
    assert cli.main([f"--config={good_config}"]) == 3


def test_shutdown_timeout_flag_and_environment(
    fake_server: list[tuple[Config, bool]], good_config: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli.main([f"--config={good_config}", "--shutdown-timeout=2.5"]) == 0
    assert OPTIONS[-1]["limits"].shutdown_timeout == 2.5
    assert callable(OPTIONS[-1]["on_reload"])
    monkeypatch.setenv("FASTAPHLICT_SHUTDOWN_TIMEOUT", "4")
    assert cli.main([f"--config={good_config}"]) == 0
    assert OPTIONS[-1]["limits"].shutdown_timeout == 4.0
    assert cli.main([f"--config={good_config}", "--shutdown-timeout=1"]) == 0
    assert OPTIONS[-1]["limits"].shutdown_timeout == 1.0, "the flag wins over the variable"


def test_max_subscribers_flag_and_environment(
    fake_server: list[tuple[Config, bool]], good_config: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli.main([f"--config={good_config}"]) == 0
    assert OPTIONS[-1]["limits"].max_subscribers == 16384
    monkeypatch.setenv("FASTAPHLICT_MAX_SUBSCRIBERS", "5000")
    assert cli.main([f"--config={good_config}"]) == 0
    assert OPTIONS[-1]["limits"].max_subscribers == 5000
    assert cli.main([f"--config={good_config}", "--max-subscribers=70000"]) == 0
    assert OPTIONS[-1]["limits"].max_subscribers == 70000, "the flag wins over the variable"


def test_every_limit_has_a_flag(
    fake_server: list[tuple[Config, bool]], good_config: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FASTAPHLICT_ALLOWED_ORIGINS", "https://a.example, https://b.example")
    args = [
        f"--config={good_config}",
        "--max-frame-size=1000",
        "--max-subscriptions=7",
        "--ping-interval=0",
        "--admin-allow=10.0.0.0/8,127.0.0.1",
    ]
    assert cli.main(args) == 0
    limits = OPTIONS[-1]["limits"]
    assert limits.max_frame_size == 1000 and limits.max_subscriptions == 7
    assert limits.ping_interval == 0.0
    assert limits.admin_allow == ("10.0.0.0/8", "127.0.0.1")
    assert limits.allowed_origins == ("https://a.example", "https://b.example")
    assert limits.max_buffered == 1024 * 1024, "untouched limits keep their defaults"


def test_bad_admin_allow_list_fails_at_start(good_config: str, capsys) -> None:
    assert cli.main([f"--config={good_config}", "--admin-allow=10.0.0.0/33"]) == 1
    assert "--admin-allow" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-1", "soon", "nan"])
def test_bad_shutdown_timeout_is_a_usage_error(good_config: str, value: str) -> None:
    assert cli.main([f"--config={good_config}", f"--shutdown-timeout={value}"]) == 2


# -- --test means "this will start" ----------------------------------------------------


def test_test_refuses_a_pidfile_whose_directory_cannot_be_made(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    pidfile = tmp_path / "a-file" / "run" / "aphlict.pid"
    path = write_config(tmp_path / "c.json", {**GOOD, "pidfile": str(pidfile)})
    result = run_cli("--test", f"--config={path}")
    assert_clean_failure(result, '"pidfile"')
    assert str(pidfile) in result.stderr and "not a directory" in result.stderr
    assert result.stderr.count("\n") == 1


def test_test_refuses_a_pidfile_that_start_could_not_write_even_as_root() -> None:
    # os.access says yes to root; the start's write would fail under /proc.
    result = run_cli("--test", "--pidfile=/proc/fastaphlict-test.pid")
    assert_clean_failure(result, "--pidfile=/proc/fastaphlict-test.pid: can not be written")
    assert '"/proc" is not writable' in result.stderr
    assert result.stderr.count("\n") == 1


def test_test_creates_no_log_file_pidfile_or_directory(tmp_path: Path) -> None:
    log_path = tmp_path / "var" / "log" / "aphlict.log"
    pidfile = tmp_path / "run" / "aphlict.pid"
    data = {**GOOD, "logs": [{"path": str(log_path)}], "pidfile": str(pidfile)}
    path = write_config(tmp_path / "c.json", data)
    assert_test_ok(run_cli("--test", f"--config={path}"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json"]


def test_test_refuses_listen_addr_that_does_not_resolve() -> None:
    # .invalid never resolves (RFC 6761), with or without a network.
    result = run_cli("--test", LISTEN_ADDR="bogus.invalid")
    assert_clean_failure(result, 'LISTEN_ADDR ("bogus.invalid") does not resolve')


def test_test_names_the_server_entry_whose_listen_does_not_resolve(tmp_path: Path) -> None:
    servers = [GOOD["servers"][0], {**GOOD["servers"][1], "listen": "bogus.invalid"}]
    path = write_config(tmp_path / "c.json", {"servers": servers})
    result = run_cli("--test", f"--config={path}")
    assert_clean_failure(result, 'Server (at index "1", on port "22281") has "listen"')
    assert "bogus.invalid" in result.stderr


@pytest.mark.parametrize(
    "flag",
    [
        "--max-frame-size=0",
        "--relay-queue=0",
        "--relay-timeout=0",
        "--handshake-timeout=0",
        "--max-subscriptions=0",
        "--max-phid-length=0",
        "--max-instance-length=0",
        "--max-buffered=0",
        "--max-body-size=0",
        "--max-subscribers=0",
    ],
)
def test_test_refuses_a_limit_that_makes_no_sense(
    good_config: str, flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--test", f"--config={good_config}", flag]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"fastaphlict: {flag}") and ": must be " in err
    assert err.count("\n") == 1


def test_a_limit_from_the_environment_is_named_as_a_variable(
    good_config: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FASTAPHLICT_RELAY_QUEUE", "0")
    assert cli.main(["--test", f"--config={good_config}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastaphlict: FASTAPHLICT_RELAY_QUEUE=0 (environment, for --relay-queue)")
    monkeypatch.setenv("FASTAPHLICT_RELAY_QUEUE", "many")
    assert cli.main(["--test", f"--config={good_config}"]) == 1
    assert "FASTAPHLICT_RELAY_QUEUE=many (environment" in capsys.readouterr().err


def test_a_nonsense_limit_fails_the_start_in_one_line(good_config: str) -> None:
    # Without --test: the process used to die in a traceback building the relay.
    assert_clean_failure(run_cli(f"--config={good_config}", "--relay-queue=0"), "--relay-queue=0")


def test_version_prints_the_package_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout == f"fastaphlict {fastaphlict.__version__}\n"


@pytest.mark.parametrize(
    ("flags", "env", "level"),
    [
        ([], "", logging.INFO),
        (["--log-level=warning"], "", logging.WARNING),
        (["--log-level=ERROR"], "", logging.ERROR),
        ([], "warning", logging.WARNING),
        (["--log-level=info"], "error", logging.INFO),
        (["--debug", "--log-level=error"], "", logging.DEBUG),
    ],
)
def test_log_level_flag_and_variable(
    fake_server: list[tuple[Config, bool]],
    good_config: str,
    monkeypatch: pytest.MonkeyPatch,
    flags: list[str],
    env: str,
    level: int,
) -> None:
    monkeypatch.setenv("FASTAPHLICT_LOG_LEVEL", env)
    assert cli.main([f"--config={good_config}", *flags]) == 0
    assert logging.getLogger("fastaphlict").level == level


def test_bad_log_level_variable_is_named(
    good_config: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FASTAPHLICT_LOG_LEVEL", "loud")
    assert cli.main(["--test", f"--config={good_config}"]) == 1
    assert capsys.readouterr().err.startswith(
        "fastaphlict: FASTAPHLICT_LOG_LEVEL=loud (environment, for --log-level)"
    )
    assert cli.main(["--test", f"--config={good_config}", "--log-level=loud"]) == 2


# -- --broker ---------------------------------------------------------------------


@pytest.fixture
def no_broker_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "FASTAPHLICT_BROKER",
        "FASTAPHLICT_BROKER_CA_FILE",
        "FASTAPHLICT_BROKER_SENTINEL_PASSWORD",
        "FASTAPHLICT_REUSE_PORT",
    ):
        monkeypatch.delenv(name, raising=False)


def test_no_broker_by_default(
    fake_server: list[tuple[Config, bool]], good_config: str, no_broker_variables: None
) -> None:
    assert cli.main([f"--config={good_config}"]) == 0
    assert OPTIONS[-1]["broker"] is None
    assert OPTIONS[-1]["broker_ca_file"] is None


def test_broker_flag_and_variable_and_the_flag_wins(
    fake_server: list[tuple[Config, bool]],
    good_config: str,
    monkeypatch: pytest.MonkeyPatch,
    no_broker_variables: None,
) -> None:
    assert cli.main([f"--config={good_config}", "--broker=redis://flag.example:6380/2"]) == 0
    broker = OPTIONS[-1]["broker"]
    assert (broker.host, broker.port, broker.db) == ("flag.example", 6380, 2)
    monkeypatch.setenv("FASTAPHLICT_BROKER", "redis://:s3cret@env.example/5")
    assert cli.main([f"--config={good_config}"]) == 0
    broker = OPTIONS[-1]["broker"]
    assert (broker.host, broker.db, broker.password) == ("env.example", 5, "s3cret")
    assert cli.main([f"--config={good_config}", "--broker=unix:///run/redis.sock"]) == 0
    assert OPTIONS[-1]["broker"].path == "/run/redis.sock", "the flag wins over the variable"


def test_an_empty_broker_variable_means_none(
    fake_server: list[tuple[Config, bool]], good_config: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FASTAPHLICT_BROKER", "  ")
    assert cli.main([f"--config={good_config}"]) == 0
    assert OPTIONS[-1]["broker"] is None


def test_an_empty_broker_flag_is_refused(
    good_config: str, no_broker_variables: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--test", f"--config={good_config}", "--broker="]) == 1
    assert capsys.readouterr().err == "fastaphlict: --broker: empty URL\n"


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("redis://admin:hunter22@cache.example:99999/0", "the port is not a number"),
        ("http://admin:hunter22@cache.example/0", "expected redis://host:port/db"),
        ("redis://admin:hunter22@cache.example/zero", "the database must be a whole number"),
        ("unix://:hunter22/x@/run/redis.sock", "percent-encode"),
        ("admin:hunter22@cache.example", "(not a URL)"),
    ],
)
def test_a_malformed_broker_url_names_its_source_and_never_the_password(
    good_config: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_broker_variables: None,
    url: str,
    reason: str,
) -> None:
    assert cli.main(["--test", f"--config={good_config}", f"--broker={url}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastaphlict: --broker: broker URL ") and reason in err
    assert "hunter22" not in err and err.count("\n") == 1
    monkeypatch.setenv("FASTAPHLICT_BROKER", url)
    assert cli.main([f"--config={good_config}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastaphlict: FASTAPHLICT_BROKER (environment): broker URL ")
    assert reason in err and "hunter22" not in err


def test_a_broker_ca_file_without_rediss_is_refused(
    good_config: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_broker_variables: None,
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    flags = ["--test", f"--config={good_config}", f"--broker-ca-file={ca}"]
    assert cli.main([*flags, "--broker=redis://u:hunter22@h/0"]) == 1
    err = capsys.readouterr().err
    assert err == (
        "fastaphlict: --broker-ca-file applies to a rediss:// broker, not redis://u:***@h:6379/0\n"
    )
    assert cli.main([*flags, "--broker=unix:///run/redis.sock"]) == 1
    assert "--broker-ca-file applies to a rediss:// broker" in capsys.readouterr().err


def test_an_unloadable_broker_ca_file_fails_the_config_test(
    good_config: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_broker_variables: None,
) -> None:
    missing, garbage = tmp_path / "missing.pem", tmp_path / "garbage.pem"
    garbage.write_text(
        "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n"
    )
    broker = "--broker=rediss://cache.example/0"
    for path in (missing, garbage):
        assert (
            cli.main(["--test", f"--config={good_config}", broker, f"--broker-ca-file={path}"]) == 1
        )
        err = capsys.readouterr().err
        assert err.startswith(f'fastaphlict: Broker CA file "{path}" can not be loaded')
        assert err.count("\n") == 1
    monkeypatch.setenv("FASTAPHLICT_BROKER_CA_FILE", str(missing))
    assert cli.main(["--test", f"--config={good_config}", broker]) == 1
    assert f'Broker CA file "{missing}"' in capsys.readouterr().err


def test_a_good_broker_ca_file_passes_and_reaches_the_server(
    fake_server: list[tuple[Config, bool]],
    good_config: str,
    tmp_path: Path,
    no_broker_variables: None,
) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    args = [f"--config={good_config}", "--broker=rediss://cache.example/0"]
    assert cli.main(["--test", *args, f"--broker-ca-file={path}"]) == 0
    assert cli.main([*args, f"--broker-ca-file={path}"]) == 0
    assert OPTIONS[-1]["broker_ca_file"] == str(path)
    assert OPTIONS[-1]["broker"].scheme == "rediss"


def test_a_sentinel_broker_and_its_password_from_the_flag_or_the_variable(
    fake_server: list[tuple[Config, bool]],
    good_config: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_broker_variables: None,
) -> None:
    url = "redis+sentinel://u:data-pw@s1:26380,s2/mymaster/2"
    monkeypatch.setenv("FASTAPHLICT_BROKER", url)
    assert cli.main(["--test", f"--config={good_config}"]) == 0
    assert capsys.readouterr().out == "Configuration test OK.\n"
    assert cli.main([f"--config={good_config}"]) == 0
    broker = OPTIONS[-1]["broker"]
    assert (broker.sentinels, broker.service, broker.db) == (
        (("s1", 26380), ("s2", 26379)),
        "mymaster",
        2,
    )
    assert (broker.password, broker.sentinel_password) == ("data-pw", None)
    monkeypatch.setenv("FASTAPHLICT_BROKER_SENTINEL_PASSWORD", "env-pw")
    assert cli.main([f"--config={good_config}"]) == 0
    assert OPTIONS[-1]["broker"].sentinel_password == "env-pw"
    assert OPTIONS[-1]["broker"].password == "data-pw", "kept apart from the data password"
    assert cli.main([f"--config={good_config}", "--broker-sentinel-password=flag-pw"]) == 0
    assert OPTIONS[-1]["broker"].sentinel_password == "flag-pw", "the flag wins"
    assert "pw" not in repr(OPTIONS[-1]["broker"]).replace("password=", "")


def test_a_malformed_sentinel_url_fails_the_config_test_without_its_password(
    good_config: str, capsys: pytest.CaptureFixture[str], no_broker_variables: None
) -> None:
    url = "--broker=redis+sentinel://u:hunter22@s1:26379,s2:x/mymaster/0"
    assert cli.main(["--test", f"--config={good_config}", url]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastaphlict: --broker: broker URL redis+sentinel://***@s1:26379,s2:x/")
    assert "a sentinel's port is not a number" in err and "hunter22" not in err


def test_a_sentinel_password_without_a_sentinel_broker_is_refused(
    good_config: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_broker_variables: None,
) -> None:
    args = ["--test", f"--config={good_config}", "--broker=redis://u:data-pw@h/0"]
    assert cli.main([*args, "--broker-sentinel-password=hunter22"]) == 1
    err = capsys.readouterr().err
    assert err == (
        "fastaphlict: --broker-sentinel-password applies to a redis+sentinel:// broker,"
        " not redis://u:***@h:6379/0\n"
    )
    monkeypatch.setenv("FASTAPHLICT_BROKER_SENTINEL_PASSWORD", "hunter22")
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "FASTAPHLICT_BROKER_SENTINEL_PASSWORD (environment) applies to" in err
    assert "hunter22" not in err


@pytest.mark.parametrize("reuse", [["--reuse-port"], ["--reuse-port=1"]])
def test_reuse_port_without_a_broker_is_refused(
    good_config: str,
    no_broker_variables: None,
    capsys: pytest.CaptureFixture[str],
    reuse: list[str],
) -> None:
    for test in (["--test"], []):
        assert cli.main([*test, f"--config={good_config}", *reuse]) == 1
        err = capsys.readouterr().err
        assert err.startswith("fastaphlict: --reuse-port needs a broker (--broker or")
        assert "FASTAPHLICT_BROKER" in err and "would miss the message" in err


def test_reuse_port_from_the_variable_without_a_broker_is_refused_too(
    good_config: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_broker_variables: None,
) -> None:
    monkeypatch.setenv("FASTAPHLICT_REUSE_PORT", "true")
    assert cli.main(["--test", f"--config={good_config}"]) == 1
    assert "--reuse-port needs a broker" in capsys.readouterr().err
    monkeypatch.setenv("FASTAPHLICT_BROKER", "redis://127.0.0.1:1/0")
    assert cli.main(["--test", f"--config={good_config}"]) == 0


def test_reuse_port_with_a_broker_reaches_the_server(
    fake_server: list[tuple[Config, bool]], good_config: str, no_broker_variables: None
) -> None:
    args = [f"--config={good_config}", "--reuse-port", "--broker=redis://127.0.0.1:1/0"]
    assert cli.main(args) == 0
    assert OPTIONS[-1]["reuse_port"] is True
    assert OPTIONS[-1]["broker"].port == 1


def test_test_with_a_broker_prints_ok_without_contacting_redis(good_config: str) -> None:
    """--test checks the URL; whether Redis is up is a fact of the moment, not of the config."""
    import socket

    with socket.socket() as redis:
        redis.bind(("127.0.0.1", 0))
        redis.listen(8)
        redis.settimeout(0)
        port = redis.getsockname()[1]
        result = run_cli(
            "--test",
            f"--config={good_config}",
            f"--broker=redis://:hunter22@127.0.0.1:{port}/0",
            "--reuse-port",
        )
        assert_test_ok(result)
        with pytest.raises(BlockingIOError):
            redis.accept()  # nobody connected
    assert "hunter22" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("flag", "error"),
    [
        ("--broker-timeout=0", "--broker-timeout=0.0: must be more than 0"),
        ("--broker-buffer=0", "--broker-buffer=0: must be at least 1"),
        ("--broker-probe-interval=0", "--broker-probe-interval=0.0: must be more than 0"),
    ],
)
def test_broker_limits_refuse_values_that_cannot_work(
    good_config: str, capsys: pytest.CaptureFixture[str], flag: str, error: str
) -> None:
    assert cli.main(["--test", f"--config={good_config}", flag]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"fastaphlict: {error}; ")
    assert err.count("\n") == 1


@pytest.mark.parametrize("value", ["-1", "soon", "nan"])
def test_a_broker_timeout_that_is_not_seconds_is_a_usage_error(
    good_config: str, value: str
) -> None:
    assert cli.main(["--test", f"--config={good_config}", f"--broker-timeout={value}"]) == 2
    assert cli.main(["--test", f"--config={good_config}", f"--broker-buffer={value}"]) == 2


def test_broker_limits_flags_and_variables(
    fake_server: list[tuple[Config, bool]],
    good_config: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main([f"--config={good_config}"]) == 0
    limits = OPTIONS[-1]["limits"]
    assert (limits.broker_timeout, limits.broker_buffer, limits.broker_probe_interval) == (
        2.0,
        16384,
        1.0,
    )
    monkeypatch.setenv("FASTAPHLICT_BROKER_TIMEOUT", "0.5")
    monkeypatch.setenv("FASTAPHLICT_BROKER_BUFFER", "100")
    monkeypatch.setenv("FASTAPHLICT_BROKER_PROBE_INTERVAL", "0.25")
    assert cli.main([f"--config={good_config}", "--broker-buffer=7"]) == 0
    limits = OPTIONS[-1]["limits"]
    assert (limits.broker_timeout, limits.broker_buffer, limits.broker_probe_interval) == (
        0.5,
        7,
        0.25,
    ), "the flag wins over the variable"
    capsys.readouterr()
    monkeypatch.setenv("FASTAPHLICT_BROKER_BUFFER", "0")
    assert cli.main(["--test", f"--config={good_config}"]) == 1
    assert capsys.readouterr().err.startswith(
        "fastaphlict: FASTAPHLICT_BROKER_BUFFER=0 (environment, for --broker-buffer)"
    )


def test_help_tells_where_the_broker_password_belongs() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for text in ("--broker URL", "FASTAPHLICT_BROKER", "--broker-ca-file", "--broker-buffer"):
        assert text in result.stdout
