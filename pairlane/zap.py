"""ZAP decisions for the CURVE sockets and the legacy allowlist (PROTOCOL.md section 7).

Owns: loading keys with pyzmq's `zmq.auth` certificate functions (the server's secret
certificate, a directory of authorized public certificates), and the pure answer to one
ZAP request (RFC 27/ZAP 1.0: frames in, reply frames out): CURVE allowed when the client's
public key is in the authorized set, NULL allowed when the peer's IP address is in the
allowlist. It also remembers which refused keys or addresses it has already reported, so
each refusal is logged and counted once per key, not once per reconnection.
Never opens a socket (actors/zap.py binds the ZAP endpoint and carries out the answers).
"""
from __future__ import annotations

import dataclasses
import ipaddress
import os

import zmq.auth
from zmq.utils import z85

ZAP_VERSION = b"1.0"
MAX_REMEMBERED = 10000   # refused keys/addresses remembered for once-only reporting


def load_secret_certificate(path: str) -> tuple[bytes, bytes]:
    """(public, secret) z85 keys of a ZeroMQ secret certificate; ValueError when the file is
    missing, unreadable or holds no secret key."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable ZeroMQ certificate ({exc})")
    if not secret:
        raise ValueError(f"{path} holds no secret key (use NAME.key_secret, not NAME.key)")
    return public, secret


def load_public_certificate(path: str) -> bytes:
    """The z85 public key of a ZeroMQ certificate file (public or secret); ValueError if none."""
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable ZeroMQ certificate ({exc})")
    return public


def load_authorized(directory: str) -> frozenset[bytes]:
    """The z85 public keys of every *.key certificate in `directory`; ValueError if it is not one."""
    if not os.path.isdir(directory):
        raise ValueError(f"{directory} is not a directory")
    try:
        return frozenset(zmq.auth.load_certificates(directory))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the certificates in {directory}: {exc}")


def parse_allowlist(values: list) -> frozenset[str]:
    """Normalized IP address strings; ValueError naming the first that is not an IP address."""
    out = set()
    for v in values:
        if not isinstance(v, str):
            raise ValueError(f"{v!r} is not an IP address string")
        try:
            out.add(str(ipaddress.ip_address(v.strip())))
        except ValueError:
            raise ValueError(f"{v!r} is not an IP address")
    return frozenset(out)


@dataclasses.dataclass(frozen=True)
class Refusal:
    """A refused ZAP request: why, and who (z85 key or IP address)."""
    reason: str
    who: str
    first: bool        # the first refusal of this `who` for this reason: log and count it


@dataclasses.dataclass
class ZapPolicy:
    """Who may connect to one socket. `mechanism` is "CURVE" (authorized public keys) or
    "NULL" (allowed IP addresses)."""
    mechanism: str
    keys: frozenset = frozenset()
    addresses: frozenset = frozenset()
    reported: set = dataclasses.field(default_factory=set)

    def set_keys(self, keys: frozenset) -> None:
        """Replace the authorized keys (SIGHUP); a refused key now authorized is forgotten, so a
        later refusal of it is reported again."""
        self.keys = frozenset(keys)
        self.reported = {r for r in self.reported if r[1] not in {k.decode() for k in self.keys}}

    def decide(self, frames: list[bytes]) -> tuple[list[bytes], Refusal | None]:
        """The ZAP reply frames for one request, and the refusal if it is one."""
        if len(frames) < 6:
            rid = frames[1] if len(frames) > 1 else b""
            return self._reply(rid, b"400", b"malformed ZAP request"), Refusal("malformed", "?", False)
        version, rid, _domain, address, _identity, mechanism = frames[:6]
        creds = frames[6:]
        if version != ZAP_VERSION:
            return self._reply(rid, b"400", b"unsupported ZAP version"), Refusal("malformed", "?", False)
        mech = mechanism.decode("ascii", "replace")
        peer = address.decode("ascii", "replace")
        if mech != self.mechanism:
            return self._refuse(rid, "wrong_mechanism", peer)
        if mech == "CURVE":
            if len(creds) != 1 or len(creds[0]) != 32:
                return self._refuse(rid, "malformed", peer)
            key = z85.encode(creds[0])
            if key in self.keys:
                return self._reply(rid, b"200", b"OK", key), None
            return self._refuse(rid, "unknown_key", key.decode("ascii"))
        if self.mechanism == "NULL":
            try:
                ip = str(ipaddress.ip_address(peer))
            except ValueError:
                ip = peer
            if ip in self.addresses:
                return self._reply(rid, b"200", b"OK", ip.encode()), None
            return self._refuse(rid, "address_not_allowed", ip)
        return self._refuse(rid, "wrong_mechanism", peer)

    def _refuse(self, rid: bytes, reason: str, who: str) -> tuple[list[bytes], Refusal]:
        mark = (reason, who)
        first = mark not in self.reported
        if first:
            if len(self.reported) >= MAX_REMEMBERED:
                self.reported.clear()
            self.reported.add(mark)
        return self._reply(rid, b"400", reason.encode()), Refusal(reason, who, first)

    @staticmethod
    def _reply(rid: bytes, code: bytes, text: bytes, user: bytes = b"") -> list[bytes]:
        return [ZAP_VERSION, rid, code, text, user, b""]


def client_curve_options(server_key: str | None, client_key: str | None) -> dict[str, bytes]:
    """Socket options for a CURVE client (producer, admin CLI): {} when neither file is given.
    `server_key`: the server's public certificate; `client_key`: our secret certificate.
    ValueError when only one is given or a file does not load."""
    if not server_key and not client_key:
        return {}
    if not server_key or not client_key:
        raise ValueError("CURVE needs both the server's public certificate (--server-key) and "
                         "this client's secret certificate (--client-key)")
    server_public = load_public_certificate(server_key)
    public, secret = load_secret_certificate(client_key)
    return {"CURVE_SERVERKEY": server_public, "CURVE_PUBLICKEY": public, "CURVE_SECRETKEY": secret}


# handshakes that fail before ZAP is asked (no key to name): reasons by ZMQ's protocol error value
_MECHANISM_MISMATCH = 0x11000002
HANDSHAKE_LOG_EVERY_S = 60.0


def handshake_reason(error_value: int) -> str:
    """The auth-failure reason of a failed handshake reported by a socket monitor:
    "wrong_mechanism" (a plaintext client on a CURVE socket), else "bad_handshake" (a wrong
    server key, or bytes that are not a CURVE handshake)."""
    return "wrong_mechanism" if error_value == _MECHANISM_MISMATCH else "bad_handshake"


@dataclasses.dataclass
class HandshakeLog:
    """When to log keyless handshake failures: the first of each reason at once, then at most
    one line per HANDSHAKE_LOG_EVERY_S carrying the number since the last line."""
    last: dict = dataclasses.field(default_factory=dict)     # reason -> time of the last line
    since: dict = dataclasses.field(default_factory=dict)    # reason -> failures not yet logged

    def failed(self, reason: str, now: float) -> int:
        """Record one failure; the number to log now, or 0 when this one is not logged."""
        self.since[reason] = self.since.get(reason, 0) + 1
        last = self.last.get(reason)
        if last is not None and now - last < HANDSHAKE_LOG_EVERY_S:
            return 0
        self.last[reason] = now
        return self.since.pop(reason)
