"""Embedding: ``async with Manager(...)`` in a FastAPI lifespan and an aiohttp cleanup_ctx."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import httpx
from aiohttp import web
from fastapi import FastAPI, Request

from ess_async import Manager

from .conftest import SMTPServer, make_config


async def test_fastapi_lifespan(tmp_path: Path, smtp_server: SMTPServer) -> None:
    config = make_config(smtp_server.port)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with Manager(tmp_path / "ws", config=config) as manager:
            app.state.outbox = manager
            yield

    app = FastAPI(lifespan=lifespan)

    @app.post("/signup")
    async def signup(request: Request, email: str) -> dict[str, str]:
        path = await request.app.state.outbox.create_work(to=email, subject="Welcome")
        return {"queued": path.name}

    # httpx's ASGI transport does not run the lifespan, so run it as a server would.
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            response = await client.post("/signup", params={"email": "new@example.com"})
        assert response.status_code == 200
        assert response.json()["queued"].endswith(".json")
        await asyncio.to_thread(smtp_server.handler.wait_for, 1)
    (got,) = smtp_server.handler.messages
    assert got.rcpt_tos == ["new@example.com"]
    assert got.message["Subject"] == "Welcome"
    assert not (tmp_path / "ws" / "ess.lock").read_text()  # lock released at shutdown


async def test_aiohttp_cleanup_ctx(tmp_path: Path, smtp_server: SMTPServer) -> None:
    config = make_config(smtp_server.port)
    outbox_key = web.AppKey("outbox", Manager)

    async def outbox(app: web.Application) -> AsyncIterator[None]:
        async with Manager(tmp_path / "ws", config=config) as manager:
            app[outbox_key] = manager
            yield

    async def signup(request: web.Request) -> web.Response:
        data = await request.post()
        await request.app[outbox_key].create_work(to=str(data["email"]), subject="Hi there")
        return web.json_response({"ok": True})

    app = web.Application()
    app.cleanup_ctx.append(outbox)
    app.router.add_post("/signup", signup)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with aiohttp.ClientSession() as session, session.post(
                f"http://127.0.0.1:{port}/signup", data={"email": "web@example.com"}) as response:
            assert response.status == 200
        await asyncio.to_thread(smtp_server.handler.wait_for, 1)
    finally:
        await runner.cleanup()
    assert smtp_server.handler.subjects() == ["Hi there"]
    assert Manager(tmp_path / "ws", config=config).status()["active"] == 0
