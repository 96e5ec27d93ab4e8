"""Config parsing: Phorge's launcher rules, environment defaults, precedence."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastaphlict.config import (
    DEFAULT_ADMIN_PORT,
    DEFAULT_CLIENT_PORT,
    Config,
    ConfigError,
    LimitError,
    Limits,
    LogConfig,
    PeerConfig,
    ServerConfig,
    check_files,
    check_state_dir,
    from_environment,
    load_config,
    load_file,
    parse_config,
)

# The example from the protocol spec, §6.
SPEC_EXAMPLE: dict[str, Any] = {
    "servers": [
        {
            "type": "client",
            "port": 22280,
            "listen": "0.0.0.0",
            "ssl.key": None,
            "ssl.cert": None,
            "ssl.chain": None,
        },
        {"type": "admin", "port": 22281, "listen": "127.0.0.1"},
    ],
    "logs": [{"path": "/var/log/aphlict.log"}],
    "cluster": [{"host": "peer1.example.com", "port": 22281, "protocol": "http"}],
    "pidfile": "/var/tmp/aphlict/pid/aphlict.pid",
    "memory.hint": 256,
}

MINIMAL: dict[str, Any] = {
    "servers": [{"type": "client", "port": 22280}, {"type": "admin", "port": 22281}],
}


def with_changes(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A deep copy of base with top-level keys set; ``memory_hint`` means "memory.hint"."""
    data = copy.deepcopy(base)
    for key, value in changes.items():
        data[key.replace("_", ".")] = value
    return data


def write_json(path: Path, data: object) -> str:
    path.write_text(json.dumps(data))
    return str(path)


# -- the full example and defaults -----------------------------------------------


def test_spec_example_parses_to_exact_dataclasses() -> None:
    config = parse_config(SPEC_EXAMPLE, source="aphlict.custom.json")
    assert config == Config(
        servers=(
            ServerConfig(type="client", port=22280, listen="0.0.0.0"),
            ServerConfig(type="admin", port=22281, listen="127.0.0.1"),
        ),
        logs=(LogConfig(path="/var/log/aphlict.log"),),
        cluster=(PeerConfig(host="peer1.example.com", port=22281, protocol="http"),),
        pidfile="/var/tmp/aphlict/pid/aphlict.pid",
        memory_hint=256,
        source="aphlict.custom.json",
    )
    assert config.client_servers == (config.servers[0],)
    assert config.admin_servers == (config.servers[1],)
    assert not config.servers[0].tls


def test_minimal_file_gets_defaults() -> None:
    config = parse_config(MINIMAL, source="f.json")
    assert config.logs == ()
    assert config.cluster == ()
    assert config.pidfile is None
    assert config.memory_hint is None
    assert [s.listen for s in config.servers] == ["0.0.0.0", "0.0.0.0"]
    assert all(s.ssl_key is s.ssl_cert is s.ssl_chain is None for s in config.servers)


def test_null_or_empty_listen_binds_all_interfaces_like_node() -> None:
    data = {
        "servers": [
            {"type": "client", "port": 1, "listen": None},
            {"type": "admin", "port": 2, "listen": ""},
        ]
    }
    assert [s.listen for s in parse_config(data, "f").servers] == ["0.0.0.0", "0.0.0.0"]


def test_null_memory_hint_and_pidfile_are_accepted() -> None:
    config = parse_config(with_changes(MINIMAL, memory_hint=None, pidfile=None), "f")
    assert config.memory_hint is None
    assert config.pidfile is None


def test_several_servers_of_each_type_keep_their_order() -> None:
    data = {
        "servers": [
            {"type": "client", "port": 1},
            {"type": "admin", "port": 2},
            {"type": "client", "port": 3, "listen": "::"},
            {"type": "admin", "port": 4},
        ]
    }
    config = parse_config(data, "f")
    assert [s.port for s in config.client_servers] == [1, 3]
    assert [s.port for s in config.admin_servers] == [2, 4]


def test_tls_is_on_when_key_and_cert_are_both_set() -> None:
    data = {
        "servers": [
            {
                "type": "client",
                "port": 443,
                "ssl.key": "k.pem",
                "ssl.cert": "c.pem",
                "ssl.chain": "ch.pem",
            },
            {"type": "admin", "port": 22281},
        ]
    }
    client = parse_config(data, "f").servers[0]
    assert client.tls
    assert (client.ssl_key, client.ssl_cert, client.ssl_chain) == ("k.pem", "c.pem", "ch.pem")


