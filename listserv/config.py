"""Settings from a TOML file, with environment overrides for secrets and deployment.

Every key has a default, so an empty file is a valid configuration. Unknown
sections or keys, and values of the wrong type, are errors that name the key:
a typo in a config file must not silently fall back to a default.

Environment: ``LISTSERV_CONFIG`` names the file; ``LISTSERV_<SECTION>_<KEY>``
overrides one key (e.g. ``LISTSERV_DELIVERY_PASSWORD``, ``LISTSERV_DATABASE_URL``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import types
import typing
import zoneinfo
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from listserv.errors import ConfigError

DEFAULT_CONFIG = Path("config/listserv.toml")
DEFAULT_DNS_PORT = 53


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8025
    hostname: str = "localhost"
    max_message_size: int = 10 * 1024 * 1024
    #: seconds without a complete command before "421 4.4.2" (RFC 5321 4.5.3.2.7: 5 minutes)
    idle_timeout: float = 300.0
    #: seconds from DATA to the final dot, so a client trickling bytes is cut off
    data_timeout: float = 600.0
    #: seconds a session may last in all, however busy (a trickle of NOOPs)
    session_timeout: float = 1800.0
    #: concurrent sessions in all, and from one client IP address; more get 421 at connect
    max_connections: int = 100
    max_connections_per_ip: int = 50
    #: commands in one session before "421 4.7.0"
    max_commands: int = 10000
    #: processes taking SMTP sessions (2 or more: child processes accepting from the
    #: port the daemon binds): one Python process takes about 220 posts/s on 2 cores,
    #: its interpreter lock the limit. The connection limits above hold in each.
    listeners: int = 1


@dataclass(frozen=True, kw_only=True)
class DatabaseSettings:
    url: str = "sqlite:///var/listserv.db"
    echo: bool = False


@dataclass(frozen=True, kw_only=True)
class DeliverySettings:
    host: str = "127.0.0.1"
    port: int = 25
    max_recipients_per_message: int = 500
    max_connections: int = 4
    starttls: bool = False
    tls_ca_file: str = ""
    username: str = ""
    password: str = ""
    timeout: float = 60.0
    #: write MAIL, every RCPT and DATA in one go when the smarthost offers PIPELINING
    #: (RFC 2920); false: one command at a time, for a smarthost that mishandles it
    pipelining: bool = True
    retry_initial: float = 300.0
    retry_factor: float = 2.0
    retry_max_interval: float = 4 * 3600.0
    retry_give_up_after: float = 5 * 24 * 3600.0
    lease_seconds: float = 300.0
    poll_interval: float = 1.0
    workers: int = 0  # delivery processes beside the listener (0: in its own process)
    mix_domains: bool = False  # batches across domains: the smarthost is an MTA
    #: false: this daemon sends no delivery reports (reports.py), whatever the lists say
    reports: bool = True
    #: members written per snapshot transaction: the first batches go out after one
    snapshot_chunk: int = 1000  # posts.SNAPSHOT_ROWS


@dataclass(frozen=True, kw_only=True)
class DkimSettings:
    keys_dir: str = "var/dkim"


@dataclass(frozen=True, kw_only=True)
class HttpSettings:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8080
    public_base_url: str = ""


@dataclass(frozen=True, kw_only=True)
class DnsSettings:
    #: "HOST" or "HOST:PORT" ("[V6]:PORT") IP addresses; empty: the system's resolver
    nameservers: tuple[str, ...] = ()
    #: seconds one look-up may take in all, over every nameserver
    timeout: float = 5.0
    #: answers kept (each for its TTL); 0: no cache
    cache_size: int = 10000
    #: `dns check`: hosts the list domains' MX records should name (empty: any MX will do)
    mx_hosts: tuple[str, ...] = ()
    #: `dns check`: the IP addresses (or CIDR networks) our list mail leaves the site from,
    #: which the domains' SPF records must pass; empty: the smarthost's, when public
    outbound_ips: tuple[str, ...] = ()
    #: `dns check`: a domain the SPF records must include (a provider's "_spf.example.net")
    spf_include: str = ""


@dataclass(frozen=True, kw_only=True)
class AuthSettings:
    #: authserv-ids (RFC 8601) of the MTAs in front of us whose Authentication-Results
    #: we believe; each of them must remove such headers with its id from incoming mail
    trusted_authserv_ids: tuple[str, ...] = ()
    #: our own authserv-id in the Authentication-Results header added to incoming posts
    #: (empty: [server] hostname); incoming headers claiming it are removed as forged
    authserv_id: str = ""
    #: check incoming posts (DKIM, SPF with the client's IP, DMARC) and add our
    #: Authentication-Results header before the rules run
    inbound_results: bool = True
    #: check SPF for the SMTP client's address (skipped for loopback clients: that is
    #: the MTA in front of us, whose own checks count)
    spf: bool = True


@dataclass(frozen=True, kw_only=True)
class DmarcSettings:
    """DMARC mitigation of posts (distribute/dmarc.py); the per-list choice is a list setting."""

    #: the site's own sender domains: posts from them are never rewritten when the
    #: list's DKIM domain is aligned with them (no DNS look-up either)
    own_domains: tuple[str, ...] = ()
    #: DMARC policies kept (each for its TTL) by a process
    cache_size: int = 10000


@dataclass(frozen=True, kw_only=True)
class LoggingSettings:
    level: str = "INFO"


#: a month and a day, as in a blackout window
MonthDay = tuple[int, int]
#: first and last day, both included; a window whose start is after its end wraps the year end
Window = tuple[MonthDay, MonthDay]
WINDOW_FORMAT = "MM-DD..MM-DD (e.g. 07-01..07-31, or 12-24..01-06 across the year end)"


def parse_window(text: str) -> Window:
    """One blackout window ``MM-DD..MM-DD``, or ValueError saying what is allowed."""
    start, sep, end = text.strip().partition("..")
    if not sep:
        raise ValueError(f"{text.strip()!r} is not a window: expected {WINDOW_FORMAT}")
    return _month_day(start, text), _month_day(end, text)


def _month_day(part: str, text: str) -> MonthDay:
    month, sep, day = part.strip().partition("-")
    try:
        if not (sep and len(month) == 2 and len(day) == 2 and (month + day).isdigit()):
            raise ValueError
        date(2000, int(month), int(day))  # a leap year: 02-29 is a day
    except ValueError:
        raise ValueError(f"{text.strip()!r} is not a window: expected {WINDOW_FORMAT}") from None
    return int(month), int(day)


def parse_windows(text: str) -> tuple[Window, ...]:
    """Comma-separated windows (as `lists set ... blackout` takes them); empty: none."""
    return tuple(parse_window(part) for part in text.split(",") if part.strip())


def format_window(window: Window) -> str:
    (m1, d1), (m2, d2) = window
    return f"{m1:02d}-{d1:02d}..{m2:02d}-{d2:02d}"


@dataclass(frozen=True, kw_only=True)
class PolicySettings:
    """Site-wide posting policy: what every list obeys on top of its own settings."""

    #: windows in which posts are held (see WINDOW_FORMAT), e.g. ["07-01..07-31"]
    blackout: tuple[str, ...] = ()
    #: the IANA time zone the windows' days are counted in
    timezone: str = "UTC"

    def windows(self) -> tuple[Window, ...]:
        return tuple(parse_window(w) for w in self.blackout)

    def zone(self) -> zoneinfo.ZoneInfo:
        return zoneinfo.ZoneInfo(self.timezone)


@dataclass(frozen=True, kw_only=True)
class DomainLimit:
    """Limits for one destination domain (and the domains that share its bucket)."""

    #: messages per second (a shared batch is one message, a personalized one one per
    #: recipient); 0: no rate limit
    rate: float = 0.0
    #: batches in flight to the domain at once, over every daemon; 0: no limit
    concurrency: int = 0


@dataclass(frozen=True, kw_only=True)
class ThrottleSettings:
    """Politeness: global and per-domain rates and concurrency (distribute/throttle.py)."""

    #: messages per second over every domain and daemon; 0: no limit
    rate: float = 0.0
    #: recipients per second over every domain and daemon; 0: no limit
    recipient_rate: float = 0.0
    #: seconds of its rate a full bucket holds (what may go out at once after a pause)
    burst: float = 1.0
    #: limits of a domain that is neither in `domains` nor a built-in provider
    domain_rate: float = 0.0
    domain_concurrency: int = 0
    #: built-in limits for the large providers (gmail.com, outlook.com, yahoo.com, ...)
    providers: bool = True
    #: seconds between two additive steps back to full rate after a slow-down
    restore_after: float = 60.0
    #: seconds a domain refusing most recipients of a batch (5xx) is not sent to
    pause_for: float = 900.0
    #: [throttle.domains."gmail.com"] rate = 5, concurrency = 2 (overrides the built-ins)
    domains: typing.Mapping[str, DomainLimit] = field(default_factory=dict)


#: a sync's name: it marks its members (source "sync:NAME", 64 characters at most)
SYNC_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{0,57}[a-z0-9])?$")


SYNC_KEYS = ("name", "list", "from", "from_sql", "query", "interval", "check_mx")


@dataclass(frozen=True, kw_only=True)
class SyncSettings:
    """One ``[[sync]]`` entry: a list's members kept in step with a CSV file or an SQL
    query, every `interval` seconds, by the daemon (listserv/sync.py)."""

    name: str
    list: str
    #: a CSV file with an address column (TOML key "from")
    path: str = ""
    #: a SQLAlchemy URL and a query returning address[, name]
    from_sql: str = ""
    query: str = ""
    interval: float = 3600.0
    #: refuse new addresses whose domain does not accept mail (MX, else A/AAAA)
    check_mx: bool = False


@dataclass(frozen=True, kw_only=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    dkim: DkimSettings = field(default_factory=DkimSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    dns: DnsSettings = field(default_factory=DnsSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    dmarc: DmarcSettings = field(default_factory=DmarcSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    throttle: ThrottleSettings = field(default_factory=ThrottleSettings)
    #: [[sync]] entries, in file order
    sync: tuple[SyncSettings, ...] = ()
    source: str = "(defaults)"

    @property
    def keys_dir(self) -> Path:
        return Path(self.dkim.keys_dir)


_SECTIONS: dict[str, type[Any]] = {
    f.name: typing.get_type_hints(Settings)[f.name]
    for f in dataclasses.fields(Settings)
    if f.name not in ("source", "sync")
}


def load(
    path: str | Path | None = None, *, env: typing.Mapping[str, str] | None = None
) -> Settings:
    """Load the given path, else $LISTSERV_CONFIG, else config/listserv.toml if present."""
    env = os.environ if env is None else env
    explicit = path is not None or "LISTSERV_CONFIG" in env
    config_path = Path(path if path is not None else env.get("LISTSERV_CONFIG", DEFAULT_CONFIG))
    data: dict[str, Any] = {}
    if config_path.is_file():
        try:
            data = tomllib.loads(config_path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{config_path}: not valid TOML: {exc}") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{config_path}: cannot read: {exc}") from exc
    elif explicit:
        raise ConfigError(f"{config_path}: config file not found")
    return from_dict(
        data, env=env, source=str(config_path) if config_path.is_file() else "(defaults)"
    )


def from_dict(
    data: dict[str, Any], *, env: typing.Mapping[str, str] | None = None, source: str = "(dict)"
) -> Settings:
    env = {} if env is None else env
    sections: dict[str, Any] = {}
    for name in data:
        if name == "sync":
            continue
        if name not in _SECTIONS:
            raise ConfigError(f"{source}: unknown section [{name}]")
        if not isinstance(data[name], dict):
            raise ConfigError(f"{source}: [{name}] must be a table")
    for name, cls in _SECTIONS.items():
        values = dict(data.get(name, {}))
        hints = typing.get_type_hints(cls)
        for key in values:
            if key not in hints:
                raise ConfigError(f"{source}: unknown key '{key}' in [{name}]")
        for key, hint in hints.items():
            if hint == typing.Mapping[str, DomainLimit]:
                if key in values:
                    values[key] = _domain_limits(values[key], f"{source}: [{name}.{key}]")
                continue
            env_name = f"LISTSERV_{name.upper()}_{key.upper()}"
            if env_name in env:
                values[key] = _from_env(env[env_name], hint, env_name)
            if key in values:
                values[key] = _check(values[key], hint, f"{source}: [{name}] {key}")
        sections[name] = cls(**values)
    syncs = _syncs(data.get("sync", []), env, source)
    settings = Settings(**sections, sync=syncs, source=source)
    _validate(settings)
    return settings


def _domain_limits(value: Any, where: str) -> dict[str, DomainLimit]:
    """``[throttle.domains."gmail.com"]`` tables, keyed by the domain's A-label form."""
    if not isinstance(value, dict):
        raise ConfigError(f'{where}: expected tables such as [throttle.domains."gmail.com"]')
    hints = typing.get_type_hints(DomainLimit)
    limits: dict[str, DomainLimit] = {}
    for domain, table in value.items():
        here = f'{where[:-1]}."{domain}"]'
        try:
            key = domain.strip().lower().encode("idna").decode("ascii")
        except UnicodeError:
            key = ""
        if not key or "@" in key or "." not in key:
            raise ConfigError(f"{here}: not a domain name (e.g. gmail.com)")
        if key in limits:
            raise ConfigError(f"{here}: {key} is listed twice")
        if not isinstance(table, dict):
            raise ConfigError(f"{here}: must be a table (rate = ..., concurrency = ...)")
        for k in table:
            if k not in hints:
                raise ConfigError(f"{here}: unknown key '{k}' (rate, concurrency)")
        checked = {k: _check(v, hints[k], f"{here} {k}") for k, v in table.items()}
        limit = DomainLimit(**checked)
        if limit.rate < 0 or limit.concurrency < 0:
            raise ConfigError(f"{here}: rate and concurrency must not be negative (0: no limit)")
        limits[key] = limit
    return limits


