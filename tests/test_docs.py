"""The README, ``docs/`` and ``contrib/`` say what works: their commands run, their links resolve.

- A fenced ``sh`` block preceded by the line ``<!-- docs-test -->`` is run line
  by line from the root of the clone, as a reader would paste it, so the
  documented command and the tested one are the same text. The clone's
  ``.venv/bin/`` is read as the bin directory of the interpreter running the
  tests (the same directory when the tests run as the README says).
- A block preceded by ``<!-- docs-test: LABEL -->`` is run by the test that
  asks for that label with :func:`labelled` (the two-node cluster, the nginx
  block, the logrotate entry: ``tests/test_docs_*.py``); no label may be left
  unasked for.
- Every other ``sh`` block is at least checked for programs called bare
  (``python``, ``pip``, ``fastaphlict``...) that a fresh clone does not put on
  ``PATH``.
- The Grafana dashboard only queries series that a real ``/metrics`` answers.
- The systemd units pass ``systemd-analyze verify``, and their ``ExecStart=``
  passes ``--test``: a renamed flag or a misspelt key fails here, not at a
  customer's ``systemctl start``.
- Every JSON block is a ``notification.servers`` list that passes Phorge's
  own checks of that setting, or an Aphlict config that passes ``--test``.
- Every other block is run somewhere, or :data:`NOT_RUN` says why not.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import settings_table
from docs_support import (
    CONTRIB,
    DASHBOARD,
    DOCS,
    INSTALLED,
    REPO,
    TARGET_LABELS,
    UNITS,
    VENV_PROGRAMS,
    Block,
    all_blocks,
    labelled,
    paths_under,
    runnable,
    shell_blocks,
)
from fastaphlict import cli
from fastaphlict.config import PeerConfig
from fastaphlict.config.options import build_parser
from support import TIMEOUT, child_env, eventually, local_config, require, run, scaled, settings


def marked_commands() -> list[tuple[str, str]]:
    return [(b.where(), command) for b in shell_blocks() if b.marked for command in b.commands]


def test_docs_mark_some_commands_to_run() -> None:
    where = {w.split(":")[0] for w, _ in marked_commands()}
    assert {"README.md", "docs/benchmarks.md"} <= where


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("where", "command"), marked_commands())
def test_documented_command_runs(where: str, command: str) -> None:
    done = subprocess.run(
        ["sh", "-c", runnable(command)],
        cwd=REPO,
        env=child_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=scaled(100),
    )
    assert done.returncode == 0, (
        f"{where}: `{command}` exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    )


def test_fresh_clone_has_no_bare_venv_programs() -> None:
    """``python -m pytest`` fails from a fresh clone; ``.venv/bin/python -m pytest`` works."""
    bare = []
    for block in shell_blocks():
        for command in block.commands:
            for part in re.split(r"&&|\|\||;|\|", command):
                words = part.strip().lstrip("(").split()
                while words and re.match(r"\w+=", words[0]):  # VAR=value before the program
                    words.pop(0)
                if words and words[0] in VENV_PROGRAMS:
                    bare.append(f"{block.where()}: {command}")
    assert not bare, "call these through .venv/bin/ (or the install's own path):\n" + "\n".join(
        bare
    )


def anchors(path: Path) -> set[str]:
    """The ``#fragment`` of each heading of a markdown file, as GitHub makes them."""
    found = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        heading = re.match(r"#+ (.*)", line)
        if heading:
            found.add(re.sub(r"[^\w\- ]", "", heading[1].lower()).replace(" ", "-"))
    return found


