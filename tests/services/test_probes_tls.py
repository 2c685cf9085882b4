"""The tls probe against loopback TLS servers with certificates the tests make (tests/fixtures/tls.py)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from handlers.commands import load_registry
from handlers.context import Deps
from handlers.router import Router
from services.access import RoleResolver
from services.approvals import ApprovalEngine
from services.errors import InventoryError
from services.health import Status, Target, check_health
from services.inventory import SqliteComponent, TlsComponent, parse_inventory
from services.locks import LocalLocks
from services.probes import PROBED_TYPES, build_health_probes
from services.probes.tls import Leaf, TlsProbe, expiry_status, read_leaf
from services.redaction import Redactor
from services.state import open_state_store
from tests.fixtures.servers import free_port
from tests.fixtures.tls import SERVER_NAME, TlsWorld


def tls(world: TlsWorld, endpoint: str, **fields: Any) -> TlsComponent:
    """A tls component for one of the world's endpoints, trusting the test CA."""
    data: dict[str, Any] = {
        "type": "tls",
        "host": "127.0.0.1",
        "port": world.ports[endpoint],
        "server_name": SERVER_NAME,
        "ca_file": str(world.ca_file),
        "timeout": 3,
    }
    return TlsComponent.model_validate({**data, **fields})


async def probe(component: TlsComponent) -> Any:
    return await TlsProbe().probe(component)


# --- certificates -------------------------------------------------------------------------------


async def test_a_valid_certificate_is_healthy_with_its_facts(tls_world: TlsWorld) -> None:
    result = await probe(tls(tls_world, "valid"))

    assert result.status == Status.HEALTHY, result.detail
    assert result.detail.startswith("certificate expires in 199 days (")
    assert "issued by opsbot test CA (opsbot tests) · EC P-256" in result.detail
    facts = result.facts
    assert facts["cert_status"] == "healthy"
    assert facts["verified"] == 1 and "verify_error" not in facts
    assert 199 < float(facts["days_left"]) <= 200
    assert facts["sans"] == SERVER_NAME
    assert facts["subject"] == SERVER_NAME
    assert facts["issuer"] == "opsbot test CA (opsbot tests)"
    assert facts["key"] == "EC P-256"
    assert str(facts["tls_version"]).startswith("TLSv1.")
    assert datetime.fromisoformat(str(facts["not_after"])) > datetime.now(UTC) + timedelta(days=199)
    assert result.latency_ms > 0


async def test_the_key_type_and_size_are_read(tls_world: TlsWorld) -> None:
    result = await probe(tls(tls_world, "valid_rsa"))

    assert result.status == Status.HEALTHY, result.detail
    assert result.facts["key"] == "RSA 2048"


async def test_an_expired_certificate_is_critical_and_says_when(tls_world: TlsWorld) -> None:
    result = await probe(tls(tls_world, "expired"))

    assert result.status == Status.CRITICAL
    assert result.detail.startswith("certificate expired 3 days ago (")  # said once, not also "not trusted"
    assert result.facts["verify_error"] == "expired"
    assert result.facts["verified"] == 0
    assert float(result.facts["days_left"]) < -2.9


async def test_five_days_left_is_critical(tls_world: TlsWorld) -> None:
    result = await probe(tls(tls_world, "expiring_5"))

    assert result.status == Status.CRITICAL
    assert result.detail.startswith("certificate expires in 4 days (")
    assert result.facts["cert_status"] == "critical" and result.facts["verified"] == 1


async def test_fifteen_days_left_is_a_warning(tls_world: TlsWorld) -> None:
    result = await probe(tls(tls_world, "expiring_15"))

    assert result.status == Status.WARNING
    assert result.detail.startswith("certificate expires in 14 days (")
    assert result.facts["cert_status"] == "warning"