def test_empty_ssl_strings_mean_not_set_like_php_and_node() -> None:
    data = {
        "servers": [
            {"type": "client", "port": 1, "ssl.key": "", "ssl.cert": "", "ssl.chain": ""},
            {"type": "admin", "port": 2},
        ]
    }
    client = parse_config(data, "f").servers[0]
    assert not client.tls
    assert client.ssl_key is client.ssl_cert is client.ssl_chain is None


def test_same_host_on_another_port_is_a_different_peer() -> None:
    cluster = [
        {"host": "a", "port": 1, "protocol": "http"},
        {"host": "a", "port": 2, "protocol": "https"},
        {"host": "b", "port": 1, "protocol": "http"},
    ]
    config = parse_config(with_changes(MINIMAL, cluster=cluster), "f")
    assert [(p.host, p.port, p.protocol) for p in config.cluster] == [
        ("a", 1, "http"),
        ("a", 2, "https"),
        ("b", 1, "http"),
    ]


def test_config_is_frozen() -> None:
    config = parse_config(MINIMAL, "f")
    with pytest.raises(AttributeError):
        config.pidfile = "x"  # type: ignore[misc]


# -- every rule of Phorge's launcher, each naming its index and key -------------


def servers(*entries: Any) -> dict[str, Any]:
    return {"servers": list(entries)}


CLIENT = {"type": "client", "port": 22280}
ADMIN = {"type": "admin", "port": 22281}