def test_relative_links_resolve() -> None:
    """Every relative link names a file, and its ``#fragment`` a heading of that file."""
    broken = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, fragment = target.partition("#")
            linked = path.parent / file if file else path
            if not linked.exists():
                broken.append(f"{path.relative_to(REPO)}: {target}")
            elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
                broken.append(f"{path.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, broken


#: The README's quick-start install: CI's install phase without the test extras.
#: The quick start's first line: the install (its second line runs the server).
QUICK_INSTALL = "python3 -m venv .venv && .venv/bin/pip install ."


def ci_install() -> str:
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    install = re.search(r'^install="(.*)"$', ci, re.M)
    assert install
    return install.group(1)


def test_the_quick_start_installs_as_ci_does() -> None:
    """CI's install phase runs the quick start's install, with the tests' extras added."""
    block = labelled("quickstart start")
    assert block.path.name == "README.md"
    command, _ = block.commands
    assert command == QUICK_INSTALL
    assert f"sh tests/install-deps.sh && {command[:-1]}'.[test]'" == ci_install()


def test_the_prerequisites_are_debian_packages() -> None:
    """``apt-get`` finds the README's prerequisites (simulated: ``-s`` installs nothing)."""
    (command,) = labelled("prerequisites").commands
    assert command.startswith("apt-get install ")
    require(shutil.which("apt-get") is not None, "apt-get is missing (not Debian)", command)
    if not any(Path("/var/lib/apt/lists").glob("*Packages*")):
        pytest.skip("apt has no package lists (apt-get update first)")
    packages = command.split()[2:]
    done = subprocess.run(
        ["apt-get", "install", "-s", *packages],
        capture_output=True,
        text=True,
        timeout=scaled(60),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for package in packages:
        assert re.search(
            rf"^(Inst {re.escape(package)} |{re.escape(package)} is already)", done.stdout, re.M
        ), package


def test_the_readme_stays_short() -> None:
    """The README is the way in, at most 300 lines; the rest belongs in ``docs/``."""
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines"


def test_readme_keeps_the_ci_test_command() -> None:
    """``.ci/run`` refuses a README whose test command changed; fail here first."""
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    install = re.search(r'^install="(.*)"$', ci, re.M)
    tests = re.search(r'^tests="(.*)"$', ci, re.M)
    assert install and tests
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert f"{install.group(1)} && {tests.group(1)}" in lines


# -- the Grafana dashboard -----------------------------------------------------


def dashboard_expressions() -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and variable queries."""
    found: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "definition") and isinstance(value, str):
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(json.loads(DASHBOARD.read_text(encoding="utf-8")))
    return found


def test_dashboard_panels_have_unique_ids_and_queries() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert all(t["expr"] for t in panel["targets"]), panel["title"]


async def test_dashboard_queries_only_series_that_metrics_exports() -> None:
    # A cluster peer, so that the per-peer series exist, and one relay through it.
    async with run(settings()) as b:
        peer = PeerConfig("127.0.0.1", b.server.admin_ports[0], "http")
        async with run(settings(config=local_config(peers=(peer,)))) as a:
            async with a.client("/") as browser:
                await browser.subscribe("PHID-1")
                await a.post({"subscribers": ["PHID-1"]})
                await browser.recv()
                await eventually(lambda: a.server.relay.peers[0].sent, TIMEOUT, "the relay arrived")
                async with a.session.get(f"{a.admin_url}/metrics") as resp:
                    assert resp.status == 200
                    text = await resp.text()
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)

    expressions = dashboard_expressions()
    assert expressions
    missing, unlabelled = set(), []
    for expr in expressions:
        names = set(re.findall(r"\bfastaphlict_[a-z0-9_]+", expr))
        assert names, f"no fastaphlict series in {expr!r}"
        missing |= names - labels.keys()
        # Every label the query groups by is one the series carry (or Prometheus adds).
        for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
            for label in (g.strip() for g in group.split(",")):
                have = set().union(*(labels.get(n, set()) for n in names))
                if label not in TARGET_LABELS and label not in have:
                    unlabelled.append(f"{label} in {expr}")
    assert not missing, f"the dashboard queries series /metrics lacks: {sorted(missing)}"
    assert not unlabelled, unlabelled


def test_the_settings_table_is_the_declared_one() -> None:
    """Flags and limits are declared once (parser, ``Limits``); docs/settings.md shows them."""
    text = settings_table.SETTINGS.read_text(encoding="utf-8")
    assert settings_table.current(text) == settings_table.table(), (
        "regenerate with: .venv/bin/python tests/settings_table.py"
    )


def test_the_settings_table_has_every_flag_once() -> None:
    """A row per flag of ``--help``, and the only flag table of the docs."""
    flags = [a.option_strings[-1] for a in build_parser()._actions]
    shown = [re.match(r"`(--[\w-]+)", row[0])[1] for row in settings_table.rows()]  # type: ignore[index]
    assert shown == flags
    tables = [
        f"{path.relative_to(REPO)}:{number}"
        for path in DOCS
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if re.match(r"\|\s*(flag|limit)\s*\|", line)
    ]
    assert len(tables) == 1 and tables[0].startswith("docs/settings.md:"), tables


def test_every_variable_of_the_settings_table_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each ``FASTAPHLICT_*`` variable the table names changes what ``--test`` accepts.

    A value that cannot work, set through the variable alone, fails the
    check: so the server reads that variable (a misnamed one would pass).
    """
    any_value_works = {"FASTAPHLICT_ALLOWED_ORIGINS"}  # any text is an origin
    bad = {
        "FASTAPHLICT_LOG_LEVEL": "loud",
        "FASTAPHLICT_PIDFILE": "/proc/fastaphlict.pid",
        "FASTAPHLICT_REUSE_PORT": "maybe",
        "FASTAPHLICT_PEER_CA_FILE": "/nonexistent/ca.pem",
        "FASTAPHLICT_BROKER": "nosuch://host",
        "FASTAPHLICT_BROKER_SENTINEL_PASSWORD": "s3cret",  # with a broker not through Sentinel
        "FASTAPHLICT_BROKER_CA_FILE": "/nonexistent/ca.pem",
        "FASTAPHLICT_STATE_DIR": "/proc/fastaphlict",
        "FASTAPHLICT_ADMIN_ALLOW": "not-a-network",
    }
    #: What must be set first for the variable's bad value to be refused.
    context = {"FASTAPHLICT_BROKER_SENTINEL_PASSWORD": {"FASTAPHLICT_BROKER": "redis://127.0.0.1"}}
    variables = [row[1].strip("`") for row in settings_table.rows() if row[1]]
    checked = [v for v in variables if v.startswith("FASTAPHLICT_") and v not in any_value_works]
    assert len(checked) > 20
    for name in checked:
        for other in variables:
            monkeypatch.delenv(other, raising=False)
        value = bad.get(name, "-1")  # every limit refuses a negative number
        for other, works in context.get(name, {}).items():
            monkeypatch.setenv(other, works)
        assert cli.main(["--test"]) == 0, f"--test fails before {name} is set"
        monkeypatch.setenv(name, value)
        assert cli.main(["--test"]) == 1, f"{name}={value} is not read"


# -- the systemd units -----------------------------------------------------------


def exec_start(unit: str, instance: str = "1") -> list[str]:
    """A unit's ``ExecStart=`` as words, continuation lines joined, ``%i`` expanded."""
    lines = iter((CONTRIB / unit).read_text(encoding="utf-8").splitlines())
    for line in lines:
        if line.startswith("ExecStart="):
            command = line.removeprefix("ExecStart=")
            while command.endswith("\\"):
                command = command[:-1] + next(lines)
            return shlex.split(command.replace("%i", instance))
    raise AssertionError(f"{unit} has no ExecStart=")


@pytest.mark.parametrize("unit", ["fastaphlict.service", "fastaphlict@.service"])
def test_a_units_command_line_passes_the_config_test(
    unit: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every flag of the unit's ``ExecStart=`` is one the server takes, with paths it accepts.

    The broker comes from the unit's EnvironmentFile, as the docs say it should.
    """
    monkeypatch.setenv("FASTAPHLICT_BROKER", "redis://:password@redis.example:6379/0")

    config = tmp_path / "aphlict.json"
    config.write_text(
        json.dumps(
            {"servers": [{"type": "client", "port": 22280}, {"type": "admin", "port": 22281}]}
        )
    )
    places = {
        "/etc/fastaphlict/aphlict.json": str(config),
        "/run/fastaphlict/": f"{tmp_path}/run/",
        "${STATE_DIRECTORY}": f"{tmp_path}/state",
    }
    program, *args = exec_start(unit)
    assert program == INSTALLED + "fastaphlict"
    for old, new in places.items():
        args = [arg.replace(old, new) for arg in args]
    assert cli.main(["--test", *args]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out == "Configuration test OK.\n"


def test_the_template_unit_gives_each_process_its_own_pidfile_and_state() -> None:
    one, two = exec_start("fastaphlict@.service", "1"), exec_start("fastaphlict@.service", "2")
    assert "--reuse-port" in one
    pidfiles = [[a for a in words if a.startswith("--pidfile=")] for words in (one, two)]
    assert pidfiles[0] and pidfiles[0] != pidfiles[1]
    text = (CONTRIB / "fastaphlict@.service").read_text(encoding="utf-8")
    assert re.search(r"^StateDirectory=\S*%i$", text, re.M)
    assert "--state-dir=${STATE_DIRECTORY}" in " ".join(one)
    # One inherited socket serves one unit: the instances bind their ports themselves.
    assert not re.search(r"^(Sockets|Requires)=.*\.socket", text, re.M)
    # Secrets come from a file, optional ("-"), never from the command line.
    assert re.search(r"^EnvironmentFile=-/", text, re.M)
    assert not any("redis://" in arg for arg in one)


def test_the_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd parses every line: an unknown key or a bad value is only a warning at load."""
    require(
        shutil.which("systemd-analyze") is not None,
        "systemd-analyze is not installed (Debian: apt-get install systemd)",
        "the units' systemd-analyze verify",
    )
    bin_dir = f"{Path(sys.executable).parent}/"
    for unit in UNITS:
        text = (CONTRIB / unit).read_text(encoding="utf-8")
        (tmp_path / unit).write_text(text.replace(INSTALLED, bin_dir), encoding="utf-8")
    paths = [str(tmp_path / unit.replace("@.", "@1.")) for unit in UNITS]
    done = subprocess.run(
        ["systemd-analyze", "verify", *paths],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=scaled(60),
    )
    # Only what concerns our units: a host's own units may warn about themselves.
    ours = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if "fastaphlict" in line or str(tmp_path) in line
    ]
    assert done.returncode == 0 and not ours, "\n".join(ours) or done.stderr


# -- JSON the docs tell an operator to use ------------------------------------------

#: The keys Phorge reads from a ``notification.servers`` entry, with their types
#: (``PhabricatorNotificationServersConfigType``: any other key is refused).
PHORGE_KEYS = {"type": str, "host": str, "port": int, "protocol": str}
PHORGE_OPTIONAL = {"path": str, "disabled": bool}


def phorge_refuses(servers: object) -> list[str]:
    """What Phorge's check of ``notification.servers`` says against ``servers``, if anything.

    Its rules, in its order: a list of dictionaries, each with exactly the
    keys it reads and their types, type ``admin`` or ``client``, protocol
    ``http`` or ``https``, no ``path`` on an admin entry, no host and port
    twice, and at least one enabled entry of each type.
    """
    if not isinstance(servers, list) or not all(isinstance(s, dict) for s in servers):
        return ["not a list of dictionaries"]
    errors, seen = [], set()
    for index, spec in enumerate(servers):
        allowed = {**PHORGE_KEYS, **PHORGE_OPTIONAL}
        for key in sorted(spec.keys() - allowed.keys()):
            errors.append(f"{index}: unknown key {key!r}")
        for key, kind in allowed.items():
            value = spec.get(key)
            if key in PHORGE_KEYS and key not in spec:
                errors.append(f"{index}: {key} missing")
            elif key in spec and (
                not isinstance(value, kind) or isinstance(value, bool) != (kind is bool)
            ):
                errors.append(f"{index}: {key} is not {kind.__name__}")
        if spec.get("type") not in ("admin", "client"):
            errors.append(f"{index}: type {spec.get('type')!r}")
        if spec.get("protocol") not in ("http", "https"):
            errors.append(f"{index}: protocol {spec.get('protocol')!r}")
        if spec.get("type") == "admin" and spec.get("path"):
            errors.append(f"{index}: an admin entry with a path")
        where = (spec.get("host"), spec.get("port"))
        if where in seen:
            errors.append(f"{index}: {where} twice")
        seen.add(where)
    for kind in ("admin", "client"):
        if servers and not any(s.get("type") == kind and not s.get("disabled") for s in servers):
            errors.append(f"no enabled {kind} entry")
    return errors


@pytest.mark.parametrize(
    "servers",
    [
        [{"type": "client", "host": "a", "port": 1, "protocol": "https", "ssl": True}],
        [{"type": "client", "host": "a", "port": "1", "protocol": "https"}],
        [{"type": "client", "host": "a", "port": 1, "protocol": "wss"}],
        [{"type": "admin", "host": "a", "port": 1, "protocol": "http", "path": "/ws/"}],
        [{"type": "client", "host": "a", "port": 1, "protocol": "http"}],
        [
            {"type": "client", "host": "a", "port": 1, "protocol": "http"},
            {"type": "admin", "host": "a", "port": 1, "protocol": "http"},
        ],
        [
            {"type": "client", "host": "a", "port": 1, "protocol": "http"},
            {"type": "admin", "host": "a", "port": 2, "protocol": "http", "disabled": True},
        ],
        [
            {"type": "client", "host": "a", "port": 1, "protocol": "http", "disabled": 0},
            {"type": "admin", "host": "a", "port": 2, "protocol": "http"},
        ],
    ],
)
def test_the_phorge_check_refuses_what_phorge_refuses(servers: list[dict[str, object]]) -> None:
    assert phorge_refuses(servers)


def json_blocks() -> list[tuple[Block, object]]:
    return [(b, json.loads(b.text)) for b in all_blocks() if b.language == "json"]


def test_every_notification_servers_block_passes_phorges_check() -> None:
    """Each list the docs give for ``notification.servers`` is one Phorge accepts."""
    lists = [(block, value) for block, value in json_blocks() if isinstance(value, list)]
    assert len(lists) >= 4, "the single server, behind nginx, the cluster, migrating"
    for block, servers in lists:
        assert not phorge_refuses(servers), (block.where(), phorge_refuses(servers))
    cluster = [s for b, s in lists if sum(e["type"] == "admin" for e in s) > 1]  # type: ignore[index,union-attr]
    assert cluster, "the cluster's list names one admin entry per node"


def aphlict_configs() -> list[tuple[str, object]]:
    """Every Aphlict config the docs and ``contrib/`` show, by where it is."""
    found = [(b.where(), v) for b, v in json_blocks() if isinstance(v, dict)]
    example = CONTRIB / "aphlict.example.json"
    found.append((str(example.relative_to(REPO)), json.loads(example.read_text())))
    return found


def test_every_json_block_is_a_server_list_or_a_config() -> None:
    """A JSON block of another kind would have no test: give it one here."""
    for block, value in json_blocks():
        assert isinstance(value, (list, dict)), block.where()


@pytest.mark.parametrize(("where", "config"), aphlict_configs())
def test_a_documented_config_passes_the_config_test(
    where: str, config: dict[str, object], tmp_path: Path
) -> None:
    """``fastaphlict --test`` on the file as shown, its absolute paths moved under a scratch root.

    Only the paths move (``--test`` checks that logs and pidfile can be
    created there, which outside a scratch root needs root); every key and
    value else is the documented one.
    """
    path = tmp_path / "aphlict.json"
    path.write_text(paths_under(json.dumps(config), tmp_path))
    done = subprocess.run(
        [runnable(".venv/bin/fastaphlict"), "--test", f"--config={path}"],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=scaled(60),
    )
    assert (done.returncode, done.stdout) == (0, "Configuration test OK.\n"), (where, done.stderr)


# -- every block is run, or says why not -------------------------------------------

#: Each ``<!-- docs-test: LABEL -->`` label, by its first word, and the test file running it.
LABELLED_BY = {
    "prerequisites": "tests/test_docs.py",
    "quickstart": "tests/test_docs_servers.py",
    "two-node": "tests/test_docs_cluster.py",
    "nginx": "tests/test_docs_nginx.py",
    "logrotate": "tests/test_docs_logrotate.py",
    "migrate": "tests/test_docs_servers.py",
    "broker": "tests/test_docs_servers.py",
    "doctor": "tests/test_doctor_paths.py",
    "floors": "tests/test_bench_floors.py",
    "sysctl": "tests/test_docs.py",
}

#: Blocks no test here runs, by a piece of their text, and why. A new block
#: is either run (marked, labelled, or JSON) or added here with its reason.
NOT_RUN = {
    # README
    "sh tests/install-deps.sh && python3 -m venv .venv": ".ci/run runs it verbatim"
    " (test_readme_keeps_the_ci_test_command)",
    "docker build -t fastaphlict .": "needs a Docker daemon and the python base image"
    " from Docker Hub, neither reachable where the tests run",
    # docs/benchmarks.md: full runs take minutes; CI runs each scenario quick
    "pytest benchmarks/ --benchmark-only            # full run": "a full benchmark run",
    "PYTHONPATH=src .venv/bin/python -m pytest benchmarks/": "a full benchmark run",
    "--scenario targeted --sockets 10000": "needs a server running on the default ports",
    'git -C "$PHORGE" archive': "needs a Phorge checkout and Node",
    "--scenario storm --history 1000 --server-pid PID": "placeholders for a running server",
    "--scenario broker --sockets 8000 --messages 4000 --windows 10 --json": "a benchmark"
    " of minutes",
    "--broker-remote-every 1000": "a benchmark of minutes",
    "pytest benchmarks/test_broker.py -k warm": "a benchmark of minutes",
    "pytest benchmarks/test_restart.py --benchmark-only": "a benchmark of minutes",
    "pytest benchmarks/test_tls_storm.py --benchmark-disable": "a full benchmark run"
    " (its quick mode runs in CI's benchmark phase)",
    # docs/development.md
    "pip install -e '.[test]' Cython setuptools wheel": "reinstalls the clone's own .venv",
    ".venv/bin/python -m pytest -q\n": "the suite itself, which CI runs",
    "FASTAPHLICT_NODE_APHLICT=/path/to/phorge": "needs Phorge's Node Aphlict",
}

#: Blocks that a test finds by their text rather than a label, and that test.
RUN_BY = {
    "ACL SETUSER fastaphlict": "tests/test_broker.py",
    "sentinel monitor mymaster": "tests/test_sentinel.py",
    "FASTAPHLICT_BROKER='redis+sentinel://": "tests/test_sentinel.py",
}

#: Fenced blocks without a language that hold output, not something to run.
OUTPUT = ("docs/benchmarks.md", "docs/doctor.md")


def test_every_block_is_run_or_says_why_not() -> None:
    unrun = []
    for block in all_blocks():
        if block.marked or block.language == "json":
            continue
        if block.label:
            test_file = LABELLED_BY.get(block.label.split()[0])
            assert test_file, f"{block.where()}: no test for label {block.label!r}"
            assert "labelled(" in (REPO / test_file).read_text(encoding="utf-8")
            continue
        if not block.language and str(block.path.relative_to(REPO)) in OUTPUT:
            continue
        runner = next((test for piece, test in RUN_BY.items() if piece in block.text), None)
        if runner:
            # The runner reads the block from where it stands (the doc's name).
            where = str(block.path.relative_to(REPO))
            text = (REPO / runner).read_text(encoding="utf-8") if (REPO / runner).is_file() else ""
            assert where in text, f"{block.where()}: {runner} should read it from {where}"
            continue
        if not any(piece in block.text for piece in NOT_RUN):
            unrun.append(f"{block.where()}: {block.text.splitlines()[0]}")
    assert not unrun, "run these in a test, or say in NOT_RUN why not:\n" + "\n".join(unrun)


# -- the listen backlog a restart needs ----------------------------------------


def _sysctl_values(text: str) -> dict[str, int]:
    """``key = value`` lines of a sysctl.d file (comments and blank lines skipped)."""
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            values[key.strip()] = int(value)
    return values


def test_the_sysctl_file_makes_room_for_the_backlog_the_units_ask_for() -> None:
    """The kernel caps a listen backlog at somaxconn without a word: the file lifts it."""
    from fastaphlict.listeners import BACKLOG

    values = _sysctl_values((CONTRIB / "60-fastaphlict.conf").read_text())
    found = re.search(r"^Backlog=(\d+)$", (CONTRIB / "fastaphlict.socket").read_text(), re.M)
    assert found is not None
    backlog = int(found[1])
    assert backlog == BACKLOG
    assert values == {"net.core.somaxconn": backlog, "net.ipv4.tcp_max_syn_backlog": backlog}


def test_the_sysctl_block_raises_the_cap(tmp_path: Path) -> None:
    """The documented commands, run in private network and mount namespaces."""
    block = labelled("sysctl")
    unshare = shutil.which("unshare")
    require(
        unshare is not None and shutil.which("sysctl") is not None,
        "unshare and sysctl are missing (sh tests/install-deps.sh)",
        "the docs' sysctl block",
    )
    assert unshare is not None
    probe = subprocess.run([unshare, "-n", "-m", "true"], capture_output=True, timeout=scaled(10))
    if probe.returncode != 0:
        pytest.skip(f"no private namespaces here: {probe.stderr.decode().strip()}")
    # /etc/sysctl.d is a fresh tmpfs inside the mount namespace: the host's stays untouched.
    commands = " && ".join(command.removeprefix("sudo ") for command in block.commands)
    script = (
        f"mount -t tmpfs tmpfs /etc/sysctl.d && {commands} >/dev/null && "
        "sysctl -n net.core.somaxconn net.ipv4.tcp_max_syn_backlog"
    )
    done = subprocess.run(
        [unshare, "-n", "-m", "sh", "-ec", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=scaled(30),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["16384", "16384"]
