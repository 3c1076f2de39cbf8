"""Who may call a ralu server: API keys, the ``Host`` header, the ``Origin`` of browser requests and the media type
of request bodies (:class:`AccessPolicy`), shared by ``ralu serve`` and its Ray Serve ingress through
:class:`ralu_runtime.serving.protocol.Guard`. Imports nothing heavy (the CLI checks keys and addresses with it
before a model loads).
"""
from __future__ import annotations

import hmac
import ipaddress
import re
import socket
from dataclasses import dataclass, field

__all__ = ["AccessPolicy", "Refusal", "BODY_TYPES", "check_access_names", "LOOPBACK_NAMES", "MIN_API_KEY_CHARS",
           "is_loopback", "parse_api_keys"]

MIN_API_KEY_CHARS = 16


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused before it reaches the app: an HTTP status, a message, an OpenAI error code."""

    status: int
    message: str
    code: str
    headers: dict | None = None


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
# request body media types by path (default JSON only); the image upload endpoint takes multipart forms only.
# Requests from a browser page not in the CORS list never get through: see Guard.
BODY_TYPES: dict[str, tuple[str, ...]] = {"/v1/images/edits": ("multipart/form-data",)}
_BODY_METHODS = ("POST",)  # the only method with a body that a route takes (PUT / PATCH: the router's 405)
_KEY_CHARS = re.compile(r"[\x21-\x7e]+")          # printable ASCII without spaces: what a header can carry


def is_loopback(host: str) -> bool:
    """True when ``host`` (an address or a name) is this machine's loopback only."""
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def parse_api_keys(*sources) -> tuple[str, ...]:
    """API keys from strings (comma-separated keys) and lists of them, in order and without repeats; ValueError for
    a key shorter than 16 characters or with characters an HTTP header cannot carry."""
    keys: list[str] = []
    for src in sources:
        items = [src] if isinstance(src, str) else list(src or ())
        for item in items:
            for key in item.split(","):
                key = key.strip()
                if not key:
                    continue
                if not _KEY_CHARS.fullmatch(key):
                    raise ValueError("an API key may hold printable ASCII characters only (no spaces)")
                if len(key) < MIN_API_KEY_CHARS:
                    raise ValueError(f"an API key of {len(key)} characters is too short: use at least "
                                     f"{MIN_API_KEY_CHARS} random ones (python -c \"import secrets; "
                                     "print(secrets.token_urlsafe(32))\")")
                if key not in keys:
                    keys.append(key)
    return tuple(keys)


_BRACKETED = re.compile(r"\[([^\]]*)\](?::[0-9]+)?", re.ASCII)   # an IPv6 Host: "[v6]" or "[v6]:port"


def _host_name(value: str) -> str:
    """The name of a ``Host`` header value, without its port, lower case, without a trailing dot."""
    value = value.strip().lower()
    if value.startswith("["):  # "[v6]" or "[v6]:port"; anything else after "]" is no host name we answer to
        m = _BRACKETED.fullmatch(value)
        return m.group(1) if m else value
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


_ORIGIN = re.compile(r"https?://[^\s/?#@]+", re.ASCII)        # what a browser sends: scheme://host[:port]
_HOST = re.compile(r"[^\s/?#@]+", re.ASCII)                   # a Host header's name (and port), no scheme or path


def check_access_names(allowed_hosts=(), cors_origins=()) -> None:
    """ValueError for an allowed host or a CORS origin that no request could ever match (``https://x`` as a host,
    ``x.com`` as an origin): they were taken and silently matched nothing."""
    for host in allowed_hosts:
        h = host.strip()
        if h and h != "*" and ("://" in h or not _HOST.fullmatch(h)):
            raise ValueError(f"allowed host {host!r} is not a host name: give the name clients put in the Host "
                             "header, e.g. api.example.com or api.example.com:8000 (no scheme, no path), or '*'")
    for origin in cors_origins:
        o = origin.strip().rstrip("/")
        if o and o != "*" and not _ORIGIN.fullmatch(o):
            raise ValueError(f"CORS origin {origin!r} is not an origin: give what a browser sends as Origin, "
                             "scheme://host[:port], e.g. https://app.example.com, or '*'")


