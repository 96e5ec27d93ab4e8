"""``--broker=URL``: what parse_broker_url accepts, what it refuses, and that no password leaks.

The password rule (issue 11, "Secrets") is a property: whatever the password,
encoded as it should be or pasted raw, neither a parsed broker's ``display``
or ``repr`` nor any error names it.
"""

from __future__ import annotations

import inspect
from urllib.parse import quote

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from fastaphlict.config import BrokerConfig, ConfigError, _parse_sentinel_url, parse_broker_url

# -- what it accepts -------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://localhost", BrokerConfig("redis", host="localhost")),
        ("redis://10.0.0.5:6380/2", BrokerConfig("redis", host="10.0.0.5", port=6380, db=2)),
        ("redis://h/", BrokerConfig("redis", host="h")),
        ("redis://h?db=4", BrokerConfig("redis", host="h", db=4)),
        ("redis://h:7000/?db=5", BrokerConfig("redis", host="h", port=7000, db=5)),
        ("rediss://cache.example:6390/1", BrokerConfig("rediss", "cache.example", 6390, db=1)),
        ("REDIS://Cache.Example/0", BrokerConfig("redis", host="cache.example")),
        ("redis://[::1]:7000/3", BrokerConfig("redis", host="::1", port=7000, db=3)),
        ("redis://[2001:db8::7]/0", BrokerConfig("redis", host="2001:db8::7")),
        ("unix:///run/redis/redis.sock", BrokerConfig("unix", path="/run/redis/redis.sock")),
        ("unix:///run/redis.sock?db=2", BrokerConfig("unix", path="/run/redis.sock", db=2)),
        ("unix:///run/my%20redis.sock", BrokerConfig("unix", path="/run/my redis.sock")),
        ("unix:///run/redis%40a/r.sock", BrokerConfig("unix", path="/run/redis@a/r.sock")),
        (
            "redis://fastaphlict:s3cret@h:6379/0",
            BrokerConfig("redis", host="h", username="fastaphlict", password="s3cret"),
        ),
        ("redis://:s3cret@h/1", BrokerConfig("redis", host="h", db=1, password="s3cret")),
        ("redis://someone@h", BrokerConfig("redis", host="h", username="someone")),
        (
            "unix://:s3cret@/run/redis.sock?db=3",
            BrokerConfig("unix", path="/run/redis.sock", db=3, password="s3cret"),
        ),
        (
            "rediss://us%40er:p%40ss%3Aw%2Fo%23rd%25@[::1]:6390/2",
            BrokerConfig("rediss", "::1", 6390, db=2, username="us@er", password="p@ss:w/o#rd%"),
        ),
        # A raw '@' or ':' in the password is unambiguous: the host follows the last '@'.
        (
            "redis://u:p@ss:wd@h/0",
            BrokerConfig("redis", host="h", username="u", password="p@ss:wd"),
        ),
        ("  redis://h/1 ", BrokerConfig("redis", host="h", db=1)),
        (
            "redis+sentinel://s1:26380,S2,[::1]:5000/mymaster/3",
            BrokerConfig(
                "redis+sentinel",
                db=3,
                sentinels=(("s1", 26380), ("s2", 26379), ("::1", 5000)),
                service="mymaster",
            ),
        ),
        (
            "rediss+sentinel://fastaphlict:s%2F3cret@s1/my%2Dmaster?db=2",
            BrokerConfig(
                "rediss+sentinel",
                db=2,
                username="fastaphlict",
                password="s/3cret",
                sentinels=(("s1", 26379),),
                service="my-master",
            ),
        ),
        (
            "REDIS+SENTINEL://:pw@s1:1/m/",
            BrokerConfig("redis+sentinel", password="pw", sentinels=(("s1", 1),), service="m"),
        ),
    ],
)
def test_broker_urls_parse_to_exact_settings(url: str, expected: BrokerConfig) -> None:
    assert parse_broker_url(url) == expected


def test_the_last_db_parameter_counts_like_redis_py() -> None:
    assert parse_broker_url("redis://h?db=1&db=2").db == 2


def test_a_percent_encoded_password_round_trips() -> None:
    password = "pä ss/wörd?#@:%+✓"
    parsed = parse_broker_url(f"redis://u:{quote(password, safe='')}@h/0")
    assert parsed.password == password
    assert parsed.username == "u"


def test_plus_in_a_password_stays_a_plus() -> None:
    """Base64 passwords hold '+': a URL's userinfo is not form data."""
    assert parse_broker_url("redis://:a+b==@h/0").password == "a+b=="


# -- display: what logs, errors and metrics show ------------------------------------


