"""Settings: resolve(argv, environ) applies flag > environment > file > default, once."""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import pytest

from fastaphlict import cli
from fastaphlict.config import ConfigError, Limits, Settings, resolve
from fastaphlict.config.options import OPTIONS, PATH_VARIABLES, build_parser, limit_flag

#: A value for every variable resolve() reads, each one that would change the result.
EVERY_VARIABLE = {
    "APHLICT_CONFIG": "/nonexistent/aphlict.custom.json",
    "CLIENT_PORT": "http",
    "FASTAPHLICT_STATE_DIR": "/nonexistent/state",
    "FASTAPHLICT_PEER_CA_FILE": "/nonexistent/peer-ca.pem",
    "FASTAPHLICT_BROKER_CA_FILE": "/nonexistent/broker-ca.pem",
    "FASTAPHLICT_BROKER": "rediss://127.0.0.1:6379/0",
    "FASTAPHLICT_PIDFILE": "/nonexistent/pid",
    "FASTAPHLICT_LOG_LEVEL": "warning",
    "FASTAPHLICT_SHUTDOWN_TIMEOUT": "9",
}


def test_resolve_reads_only_the_environment_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """No option falls back on os.environ behind the caller's back, the path options included."""
    for name, value in EVERY_VARIABLE.items():
        monkeypatch.setenv(name, value)
    settings = resolve([], {})
    assert settings == Settings(config=settings.config)
    assert settings.config.source == "environment" and settings.config.pidfile is None


def test_resolve_reads_every_variable_from_the_environment_given() -> None:
    environ = {
        k: v for k, v in EVERY_VARIABLE.items() if k not in ("APHLICT_CONFIG", "CLIENT_PORT")
    }
    settings = resolve([], environ)
    assert settings.state_dir == "/nonexistent/state"
    assert settings.peer_ca_file == "/nonexistent/peer-ca.pem"
    assert settings.broker_ca_file == "/nonexistent/broker-ca.pem"
    assert settings.broker is not None and settings.broker.display == "rediss://127.0.0.1:6379/0"
    assert settings.config.pidfile == "/nonexistent/pid"
    assert (
        settings.pidfile_from == "FASTAPHLICT_PIDFILE=/nonexistent/pid (environment, for --pidfile)"
    )
    assert settings.log_level == logging.WARNING
    assert settings.limits.shutdown_timeout == 9.0


@pytest.mark.parametrize("name", sorted(PATH_VARIABLES))
def test_path_options_flag_then_variable_then_none(name: str) -> None:
    flag = f"--{name.replace('_', '-')}"
    variable = PATH_VARIABLES[name]
    assert getattr(resolve([f"{flag}=/from/flag"], {variable: "/from/env"}), name) == "/from/flag"
    assert getattr(resolve([], {variable: "/from/env"}), name) == "/from/env"
    assert getattr(resolve([], {variable: "  "}), name) is None, "empty counts as unset"


def test_the_config_file_comes_from_the_environment_given(tmp_path: Path) -> None:
    path = tmp_path / "aphlict.custom.json"
    path.write_text(
        '{"servers": [{"type": "client", "port": 22280, "listen": "127.0.0.1"},'
        ' {"type": "admin", "port": 22281, "listen": "127.0.0.1"}]}'
    )
    assert resolve([], {"APHLICT_CONFIG": str(path)}).config.source == str(path)
    assert resolve([], {"ADMIN_PORT": "9000"}).config.admin_servers[0].port == 9000


def test_an_error_names_the_variable_it_came_from() -> None:
    with pytest.raises(ConfigError, match=r"FASTAPHLICT_MAX_SUBSCRIBERS=x \(environment, for"):
        resolve([], {"FASTAPHLICT_MAX_SUBSCRIBERS": "x"})
    with pytest.raises(ConfigError, match=r"^--max-subscribers=0: "):
        resolve(["--max-subscribers=0"], {"FASTAPHLICT_MAX_SUBSCRIBERS": "x"})


