"""What a run is: its options, the subscription model, the messages, and what it measured."""

from __future__ import annotations

import random
import ssl
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Scenario = Literal["targeted", "broadcast", "burst", "idle", "storm", "broker"]
SCENARIOS: tuple[Scenario, ...] = ("targeted", "broadcast", "burst", "idle", "storm", "broker")

#: What Phorge's curl sends: raw JSON under the form content type.
PHORGE_CONTENT_TYPE = "application/x-www-form-urlencoded"
PING = b'{"command":"ping","data":null}'
#: What JX.Aphlict sends after its subscribe on every (re)connect.
REPLAY = b'{"command":"replay","data":{"age":60000}}'
PONG = b'{"type":"pong"}'
#: Object PHIDs per tab, users and objects per message: the targeted mix.
OBJECTS_PER_TAB = 5
USERS_PER_MESSAGE = 20
#: One object PHID per this many sockets keeps ~25 tabs on each object, so a
#: targeted message reaches ~45 sockets (20 users + ~25 object watchers) at any
#: socket count; that is what makes the scaling runs comparable.
SOCKETS_PER_OBJECT = 5
#: The PHID every tab of the broadcast and burst mixes listens to.
TOPIC_PHID = "PHID-PROJ-00000000000000000001"
#: A server's fingerprint is 16 characters; the floor frame carries one.
FAKE_TOUCHED = ["x" * 16]
_KEY_BASE = 7_000_000_000_000_000_000


def user_phid(i: int) -> str:
    """A user PHID of Phorge's shape (type, then 20 characters)."""
    return f"PHID-USER-{i:020d}"


def object_phid(i: int) -> str:
    """An object (task) PHID of Phorge's shape."""
    return f"PHID-TASK-{i:020d}"


# -- options and results ------------------------------------------------------


@dataclass
class Options:
    """One run's parameters; the command line maps onto these one to one."""

    client_url: str = "ws://127.0.0.1:22280/"
    admin_url: str = "http://127.0.0.1:22281/"
    instance: str | None = None
    scenario: Scenario = "targeted"
    sockets: int = 1000
    messages: int = 1000
    #: Messages per second on an absolute schedule; 0 posts as fast as the
    #: concurrency allows.
    rate: float = 0.0
    #: Posts in flight at once; 0 picks the scenario's default (see
    #: :func:`effective_concurrency`).
    concurrency: int = 0
    #: Distinct users (one tab each, round robin); 0 means one per socket.
    users: int = 0
    #: Distinct object PHIDs; 0 means ``sockets // 5`` (2000 at 10000 sockets).
    objects: int = 0
    server_pid: int | None = None
    seed: int = 1
    #: Also run the plain-send floor after the scenario (not for ``idle``).
    floor: bool = True
    #: WebSocket handshakes in flight; keep it at or below the server's listen
    #: backlog (asyncio's default is 100) or refused SYNs cost 1 s retries.
    #: 0 picks the scenario's default (see :func:`effective_connect_concurrency`).
    connect_concurrency: int = 0
    #: Seconds to wait, after a window's last post is answered, for missing deliveries.
    deadline: float = 10.0
    #: Measurement windows: the messages are posted in this many slices, the
    #: server's CPU is read around each, and the figures are the medians.
    windows: int = 1
    #: storm: messages posted before the storm (the busy minute); 0 = empty history.
    history: int = 1000
    #: storm: PHIDs each tab subscribes to (its user and the page's objects).
    phids_per_tab: int = 20
    #: storm: seconds between the watcher tab's pings.
    watch_interval: float = 0.005
    #: broker: how the nodes reach Redis, over loopback TCP or its unix socket.
    broker_transport: str = "tcp"
    #: broker: every N-th tab opens on node B, the rest on A (2: half each).
    broker_remote_every: int = 2
    #: A CA bundle that wss:// client URLs are verified against (None: the system's).
    ca_file: str | None = None


#: Handshakes in flight during a storm: enough to keep a server's listen
#: backlog (Node's 511, ours 4096) busy, as thousands of tabs reconnecting do.
STORM_CONNECT_CONCURRENCY = 500
#: Tabs in a storm unless told otherwise: issue 8's measurement.
STORM_TABS = 4000


def client_ssl_context(url: str, ca_file: str | None) -> ssl.SSLContext | None:
    """The TLS context for a wss:// ``url``, trusting ``ca_file`` when given; None for ws://."""
    if not url.startswith("wss:"):
        return None
    return ssl.create_default_context(cafile=ca_file)


def effective_connect_concurrency(opts: Options) -> int:
    """Handshakes in flight: the storm's burst, else 100 (asyncio's default backlog)."""
    if opts.connect_concurrency > 0:
        return opts.connect_concurrency
    return STORM_CONNECT_CONCURRENCY if opts.scenario == "storm" else 100


def effective_concurrency(opts: Options) -> int:
    """Posts in flight: burst 64; paced runs 32 (a slow answer must not stall
    the schedule); otherwise 1, so each message's cost is measured alone."""
    if opts.concurrency > 0:
        return opts.concurrency
    if opts.scenario == "burst":
        return 64
    return 32 if opts.rate > 0 else 1


