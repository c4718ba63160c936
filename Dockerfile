# vod-kafka-bridge: slim, non-root, pinned by constraints.txt.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY bridge ./bridge
RUN python -m venv /opt/bridge \
    && /opt/bridge/bin/pip install --no-cache-dir -c constraints.txt ".[fast]"

FROM python:3.11-slim
COPY --from=build /opt/bridge /opt/bridge
RUN useradd --system --uid 10001 --no-create-home bridge
USER 10001
ENV PATH=/opt/bridge/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    BRIDGE_LOG_FORMAT=json
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"]
# SIGTERM -> graceful drain (BRIDGE_SHUTDOWN_TIMEOUT_S, default 30 s): keep the orchestrator's grace period longer.
STOPSIGNAL SIGTERM
ENTRYPOINT ["vod-bridge"]
CMD ["serve"]