INVALID: list[tuple[str, object, list[str]]] = [
    ("top_level_not_an_object", [MINIMAL], ["top level", "JSON object", "list"]),
    ("top_level_null", None, ["JSON object", "null"]),
    ("unknown_top_level_key", with_changes(MINIMAL, port=1), ["top level", "port"]),
    ("servers_missing", {"pidfile": "p"}, ["top level", "Missing", "servers"]),
    ("servers_not_a_list", {"servers": {"type": "client"}}, ["servers", "list<wild>", "map"]),
    ("server_not_an_object", servers(CLIENT, "admin"), ['index "1"', "JSON object"]),
    ("server_without_type", servers({"port": 1}, ADMIN), ['index "0"', "Missing", "type"]),
    ("server_without_port", servers(CLIENT, {"type": "admin"}), ['index "1"', "port"]),
    (
        "server_type_not_a_string",
        servers({"type": 1, "port": 1}, ADMIN),
        ['index "0"', "'type'", "string"],
    ),
    (
        "server_port_a_string",
        servers({"type": "client", "port": "22280"}, ADMIN),
        ['index "0"', "'port'", "int"],
    ),
    (
        "server_port_a_bool",
        servers({"type": "client", "port": True}, ADMIN),
        ['index "0"', "'port'", "bool"],
    ),
    (
        "server_port_a_float",
        servers({"type": "client", "port": 22280.0}, ADMIN),
        ['index "0"', "'port'", "float"],
    ),
    ("server_port_zero", servers({"type": "client", "port": 0}, ADMIN), ['index "0"', "port"]),
    (
        "server_port_too_large",
        servers(CLIENT, {"type": "admin", "port": 65536}),
        ['index "1"', "port", "65536"],
    ),
    (
        "unknown_key_in_server",
        servers({**CLIENT, "host": "x"}, ADMIN),
        ['index "0"', "unexpected", "host"],
    ),
    (
        "listen_not_a_string",
        servers({**CLIENT, "listen": 1}, ADMIN),
        ['index "0"', "'listen'"],
    ),
    (
        "ssl_key_not_a_string",
        servers({**CLIENT, "ssl.key": ["k"]}, ADMIN),
        ['index "0"', "'ssl.key'"],
    ),
    (
        "two_servers_on_the_same_port",
        servers(CLIENT, {"type": "admin", "port": 22280}),
        ['indexes "0" and "1"', '"22280"', "same port"],
    ),
    (
        "server_type_not_admin_or_client",
        servers(CLIENT, ADMIN, {"type": "peer", "port": 3}),
        ['index "2"', '"peer"', "admin, client"],
    ),
    (
        "ssl_key_without_ssl_cert",
        servers({**CLIENT, "ssl.key": "k.pem"}, ADMIN),
        ['index "0"', '"ssl.key"', '"ssl.cert"'],
    ),
    (
        "ssl_cert_without_ssl_key",
        servers(CLIENT, {**ADMIN, "ssl.cert": "c.pem"}),
        ['index "1"', '"ssl.key"', '"ssl.cert"'],
    ),
    (
        "ssl_chain_without_key_and_cert",
        servers({**CLIENT, "ssl.chain": "ch.pem"}, ADMIN),
        ['index "0"', '"ssl.chain"'],
    ),
    ("no_servers_at_all", servers(), ["any servers"]),
    ("no_client_server", servers(ADMIN), ["client servers", '"client"']),
    ("no_admin_server", servers(CLIENT), ["administrative servers", '"admin"']),
    ("logs_not_a_list", with_changes(MINIMAL, logs={"path": "x"}), ["'logs'", "list"]),
    ("log_not_an_object", with_changes(MINIMAL, logs=["x.log"]), ['Log (at index "0")']),
    ("log_without_path", with_changes(MINIMAL, logs=[{}]), ['Log (at index "0")', "path"]),
    ("log_path_not_a_string", with_changes(MINIMAL, logs=[{"path": 1}]), ['"0"', "'path'"]),
    ("log_path_empty", with_changes(MINIMAL, logs=[{"path": ""}]), ['"0"', "'path'"]),
    (
        "unknown_key_in_log",
        with_changes(MINIMAL, logs=[{"path": "a"}, {"path": "b", "level": "x"}]),
        ['Log (at index "1")', "level"],
    ),
    ("cluster_not_a_list", with_changes(MINIMAL, cluster="peer"), ["'cluster'", "list"]),
    ("peer_not_an_object", with_changes(MINIMAL, cluster=[None]), ['peer (at index "0")']),
    (
        "peer_without_host",
        with_changes(MINIMAL, cluster=[{"port": 1, "protocol": "http"}]),
        ['peer (at index "0")', "host"],
    ),
    (
        "peer_without_port",
        with_changes(MINIMAL, cluster=[{"host": "a", "protocol": "http"}]),
        ['peer (at index "0")', "port"],
    ),
    (
        "peer_without_protocol",
        with_changes(MINIMAL, cluster=[{"host": "a", "port": 1}]),
        ['peer (at index "0")', "protocol"],
    ),
    (
        "peer_port_not_an_int",
        with_changes(MINIMAL, cluster=[{"host": "a", "port": "1", "protocol": "http"}]),
        ['peer (at index "0")', "'port'"],
    ),
    (
        "peer_protocol_not_http_or_https",
        with_changes(MINIMAL, cluster=[{"host": "a", "port": 1, "protocol": "ws"}]),
        ['"a"', 'index "0"', '"ws"', '"http" or "https"'],
    ),
    (
        "peer_listed_twice_even_with_another_protocol",
        with_changes(
            MINIMAL,
            cluster=[
                {"host": "a", "port": 1, "protocol": "http"},
                {"host": "a", "port": 1, "protocol": "https"},
            ],
        ),
        ['"a:1"', 'indexes "0" and "1"'],
    ),
    (
        "unknown_key_in_peer",
        with_changes(MINIMAL, cluster=[{"host": "a", "port": 1, "protocol": "http", "x": 1}]),
        ['peer (at index "0")', "x"],
    ),
    ("pidfile_not_a_string", with_changes(MINIMAL, pidfile=1), ["'pidfile'", "string"]),
    ("memory_hint_not_an_int", with_changes(MINIMAL, memory_hint="256"), ["'memory.hint'"]),
    ("memory_hint_a_bool", with_changes(MINIMAL, memory_hint=True), ["'memory.hint'", "bool"]),
]


