"""Scenario (a), the HTTP ceiling: an aiohttp server whose handler only reads the body and answers 200.

Same aiohttp, same event loop and the same response size class as the bridge, no access log (the bridge logs
access lines only at DEBUG). ``--workers N`` starts N processes sharing the port with SO_REUSEPORT, like
``vod-bridge serve --workers N``.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys

from aiohttp import web

from bench.common import loop_factory

BODY = b'{"status": "published", "topic": "vod.events", "partition": 0, "offset": 123456}'


async def handle(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=BODY, content_type="application/json")


def serve(host: str, port: int, path: str, loop: str, reuse_port: bool) -> None:
    app = web.Application(client_max_size=1024 * 1024)
    app.router.add_post(path, handle)
    web.run_app(
        app,
        host=host,
        port=port,
        access_log=None,
        print=None,
        reuse_port=reuse_port or None,
        loop=loop_factory(loop)(),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_server", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/vod/callback")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="asyncio")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--reuse-port", action="store_true")
    args = parser.parse_args(argv)
    if args.workers <= 1:
        serve(args.host, args.port, args.path, args.loop, args.reuse_port)
        return 0
    base = [sys.executable, "-m", "bench.bare_server", "--host", args.host, "--port", str(args.port)]
    base += ["--path", args.path, "--loop", args.loop, "--reuse-port"]
    children = [subprocess.Popen(base) for _ in range(args.workers)]

    def forward(signum: int, frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return max(child.wait() for child in children)


if __name__ == "__main__":
    sys.exit(main())