@dataclass
class FloorResult:
    """The plain-``send()`` baseline: same frame, same sockets, plain Python."""

    sockets: int
    sends: int
    frame_bytes: int
    cpu_s: float
    wall_s: float
    bytes_expected: int
    bytes_received: int
    window_cpu_per_send_us: list[float] = field(default_factory=list)

    @property
    def cpu_per_send_us(self) -> float:
        """The median over windows (see :func:`run_floor`)."""
        if self.window_cpu_per_send_us:
            return median(self.window_cpu_per_send_us)
        return self.cpu_s / self.sends * 1e6 if self.sends else 0.0


@dataclass
class Result:
    """Everything one run measured; :meth:`as_dict` is the JSON output."""

    scenario: str
    sockets: int
    messages: int
    concurrency: int | None
    rate: float
    windows: int = 1
    connect_s: float = 0.0
    deliveries_expected: int = 0
    deliveries_received: int = 0
    loss: int = 0
    duplicates: int = 0
    unexpected: int = 0
    foreign_frames: int = 0
    post_errors: int = 0
    first_post_error: str | None = None
    elapsed_s: float = 0.0
    msgs_per_s: float | None = None
    deliveries_per_s: float | None = None
    latency_p50_ms: float | None = None
    latency_p90_ms: float | None = None
    latency_p99_ms: float | None = None
    latency_max_ms: float | None = None
    #: The median of the windows' p99: one stall of the machine spoils one
    #: window's p99 but moves the overall p99 of a short run a lot.
    latency_p99_median_window_ms: float | None = None
    latency_p99_windows_ms: list[float] = field(default_factory=list)
    post_lag_max_ms: float = 0.0
    generator_cpu_s: float = 0.0
    server_cpu_s: float | None = None
    server_cpu_per_delivery_us: float | None = None
    server_cpu_per_message_us: float | None = None
    server_rss_mb: float | None = None
    rss_before_mb: float | None = None
    rss_after_mb: float | None = None
    bytes_per_socket: float | None = None
    frame_bytes: int = 0
    floor_sends: int | None = None
    floor_cpu_per_send_us: float | None = None
    floor_loss_bytes: int | None = None
    ratio_to_floor: float | None = None
    #: Server CPU per message beyond the floor's cost of its deliveries:
    #: matching, JSON, HTTP and event-loop work, without the kernel's sends.
    overhead_per_message_us: float | None = None
    #: Share of the machine's CPU time the hypervisor stole during the run
    #: (``/proc/stat``): a noise indicator for every figure of the run.
    steal_pct: float | None = None
    window_server_cpu_per_delivery_us: list[float] = field(default_factory=list)
    window_floor_cpu_per_send_us: list[float] = field(default_factory=list)
    #: storm: history messages posted before it, and its figures (see run_storm).
    history: int | None = None
    storm_wall_s: float | None = None
    server_cpu_per_tab_us: float | None = None
    replay_frames_expected: int | None = None
    replay_frames_received: int | None = None
    #: storm: tabs whose replay was not exactly their expected list, in order.
    replay_tabs_wrong: int = 0
    out_of_order: int = 0
    connect_retries: int = 0
    watcher_pings: int | None = None
    watcher_ping_p50_ms: float | None = None
    watcher_ping_p99_ms: float | None = None
    watcher_ping_max_ms: float | None = None
    #: broker: latency of the tabs on the node posted to (local) and on the
    #: other node (remote, through Redis), and Redis' own CPU.
    latency_local_p50_ms: float | None = None
    latency_local_p99_ms: float | None = None
    latency_remote_p50_ms: float | None = None
    latency_remote_p99_ms: float | None = None
    redis_cpu_s: float | None = None
    redis_cpu_per_delivery_us: float | None = None
    #: broker: each node's share of ``server_cpu_per_delivery_us`` (median
    #: over windows; the posting node first), to tell publishing from receiving.
    node_cpu_per_delivery_us: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """A flat dict of JSON types, floats rounded to what the noise allows."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, float):
                out[key] = round(value, 4)
            elif isinstance(value, list):
                out[key] = [round(v, 4) if isinstance(v, float) else v for v in value]
        return out

    @property
    def clean(self) -> bool:
        """No loss, no duplicates, nothing unexpected, every post accepted."""
        return not (
            self.loss
            or self.duplicates
            or self.unexpected
            or self.foreign_frames
            or self.post_errors
            or self.floor_loss_bytes
            or self.replay_tabs_wrong
            or self.out_of_order
        )


@dataclass
class BrokerResult:
    """The ``broker`` scenario: the same messages through a brokered cluster and one node.

    ``broker`` is the two-node cluster (half the tabs on each node, posts to
    the first; its CPU is both nodes', Redis' apart), ``single`` one node
    without a broker holding every tab. The ratios are broker over single.
    """

    broker: Result
    single: Result

    def comparison(self) -> dict[str, float | None]:
        """The issue's figures: latency added, and CPU and throughput as ratios."""
        b, s = self.broker, self.single

        def ratio(x: float | None, y: float | None) -> float | None:
            return x / y if x is not None and y else None

        def delta(x: float | None, y: float | None) -> float | None:
            return x - y if x is not None and y is not None else None

        cpu_with_redis = (
            b.server_cpu_per_delivery_us + b.redis_cpu_per_delivery_us
            if b.server_cpu_per_delivery_us is not None and b.redis_cpu_per_delivery_us is not None
            else None
        )
        return {
            "p50_added_ms": delta(b.latency_p50_ms, s.latency_p50_ms),
            "p50_ratio": ratio(b.latency_p50_ms, s.latency_p50_ms),
            "p99_added_ms": delta(b.latency_p99_ms, s.latency_p99_ms),
            "p99_ratio": ratio(b.latency_p99_ms, s.latency_p99_ms),
            "remote_p50_added_ms": delta(b.latency_remote_p50_ms, s.latency_p50_ms),
            "cpu_per_delivery_ratio": ratio(
                b.server_cpu_per_delivery_us, s.server_cpu_per_delivery_us
            ),
            "cpu_per_delivery_with_redis_ratio": ratio(
                cpu_with_redis, s.server_cpu_per_delivery_us
            ),
            "deliveries_per_s_ratio": ratio(b.deliveries_per_s, s.deliveries_per_s),
        }

    def as_dict(self) -> dict[str, Any]:
        """``scenario``, the rounded comparison, then each side's :meth:`Result.as_dict`."""
        ratios = {k: None if v is None else round(v, 4) for k, v in self.comparison().items()}
        return {
            "scenario": "broker",
            **ratios,
            "broker": self.broker.as_dict(),
            "single": self.single.as_dict(),
        }

    @property
    def clean(self) -> bool:
        return self.broker.clean and self.single.clean