@pytest.mark.parametrize(
    ("data", "fragments"),
    [pytest.param(data, fragments, id=rule) for rule, data, fragments in INVALID],
)
def test_invalid_config_is_rejected_naming_index_and_key(
    data: object, fragments: list[str]
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="f.json")
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_type_errors_are_reported_before_port_clashes_like_phorge() -> None:
    # Phorge checks each server fully before the next: index 0's bad type wins.
    data = servers({"type": "peer", "port": 1}, {"type": "admin", "port": 1})
    with pytest.raises(ConfigError, match=r'index "0".*invalid type'):
        parse_config(data, "f")


# -- files ----------------------------------------------------------------------


def test_load_file_records_its_path_as_source(tmp_path: Path) -> None:
    path = write_json(tmp_path / "aphlict.custom.json", SPEC_EXAMPLE)
    config = load_file(path)
    assert config.source == path
    assert config.memory_hint == 256


def test_unreadable_file_is_a_config_error_naming_the_path(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match="Failed to read configuration file") as info:
        load_file(missing)
    assert missing in str(info.value)


def test_directory_instead_of_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Failed to read"):
        load_file(str(tmp_path))


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("{servers: []}", id="unquoted_key"),
        pytest.param('{"servers": [],}', id="trailing_comma"),
        pytest.param("\xff\xfe{", id="not_utf8"),
        pytest.param("[" * 100_000, id="absurdly_deep"),
    ],
)
def test_file_that_is_not_json_is_a_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ConfigError, match="not properly formatted JSON") as info:
        load_file(str(path))
    assert str(path) in str(info.value)


# -- environment ------------------------------------------------------------------


def test_environment_defaults_bind_admin_to_loopback_only() -> None:
    config = from_environment({})
    assert config == Config(
        servers=(
            ServerConfig(type="client", port=DEFAULT_CLIENT_PORT, listen="0.0.0.0"),
            ServerConfig(type="admin", port=DEFAULT_ADMIN_PORT, listen="127.0.0.1"),
        ),
        source="environment",
    )
    assert (DEFAULT_CLIENT_PORT, DEFAULT_ADMIN_PORT) == (22280, 22281)


def test_environment_ports_and_listen_addr_apply_to_both_servers() -> None:
    config = from_environment({"CLIENT_PORT": "8080", "ADMIN_PORT": " 8081 ", "LISTEN_ADDR": "::"})
    assert [(s.type, s.port, s.listen) for s in config.servers] == [
        ("client", 8080, "::"),
        ("admin", 8081, "::"),
    ]


def test_empty_environment_values_count_as_unset() -> None:
    config = from_environment({"CLIENT_PORT": "", "ADMIN_PORT": "", "LISTEN_ADDR": ""})
    assert config == from_environment({})


@pytest.mark.parametrize("name", ["CLIENT_PORT", "ADMIN_PORT"])
@pytest.mark.parametrize(
    "value", ["abc", "-1", "0", "65536", "+80", "1_000", "8.0", "\u0668\u0660"]
)
def test_invalid_environment_port_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_environment({name: value})
    assert name in str(info.value)
    assert value in str(info.value)


def test_equal_environment_ports_are_rejected() -> None:
    with pytest.raises(ConfigError, match=r"CLIENT_PORT and ADMIN_PORT.*same port"):
        from_environment({"CLIENT_PORT": "9000", "ADMIN_PORT": "9000"})


def test_aphlict_config_file_replaces_environment_settings(tmp_path: Path) -> None:
    path = write_json(tmp_path / "a.json", SPEC_EXAMPLE)
    config = load_config(environ={"APHLICT_CONFIG": path, "CLIENT_PORT": "9999"})
    assert config.source == path
    assert [s.port for s in config.servers] == [22280, 22281]


def test_config_path_wins_over_aphlict_config(tmp_path: Path) -> None:
    chosen = write_json(tmp_path / "chosen.json", MINIMAL)
    ignored = str(tmp_path / "missing.json")
    config = load_config(chosen, environ={"APHLICT_CONFIG": ignored})
    assert config.source == chosen


def test_without_any_file_the_environment_decides() -> None:
    config = load_config(None, environ={"CLIENT_PORT": "7000"})
    assert config.source == "environment"
    assert config.client_servers[0].port == 7000


def test_load_config_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("APHLICT_CONFIG", raising=False)
    monkeypatch.setenv("ADMIN_PORT", "7001")
    assert load_config().admin_servers[0].port == 7001


