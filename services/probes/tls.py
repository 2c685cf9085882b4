"""Health of a TLS endpoint: does its certificate verify, and how long until it expires (runbook 001).

A handshake with the default verifying context proves the chain and the host name. When it fails,
the reason is kept and the handshake is tried again without verification, to still read the leaf.
Python 3.11 has no public API for the chain a server sends, so only the leaf is read
(``getpeercert(binary_form=True)``), by ``cryptography``.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

from services.health import ProbeResult, Status
from services.inventory import Component, TlsComponent
from services.probes._common import connect_budget, network_problem, short_error, since_ms

Facts = dict[str, str | int | float]

CLOSE_GRACE = 0.5
"""Seconds a polite close (close_notify) may take before the connection is simply dropped."""

_EC_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}

# OpenSSL's X509_V_ERR_* codes for the reasons people ask about; any other code keeps OpenSSL's words.
_UNKNOWN_CA = "issued by an unknown CA"
_VERIFY_REASONS = {
    2: _UNKNOWN_CA,  # unable to get issuer certificate
    9: "not valid yet",
    10: "expired",
    18: "self-signed",
    19: _UNKNOWN_CA + " (the chain ends in an untrusted root)",
    20: _UNKNOWN_CA,  # unable to get local issuer certificate
    21: _UNKNOWN_CA,  # unable to verify the first certificate
    23: "revoked",
}
_HOSTNAME_MISMATCH = 62
_IP_MISMATCH = 64

# OpenSSL's reasons when the other side answered something that is not TLS at all.
_NOT_TLS = frozenset(
    {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE"}
)


class CaFileError(Exception):
    """The component's ``ca_file`` cannot be used; the message is one plain sentence."""


class _NoCertificate(Exception):
    """No handshake, so no certificate: why, as one plain phrase."""


@dataclass(frozen=True)
class Leaf:
    """What the served leaf certificate says."""

    subject: str
    issuer: str
    key: str
    sans: tuple[str, ...]
    not_before: datetime
    not_after: datetime

    def days_left(self, now: datetime) -> float:
        return (self.not_after - now).total_seconds() / 86400

    @property
    def lifetime_days(self) -> float:
        return (self.not_after - self.not_before).total_seconds() / 86400


def verifying_context(ca_file: Path | None) -> ssl.SSLContext:
    """The default verifying context, also trusting ``ca_file`` (a private CA) when given.

    Reads files (the system trust store): run it in a thread, not on the event loop.
    """
    context = ssl.create_default_context()
    if ca_file is not None:
        try:
            context.load_verify_locations(cafile=ca_file)
        except ssl.SSLError:
            raise CaFileError(f"the CA file {ca_file} holds no PEM certificate") from None
        except OSError as exc:
            raise CaFileError(f"cannot read the CA file {ca_file}: {exc.strerror or exc}") from None
    return context


