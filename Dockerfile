# syntax=docker/dockerfile:1
# opsbot: `docker build -t opsbot .` then
#   docker run -e SLACK_BOT_TOKEN=... -e SLACK_SIGNING_SECRET=... -e OPSBOT_CONFIG=/etc/opsbot/opsbot.yaml \
#     -v ./opsbot.yaml:/etc/opsbot/opsbot.yaml:ro -v opsbot-state:/var/lib/opsbot -p 3000:3000 opsbot
FROM python:3.11-slim

# pg_dump/pg_restore for PostgreSQL backups; the client's major version must be >= the servers'.
RUN apt-get update \
    && apt-get install -y --no-install-recommends postgresql-client \
    && rm -rf /var/lib/apt/lists/*

RUN pip install --no-cache-dir uv==0.13.9

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_NO_CACHE=1

WORKDIR /app

# Dependencies first: this layer is rebuilt only when the lock file changes.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project

COPY bot/ bot/
COPY handlers/ handlers/
COPY services/ services/
COPY examples/ examples/
COPY manifest.yaml ./
# Editable (uv's default) on purpose: the demo finds examples/ next to the packages.
RUN uv sync --frozen --no-dev

RUN useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin opsbot \
    && install -d -o opsbot -g opsbot -m 0750 /var/lib/opsbot

ENV PATH="/app/.venv/bin:$PATH" \
    OPSBOT_STATE_DIR=/var/lib/opsbot \
    OPSBOT_HOST=0.0.0.0 \
    OPSBOT_PORT=3000 \
    OPSBOT_LOG_FORMAT=json

USER opsbot
EXPOSE 3000

# No curl in slim images: urlopen raises (exit 1) on a refused connection or a non-2xx answer.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('OPSBOT_PORT', '3000'), timeout=4)"

CMD ["opsbot", "serve"]