def test_settings_are_frozen() -> None:
    settings = resolve([], {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.debug = True  # type: ignore[misc]
    assert settings.limits == Limits()


def test_the_parser_reads_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every default is None or False: resolve() alone decides what the variable means."""
    for name, value in EVERY_VARIABLE.items():
        monkeypatch.setenv(name, value)
    defaults = vars(build_parser().parse_args([]))
    assert {value for value in defaults.values()} <= {None, False}


def test_main_reads_the_environment_it_is_given(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FASTAPHLICT_STATE_DIR", "/proc/no-state-here")
    monkeypatch.delenv("CLIENT_PORT", raising=False)
    monkeypatch.delenv("APHLICT_CONFIG", raising=False)
    assert cli.main(["--test"], environ={"ADMIN_PORT": "22299"}) == 0
    assert capsys.readouterr().out == "Configuration test OK.\n"
    assert cli.main(["--test"], environ={"CLIENT_PORT": "http"}) == 1
    assert "CLIENT_PORT" in capsys.readouterr().err


def test_every_flag_of_the_parser_is_declared_once() -> None:
    """OPTIONS names each flag of --help, in its order, and nothing else: the limits among them."""
    parser = build_parser()
    parsed = [action.option_strings[-1] for action in parser._actions]
    assert parsed == [option.flag for option in OPTIONS]
    assert len(set(parsed)) == len(parsed)
    names = {name for option in OPTIONS for name in (option.short, option.flag) if name}
    assert set(parser._option_string_actions) == names, "an option declared outside OPTIONS"
    limits = [option.flag for option in OPTIONS if option.limit]
    assert limits == [limit_flag(spec.name) for spec in dataclasses.fields(Limits)]


def test_help_says_every_option_and_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each option's entry in --help has its help and, if it has one, its variable."""
    monkeypatch.setenv("COLUMNS", "1000")  # no help wrapped inside a word
    text = build_parser().format_help()
    entries: dict[str, str] = {}
    flag = ""
    for line in text.splitlines():
        if line.startswith("  -"):
            flag = next(word for word in line.split() if word.startswith("--")).rstrip(",")
            entries[flag] = line
        elif flag and line.startswith("    "):
            entries[flag] += line
        else:
            flag = ""
    for option in OPTIONS:
        assert option.help, f"{option.flag} has no help"
        entry = " ".join(entries[option.flag].split())
        assert option.meaning in entry, entry
        if option.variable:
            assert f"env {option.variable})" in entry, entry
    named = set(re.findall(r"FASTAPHLICT_[A-Z_]+", text)) - {"FASTAPHLICT_"}
    assert named <= {option.variable for option in OPTIONS}, "a variable of no option"


def test_a_limit_option_is_its_field_of_limits() -> None:
    """Nothing of a limit is repeated: its option comes from the field's metadata."""
    defaults = Limits()
    for option in OPTIONS:
        if not option.limit:
            continue
        spec = next(f for f in dataclasses.fields(Limits) if f.name == option.limit)
        assert option.default == getattr(defaults, option.limit)
        assert option.help == spec.metadata["help"] and option.past == spec.metadata["past"]
        assert option.minimum == spec.metadata["minimum"] and option.why == spec.metadata["why"]
        assert option.variable == f"FASTAPHLICT_{option.limit.upper()}"


def test_a_digit_int_cannot_read_names_the_variable() -> None:
    """``²`` passes isdigit(); the error still names the variable, not int()'s complaint."""
    with pytest.raises(ConfigError) as caught:
        resolve([], {"FASTAPHLICT_MAX_FRAME_SIZE": "²"})
    assert str(caught.value) == (
        "FASTAPHLICT_MAX_FRAME_SIZE=² (environment, for --max-frame-size):"
        " expected a whole number >= 0, got '²'"
    )


def test_a_digit_int_cannot_read_on_the_flag_is_a_sentence(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """argparse repeats the converter's sentence, not the converter's function name."""
    with pytest.raises(SystemExit):
        resolve(["--max-frame-size=²"], {})
    err = capsys.readouterr().err
    assert "argument --max-frame-size: expected a whole number >= 0, got '²'" in err, err
    assert "_parse_count" not in err


@pytest.mark.parametrize(
    ("argv", "environ", "named"),
    [
        (["--broker-ca-file=/ca.pem"], {}, "--broker-ca-file applies"),
        (
            [],
            {"FASTAPHLICT_BROKER_CA_FILE": "/ca.pem"},
            "FASTAPHLICT_BROKER_CA_FILE (environment, for --broker-ca-file) applies",
        ),
    ],
)
def test_a_broker_ca_file_without_rediss_names_where_it_was_set(
    argv: list[str], environ: dict[str, str], named: str
) -> None:
    environ = {**environ, "FASTAPHLICT_BROKER": "redis://127.0.0.1:6379/0"}
    with pytest.raises(ConfigError) as caught:
        resolve(argv, environ)
    assert str(caught.value) == f"{named} to a rediss:// broker, not redis://127.0.0.1:6379/0"