def _syncs(value: Any, env: typing.Mapping[str, str], source: str) -> tuple[SyncSettings, ...]:
    """``[[sync]]`` entries. ``LISTSERV_SYNC_<NAME>_FROM_SQL`` (NAME upper-cased, other
    characters as "_") replaces an entry's from_sql, so a database password can stay
    out of the file."""
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ConfigError(f"{source}: sync must be [[sync]] tables (an array of tables)")
    hints = typing.get_type_hints(SyncSettings)
    entries: list[SyncSettings] = []
    for number, table in enumerate(value, 1):
        where = f"{source}: [[sync]] #{number}"
        for key in table:
            if key not in SYNC_KEYS:
                raise ConfigError(f"{where}: unknown key '{key}' ({', '.join(SYNC_KEYS)})")
        values = {("path" if k == "from" else k): v for k, v in table.items()}
        for key in ("name", "list"):
            if key not in values:
                raise ConfigError(f"{where}: '{key}' is required")
        values = {k: _check(v, hints[k], f"{where} {k}") for k, v in values.items()}
        entry = SyncSettings(**values)
        where = f"{source}: [[sync]] {entry.name!r}"
        if not SYNC_NAME.match(entry.name):
            raise ConfigError(
                f"{where}: name: lower-case letters, digits, '.', '-' and '_', at most 59"
            )
        env_name = "LISTSERV_SYNC_" + re.sub(r"[^A-Z0-9]", "_", entry.name.upper()) + "_FROM_SQL"
        if env_name in env:
            entry = dataclasses.replace(entry, from_sql=env[env_name])
        if bool(entry.path) == bool(entry.from_sql):
            raise ConfigError(f"{where}: give either 'from' (a CSV file) or 'from_sql'")
        if bool(entry.from_sql) != bool(entry.query):
            raise ConfigError(f"{where}: 'from_sql' and 'query' go together")
        if entry.interval <= 0:
            raise ConfigError(f"{where}: interval: must be greater than 0 (seconds)")
        if any(e.name == entry.name for e in entries):
            raise ConfigError(f"{where}: the name is used twice (it marks the members it adds)")
        entries.append(entry)
    return tuple(entries)


