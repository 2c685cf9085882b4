"""`/ops health` for a service with Qdrant over HTTP: the real app, the fake Slack, the loopback Qdrant REST
server (tests/fixtures/qdrant.py) — and the Qdrant API key nowhere in Slack, the logs or the audit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from qdrant_client import models

from bot.logging import configure_logging
from services.redaction import Redactor
from tests.fixtures.qdrant import FakeQdrant
from tests.fixtures.slack import FakeSlack
from tests.scenario.harness import inventory, running_bot

KEY = "qdr-Sc3nario-Key-5e6f7a8b9c"
OLD_KEY = "qdr-Rotated-Away-1f2e3d4c5b"


@pytest.mark.filterwarnings(
    # The fake serves plain HTTP on loopback; qdrant-client rightly warns about a key over plain HTTP.
    "ignore:Api key is used with an insecure connection:UserWarning"
)
async def test_health_with_qdrant_over_http_never_shows_the_api_key(
    fake_slack: FakeSlack, fake_qdrant: FakeQdrant, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    seed = fake_qdrant.client()
    try:
        await seed.create_collection("videos", vectors_config=models.VectorParams(size=2, distance=models.Distance.DOT))
        await seed.upsert("videos", points=[models.PointStruct(id=i, vector=[0.5, 0.5]) for i in (1, 2, 3)])
    finally:
        await seed.close()
    fake_qdrant.require_api_key(KEY)
    fake_qdrant.clear_requests()
    text = f"""
roles: {{viewer: ["*"]}}
services:
  search:
    components:
      vectors: {{type: qdrant, url: "{fake_qdrant.url}", api_key: "${{QDRANT_KEY}}", collections: [videos], timeout: 3}}
      stale: {{type: qdrant, url: "{fake_qdrant.url}", api_key: "${{QDRANT_OLD}}", collections: [videos], timeout: 3}}
"""
    loaded = inventory(text, env={"QDRANT_KEY": KEY, "QDRANT_OLD": OLD_KEY})
    # Logs through a redactor that knows no secret: a key in the output was logged, not masked.
    configure_logging("json", "DEBUG", Redactor())
    capfd.readouterr()

    async with running_bot(fake_slack, tmp_path, loaded) as bot:
        await bot.command("health search")
        [post] = await fake_slack.wait_for("chat.postMessage", timeout=10)
        events = await bot.container.store.audit_events()

    report = json.dumps(post.json_param("blocks"), ensure_ascii=False)
    assert "critical" in post.params["text"]
    assert "videos green · 3 points" in report  # the component with the right key
    assert "the API key was refused" in report  # the one with the old key
    sent = {r.api_key for r in fake_qdrant.requests_to("/collections/videos")}
    assert sent == {KEY, OLD_KEY}  # each component sent its own key, as the api-key header
    captured = capfd.readouterr()
    slack = "\n".join(c.raw.decode(errors="replace") + json.dumps(c.params) for c in fake_slack.calls)
    for where, said in (("Slack", slack), ("the logs", captured.out + captured.err), ("the audit", repr(events))):
        assert KEY not in said, f"the Qdrant API key reached {where}"
        assert OLD_KEY not in said, f"the old Qdrant API key reached {where}"
    assert [(e.command, e.outcome) for e in events] == [("health", "ok")]
    assert '"logger"' in captured.err  # the logs were captured (JSON lines), so their check meant something