# -- the subscription model ---------------------------------------------------


@dataclass
class Model:
    """Who listens to what, what each message names, and whom it must reach.

    ``targets[m]`` is the sorted list of socket indices message ``m`` must
    reach, each once; for broadcast and burst it is one shared list of every
    socket (``reaches_all``), which keeps 10000-socket runs small in memory.
    """

    subscriptions: list[list[str]]
    messages: list[list[str]]
    targets: list[list[int]]
    reaches_all: bool = False

    @property
    def expected(self) -> int:
        return sum(len(t) for t in self.targets)


def build_model(opts: Options) -> Model:
    """The deterministic (``--seed``) subscription and message mix of a scenario."""
    rng = random.Random(opts.seed)
    n = opts.sockets
    if opts.scenario in ("broadcast", "burst"):
        subs = [[user_phid(i), TOPIC_PHID] for i in range(n)]
        everyone = list(range(n))
        return Model(subs, [[TOPIC_PHID]] * opts.messages, [everyone] * opts.messages, True)

    users = opts.users or n
    objects = opts.objects or max(1, n // SOCKETS_PER_OBJECT)
    storm = opts.scenario == "storm"
    per_tab = min(max(0, opts.phids_per_tab - 1) if storm else OBJECTS_PER_TAB, objects)
    subs = []
    by_phid: dict[str, list[int]] = {}
    for i in range(n):
        phids = [user_phid(i % users)] + [
            object_phid(o) for o in rng.sample(range(objects), per_tab)
        ]
        subs.append(phids)
        for phid in phids:
            by_phid.setdefault(phid, []).append(i)
    if opts.scenario == "idle":
        return Model(subs, [], [])

    messages = []
    targets = []
    named = min(USERS_PER_MESSAGE, users)
    for _ in range(opts.history if storm else opts.messages):
        phids = [user_phid(u) for u in rng.sample(range(users), named)]
        phids.append(object_phid(rng.randrange(objects)))
        reached: set[int] = set()
        for phid in phids:
            reached.update(by_phid.get(phid, ()))
        messages.append(phids)
        targets.append(sorted(reached))
    return Model(subs, messages, targets)


def message_body(model: Model, i: int, sent_ns: int) -> dict[str, Any]:
    """Message ``i`` as Phorge posts it, plus the generator's ``sent`` and ``id``."""
    return {
        "key": str(_KEY_BASE + i),
        "type": "notification",
        "subscribers": model.messages[i],
        "sent": sent_ns,
        "id": i,
    }


def ws_frame(payload: bytes) -> bytes:
    """An unmasked, final text frame around ``payload``, as a server writes it."""
    size = len(payload)
    if size < 126:
        header = bytes((0x81, size))
    elif size < 1 << 16:
        header = bytes((0x81, 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((0x81, 127)) + size.to_bytes(8, "big")
    return header + payload


def split_windows(total: int, windows: int) -> list[tuple[int, int]]:
    """``[first, stop)`` bounds cutting ``total`` messages into near-equal windows."""
    count = max(1, min(windows, total))
    bounds = [total * k // count for k in range(count + 1)]
    return [(bounds[k], bounds[k + 1]) for k in range(count)]


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def percentile(ordered: Sequence[int], q: float) -> float:
    """Nearest-rank percentile of sorted nanoseconds, in milliseconds."""
    index = min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))
    return ordered[index] / 1e6
