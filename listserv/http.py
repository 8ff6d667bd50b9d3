"""The daemon's HTTP endpoint: GET /healthz, and RFC 8058 one-click unsubscribe.

- ``POST /unsubscribe/TOKEN`` with ``List-Unsubscribe=One-Click`` in the form body
  (urlencoded, as Gmail sends it, or multipart/form-data, as RFC 8058 §3.2
  prefers) takes the member off the list at once and answers 200, again and again
  for the same link. No cookies, no redirect (RFC 8058 §3.2).
- ``GET /unsubscribe/TOKEN`` only shows a page whose button makes that POST: link
  scanners and previewers fetch links, and must never unsubscribe anyone.
- A token that is not one of ours: 400 when it is not a token at all, 404 when
  its MAC does not check or its list is gone; nothing changes. A mandatory list
  refuses with 403 and a polite explanation; the member stays.

Every database step runs in a thread (asyncio.to_thread), never on the loop.
"""

from __future__ import annotations

import asyncio
import html
import logging
from dataclasses import dataclass

import sqlalchemy as sa
from aiohttp import web
from sqlalchemy.orm import Session

from listserv import addresses, members, unsubscribe_links
from listserv.addresses import Kind
from listserv.db import Database
from listserv.errors import ListservError, NotFound
from listserv.models import MailingList, Role

log = logging.getLogger("listserv.http")

#: token URLs must not be kept, indexed or passed on in a Referer
_PRIVATE = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Robots-Tag": "noindex, nofollow",
}


def _db_ok(db: Database) -> bool:
    with db.reading() as session:
        return session.scalar(sa.select(1)) == 1


@dataclass(frozen=True, slots=True)
class Link:
    """What an unsubscribe link names, as plain values for the page."""

    list_address: str
    description: str
    owner_address: str
    address: str
    mandatory: bool
    #: whether the address is a member (before a POST: whether it was)
    member: bool


def _resolve(session: Session, token: str) -> tuple[MailingList, str]:
    secret = unsubscribe_links.stored_secret(session)
    list_id, address = unsubscribe_links.read_token(secret, token)
    mlist = session.get(MailingList, list_id)
    if mlist is None:
        raise NotFound("This unsubscribe link is for a list that no longer exists.")
    return mlist, address


def _link(mlist: MailingList, address: str, member: bool) -> Link:
    return Link(
        list_address=mlist.address,
        description=mlist.description,
        owner_address=addresses.build(mlist.local_part, mlist.domain, Kind.OWNER),
        address=address,
        mandatory=mlist.mandatory,
        member=member,
    )


def look_up(db: Database, token: str) -> Link:
    """What `token` names, changing nothing (GET)."""
    with db.reading() as session:
        mlist, address = _resolve(session, token)
        member = Role.MEMBER in members.roles_of(session, mlist, [address])
        return _link(mlist, address, member)


def unsubscribe(db: Database, token: str) -> Link:
    """Take the member named by `token` off its list (POST). A mandatory list is
    left alone: the Link says so (`mandatory`), and `member` is then unchanged."""
    with db.session() as session:
        mlist, address = _resolve(session, token)
        if mlist.mandatory:
            member = Role.MEMBER in members.roles_of(session, mlist, [address])
            return _link(mlist, address, member)
        was_member = members.unsubscribe(session, mlist, address, via="one-click")
        link = _link(mlist, address, was_member)
    if was_member:
        log.info(
            "one-click: %s left %s",
            address,
            link.list_address,
            extra={"event": "unsubscribed", "list": link.list_address, "via": "one-click"},
        )
    return link


def _page(title: str, body: str, status: int = 200) -> web.Response:
    text = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width">'
        f"<title>{html.escape(title)}</title></head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n"
    )
    return web.Response(text=text, content_type="text/html", status=status, headers=_PRIVATE)


def _plain(text: str, status: int) -> web.Response:
    return web.Response(text=text + "\n", status=status, headers=_PRIVATE)


def _error(exc: ListservError) -> web.Response:
    """404 for a token that does not check or a list that is gone; 400 for what is
    not a token (or anything else we refuse), never a traceback."""
    if isinstance(exc, NotFound):
        return _plain(str(exc), 404)
    return _plain(str(exc), 400)


def _name(link: Link) -> str:
    """ "Description (address)", or the address alone for a list without a description."""
    if not link.description:
        return html.escape(link.list_address)
    return f"{html.escape(link.description)} ({html.escape(link.list_address)})"


def _mandatory_page(link: Link, status: int) -> web.Response:
    return _page(
        "This list cannot be unsubscribed",
        f"<p>{_name(link)} is a mandatory list: "
        "it carries notices everyone it serves must receive, so it has no opt-out. "
        f"You stay subscribed as {html.escape(link.address)}.</p>\n"
        f"<p>Questions go to the list owner: {html.escape(link.owner_address)}.</p>",
        status,
    )


def make_app(db: Database) -> web.Application:
    async def healthz(request: web.Request) -> web.Response:
        try:
            ok = await asyncio.to_thread(_db_ok, db)
        except Exception as exc:
            return web.json_response({"status": "error", "database": str(exc)}, status=503)
        return web.json_response({"status": "ok" if ok else "error"}, status=200 if ok else 503)

    async def confirm_page(request: web.Request) -> web.Response:
        try:
            link = await asyncio.to_thread(look_up, db, request.match_info["token"])
        except ListservError as exc:
            return _error(exc)
        if link.mandatory:
            return _mandatory_page(link, 200)
        if not link.member:
            return _page(
                "Not subscribed",
                f"<p>{html.escape(link.address)} is not subscribed to {_name(link)}.</p>",
            )
        # no action attribute: the form posts back to this very URL, whatever
        # prefix a proxy in front of us serves it under
        return _page(
            "Unsubscribe",
            f"<p>Unsubscribe {html.escape(link.address)} from {_name(link)}?</p>\n"
            '<form method="post">'
            '<input type="hidden" name="List-Unsubscribe" value="One-Click">'
            '<button type="submit">Unsubscribe</button></form>',
        )

    async def one_click(request: web.Request) -> web.Response:
        try:
            form = await request.post()
        except ValueError:
            return _plain("The request body is not a form.", 400)
        if form.get("List-Unsubscribe") != "One-Click":
            return _plain("Expected List-Unsubscribe=One-Click in the form body (RFC 8058).", 400)
        try:
            link = await asyncio.to_thread(unsubscribe, db, request.match_info["token"])
        except ListservError as exc:
            return _error(exc)
        if link.mandatory:
            return _mandatory_page(link, 403)
        return _page(
            "Unsubscribed",
            f"<p>{html.escape(link.address)} is no longer subscribed to {_name(link)}.</p>",
        )

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/unsubscribe/{token}", confirm_page)
    app.router.add_post("/unsubscribe/{token}", one_click)
    return app