def _media_type(value: str) -> str:
    return value.split(";", 1)[0].strip().lower()


@dataclass
class AccessPolicy:
    """Who may call the API. ``api_keys``: bearer tokens, any of which is accepted (empty: no authentication);
    every path but ``open_paths`` (``/health``) needs one. ``allowed_hosts``: names the ``Host`` header may carry
    (loopback names always; "*": any), against DNS rebinding. ``cors_origins``: browser origins allowed to call
    (and given CORS headers; "*": any); a request carrying another ``Origin`` may only GET."""

    api_keys: tuple = field(default=(), repr=False)
    allowed_hosts: set = field(default_factory=set)
    cors_origins: tuple = ()
    open_paths: tuple = ("/health",)

    def __post_init__(self):
        self.api_keys = parse_api_keys(self.api_keys)
        check_access_names(self.allowed_hosts, self.cors_origins)
        self.allowed_hosts = {_host_name(h) for h in self.allowed_hosts if h.strip()} | set(LOOPBACK_NAMES)
        self.cors_origins = tuple(o.strip().rstrip("/").lower() for o in self.cors_origins if o.strip())
        self._key_bytes = [k.encode("ascii") for k in self.api_keys]

    def allow_bound_host(self, host: str) -> None:
        """Allow the names clients use to reach a server bound to ``host`` (for a wildcard address: this
        machine's name and addresses)."""
        name = _host_name(host if not (":" in host and not host.startswith("[")) else f"[{host}]")
        if name in ("0.0.0.0", "::", ""):
            names = {socket.gethostname(), socket.getfqdn()}
            try:
                names |= {i[4][0] for i in socket.getaddrinfo(socket.gethostname(), None)}
            except OSError:
                pass
            self.allowed_hosts |= {_host_name(n) for n in names if n}
        else:
            self.allowed_hosts.add(name)

    def host_ok(self, value: str | None) -> bool:
        return "*" in self.allowed_hosts or (value is not None and _host_name(value) in self.allowed_hosts)

    def origin_ok(self, origin: str) -> bool:
        return "*" in self.cors_origins or origin.rstrip("/").lower() in self.cors_origins

    def key_ok(self, authorization: str | None) -> bool:
        """Constant-time comparison against every key (no early exit on a match)."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        given = token.strip().encode("utf-8", "surrogateescape")
        ok = False
        for key in self._key_bytes:
            ok |= hmac.compare_digest(given, key)
        return ok

    def check(self, method: str, path: str, headers: dict) -> Refusal | None:
        """The error a request gets before it reaches the app (None: it may go on)."""
        if not self.host_ok(headers.get("host")):
            host = (headers.get("host") or "")[:100]
            return Refusal(421, f"Host {host!r} is not one this server answers to; to allow it, start the server "
                                 "with --allowed-host NAME", code="host_not_allowed")
        origin = headers.get("origin")
        if origin is not None and method not in ("GET", "HEAD") and not self.origin_ok(origin):
            return Refusal(403, f"requests from the web origin {origin[:100]!r} are not allowed; to allow a web "
                                 "page to call this server, start it with --cors-origin ORIGIN",
                            code="origin_not_allowed")
        if self._key_bytes and path not in self.open_paths and not self.key_ok(headers.get("authorization")):
            given = headers.get("authorization") is not None
            return Refusal(401, "invalid API key" if given else "missing API key: send the header "
                            "'Authorization: Bearer KEY'", code="invalid_api_key",
                            headers={"WWW-Authenticate": 'Bearer realm="ralu"'})
        if method in _BODY_METHODS:
            allowed = BODY_TYPES.get(path.rstrip("/") or "/", ("application/json",))  # "/edits/" as "/edits"
            got = _media_type(headers.get("content-type", ""))
            if got not in allowed:
                return Refusal(415, f"Content-Type {got or 'none'!r} is not accepted here: send "
                                     f"{' or '.join(allowed)}", code="unsupported_media_type")
        return None
