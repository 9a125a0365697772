# The harness image: `harness sim`, `harness load` and Locust (master or worker) with our
# plugin and locustfiles. docker-compose.yml runs it as the simulator, locust-master and
# locust-worker services; it also runs a worker on another machine (README, "Docker Compose").
#   docker build -t llm-harness .
# Python 3.11: every dependency has a manylinux wheel for it, so no compiler is needed.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The dependencies first, as wheels (a layer that survives source edits) ...
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --only-binary=:all: -r /tmp/requirements.txt

# ... then the package itself (harness, servers, harness/static).
COPY harness ./harness
COPY servers ./servers
RUN pip install . && rm -rf build ./*.egg-info

# Locust runs `locust -f locustfiles/<file>.py` from /app, as from a checkout; results go
# to runs/ (docker-compose.yml bind-mounts ./runs there, so the container runs as root).
COPY locustfiles ./locustfiles
RUN mkdir -p runs

# 8000 simulator, 8089 Locust web UI, 5557 Locust master, 9646 harness Prometheus /metrics
EXPOSE 8000 8089 5557 9646
CMD ["harness", "--help"]