def _reading_context() -> ssl.SSLContext:
    """A context that verifies nothing: used only to read a leaf that already failed verification."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def verification_problem(exc: ssl.SSLCertVerificationError, server_name: str) -> str:
    """Why the certificate did not verify, in the words people use: expired, self-signed, …"""
    code = exc.verify_code
    if code == _HOSTNAME_MISMATCH:
        return f"host name mismatch (not valid for {server_name})"
    if code == _IP_MISMATCH:
        return f"IP address mismatch (not valid for {server_name})"
    if code in _VERIFY_REASONS:
        return _VERIFY_REASONS[code]
    return str(exc.verify_message or exc.reason or "verification failed")[:160]


def _handshake_problem(exc: BaseException, budget: float) -> str:
    """Why no TLS handshake was had, as one plain phrase."""
    if isinstance(exc, ConnectionAbortedError) and "handshake is taking longer" in str(exc):
        return f"connected, but no TLS handshake within {budget:g} s (is it serving TLS on this port?)"
    if isinstance(exc, ssl.SSLError) and not isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        reason = str(exc.reason or "")
        if reason in _NOT_TLS:
            return "answered, but not with TLS (plain HTTP or another protocol on this port?)"
        if "ALERT" in reason:
            words = reason.split("ALERT_", 1)[-1].replace("_", " ").lower()
            return f"the server refused the TLS handshake ({words})"
        return f"TLS handshake failed ({reason.replace('_', ' ').lower() or short_error(exc)})"
    if isinstance(exc, ssl.SSLEOFError | ConnectionResetError | EOFError):
        return "the server closed the connection during the TLS handshake"
    return network_problem(exc) or short_error(exc)


async def _read_leaf_der(
    component: TlsComponent, server_name: str, context: ssl.SSLContext, deadline: float, budget: float
) -> tuple[bytes, str]:
    """Connect, complete a TLS handshake with ``context`` and return the leaf (DER) and TLS version.

    Raises ``ssl.SSLCertVerificationError`` for a certificate that does not verify and
    ``_NoCertificate`` for everything else.
    """
    loop = asyncio.get_running_loop()
    remaining = deadline - loop.time()
    # The handshake's own timeout ends a little before the deadline, so that a server that accepts
    # and never speaks is named as such rather than as a bare timeout.
    handshake_budget = max(remaining - min(0.25, max(0.1, remaining * 0.1)), 0.05)
    try:
        async with asyncio.timeout_at(deadline):
            _, writer = await asyncio.open_connection(
                component.host,
                component.port,
                ssl=context,
                server_hostname=server_name,
                ssl_handshake_timeout=handshake_budget,
            )
    except ssl.SSLCertVerificationError:
        raise
    except TimeoutError:
        raise _NoCertificate(f"no answer within {budget:g} s") from None
    except (OSError, EOFError) as exc:
        raise _NoCertificate(_handshake_problem(exc, budget)) from None
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if isinstance(ssl_object, ssl.SSLObject) else None
        version = str(ssl_object.version() or "") if isinstance(ssl_object, ssl.SSLObject) else ""
    finally:
        await _close(writer, min(CLOSE_GRACE, max(deadline - loop.time(), 0.01)))
    if not der:
        raise _NoCertificate("the server sent no certificate")
    return der, version


async def _close(writer: asyncio.StreamWriter, grace: float) -> None:
    """Close politely (TLS close_notify) for at most ``grace`` seconds, then drop the connection."""
    writer.close()
    try:
        async with asyncio.timeout(grace):
            await writer.wait_closed()
    except TimeoutError:
        writer.transport.abort()
    except OSError:
        pass  # the server dropped it first: closed all the same


def _name(name: x509.Name) -> str:
    """``"R11 (Let's Encrypt)"``: the common name, with the organisation when it adds something."""
    common = [str(a.value) for a in name.get_attributes_for_oid(NameOID.COMMON_NAME)]
    org = [str(a.value) for a in name.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
    if common and org and org[0] != common[0]:
        text = f"{common[0]} ({org[0]})"
    elif common or org:
        text = (common or org)[0]
    else:
        text = name.rfc4514_string() or "(no name)"
    return text[:120]


def _key(cert: x509.Certificate) -> str:
    try:
        key = cert.public_key()
    except (ValueError, x509.UnsupportedGeneralNameType):
        return "unknown key type"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {_EC_CURVES.get(key.curve.name, key.curve.name)}"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(key, ed448.Ed448PublicKey):
        return "Ed448"
    if isinstance(key, dsa.DSAPublicKey):
        return f"DSA {key.key_size}"
    return type(key).__name__


def _sans(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        extension = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    names = extension.value.get_values_for_type(x509.DNSName)
    addresses = [str(ip) for ip in extension.value.get_values_for_type(x509.IPAddress)]
    return (*names, *addresses)


def read_leaf(der: bytes) -> Leaf:
    """Parse a DER certificate; ``ValueError`` when it is not one."""
    cert = x509.load_der_x509_certificate(der)
    return Leaf(
        subject=_name(cert.subject),
        issuer=_name(cert.issuer),
        key=_key(cert),
        sans=_sans(cert),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
    )


def _days(days: float) -> str:
    """``"5 days"``, ``"1 day"``, ``"7 hours"``: whole units, rounded down."""
    if days >= 2:
        return f"{int(days)} days"
    if days >= 1:
        return "1 day"
    hours = int(days * 24)
    return "1 hour" if hours == 1 else f"{hours} hours" if hours else "less than an hour"


def _share_words(share: float) -> str:
    known = {1 / 3: "a third", 0.1: "a tenth", 0.25: "a quarter", 0.5: "half"}
    for value, words in known.items():
        if abs(share - value) < 1e-9:
            return words
    return f"{share * 100:g} %"


def expiry_status(component: TlsComponent, leaf: Leaf, now: datetime) -> tuple[Status, str]:
    """The status the days left give, and why when it is not healthy.

    Each threshold is the smaller of its days and its share of the certificate's lifetime, so a
    short-lived certificate (10 days) warns when under a third of its life is left, not from birth.
    """
    left = leaf.days_left(now)
    if left <= 0:
        return Status.CRITICAL, "expired"
    lifetime = leaf.lifetime_days
    for status, days, share in (
        (Status.CRITICAL, component.critical_days, component.critical_lifetime_share),
        (Status.WARNING, component.warning_days, component.warning_lifetime_share),
    ):
        by_share = lifetime * share
        if by_share < days:
            if left < by_share:
                return status, f"under {_share_words(share)} of its {_days(lifetime)} lifetime left"
        elif left <= days:
            return status, f"{days} days or less left"
    return Status.HEALTHY, ""


def judge(component: TlsComponent, leaf: Leaf, trust_problem: str | None, version: str, now: datetime) -> ProbeResult:
    """The probe's result from what was read: trust first, then the days left."""
    status, why = expiry_status(component, leaf, now)
    left = leaf.days_left(now)
    date = leaf.not_after.strftime("%Y-%m-%d")
    if left <= 0:
        expiry = f"certificate expired {_days(-left)} ago ({date})"
    else:
        expiry = f"certificate expires in {_days(left)} ({date})"
        if why and why.startswith("under "):
            expiry += f", {why}"
    parts = [expiry, f"issued by {leaf.issuer}", leaf.key]
    if trust_problem is not None:
        status = Status.CRITICAL
        if trust_problem != "expired":  # already said
            parts.insert(0, f"not trusted: {trust_problem}")
    facts: Facts = {
        "cert_status": status.label,
        "days_left": round(left, 2),
        "lifetime_days": round(leaf.lifetime_days, 2),
        "not_before": leaf.not_before.isoformat(),
        "not_after": leaf.not_after.isoformat(),
        "subject": leaf.subject,
        "issuer": leaf.issuer,
        "key": leaf.key,
        "sans": ", ".join(leaf.sans)[:500],
        "verified": int(trust_problem is None),
    }
    if trust_problem is not None:
        facts["verify_error"] = trust_problem
    if version:
        facts["tls_version"] = version
    return ProbeResult(status, " · ".join(parts), facts=facts)