async def test_thresholds_are_per_component(tls_world: TlsWorld) -> None:
    relaxed = await probe(tls(tls_world, "expiring_15", warning_days=10, critical_days=3))
    # 200 days is more than a third of this 230-day certificate's life: the share decides unless raised.
    by_share = await probe(tls(tls_world, "valid", warning_days=200, critical_days=30))
    strict = await probe(
        tls(
            tls_world,
            "valid",
            warning_days=200,
            critical_days=30,
            warning_lifetime_share=0.9,
            critical_lifetime_share=0.2,
        )
    )

    assert relaxed.status == Status.HEALTHY, relaxed.detail
    assert by_share.status == Status.HEALTHY, by_share.detail
    assert strict.status == Status.WARNING, strict.detail
    assert strict.detail.startswith("certificate expires in 199 days")


async def test_short_lived_certificates_are_judged_by_the_share_of_their_life_left(tls_world: TlsWorld) -> None:
    fresh = await probe(tls(tls_world, "short_fresh"))
    third = await probe(tls(tls_world, "short_third"))
    tenth = await probe(tls(tls_world, "short_tenth"))

    assert fresh.status == Status.HEALTHY, fresh.detail  # 6 days left would be critical for a long one
    assert third.status == Status.WARNING, third.detail
    assert "under a third of its 10 days lifetime left" in third.detail
    assert tenth.status == Status.CRITICAL, tenth.detail
    assert "expires in 11 hours" in tenth.detail or "expires in 12 hours" in tenth.detail
    assert "under a tenth of its 10 days lifetime left" in tenth.detail


async def test_wrong_host_is_critical_and_named_and_the_leaf_is_still_read(tls_world: TlsWorld) -> None:
    result = await probe(tls(tls_world, "valid", server_name="other.test"))

    assert result.status == Status.CRITICAL
    assert result.detail.startswith("not trusted: host name mismatch (not valid for other.test) · ")
    assert "expires in 199 days" in result.detail
    assert result.facts["verify_error"] == "host name mismatch (not valid for other.test)"
    assert result.facts["sans"] == SERVER_NAME


async def test_a_self_signed_certificate_is_critical(tls_world: TlsWorld) -> None:
    result = await probe(tls(tls_world, "self_signed"))

    assert result.status == Status.CRITICAL
    assert result.detail.startswith("not trusted: self-signed · certificate expires in 199 days")
    assert result.facts["issuer"] == SERVER_NAME


async def test_a_certificate_of_an_unknown_ca_is_critical(tls_world: TlsWorld) -> None:
    result = await probe(tls(tls_world, "unknown_ca"))

    assert result.status == Status.CRITICAL
    assert result.detail.startswith("not trusted: issued by an unknown CA · ")
    assert "issued by somebody else's CA (opsbot tests)" in result.detail


async def test_without_the_ca_file_the_test_ca_is_unknown(tls_world: TlsWorld) -> None:
    result = await probe(tls(tls_world, "valid", ca_file=None))

    assert result.status == Status.CRITICAL
    assert result.facts["verify_error"] == "issued by an unknown CA"


# --- endpoints that give no certificate ----------------------------------------------------------


async def test_a_refused_connection_is_critical_in_one_line(tls_world: TlsWorld) -> None:
    component = tls(tls_world, "valid", port=free_port())

    result = await probe(component)

    assert result.status == Status.CRITICAL
    assert result.detail == "connection refused"
    assert result.facts == {}


async def test_a_server_that_never_speaks_is_bounded_by_the_timeout(tls_world: TlsWorld) -> None:
    component = tls(tls_world, "silent", timeout=1)

    started = time.perf_counter()
    result = await probe(component)
    elapsed = time.perf_counter() - started

    assert result.status == Status.CRITICAL
    assert result.detail == "connected, but no TLS handshake within 0.8 s (is it serving TLS on this port?)"
    assert elapsed < component.timeout + 0.3, elapsed
    assert tls_world.silent.accepted >= 1


async def test_a_plain_http_server_is_not_tls(tls_world: TlsWorld) -> None:
    result = await probe(tls(tls_world, "plain_http"))

    assert result.status == Status.CRITICAL
    assert result.detail == "answered, but not with TLS (plain HTTP or another protocol on this port?)"


