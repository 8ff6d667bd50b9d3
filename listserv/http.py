"""The daemon's HTTP endpoint. This issue serves GET /healthz; one-click unsubscribe comes later."""

from __future__ import annotations

import asyncio

import sqlalchemy as sa
from aiohttp import web

from listserv.db import Database


def _db_ok(db: Database) -> bool:
    with db.reading() as session:
        return session.scalar(sa.select(1)) == 1


def make_app(db: Database) -> web.Application:
    async def healthz(request: web.Request) -> web.Response:
        try:
            ok = await asyncio.to_thread(_db_ok, db)
        except Exception as exc:
            return web.json_response({"status": "error", "database": str(exc)}, status=503)
        return web.json_response({"status": "ok" if ok else "error"}, status=200 if ok else 503)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    return app