def test_bad_aphlict_config_path_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Failed to read"):
        load_config(environ={"APHLICT_CONFIG": str(tmp_path / "missing.json")})


# -- check_files (--test) -------------------------------------------------------


def tls_config(tmp_path: Path, chain: bool = True) -> Config:
    for name in ("k.pem", "c.pem", "ch.pem"):
        (tmp_path / name).write_text("-----BEGIN-----\n")
    client = {
        "type": "client",
        "port": 443,
        "ssl.key": str(tmp_path / "k.pem"),
        "ssl.cert": str(tmp_path / "c.pem"),
    }
    if chain:
        client["ssl.chain"] = str(tmp_path / "ch.pem")
    return parse_config(servers(ADMIN, client), "f")


def test_check_files_passes_when_tls_files_are_readable(tmp_path: Path) -> None:
    check_files(tls_config(tmp_path))


def test_check_files_ignores_servers_without_tls() -> None:
    check_files(parse_config(MINIMAL, "f"))


@pytest.mark.parametrize(
    ("filename", "key"),
    [("k.pem", "ssl.key"), ("c.pem", "ssl.cert"), ("ch.pem", "ssl.chain")],
)
def test_check_files_names_index_and_key_of_a_missing_file(
    tmp_path: Path, filename: str, key: str
) -> None:
    config = tls_config(tmp_path)
    (tmp_path / filename).unlink()
    with pytest.raises(ConfigError) as info:
        check_files(config)
    message = str(info.value)
    assert 'index "1"' in message
    assert f'"{key}"' in message
    assert str(tmp_path / filename) in message


def test_check_files_rejects_a_directory(tmp_path: Path) -> None:
    config = tls_config(tmp_path, chain=False)
    (tmp_path / "c.pem").unlink()
    (tmp_path / "c.pem").mkdir()
    with pytest.raises(ConfigError, match=r'index "1".*"ssl\.cert"'):
        check_files(config)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_check_files_rejects_an_unreadable_file(tmp_path: Path) -> None:
    config = tls_config(tmp_path, chain=False)
    (tmp_path / "k.pem").chmod(0)
    with pytest.raises(ConfigError, match=r'"ssl\.key"'):
        check_files(config)


# -- robustness -------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


