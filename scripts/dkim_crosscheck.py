#!/usr/bin/env python3
"""Cross-check our DKIM signatures with an independent verifier (Perl Mail::DKIM).

The test suite verifies with dkimpy; this script renders sample posts through
listserv's real pipeline (decorate + our own signer), shared and personalized
(copies on the fast path, hashed once per post, and full renders), with
relaxed/relaxed and simple/simple, then asks Perl's Mail::DKIM (Debian:
libmail-dkim-perl) to verify each one, serving our public key in place of DNS,
as the quoted strings of the zone-file line `listserv dkim keygen` prints. It
also checks that tampered copies fail: a changed body, and an extra From,
Subject or List-Unsubscribe added above or below the signed ones (oversigning:
h= names each once more than it occurs). Offline; prints one line per message
and exits non-zero on any mismatch.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from listserv.distribute import dkim, prepare
from listserv.models import DeliveryMode

VERIFY_PL = r"""
use strict; use warnings;
use Mail::DKIM::Verifier; use Net::DNS;
my $record = shift @ARGV;
my @strings = $record =~ /"([^"]*)"/g;
no warnings 'redefine';
*Mail::DKIM::DNS::query_async = sub {
  my ($host, $type, %args) = @_;
  my $rr = Net::DNS::RR->new(name => $host, type => 'TXT', txtdata => [@strings]);
  my $result = $args{Callbacks}{Success}->($rr);
  return sub { $result };
};
for my $file (@ARGV) {
  my $v = Mail::DKIM::Verifier->new();
  open my $fh, '<', $file or die; binmode $fh; $v->load($fh); close $fh;
  print $v->result, "\n";
}
"""

SAMPLES = {
    "plain-8bit": (
        b"From: Boss <boss@example.org>\r\nTo: staff@lists.example.org\r\n"
        b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= and a long subject that needs folding when "
        b"the prefix is added to it\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        b"Sch\xc3\xb6ne Gr\xc3\xbc\xc3\x9fe.\r\n"
    ),
    "alternative": (
        b"From: boss@example.org\r\nSubject: Hi\r\nMIME-Version: 1.0\r\nContent-Type: "
        b'multipart/alternative; boundary="b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n'
        b"Hello.\r\n--b\r\nContent-Type: text/html\r\n\r\n<html><body>Hello</body></html>\r\n"
        b"--b--\r\n"
    ),
    "no-headers-to-speak-of": b"From: boss@example.org\r\n\r\nbody only\r\n",
    "trailing-space-and-blank-lines": (
        b"From: boss@example.org\r\nSubject:   spaced\t out  \r\n\r\n"
        b"text with trailing space   \r\n\t\r\n\r\n\r\n"
    ),
}
#: One recipient per path: the first two take the fast path, the others a full render.
RECIPIENTS = ("ann@one.example", "bob.smith+lists@two.example", "zoë@three.example")


def main() -> int:
    if (
        not shutil.which("perl")
        or subprocess.run(
            ["perl", "-MMail::DKIM::Verifier", "-e", "1"], capture_output=True
        ).returncode
    ):
        print("Perl Mail::DKIM is not installed (Debian: apt-get install libmail-dkim-perl)")
        return 2
    work = Path(tempfile.mkdtemp(prefix="dkim-crosscheck-"))
    key = dkim.generate_key(work / "keys", "lists.example.org", "s1", 2048)
    view = prepare.ListView(
        name="staff",
        domain="lists.example.org",
        list_id="staff.lists.example.org",
        description="Staff · Köln",
        subject_prefix="[staff]",
        footer="",
        delivery_mode=DeliveryMode.SHARED,
    )
    personal = dataclasses.replace(view, delivery_mode=DeliveryMode.PERSONALIZED)
    messages: list[tuple[str, bytes]] = []
    canons: tuple[dkim.Canonicalization, ...] = ("relaxed", "simple")
    for canon in canons:
        signer = dkim.Signer(key, header_canon=canon, body_canon=canon)
        for name, raw in SAMPLES.items():
            messages.append((f"{name} {canon} shared", prepare.render(raw, view, signer)))
            personalizer = prepare.Personalizer(prepare.render(raw, personal, None), personal)
            assert personalizer.signing_template(signer) is not None
            for rcpt in RECIPIENTS:
                path = "fast" if personalizer.fits_fast_path(rcpt) else "full render"
                [copy] = personalizer.render_all([rcpt], signer)
                messages.append((f"{name} {canon} personalized {path} {rcpt}", copy))
    files: list[tuple[str, Path, str]] = []
    for n, (name, signed) in enumerate(messages):
        good = work / f"{n}.eml"
        good.write_bytes(signed)
        files.append((name, good, "pass"))
        head, sep, body = signed.partition(b"\r\n\r\n")
        tampered = {
            "body changed": head + sep + b"X" + body,
            "From prepended": b"From: mallory@example.com\r\n" + signed,
            "Subject appended": head + b"\r\nSubject: [staff] urgent" + sep + body,
            "List-Unsubscribe prepended": b"List-Unsubscribe: <https://evil.example/>\r\n" + signed,
        }
        for i, (how, data) in enumerate(tampered.items()):
            bad = work / f"{n}-tampered-{i}.eml"
            bad.write_bytes(data)
            files.append((f"{name} ({how})", bad, "fail"))
    script = work / "verify.pl"
    script.write_text(VERIFY_PL)
    out = subprocess.run(
        ["perl", str(script), key.dns_record(), *(str(f) for _, f, _ in files)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    failures = 0
    for (name, _, expected), got in zip(files, out, strict=True):
        ok = got == expected
        failures += not ok
        print(f"{'ok ' if ok else 'BAD'} {name}: Mail::DKIM says {got}, expected {expected}")
    shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