class TlsProbe:
    """Completes a TLS handshake with a :class:`TlsComponent` and judges its leaf certificate."""

    def __init__(self, *, clock: Callable[[], datetime] | None = None) -> None:
        self._clock = clock or (lambda: datetime.now(UTC))

    async def probe(self, component: Component) -> ProbeResult:
        """Verify, and on failure read the leaf anyway; never raises for an unhealthy target."""
        if not isinstance(component, TlsComponent):
            raise TypeError(f"TlsProbe cannot probe a {component.type} component")
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        budget = connect_budget(component.timeout)
        deadline = loop.time() + budget
        server_name = component.server_name or component.host
        try:
            context = await asyncio.to_thread(verifying_context, component.ca_file)
        except CaFileError as exc:
            return ProbeResult(Status.CRITICAL, str(exc), since_ms(started))
        trust_problem: str | None = None
        try:
            try:
                der, version = await _read_leaf_der(component, server_name, context, deadline, budget)
            except ssl.SSLCertVerificationError as exc:
                trust_problem = verification_problem(exc, server_name)
                der, version = await _read_leaf_der(component, server_name, _reading_context(), deadline, budget)
        except _NoCertificate as exc:
            detail = str(exc) if trust_problem is None else f"not trusted: {trust_problem}; then {exc}"
            return ProbeResult(Status.CRITICAL, detail, since_ms(started))
        latency = since_ms(started)
        try:
            leaf = read_leaf(der)
        except ValueError:
            return ProbeResult(Status.CRITICAL, "the server's certificate could not be read as X.509", latency)
        result = judge(component, leaf, trust_problem, version, self._clock())
        return ProbeResult(result.status, result.detail, latency, result.facts)


__all__ = ["CaFileError", "Leaf", "TlsProbe", "expiry_status", "judge", "read_leaf", "verification_problem"]