async def test_a_server_that_hangs_up_at_once_is_named(tls_world: TlsWorld) -> None:
    result = await probe(tls(tls_world, "hang_up"))

    assert result.status == Status.CRITICAL
    assert result.detail == "the server closed the connection during the TLS handshake"


async def test_a_server_that_refuses_our_tls_versions_is_named(tls_world: TlsWorld) -> None:
    result = await probe(tls(tls_world, "legacy"))

    assert result.status == Status.CRITICAL
    assert result.detail == "the server refused the TLS handshake (handshake failure)"


def test_bytes_that_are_no_certificate_are_refused() -> None:
    with pytest.raises(ValueError):
        read_leaf(b"not a DER certificate")


async def test_an_unknown_host_name_is_named(tls_world: TlsWorld) -> None:
    result = await probe(tls(tls_world, "valid", host="no-such-host.invalid"))

    assert result.status == Status.CRITICAL
    assert result.detail == "host name not found"


async def test_a_missing_or_bad_ca_file_is_one_sentence(tls_world: TlsWorld, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("this is not a certificate\n")

    gone = await probe(tls(tls_world, "valid", ca_file=str(missing)))
    junk = await probe(tls(tls_world, "valid", ca_file=str(not_pem)))

    assert gone.status == Status.CRITICAL
    assert gone.detail == f"cannot read the CA file {missing}: No such file or directory"
    assert junk.status == Status.CRITICAL
    assert junk.detail == f"the CA file {not_pem} holds no PEM certificate"


async def test_wrong_component_type_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="cannot probe a sqlite"):
        await TlsProbe().probe(SqliteComponent(type="sqlite", path=tmp_path / "x.db"))


# --- thresholds without a server ----------------------------------------------------------------


def _leaf(lifetime_days: float, left_days: float, now: datetime) -> Leaf:
    return Leaf(
        subject="x", issuer="y", key="EC P-256", sans=(),
        not_before=now - timedelta(days=lifetime_days - left_days), not_after=now + timedelta(days=left_days),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("lifetime", "left", "expected"),
    [
        (365, 21.01, Status.HEALTHY),
        (365, 21, Status.WARNING),  # "warning ≤ 21 days": exactly 21 is a warning
        (365, 7.01, Status.WARNING),
        (365, 7, Status.CRITICAL),
        (90, 21, Status.WARNING),  # a third of 90 is 30 > 21: the days decide
        (90, 22, Status.HEALTHY),
        (10, 3.4, Status.HEALTHY),
        (10, 3.3, Status.WARNING),  # under a third of 10 days
        (10, 1.0, Status.WARNING),  # a tenth is not *under* a tenth
        (10, 0.99, Status.CRITICAL),
        (365, 0, Status.CRITICAL),
        (365, -1, Status.CRITICAL),
    ],
)
def test_expiry_thresholds(lifetime: float, left: float, expected: Status) -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    component = TlsComponent(type="tls", host="example.com")

    status, _ = expiry_status(component, _leaf(lifetime, left, now), now)

    assert status == expected


# --- inventory ----------------------------------------------------------------------------------


