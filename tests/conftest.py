"""Shared fixtures: real servers in tests/fixtures/servers.py, the fake Slack Web API in
tests/fixtures/slack.py."""

pytest_plugins = ["tests.fixtures.servers", "tests.fixtures.slack"]
