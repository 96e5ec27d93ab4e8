"""What a failure means, in one plain sentence, and the fix to try.

Pure: an answer in, a ``(cause, fix)`` pair out, so each reading is
table-tested without a network. Where the fix is a proxy setting it names the
README's nginx section, which holds a block that works.
"""

from __future__ import annotations

__all__ = [
    "NGINX_SECTION",
    "Failure",
    "connect_failure",
    "idle_cut",
    "status_refusal",
    "tls_failure",
    "upgrade_refusal",
]


class Failure(Exception):
    """A step failed: its cause and the fix to try, each one sentence."""

    def __init__(self, cause: str, fix: str | None = None) -> None:
        super().__init__(cause)
        self.cause = cause
        self.fix = fix


#: Where the README shows a proxy set up right.
NGINX_SECTION = 'the README\'s "Behind nginx" section'


#: JX.Aphlict sends a ping command every 15 s; browsers throttle the timers
#: of background tabs, so theirs come later.
BROWSER_PING = 15.0


def idle_cut(after: float) -> tuple[str, str]:
    """A socket cut after ``after`` seconds without traffic: who it hurts, and the fix."""
    if after < BROWSER_PING:
        hurts = (
            f"browsers ping every {BROWSER_PING:g} s, so this cuts every tab, in the foreground too"
        )
    else:
        hurts = (
            f"browsers ping every {BROWSER_PING:g} s, so this cuts only background tabs, "
            "whose timers the browser throttles"
        )
    return (
        f"the socket was cut after {after:.1f} s without traffic: something in the path "
        "closes quiet sockets (nginx's proxy_read_timeout, a load balancer's idle "
        f"timeout); {hurts}.",
        "raise proxy_read_timeout and proxy_send_timeout well above the server's "
        f"--ping-interval ({NGINX_SECTION} uses 600s).",
    )


def connect_failure(where: str, kind: str, reason: str | None) -> tuple[str, str]:
    """A TCP connect that failed: ``reason`` None means it timed out."""
    if reason is None:
        return (
            f"connecting to {where} got no answer: a firewall drops the packets, or the "
            "host is down.",
            f"open port {where.rsplit(':', 1)[-1]} between this host and the server.",
        )
    if "refused" in reason.lower():
        who = (
            "Phorge posts here: while it is down no notification is sent"
            if kind == "admin"
            else ("browsers connect here")
        )
        return (
            f"nothing listens on {where} (connection refused).",
            f"start the server, or correct this entry's port in notification.servers ({who}).",
        )
    return f"cannot connect to {where}: {reason}.", "check the host and port of this entry."


def tls_failure(host: str, verify_message: str | None, reason: str) -> tuple[str, str]:
    """A TLS handshake that failed; ``verify_message`` is set when the chain or name was refused."""
    if verify_message is None:
        return (
            f"the TLS handshake failed ({reason}): this port may serve plain HTTP.",
            'make the entry\'s "protocol" match what the port serves (http or https).',
        )
    message = verify_message.rstrip(".")
    if "mismatch" in message.lower():
        return (
            f"the certificate does not name {host} ({message}): browsers refuse the socket.",
            f"serve a certificate issued for {host}.",
        )
    if "expired" in message.lower():
        return (
            f"the certificate has expired ({message}): browsers refuse the socket.",
            "renew the certificate and reload the server or proxy that serves it.",
        )
    return (
        f"the certificate is not trusted ({message}): browsers refuse the socket.",
        "serve a certificate from a CA browsers trust, with its full chain (ssl.chain, or "
        "nginx's fullchain.pem); for a private CA, pass it as --ca-file.",
    )


def upgrade_refusal(
    status: int, content_type: str, body: bytes, path: str, origin: str | None
) -> tuple[str, str]:
    """What a WebSocket upgrade answered with anything but 101 means."""
    text = body[:512].decode("utf-8", "replace").lower()
    proxy_fix = (
        "forward the upgrade: proxy_http_version 1.1 and the Upgrade and Connection "
        f"headers in the location ({NGINX_SECTION})."
    )
    if status == 501 or "use websockets" in text:
        return (
            f"HTTP {status}: the request reached the notification server without its Upgrade "
            "header, so the proxy does not forward Upgrade.",
            proxy_fix,
        )
    if status == 200 or (200 <= status < 300 and "html" in content_type):
        page = "with HTML" if "html" in content_type or "<html" in text else "with a body"
        return (
            f"HTTP {status} {page}: the proxy served a page, the location does not forward "
            "Upgrade to the notification server.",
            f"add a location for {path.split('?')[0]} that proxies to the client port; "
            + proxy_fix,
        )
    if status in (400, 426):
        return (
            f"HTTP {status}: the upgrade arrived without its Upgrade or Connection header "
            "(the proxy drops them, or speaks HTTP/1.0 upstream).",
            proxy_fix,
        )
    if status == 404:
        return (
            f"HTTP 404: the path {path.split('?')[0]} is not mapped, nothing there forwards to the "
            "notification server.",
            "make the client entry's \"path\" and the proxy's location agree "
            f"(a prefix location, as in {NGINX_SECTION}).",
        )
    if status == 403 and "origin" in text:
        return (
            "HTTP 403: the server accepts only listed Origins and this request "
            + (f"came from {origin}." if origin else "had none."),
            "pass Phorge's base URI as --origin, or add it to the server's --allowed-origins.",
        )
    if status in (502, 503, 504):
        return (
            f"HTTP {status}: the proxy could not reach the notification server behind it.",
            "start fastaphlict, and make the proxy_pass address its client port.",
        )
    if 300 <= status < 400:
        return (
            f"HTTP {status}: a redirect; browsers do not follow redirects for WebSockets.",
            "point the client entry at the final host, port and path.",
        )
    return (
        f"HTTP {status} instead of 101 Switching Protocols.",
        f"check what answers on this URL ({NGINX_SECTION} shows a working proxy).",
    )


def status_refusal(status: int, body: bytes) -> tuple[str, str]:
    """What an admin port's ``/status/`` answered with anything but 200 means."""
    text = body[:512].decode("utf-8", "replace").lower()
    if status == 501 or "use websockets" in text:
        return (
            f"HTTP {status}: this is a client port, not the admin port.",
            "swap the ports of the client and admin entries in notification.servers.",
        )
    if status == 403:
        return (
            "HTTP 403: the admin port refuses this host (its allow-list).",
            "run the doctor where Phorge runs, or add this host to --admin-allow.",
        )
    if status == 404:
        return (
            "HTTP 404: no /status/ here, this is not a notification server's admin port.",
            "point the admin entry at the server's admin port (22281 by default).",
        )
    return (
        f"HTTP {status} instead of 200 with the server's status.",
        "check what answers on the admin port.",
    )