@pytest.mark.parametrize(
    ("url", "display"),
    [
        ("redis://h", "redis://h:6379/0"),
        ("redis://u:pw@h:6380/2", "redis://u:***@h:6380/2"),
        ("redis://:pw@h/2", "redis://:***@h:6379/2"),
        ("redis://u@h/2", "redis://u@h:6379/2"),
        ("rediss://[::1]:7000/1", "rediss://[::1]:7000/1"),
        ("unix:///run/r.sock", "unix:///run/r.sock?db=0"),
        ("unix://:pw@/run/r.sock?db=4", "unix://:***@/run/r.sock?db=4"),
        ("redis+sentinel://u:pw@a,b:1/m/2", "redis+sentinel://u:***@a:26379,b:1/m/2"),
        ("rediss+sentinel://[::1]:7/m", "rediss+sentinel://[::1]:7/m/0"),
    ],
)
def test_display_shows_where_with_the_password_as_stars(url: str, display: str) -> None:
    assert parse_broker_url(url).display == display


def test_a_sentinel_broker_connects_to_the_primary_with_the_data_password_only() -> None:
    parsed = BrokerConfig(
        "rediss+sentinel",
        db=4,
        username="u",
        password="data-pw",
        sentinels=(("s1", 26379),),
        service="m",
        sentinel_password="sentinel-pw",
    )
    assert parsed.sentinel and parsed.tls
    assert parsed.primary_at("10.0.0.9", 6390) == BrokerConfig(
        "rediss", "10.0.0.9", 6390, db=4, username="u", password="data-pw"
    )
    assert parsed.sentinel_at("s1", 26379) == BrokerConfig(
        "rediss", "s1", 26379, password="sentinel-pw"
    )
    assert "sentinel-pw" not in repr(parsed) and "sentinel-pw" not in parsed.display
    assert "data-pw" not in repr(parsed) and "data-pw" not in parsed.display


def test_repr_leaves_the_password_out() -> None:
    parsed = parse_broker_url("redis://u:hunter22@h/0")
    assert "hunter22" not in repr(parsed)
    assert "hunter22" not in str(parsed)
    assert "u" in repr(parsed)


def test_an_empty_password_shows_no_stars() -> None:
    # "redis://u:@h": no password to hide, and nothing suggests there is one.
    assert parse_broker_url("redis://u:@h/0").display == "redis://u@h:6379/0"


# -- what it refuses ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://h:6379/0", "expected redis://host:port/db"),
        ("redis+cluster://h/0", "expected redis://host:port/db"),
        ("redis+sentinel://h:26379", "no service"),
        ("redis+sentinel://h:26379/", "no service"),
        ("redis+sentinel://h/0", "the first path segment is the service name"),
        ("redis+sentinel://h/m/0/1", "expected /service or /service/db"),
        ("redis+sentinel://h/m/x", "the database must be a whole number"),
        ("redis+sentinel://h/m/1?db=2", "the database is given twice"),
        ("redis+sentinel://h/m?timeout=1", "unknown parameter(s): timeout"),
        ("redis+sentinel://h/m%20x", "the service name holds a space"),
        ("redis+sentinel://h:0/m", "a sentinel's port is not a number in 1..65535"),
        ("redis+sentinel://h:70000/m", "a sentinel's port is not a number in 1..65535"),
        ("redis+sentinel://h:x/m", "a sentinel's port is not a number in 1..65535"),
        ("redis+sentinel://h1,,h2/m", "a sentinel without a host"),
        ("redis+sentinel://u:p@/m", "a sentinel without a host"),
        ("redis+sentinel://[::1/m", "lacks its closing ']'"),
        ("redis+sentinel://[::1]x/m", "a sentinel's port is not a number"),
        ("localhost:6379", "expected redis://host:port/db"),
        ("", "expected redis://host:port/db"),
        ("redis://", "no host"),
        ("redis:///0", "no host"),
        ("redis://h:0/0", "the port is not a number in 1..65535"),
        ("redis://h:65536/0", "the port is not a number in 1..65535"),
        ("redis://h:port/0", "the port is not a number in 1..65535"),
        ("redis://h:-1/0", "the port is not a number in 1..65535"),
        ("redis://h/x", "the database must be a whole number"),
        ("redis://h/-1", "the database must be a whole number"),
        ("redis://h/0/1", "the database must be a whole number"),
        ("redis://h?db=one", "the database must be a whole number"),
        ("redis://h/\u00b2", "the database must be a whole number"),
        ("redis://h/\u0661", "the database must be a whole number"),
        ("redis://h/1?db=2", "the database is given twice"),
        ("redis://h/0?timeout=5", "unknown parameter(s): timeout"),
        ("redis://h/0?b=1&a=2", "unknown parameter(s): a, b"),
        ("unix://", "unix:// needs the socket's path"),
        ("unix://?db=1", "unix:// needs the socket's path"),
        ("unix:///r.sock?db=x", "the database must be a whole number"),
    ],
)
def test_a_bad_broker_url_is_refused_with_its_reason(url: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=r"^broker URL ") as caught:
        parse_broker_url(url)
    assert reason in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        # A base64 password's '/', pasted raw: without the rule, unix:// took the
        # password's tail as the socket path and showed it in every log line.
        "unix://:abc/defghijk@/run/redis.sock",
        "unix://u:/secretpw@/run/redis.sock",
        "redis://:abc/defghijk@h:6379/0",
        "redis://u:12/abcdefg@h:6379/0",
        # '?' and '#' raw: the tail became a query parameter named in the error,
        # or a fragment silently ignored.
        "redis://u:1?secretpw@h:6379/0",
        "redis://u:12#secretpw@h:6379/0",
        # A socket path's own '@' looks the same: it is written %40.
        "unix:///run/redis@1/r.sock",
    ],
)
def test_a_raw_slash_question_mark_or_hash_in_credentials_is_refused_unseen(url: str) -> None:
    with pytest.raises(ConfigError, match="percent-encode") as caught:
        parse_broker_url(url)
    message = str(caught.value)
    assert "secretpw" not in message and "defghijk" not in message and "abcdefg" not in message