def test_a_tls_component_loads_with_the_defaults() -> None:
    loaded = parse_inventory("services: {shop: {components: {cert: {type: tls, host: shop.example.com}}}}", "t", {})

    spec = loaded.inventory.services["shop"].components["cert"]
    assert isinstance(spec, TlsComponent)
    assert (spec.port, spec.server_name, spec.ca_file, spec.warning_days, spec.critical_days) == (
        443, None, None, 21, 7,
    )  # fmt: skip
    assert (spec.warning_lifetime_share, spec.critical_lifetime_share) == (1 / 3, 0.1)


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        (
            "host: https://shop.example.com",
            "services.shop.components.cert.host: 'https://shop.example.com' is not a host name or IP address "
            "(no scheme, path or port: use `port`)",
        ),
        (
            "host: 'shop.example.com:8443'",
            "services.shop.components.cert.host: 'shop.example.com:8443' is not a host name or IP address "
            "(no scheme, path or port: use `port`)",
        ),
        ("host: a.example, port: 70000", "services.shop.components.cert.port: Input should be less than or equal"),
        ("host: a.example, warning_days: 7, critical_days: 7", "critical_days must be below warning_days"),
        (
            "host: a.example, warning_lifetime_share: 0.1, critical_lifetime_share: 0.2",
            "critical_lifetime_share must be below warning_lifetime_share",
        ),
        ("host: a.example, ca_file: certs/ca.pem", "services.shop.components.cert.ca_file: certs/ca.pem: must be an"),
        ("host: a.example, server_name: 'a b'", "'a b' is not a host name or IP address"),
        ("port: 443", "services.shop.components.cert.host: Field required"),
    ],
)
def test_bad_tls_components_are_refused_with_one_sentence(fields: str, problem: str) -> None:
    with pytest.raises(InventoryError) as caught:
        parse_inventory(f"services: {{shop: {{components: {{cert: {{type: tls, {fields}}}}}}}}}", "t", {})

    assert any(p.startswith(problem) or problem in p for p in caught.value.problems), caught.value.problems


def test_ip_addresses_are_hosts() -> None:
    assert TlsComponent(type="tls", host="10.0.0.1").host == "10.0.0.1"
    assert TlsComponent(type="tls", host="::1").host == "::1"


# --- through health and the router --------------------------------------------------------------


async def test_the_registry_probes_tls_for_health_and_the_watcher(http_session: aiohttp.ClientSession) -> None:
    assert "tls" in PROBED_TYPES
    assert isinstance(build_health_probes(http_session, types={"tls"})["tls"], TlsProbe)


async def test_check_health_fans_out_tls_probes_each_within_its_timeout(
    tls_world: TlsWorld, http_session: aiohttp.ClientSession
) -> None:
    targets = [
        Target("shop", "cert", tls(tls_world, "expiring_15")),
        Target("shop", "hung", tls(tls_world, "silent", timeout=1)),
    ]
    probes = build_health_probes(http_session, types={"tls"})

    started = time.perf_counter()
    report = await check_health(targets, lambda t: probes.get(t.type), deadline=5, redactor=Redactor())

    results = {item.target.component: item.result for item in report.items}
    assert results["cert"].status == Status.WARNING
    assert results["hung"].status == Status.CRITICAL
    assert time.perf_counter() - started < 1.5


async def test_ops_health_shows_the_tls_line(
    tls_world: TlsWorld, http_session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    inventory = f"""
roles: {{viewer: [U0VIEWER]}}
services:
  shop:
    components:
      cert: {{type: tls, host: 127.0.0.1, port: {tls_world.ports["expiring_15"]}, server_name: {SERVER_NAME},
              ca_file: "{tls_world.ca_file}"}}
"""
    loaded = parse_inventory(inventory, "t", {})
    store = await open_state_store(None, default_path=tmp_path / "state.sqlite3")
    try:
        roles = RoleResolver(loaded.inventory.roles)
        deps = Deps(
            loaded=loaded,
            store=store,
            probes=build_health_probes(http_session, types={"tls"}),
            redactor=Redactor(),
            roles=roles,
            approvals=ApprovalEngine(store, LocalLocks(), roles, loaded.inventory.approvals, Redactor()),
        )

        reply = await Router(load_registry()).dispatch(
            user_id="U0VIEWER", channel_id="C0OPS", text="health shop", deps=deps, request_id="req-tls"
        )
    finally:
        await store.close()

    assert reply.outcome == "ok"
    assert reply.status == Status.WARNING
    assert "Health of shop: warning" in reply.text
    assert "WARNING  shop/cert: certificate expires in 14 days (" in reply.text
    assert "*cert* (tls)" in str(reply.blocks)
