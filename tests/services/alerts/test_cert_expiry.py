"""The cert_expiry rule: its model, its check, and the watcher firing and resolving it on real TLS servers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from pydantic import TypeAdapter, ValidationError

from services.alerts.rules import AlertRule, CertExpiryRule, DownRule, Observation, Verdict, check
from services.alerts.watch import Fired, Watcher, watched
from services.health import HealthProbe, Target
from services.inventory import LoadedInventory, parse_inventory
from services.probes import PROBED_TYPES
from services.probes.tls import TlsProbe
from services.redaction import Redactor
from services.state import StateStore, open_state_store
from tests.fixtures.servers import free_port
from tests.fixtures.tls import SERVER_NAME, TlsWorld

RULES: TypeAdapter[AlertRule] = TypeAdapter(AlertRule)
T0 = datetime(2026, 11, 22, 3, 0, tzinfo=UTC)


# --- the model and the check ---------------------------------------------------------------------


def test_cert_expiry_loads_with_its_defaults() -> None:
    rule = RULES.validate_python({"kind": "cert_expiry"})

    assert isinstance(rule, CertExpiryRule)
    assert (rule.at, rule.severity, rule.for_minutes, rule.alert_name) == ("warning", "warning", 0, "CertificateExpiry")
    assert rule.key("shop", "cert") == "shop/cert/CertificateExpiry"


def test_a_bad_level_is_refused_with_the_field_named() -> None:
    with pytest.raises(ValidationError) as caught:
        RULES.validate_python({"kind": "cert_expiry", "at": "soon"})

    [error] = caught.value.errors()
    assert error["loc"] == ("cert_expiry", "at")
    assert error["msg"] == "Input should be 'warning' or 'critical'"


@pytest.mark.parametrize(
    ("at", "status", "verdict"),
    [
        ("warning", "healthy", Verdict.OK),
        ("warning", "warning", Verdict.BREACH),
        ("warning", "critical", Verdict.BREACH),
        ("critical", "warning", Verdict.OK),
        ("critical", "critical", Verdict.BREACH),
    ],
)
def test_the_rule_holds_the_certificate_status_against_its_level(at: str, status: str, verdict: Verdict) -> None:
    rule = RULES.validate_python({"kind": "cert_expiry", "at": at})
    detail = "certificate expires in 14 days (2026-12-06) · issued by R11 (Let's Encrypt) · EC P-256"

    condition = check(rule, Observation(reachable=True, detail=detail, cert_status=status, cert_days_left=14.2))

    assert condition.verdict is verdict
    assert condition.evidence == f"{detail}; alerts at {at} or worse"
    assert condition.value == 14.2


def test_no_certificate_read_is_unknown_and_says_why() -> None:
    rule = RULES.validate_python({"kind": "cert_expiry"})

    unreachable = check(rule, Observation(reachable=False, detail="connection refused"))
    unreported = check(rule, Observation(reachable=True, detail="OK"))

    assert unreachable.verdict is Verdict.UNKNOWN
    assert unreachable.evidence == "cannot read the certificate, the target is not answering: connection refused"
    assert unreported.verdict is Verdict.UNKNOWN
    assert unreported.evidence == "the certificate not reported"


def test_a_tls_component_is_watched_for_its_certificate_by_default() -> None:
    loaded = parse_inventory(
        "services: {shop: {components: {cert: {type: tls, host: shop.example.com}, "
        "own: {type: tls, host: shop.example.com, alerts: [{kind: cert_expiry, at: critical}]}}}}",
        "t",
        env={},
    )

    found = {w.target.component: [type(r) for r in w.rules] for w in watched(loaded.inventory, PROBED_TYPES)}

    assert found == {"cert": [DownRule, CertExpiryRule], "own": [CertExpiryRule]}


# --- the watcher on real TLS servers -------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.fired: list[Fired] = []
        self.resolved: list[Fired] = []

    async def fired_alert(self, alert: Fired) -> tuple[str, str] | None:
        self.fired.append(alert)
        return "C0OPS", f"ts-{len(self.fired)}"


class Notifier:
    def __init__(self, seen: Recorder) -> None:
        self.seen = seen

    async def fired(self, alert: Fired) -> tuple[str, str] | None:
        return await self.seen.fired_alert(alert)

    async def resolved(self, alert: Fired) -> None:
        self.seen.resolved.append(alert)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[StateStore]:
    store = await open_state_store(None, default_path=tmp_path / "state.db")
    yield store
    await store.close()


def _inventory(world: TlsWorld, **ports: int) -> LoadedInventory:
    lines = "\n".join(
        f"      {name}: {{type: tls, host: 127.0.0.1, port: {port}, server_name: {SERVER_NAME}, "
        f'ca_file: "{world.ca_file}", timeout: 2}}'
        for name, port in ports.items()
    )
    return parse_inventory(f"alerts: {{interval_seconds: 20}}\nservices:\n  shop:\n    components:\n{lines}\n", "t", {})


def _watcher(
    store: StateStore,
    loaded: LoadedInventory,
    http: aiohttp.ClientSession,
    seen: Recorder,
    now: list[datetime],
    probe: HealthProbe,
) -> Watcher:
    probe_for: Callable[[Target], HealthProbe | None] = lambda _target: probe  # noqa: E731
    return Watcher(
        store, loaded.inventory, probe_for, http, Redactor(), probed_types=PROBED_TYPES,
        notifier=Notifier(seen), clock=lambda: now[0],
    )  # fmt: skip


async def test_an_expiring_or_expired_certificate_fires_at_once_and_is_not_service_down(
    tls_world: TlsWorld, store: StateStore
) -> None:
    loaded = _inventory(
        tls_world, soon=tls_world.ports["expiring_15"], gone=tls_world.ports["expired"], fine=tls_world.ports["valid"]
    )
    seen, now = Recorder(), [T0]
    async with aiohttp.ClientSession() as http:
        watcher = _watcher(store, loaded, http, seen, now, TlsProbe())
        fired = await watcher.round()
        now[0] = T0 + timedelta(minutes=5)
        later = await watcher.round()

    assert sorted(f.key for f in fired) == ["shop/gone/CertificateExpiry", "shop/soon/CertificateExpiry"]
    by_key = {f.key: f for f in fired}
    assert by_key["shop/soon/CertificateExpiry"].transition.evidence.startswith("certificate expires in 14 days (")
    assert by_key["shop/gone/CertificateExpiry"].transition.evidence.startswith("certificate expired 3 days ago (")
    assert later == []  # still expiring: no second message, and never ServiceDown for an answering server


async def test_a_refused_port_is_service_down_and_the_certificate_unknown(
    tls_world: TlsWorld, store: StateStore
) -> None:
    loaded = _inventory(tls_world, dead=free_port())
    seen, now = Recorder(), [T0]
    async with aiohttp.ClientSession() as http:
        watcher = _watcher(store, loaded, http, seen, now, TlsProbe())
        first = await watcher.round()
        now[0] = T0 + timedelta(minutes=1)
        second = await watcher.round()
        alerts = await store.load_alerts()

    assert first == []
    assert [f.key for f in second] == ["shop/dead/ServiceDown"]
    assert second[0].transition.evidence == "not answering: connection refused"
    cert = alerts["shop/dead/CertificateExpiry"].state
    assert cert["phase"] == "ok"
    assert cert["evidence"] == ""  # unknown holds the state where it was


async def test_a_certificate_nearing_its_end_fires_and_a_renewal_resolves_it(
    tls_world: TlsWorld, store: StateStore
) -> None:
    loaded = _inventory(tls_world, cert=tls_world.ports["valid"])  # 199 days left today
    seen, now = Recorder(), [T0]
    today = [datetime.now(UTC)]
    async with aiohttp.ClientSession() as http:
        watcher = _watcher(store, loaded, http, seen, now, TlsProbe(clock=lambda: today[0]))
        assert await watcher.round() == []
        today[0] += timedelta(days=190)  # 9 days left: a warning by the component's 21 days
        now[0] = T0 + timedelta(minutes=1)
        fired = await watcher.round()
        today[0] = datetime.now(UTC)  # renewed: 199 days again
        now[0] = T0 + timedelta(minutes=2)
        resolved = await watcher.round()

    assert [f.key for f in fired] == ["shop/cert/CertificateExpiry"]
    assert fired[0].transition.evidence.startswith("certificate expires in 9 days (")
    assert [(f.key, f.transition.kind.value) for f in resolved] == [("shop/cert/CertificateExpiry", "resolved")]
    assert [f.key for f in seen.resolved] == ["shop/cert/CertificateExpiry"]