def test_a_refused_url_is_named_with_its_credentials_cut_out() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_broker_url("redis://admin:hunter22@h:99999/0")
    assert str(caught.value) == (
        "broker URL redis://***@h:99999/0: the port is not a number in 1..65535"
    )


def test_a_refused_text_that_is_not_a_url_is_not_repeated_if_it_may_hold_a_secret() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_broker_url("admin:hunter22@h")
    assert "hunter22" not in str(caught.value)
    assert "(not a URL)" in str(caught.value)


# -- the password never shows -----------------------------------------------------

SPECIALS = "@:/#%?&=+ \\[]"
passwords = st.text(
    alphabet=st.sampled_from(SPECIALS) | st.characters(codec="utf-8", exclude_categories=("Cs",)),
    min_size=4,
    max_size=24,
)
users = st.sampled_from(["", "u", "fastaphlict", "us@er"])
#: Every word the parser's messages and repr are made of: a password that is
#: one of them ("Conf", "database") shows without being leaked.
VOCABULARY = (
    inspect.getsource(parse_broker_url)
    + inspect.getsource(_parse_sentinel_url)
    + inspect.getsource(BrokerConfig)
)
hosts = st.sampled_from(
    ["h", "cache.example", "10.0.0.5", "[::1]", "[2001:db8::7]", "", "a:1,b", "a,[::1]:2"]
)
tails = st.sampled_from(
    ["", "/", "/0", "/15", "?db=3", "/x", ":6390/1", ":99999/0", "/0?x=1", "/m/1", "/m"]
)


@settings(max_examples=500, deadline=None)
@given(
    scheme=st.sampled_from(["redis", "rediss", "unix", "http", "redis+sentinel"]),
    user=users,
    password=passwords,
    host=hosts,
    tail=tails,
    encoded=st.booleans(),
)
@example(scheme="unix", user="", password="/secretpw", host="", tail="", encoded=False)
@example(scheme="redis", user="u", password="1?secretpw", host="h", tail="/0", encoded=False)
@example(scheme="redis", user="u", password="12#secretpw", host="h", tail="/0", encoded=False)
def test_no_display_repr_or_error_ever_holds_the_password(
    scheme: str, user: str, password: str, host: str, tail: str, encoded: bool
) -> None:
    secret = quote(password, safe="") if encoded else password
    where = "/run/redis.sock" if scheme == "unix" else host
    url = f"{scheme}://{quote(user, safe='')}:{secret}@{where}{tail}"
    rest = url.replace(secret, "", 1)
    # A password the rest of the URL spells anyway can't be told apart from it.
    assume(password.strip() and password not in rest and secret not in rest)
    assume(password not in VOCABULARY and secret not in VOCABULARY)
    try:
        parsed = parse_broker_url(url)
    except ConfigError as exc:
        shown = str(exc)
    else:
        shown = f"{parsed.display} {parsed!r}"
        if encoded:
            assert parsed.password == password
    assert password not in shown
    assert secret not in shown


def parses_or_refuses(url: str) -> None:
    """``url`` parses to sane settings, or is refused with a ConfigError and nothing else."""
    try:
        parsed = parse_broker_url(url)
    except ConfigError:
        return
    assert parsed.scheme in ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel")
    assert parsed.db >= 0 and 1 <= parsed.port <= 65535
    assert parsed.sentinel == bool(parsed.sentinels and parsed.service)
    assert all(host and 1 <= port <= 65535 for host, port in parsed.sentinels)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_parse_broker_url_raises_nothing_but_config_error(url: str) -> None:
    parses_or_refuses(url)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_a_sentinel_url_of_any_text_raises_nothing_but_config_error(tail: str) -> None:
    parses_or_refuses(f"redis+sentinel://{tail}")
