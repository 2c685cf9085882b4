"""Deploy control: releases, rollback, restart, scale and lifecycle of Cloud Run, Lambda, Render and
docker compose components, one provider module per platform."""
