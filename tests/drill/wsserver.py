"""A WebSocket echo server (aiohttp) that closes each session cleanly after K echoes.

``python -m tests.drill.wsserver --every K`` prints ``PORT <n>``, serves until
SIGTERM, then prints one JSON line: ``handshakes``, ``echoes`` and ``closes`` (the
sessions it closed itself, with code 1001).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket

from aiohttp import WSCloseCode, WSMsgType, web


async def main_async(every: int) -> dict[str, int]:
    records = {"handshakes": 0, "echoes": 0, "closes": 0}

    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        records["handshakes"] += 1
        n = 0
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            await ws.send_str(msg.data)
            records["echoes"] += 1
            n += 1
            if n == every:
                records["closes"] += 1
                await ws.close(code=WSCloseCode.GOING_AWAY)
        return ws

    app = web.Application()
    app.router.add_get("/ws", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.create_server(("127.0.0.1", 0))
    site = web.SockSite(runner, sock)
    await site.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    await stop.wait()
    await runner.cleanup()
    return records


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--every", type=int, default=3)
    print(json.dumps(asyncio.run(main_async(p.parse_args().every))), flush=True)


if __name__ == "__main__":
    main()