def mostly(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Nine times in ten a plausible value, else any JSON: so every rule gets reached."""
    # sampled_from is uniform; integers() would favour its bounds, i.e. the bad branch.
    return st.sampled_from([True] * 9 + [False]).flatmap(lambda ok: good if ok else json_values)


def config_like(
    noise: Callable[[st.SearchStrategy[Any]], st.SearchStrategy[Any]], min_servers: int = 0
) -> st.SearchStrategy[dict[str, Any]]:
    """Aphlict-shaped objects; ``noise`` decides how often a value is replaced by junk."""
    ssl = noise(st.sampled_from([None] * 4 + ["", "k.pem", "c.pem"]))
    server = st.fixed_dictionaries(
        {
            "type": noise(st.sampled_from(["client", "admin"] * 4 + ["peer"])),
            # Small ports collide often; the edges probe the 1..65535 range.
            "port": noise(st.sampled_from([*range(1, 17)] * 2 + [-1, 0, 65535, 65536])),
        },
        optional={
            "listen": noise(st.none() | st.sampled_from(["", "::", "127.0.0.1"])),
            "ssl.key": ssl,
            "ssl.cert": ssl,
            "ssl.chain": ssl,
        },
    )
    peer = st.fixed_dictionaries(
        {
            "host": noise(st.sampled_from(["a", "b"])),
            "port": noise(st.integers(0, 3)),
            "protocol": noise(st.sampled_from(["http", "https", "ws"])),
        }
    )
    log = st.fixed_dictionaries({"path": noise(st.text(max_size=8))})
    return st.fixed_dictionaries(
        {"servers": noise(st.lists(noise(server), min_size=min_servers, max_size=5))},
        optional={
            "logs": noise(st.lists(noise(log), max_size=3)),
            "cluster": noise(st.lists(noise(peer), max_size=3)),
            "pidfile": noise(st.none() | st.text(max_size=8)),
            "memory.hint": noise(st.none() | st.integers()),
        },
    )


def plausible(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return good


@settings(max_examples=300, deadline=None)
@given(json_values | config_like(mostly) | config_like(plausible, min_servers=2))
def test_parse_config_raises_nothing_but_config_error(data: object) -> None:
    try:
        config = parse_config(data, source="fuzz")
    except ConfigError as exc:
        assert str(exc)
    else:
        assert config.client_servers
        assert config.admin_servers
        assert len({s.port for s in config.servers}) == len(config.servers)
        assert all(s.tls == bool(s.ssl_key) for s in config.servers)


# -- Limits --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("handshake_timeout", 0.0),
        ("max_frame_size", 0),
        ("max_frame_size", 127),
        ("max_subscriptions", 0),
        ("max_phid_length", 0),
        ("max_instance_length", 0),
        ("max_connections", -1),
        ("max_buffered", 0),
        ("max_body_size", 0),
        ("max_subscribers", 0),
        ("ping_interval", -1.0),
        ("ping_interval", float("inf")),
        ("relay_timeout", 0.0),
        ("relay_queue", 0),
        ("relay_drain_timeout", float("nan")),
        ("shutdown_timeout", -1.0),
        ("admin_allow", ("10.0.0.0/33",)),
    ],
)
def test_limits_refuse_values_that_cannot_work(name: str, value: object) -> None:
    with pytest.raises(LimitError) as caught:
        Limits(**{name: value})  # type: ignore[arg-type]
    assert caught.value.name == name


def test_limits_accept_their_defaults_and_the_documented_zeros() -> None:
    Limits()
    Limits(max_connections=0, ping_interval=0.0, relay_drain_timeout=0.0, shutdown_timeout=0.0)


def test_check_files_refuses_a_log_path_that_is_a_directory(tmp_path: Path) -> None:
    config = Config(servers=(), logs=(LogConfig(str(tmp_path)),))
    with pytest.raises(ConfigError, match=r'Failed to open log file .* "0"'):
        check_files(config)


def test_check_files_creates_nothing(tmp_path: Path) -> None:
    new = tmp_path / "new"
    config = Config(
        servers=(), logs=(LogConfig(str(new / "log" / "a.log")),), pidfile=str(new / "a.pid")
    )
    check_files(config)
    assert not new.exists()


@pytest.mark.parametrize(
    "pidfile", ["/proc/fastaphlict-test.pid", "/proc/fastaphlict-test/pid/aphlict.pid"]
)
def test_check_files_refuses_a_pidfile_that_cannot_be_made_even_as_root(pidfile: str) -> None:
    # os.access says yes to root under /proc; creating there fails, for root too.
    config = Config(servers=(), pidfile=pidfile)
    with pytest.raises(ConfigError) as caught:
        check_files(config)
    assert str(caught.value).startswith(
        f'Configuration file has "pidfile" set to "{pidfile}", which can not be written: '
        '"/proc" is not writable: '
    )


def test_check_files_refuses_a_pidfile_directory_another_user_owns(tmp_path: Path) -> None:
    taken = tmp_path / "aphlict"  # created first by someone else, as /var/tmp/aphlict can be
    taken.mkdir()
    os.chown(taken, 12345, 12345)
    pidfile = taken / "pid" / "aphlict.pid"
    with pytest.raises(ConfigError) as caught:
        check_files(Config(servers=(), pidfile=str(pidfile)))
    assert str(caught.value) == (
        f'Configuration file has "pidfile" set to "{pidfile}", which can not be written: '
        f'"{taken}" belongs to another user (uid 12345): another user could replace it by'
        " a symlink."
    )
    assert list(taken.iterdir()) == [], "nothing made"


@pytest.mark.parametrize("path", ["/proc/self", "/proc/fastaphlict-test/state"])
def test_check_state_dir_refuses_what_root_cannot_write_either(path: str) -> None:
    with pytest.raises(ConfigError, match=f'State directory "{path}" can not be written: '):
        check_state_dir(path)


def test_check_files_leaves_no_probe_behind(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    config = Config(
        servers=(),
        logs=(LogConfig(str(tmp_path / "log" / "a.log")),),
        pidfile=str(tmp_path / "run" / "a.pid"),
    )
    check_files(config)
    check_state_dir(str(tmp_path / "run"))
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["run"]
