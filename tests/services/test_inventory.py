"""Inventory loading: every problem listed by path, ${VAR} from the environment, secrets collected."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.errors import InventoryError
from services.inventory import load_inventory, parse_inventory

EXAMPLE = Path(__file__).parents[2] / "examples" / "inventory.yaml"
EXAMPLE_ENV = {
    "VCBL_DB_URL": "postgresql://vcbl:pw-vcbl-1@db/vcbl",
    "VCC_MONGO_URI": "mongodb://vcc:pw-mongo-2@mongo:27017",
    "RENDER_API_KEY": "rnd_secret_key_3",
    "YT_DB_URL": "postgresql://yt:pw-yt-4@db/yt",
}


def problems_of(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(InventoryError) as caught:
        parse_inventory(text, "test.yaml", env or {})
    return caught.value.problems


def test_the_example_inventory_is_valid_and_its_secrets_are_known() -> None:
    loaded = load_inventory(EXAMPLE, EXAMPLE_ENV)
    assert set(loaded.inventory.services) == {
        "vcbl-chatbot", "vcc-manager", "work-logging", "youtube-agent", "ecommerce-agent",
    }  # fmt: skip
    types = {c.type for _, _, c in loaded.inventory.components()}
    assert types >= {"http", "postgres", "mongodb", "redis", "qdrant", "sqlite", "cloudrun", "lambda", "render"}
    for secret in ("pw-vcbl-1", "pw-mongo-2", "rnd_secret_key_3", "pw-yt-4", EXAMPLE_ENV["YT_DB_URL"]):
        assert secret in loaded.secrets


@pytest.mark.parametrize("example", sorted(EXAMPLE.parent.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_example_is_valid(example: Path) -> None:
    assert load_inventory(example, EXAMPLE_ENV).inventory.services


def test_every_problem_is_listed_with_its_path() -> None:
    text = """
roles: {viewer: ["not-an-id"]}
timezone: Mars/Olympus
services:
  shop:
    components:
      db: {type: postgres, dsn: "${SHOP_DB_URL}"}
      web: {type: http, url: "not a url", liveness: healthz}
      cache: {type: redis, url: "redis://h", colour: blue}
      thing: {type: kubernetes}
  Bad Name:
    components: {}
"""
    problems = problems_of(text)
    assert "services.shop.components.db.dsn: missing env var SHOP_DB_URL" in problems
    assert any(p.startswith("services.shop.components.web.url:") for p in problems)
    assert "services.shop.components.web.liveness: must be a path starting with /" in problems
    assert "services.shop.components.cache.colour: Extra inputs are not permitted" in problems
    assert any(p.startswith("services.shop.components.thing: Input tag 'kubernetes'") for p in problems)
    assert any(p.startswith("services.Bad Name") for p in problems)
    assert any(p.startswith("roles.viewer.0:") for p in problems)
    assert any(p.startswith("timezone: unknown time zone 'Mars/Olympus'") for p in problems)
    assert len(problems) >= 8


def test_variables_with_defaults_and_missing_file() -> None:
    text = 'services: {s: {components: {r: {type: redis, url: "${R_URL:-redis://127.0.0.1:6379/0}"}}}}'
    loaded = parse_inventory(text, "t", {})
    component = loaded.inventory.services["s"].components["r"]
    assert component.type == "redis"
    assert component.url.get_secret_value() == "redis://127.0.0.1:6379/0"
    with pytest.raises(InventoryError) as caught:
        load_inventory("/nonexistent/opsbot.yaml")
    assert caught.value.problems[0].startswith("(file): cannot read")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("services: [1, 2", "line 1"),
        ("- just\n- a list\n", "(top level): expected a mapping"),
        ("roles: {}\n", "services: Field required"),
    ],
)
def test_broken_files_get_one_line_each(text: str, expected: str) -> None:
    assert any(expected in p for p in problems_of(text))


def test_header_secrets_typed_into_the_file_are_known_and_thresholds_checked() -> None:
    text = """
services:
  s:
    components:
      api: {type: http, url: "http://h", headers: {Authorization: "Bearer typed-in-token-9"}}
"""
    assert "Bearer typed-in-token-9" in parse_inventory(text, "t", {}).secrets
    bad = 'services: {s: {components: {r: {type: redis, url: "redis://h", memory_warning_pct: 95}}}}'
    assert problems_of(bad) == ["services.s.components.r: memory_warning_pct must be below memory_critical_pct"]


def test_a_component_timeout_longer_than_the_health_deadline_is_refused() -> None:
    text = """
health: {deadline: 10}
services:
  render-app:
    components:
      api: {type: http, url: "https://x.onrender.com", sleeps: true, timeout: 45}
"""
    assert problems_of(text) == [
        "services.render-app.components.api.timeout: 45 s is longer than health.deadline (10 s), "
        "so /ops health would always cut it off"
    ]