def _from_env(raw: str, hint: Any, env_name: str) -> Any:
    if hint is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"${env_name}: expected true or false, got {raw!r}")
    if hint in (int, float):
        try:
            return hint(raw)
        except ValueError:
            raise ConfigError(f"${env_name}: expected a number, got {raw!r}") from None
    if typing.get_origin(hint) is tuple:
        return [part.strip() for part in raw.split(",") if part.strip()]
    return raw


def _check(value: Any, hint: Any, where: str) -> Any:
    if typing.get_origin(hint) is tuple:  # tuple[str, ...]: a TOML array of strings
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected an array of strings, got {value!r}")
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    expected = hint if isinstance(hint, type) else None
    if isinstance(hint, types.UnionType):
        expected = None
    if expected is not None and (
        not isinstance(value, expected) or (expected is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{where}: expected {expected.__name__}, got {value!r}")
    return value


def _validate(s: Settings) -> None:
    def positive(section: str, key: str, value: float) -> None:
        if value <= 0:
            raise ConfigError(f"{s.source}: [{section}] {key}: must be greater than 0")

    if not 0 <= s.server.port <= 65535:
        raise ConfigError(f"{s.source}: [server] port: must be 0..65535")
    if not 0 <= s.http.port <= 65535:
        raise ConfigError(f"{s.source}: [http] port: must be 0..65535")
    if not 0 < s.delivery.port <= 65535:
        raise ConfigError(f"{s.source}: [delivery] port: must be 1..65535")
    positive("server", "max_message_size", s.server.max_message_size)
    for key in (
        "idle_timeout",
        "data_timeout",
        "session_timeout",
        "max_connections",
        "max_connections_per_ip",
        "max_commands",
    ):
        positive("server", key, getattr(s.server, key))
    positive("delivery", "max_recipients_per_message", s.delivery.max_recipients_per_message)
    positive("delivery", "max_connections", s.delivery.max_connections)
    positive("delivery", "timeout", s.delivery.timeout)
    positive("delivery", "lease_seconds", s.delivery.lease_seconds)
    positive("delivery", "snapshot_chunk", s.delivery.snapshot_chunk)
    positive("delivery", "poll_interval", s.delivery.poll_interval)
    if not 0 <= s.delivery.workers <= 64:
        raise ConfigError(f"{s.source}: [delivery] workers: must be 0..64")
    if not 1 <= s.server.listeners <= 64:
        raise ConfigError(f"{s.source}: [server] listeners: must be 1..64")
    positive("delivery", "retry_factor", s.delivery.retry_factor)
    if s.delivery.retry_initial < 0:
        raise ConfigError(f"{s.source}: [delivery] retry_initial: must not be negative")
    if s.delivery.tls_ca_file and not Path(s.delivery.tls_ca_file).is_file():
        raise ConfigError(
            f"{s.source}: [delivery] tls_ca_file: no such file {s.delivery.tls_ca_file!r}"
        )
    if not s.database.url:
        raise ConfigError(f"{s.source}: [database] url: must not be empty")
    for window in s.policy.blackout:
        try:
            parse_window(window)
        except ValueError as exc:
            raise ConfigError(f"{s.source}: [policy] blackout: {exc}") from None
    try:
        s.policy.zone()
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        raise ConfigError(
            f"{s.source}: [policy] timezone: {s.policy.timezone!r} is not an IANA time zone"
            " name (e.g. UTC, Europe/Berlin, America/New_York)"
        ) from None
    _validate_dns_auth(s)
    _validate_throttle(s)
    if s.logging.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"{s.source}: [logging] level: one of DEBUG, INFO, WARNING, ERROR")


def _validate_throttle(s: Settings) -> None:
    t = s.throttle
    for key in ("rate", "recipient_rate", "domain_rate", "domain_concurrency"):
        if getattr(t, key) < 0:
            raise ConfigError(f"{s.source}: [throttle] {key}: must not be negative (0: no limit)")
    positive("throttle", "burst", t.burst, s.source)
    positive("throttle", "restore_after", t.restore_after, s.source)
    positive("throttle", "pause_for", t.pause_for, s.source)


def positive(section: str, key: str, value: float, source: str) -> None:
    if value <= 0:
        raise ConfigError(f"{source}: [{section}] {key}: must be greater than 0")


def _validate_dns_auth(s: Settings) -> None:
    for ns in s.dns.nameservers:
        try:
            parse_nameserver(ns)
        except ValueError as e:
            raise ConfigError(f"{s.source}: [dns] nameservers: {e}") from None
    if not 0 < s.dns.timeout <= 300:
        raise ConfigError(f"{s.source}: [dns] timeout: must be greater than 0 and at most 300")
    if s.dns.cache_size < 0:
        raise ConfigError(f"{s.source}: [dns] cache_size: must not be negative")
    for ip in s.dns.outbound_ips:
        try:
            ipaddress.ip_network(ip.strip(), strict=False)
        except ValueError:
            raise ConfigError(
                f"{s.source}: [dns] outbound_ips: {ip!r} is not an IP address or network"
            ) from None
    if s.auth.authserv_id and not _authserv_id_ok(s.auth.authserv_id):
        raise ConfigError(
            f"{s.source}: [auth] authserv_id: {s.auth.authserv_id!r} is not an authserv-id"
            " (e.g. this server's host name)"
        )
    if s.dmarc.cache_size < 0:
        raise ConfigError(f"{s.source}: [dmarc] cache_size: must not be negative")
    for domain in s.dmarc.own_domains:
        if not domain.strip() or "@" in domain or any(c.isspace() for c in domain.strip()):
            raise ConfigError(f"{s.source}: [dmarc] own_domains: {domain!r} is not a domain")
    for authserv_id in s.auth.trusted_authserv_ids:
        # RFC 8601 §2.2: authserv-id is a value (token or quoted-string); we accept the
        # host-name-like ids MTAs use, so a typo cannot silently trust nothing or anything.
        if (
            not authserv_id
            or not authserv_id.isascii()
            or any(c.isspace() or c in ';()"\\=' for c in authserv_id)
        ):
            raise ConfigError(
                f"{s.source}: [auth] trusted_authserv_ids: {authserv_id!r} is not an authserv-id"
                " (e.g. the MTA's host name, as it writes it in Authentication-Results)"
            )


def _authserv_id_ok(value: str) -> bool:
    return value.isascii() and not any(c.isspace() or c in ';()"\\=' for c in value)


def parse_nameserver(value: str) -> tuple[str, int]:
    """``HOST`` or ``HOST:PORT`` (``[V6]:PORT``) as (IP address, port); ValueError says why.

    Only IP addresses: a name would need a resolver to find the resolver.
    """
    text = value.strip()
    port = DEFAULT_DNS_PORT
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{value!r} is not HOST, HOST:PORT or [IPv6]:PORT")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:  # an IPv4 address, or a bare IPv6 address
        host, port_text = text, None
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) <= 65535:
            raise ValueError(f"{value!r}: port must be 1..65535")
        port = int(port_text)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{value!r}: expected an IP address (not a host name)") from None
    return str(address), port
