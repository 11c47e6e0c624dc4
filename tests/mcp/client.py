"""Drives hivegate's /mcp with the official MCP Python SDK (tests/mcp.rs).

Usage: client.py URL TOKEN SCENARIO; prints one JSON object with what the
SDK saw. URL http://HOST/mcp (Streamable HTTP) or ws://HOST/ws (the `mcp`
WebSocket subprotocol; the SDK's WebSocket client sends no token, so open
mode). TOKEN "-" means none."""

import asyncio
import json
import sys
import time

import mcp.types as types
from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client
from mcp.client.websocket import websocket_client
from contextlib import asynccontextmanager


@asynccontextmanager
async def transport(url, headers):
    """The SDK's Streamable HTTP client, or its WebSocket one for ws://."""
    if url.startswith("ws://"):
        async with websocket_client(url) as (read, write):
            yield read, write, lambda: "the connection"
    else:
        async with streamablehttp_client(url, headers=headers) as (read, write, session_id):
            yield read, write, session_id


def chat_args(text="hi"):
    return {"messages": [{"role": "user", "content": text}]}


def result_of(r):
    return {
        "isError": r.isError,
        "text": "".join(c.text for c in r.content if c.type == "text"),
        "structured": r.structuredContent,
    }


async def run(url, token, scenario):
    headers = {"Authorization": f"Bearer {token}"} if token != "-" else None
    out = {}
    async with transport(url, headers) as (read, write, session_id):
        async with ClientSession(read, write) as session:
            init = await session.initialize()
            out["server"] = init.serverInfo.name
            out["protocol"] = init.protocolVersion
            out["session"] = bool(session_id())
            tools = await session.list_tools()
            out["tools"] = [t.name for t in tools.tools]
            out["schema_required"] = tools.tools[0].inputSchema.get("required")
            await session.send_ping()

            if scenario == "call":
                progress = []

                async def on_progress(p, total, message):
                    progress.append(message)

                r = await session.call_tool("chat", chat_args(), progress_callback=on_progress)
                out["call"] = result_of(r)
                out["progress"] = progress
                plain = await session.call_tool("chat", chat_args())
                out["plain"] = result_of(plain)
                bad = await session.call_tool("chat", {"messages": []})
                out["empty"] = result_of(bad)
                try:
                    await session.call_tool("nope", chat_args())
                    out["unknown_tool"] = "answered"
                except Exception as e:  # an McpError with the JSON-RPC code
                    out["unknown_tool"] = getattr(getattr(e, "error", None), "code", str(e))

            elif scenario == "cancel":
                first = asyncio.Event()

                async def on_progress(p, total, message):
                    first.set()

                task = asyncio.create_task(
                    session.call_tool("chat", chat_args(), progress_callback=on_progress)
                )
                await asyncio.wait_for(first.wait(), 10)
                call_id = session._request_id - 1
                await session.send_notification(
                    types.ClientNotification(
                        types.CancelledNotification(
                            params=types.CancelledNotificationParams(
                                requestId=call_id, reason="test cancels"
                            )
                        )
                    )
                )
                task.cancel()
                try:
                    await task
                except BaseException:
                    pass
                out["cancelled"] = True
                # The session is still good.
                await session.send_ping()

            elif scenario == "limited":
                seen = []
                for _ in range(10):
                    r = await session.call_tool("chat", chat_args())
                    seen.append(result_of(r))
                    if r.isError:
                        break
                out["calls"] = seen

            elif scenario == "breaker":
                seen = []
                for _ in range(6):
                    t = time.monotonic()
                    r = await session.call_tool("chat", chat_args())
                    res = result_of(r)
                    res["seconds"] = time.monotonic() - t
                    seen.append(res)
                out["calls"] = seen
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(run(sys.argv[1], sys.argv[2], sys.argv[3]))
