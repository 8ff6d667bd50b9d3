"""`listserv inject`: hand a message to intake as if it had arrived by SMTP."""

from __future__ import annotations

from typing import BinaryIO

import click

from listserv import addresses, mail, replies
from listserv.cli.app import App, pass_app
from listserv.errors import NotFound
from listserv.pipeline.auth import Authenticator
from listserv.smtp_in import intake


@click.command()
@click.argument("address", metavar="LIST")
@click.argument("file", type=click.File("rb"))
@click.option(
    "--sender", default=None, metavar="ADDR", help="Envelope sender. Default: the From: address."
)
@pass_app
def inject(app: App, address: str, file: BinaryIO, sender: str | None) -> None:
    """Queue a message as if it had arrived by SMTP.

    FILE ('-': stdin) goes through the same checks as mail sent to LIST from
    the network (posting policy, size, loops, a header section with a From:
    address). Prints the SMTP reply; exit status 0 on 250, else 1 with the
    reply as the error.

    \b
    Example:
      listserv inject staff@lists.example.org announcement.eml --sender boss@example.org
    """
    raw = file.read()
    limit = app.settings.server.max_message_size
    if len(raw) > limit:
        raise click.ClickException(f"{replies.TOO_BIG} ({len(raw)} bytes, limit {limit})")
    if isinstance(intake.resolve(app.db, address), replies.Reply):
        raise NotFound(f"no such list: {address}")
    if sender is None:
        # No From: address: intake refuses the post (550 5.6.0) with the reason.
        found = mail.addresses(mail.parse(raw), "From")
        sender = found[0] if found else ""
    envelope = intake.Envelope(
        mail_from=addresses.normalize(sender) if sender else "",
        rcpt_tos=(address,),
        content=raw,
        peer="listserv inject",
    )
    outcome = intake.receive(
        app.db,
        envelope,
        policy=app.settings.policy,
        authenticator=Authenticator.from_settings(app.settings),
    )
    if outcome.reply.code != 250:
        hint = ""
        if outcome.reply.enhanced == replies.UNDELIVERABLE.enhanced:
            hint = " (--sender sets only the envelope sender; the message needs its own From:)"
        elif outcome.reply.enhanced == replies.NOT_ALLOWED.enhanced:
            hint = (
                " (--sender sets only the envelope sender, which never authorizes a post:"
                " the From: or Sender: header must name someone allowed to post)"
            )
        raise click.ClickException(f"{outcome.reply}{hint}")
    click.echo(str(outcome.reply))
    for target, state in outcome.posts.items():
        click.echo(f"post to {target}: {state.value}")
