#!/usr/bin/env bash
# listserv behind Postfix, for real, on loopback only: the setup of docs/postfix.md.
#
# NOT RUN BY CI. It needs root (Postfix's master runs as root) and the Debian
# package `postfix` (install it without a system instance:
#   echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
#   DEBIAN_FRONTEND=noninteractive apt-get install -y postfix
# ) and `make install` (for .venv). Run from the repository: scripts/postfix_roundtrip.sh
#
# It starts, in a temporary directory, everything on 127.0.0.1:
#   - a private Postfix instance (`postfix -c DIR start`) with
#       * a "public" smtpd (port 25 in production) that relays lists.example.edu to
#         listserv and checks recipients with reject_unverified_recipient,
#       * a second smtpd (10025 in production) that takes listserv's outgoing mail and
#         sends it on, without handing it to listserv again,
#       * transports sending the member domains to a local smtp-sink; every other
#         destination is error: (nothing can leave the machine);
#   - `listserv serve` with [delivery] pointing at that second smtpd;
#   - smtp-sink writing each transaction it receives to a file.
# Then it creates a list, posts into Postfix, and checks that every member's copy
# arrived at the sink via listserv and back through Postfix, DKIM-signed and
# decorated; that Postfix refuses an unknown list address at RCPT with 550; and that
# a post listserv refuses (sender not allowed) comes back to its sender as a bounce
# from Postfix. Exit status 0 when all of that held. Everything is removed at the end
# (KEEP=1 keeps the directory and prints its path).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$ROOT/.venv/bin/python
LISTSERV=$ROOT/.venv/bin/listserv
[ "$(id -u)" = 0 ] || { echo "run as root (Postfix's master must start as root)"; exit 2; }
command -v postfix >/dev/null || { echo "install the postfix package first (see the top of $0)"; exit 2; }
[ -x "$LISTSERV" ] || { echo "run make install first"; exit 2; }

D=$(mktemp -d /tmp/postfix-roundtrip.XXXXXX)
chmod 755 "$D"
LS_PID="" SINK_PID="" DNS_PID=""
cleanup() {
    set +e
    postfix -c "$D/etc" stop >/dev/null 2>&1
    [ -n "$LS_PID" ] && kill "$LS_PID" 2>/dev/null && wait "$LS_PID" 2>/dev/null
    [ -n "$SINK_PID" ] && kill "$SINK_PID" 2>/dev/null && wait "$SINK_PID" 2>/dev/null
    [ -n "$DNS_PID" ] && kill "$DNS_PID" 2>/dev/null && wait "$DNS_PID" 2>/dev/null
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $D"; else rm -rf "$D"; fi
}
trap cleanup EXIT
fail() {
    echo "FAIL: $*"
    echo "--- postfix log (tail)"; tail -n 30 "$D/maillog" 2>/dev/null
    echo "--- listserv log (tail)"; tail -n 30 "$D/listserv.log" 2>/dev/null
    exit 1
}

# Four free loopback ports: Postfix public smtpd, Postfix outbound smtpd, listserv, sink.
read -r P_IN P_OUT LS_PORT SINK_PORT < <("$PY" - <<'EOF'
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
EOF
)
echo "postfix in 127.0.0.1:$P_IN, postfix out 127.0.0.1:$P_OUT, listserv 127.0.0.1:$LS_PORT, sink 127.0.0.1:$SINK_PORT"

mkdir -p "$D/etc" "$D/spool" "$D/data" "$D/sink"
chmod 1777 "$D/sink"   # smtp-sink runs as nobody and must be able to write there
chown postfix "$D/data"

# ---- Postfix ---------------------------------------------------------------------
cat >"$D/etc/main.cf" <<EOF
compatibility_level = 3.6
queue_directory = $D/spool
data_directory = $D/data
maillog_file = $D/maillog
maillog_file_prefixes = $D
myhostname = mx.example.edu
mydomain = example.edu
myorigin = \$mydomain
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtp_dns_support_level = disabled
default_transport = error:this test instance sends nowhere else
relay_transport = error:this test instance sends nowhere else

# --- what docs/postfix.md tells the admin to add -----------------------------
# Mail for the list domain is relayed to listserv.
relay_domains = lists.example.edu
transport_maps = hash:$D/etc/transport
# Ask listserv at RCPT time whether an address exists (it answers 550 for unknown
# ones), so Postfix refuses unknown list addresses instead of bouncing them later.
smtpd_recipient_restrictions = check_recipient_access hash:$D/etc/list_domains
unverified_recipient_reject_code = 550
# refused addresses are remembered; a list created later is found after this
address_verify_negative_refresh_time = 10m
EOF

cat >"$D/etc/transport" <<EOF
# the list domain goes to listserv
lists.example.edu   smtp:[127.0.0.1]:$LS_PORT
# test only: the members' and posters' domains go to the local sink
one.example         smtp:[127.0.0.1]:$SINK_PORT
two.example         smtp:[127.0.0.1]:$SINK_PORT
example.org         smtp:[127.0.0.1]:$SINK_PORT
EOF

cat >"$D/etc/list_domains" <<'EOF'
lists.example.edu   reject_unverified_recipient
EOF

# master.cf: no chroot (the temp queue has no chroot jail), no local delivery.
cat >"$D/etc/master.cf" <<EOF
# the public smtpd (port 25 in production)
127.0.0.1:$P_IN  inet n - n - - smtpd
# listserv's smarthost (127.0.0.1:10025 in production): relays for loopback clients
# only, no recipient checks, filters or milters (listserv has already signed).
127.0.0.1:$P_OUT inet n - n - - smtpd
  -o syslog_name=postfix/from-listserv
  -o mynetworks=127.0.0.0/8
  -o smtpd_relay_restrictions=permit_mynetworks,reject
  -o smtpd_recipient_restrictions=permit_mynetworks,reject
  -o smtpd_client_restrictions=permit_mynetworks,reject
  -o content_filter=
  -o smtpd_milters=
  -o receive_override_options=no_header_body_checks,no_unknown_recipient_checks
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
EOF

postmap -c "$D/etc" "$D/etc/transport" "$D/etc/list_domains"
postfix -c "$D/etc" check || fail "postfix check"

# ---- sink and listserv -----------------------------------------------------------
smtp-sink -u nobody -d "$D/sink/%M." -h sink.example 127.0.0.1:"$SINK_PORT" 100 &
SINK_PID=$!

# an empty DNS server on loopback: listserv's DMARC and SPF look-ups never leave the machine
"$PY" -c '
import sys, time
sys.path.insert(0, sys.argv[1])
from tests.dnsserver import DnsServer
print(DnsServer().start().address, flush=True)
time.sleep(86400)' "$ROOT" >"$D/dns.addr" &
DNS_PID=$!
for _ in $(seq 50); do [ -s "$D/dns.addr" ] && break; sleep 0.1; done

cat >"$D/listserv.toml" <<EOF
[server]
host = "127.0.0.1"
port = $LS_PORT
# the name in listserv's greeting and EHLO (Postfix writes it into Received:)
hostname = "lists.example.edu"

[database]
url = "sqlite:///$D/listserv.db"

[delivery]
host = "127.0.0.1"
port = $P_OUT

[dkim]
keys_dir = "$D/dkim"

[http]
enabled = false

[dns]
nameservers = ["$(cat "$D/dns.addr")"]
EOF
export LISTSERV_CONFIG=$D/listserv.toml
"$LISTSERV" init
"$LISTSERV" lists create staff@lists.example.edu --owner owner@example.org --policy announce
"$LISTSERV" members add staff@lists.example.edu ann@one.example bob@two.example
"$LISTSERV" members add staff@lists.example.edu boss@example.org --role sender
"$LISTSERV" dkim keygen lists.example.edu --selector s2026 >/dev/null
"$LISTSERV" serve >"$D/listserv.log" 2>&1 &
LS_PID=$!

postfix -c "$D/etc" start || fail "postfix start"

wait_port() {
    "$PY" - "$1" <<'EOF' || fail "nothing listens on port $1"
import socket, sys, time
deadline = time.time() + 20
while time.time() < deadline:
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.2)
sys.exit(1)
EOF
}
for p in "$P_IN" "$P_OUT" "$LS_PORT" "$SINK_PORT"; do wait_port "$p"; done

# ---- the checks, as an SMTP client of the public Postfix -----------------------------
P_IN=$P_IN "$PY" - <<'EOF' || fail "SMTP dialogue with Postfix"
import os, smtplib
port = int(os.environ["P_IN"])

# 1. an unknown list address is refused by Postfix at RCPT (it asked listserv)
with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
    s.ehlo("client.example.org")
    s.mail("someone@example.org")
    code, text = s.rcpt("nosuch@lists.example.edu")
    print(f"RCPT nosuch@lists.example.edu -> {code} {text.decode()}")
    assert code == 550, code

# 2. a post by the authorized sender is accepted by Postfix (then relayed to listserv)
msg = ("From: boss@example.org\r\nTo: staff@lists.example.edu\r\n"
       "Subject: Budget\r\nMessage-ID: <budget-1@example.org>\r\n\r\n"
       "The budget is approved.\r\n")
with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
    s.ehlo("client.example.org")
    s.mail("boss@example.org")
    code, text = s.rcpt("staff@lists.example.edu")
    print(f"RCPT staff@lists.example.edu -> {code} {text.decode()}")
    assert code == 250, code
    code, text = s.data(msg)
    print(f"DATA -> {code} {text.decode()}")
    assert code == 250, code

# 3. a post by someone who may not post: Postfix accepts it (it cannot know),
#    listserv refuses it with 550 5.7.1, Postfix bounces it to the sender
msg = ("From: mallory@example.org\r\nTo: staff@lists.example.edu\r\n"
       "Subject: Spam\r\n\r\nBuy now.\r\n")
with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
    s.sendmail("mallory@example.org", ["staff@lists.example.edu"], msg)
print("post by mallory@example.org accepted by Postfix")
EOF

# Wait for the two members' copies and the bounce to mallory at the sink.
"$PY" - "$D/sink" <<'EOF' || fail "the sink did not receive what it should"
import pathlib, sys, time
from email import message_from_bytes, policy
sink = pathlib.Path(sys.argv[1])
deadline = time.time() + 60
while time.time() < deadline:
    rcpts, files = {}, sorted(sink.iterdir())
    for f in files:
        data = f.read_bytes()
        for line in data.splitlines():
            if line.startswith(b"X-Rcpt-Args: "):
                rcpts[line.split()[1].decode().strip("<>")] = data
    if {"ann@one.example", "bob@two.example", "mallory@example.org"} <= set(rcpts):
        break
    time.sleep(0.5)
else:
    sys.exit(f"sink holds only {sorted(rcpts)}")
for who in ("ann@one.example", "bob@two.example"):
    msg = message_from_bytes(rcpts[who], policy=policy.default)
    received = msg.get_all("Received")
    print(f"{who}: Subject={msg['Subject']!r} List-Id={msg['List-Id']!r} "
          f"DKIM d=lists.example.edu: {'d=lists.example.edu' in str(msg['DKIM-Signature'])}; "
          f"{len(received)} Received headers")
    assert msg["Subject"] == "[staff] Budget", msg["Subject"]
    assert "d=lists.example.edu" in str(msg["DKIM-Signature"])
    mail_from = [l for l in rcpts[who].splitlines() if l.startswith(b"X-Mail-Args: ")]
    assert b"staff-bounces@lists.example.edu" in mail_from[0], mail_from
    # sink <- outbound smtpd (from listserv) <- public smtpd (from the client):
    # listserv adds no Received header, so one pass through listserv is exactly this
    assert len(received) == 3, received
    assert sum(r.startswith("from lists.example.edu ") for r in received) == 1, received
bounce = message_from_bytes(rcpts["mallory@example.org"], policy=policy.default)
print(f"mallory@example.org got: Subject={bounce['Subject']!r} From={bounce['From']!r}")
assert "5.7.1" in bounce.as_string(), "the bounce should quote listserv's 550 5.7.1"
EOF

# Verify the results with the DKIM key (no DNS: dkimpy is given the key).
"$PY" - "$D" <<'EOF' || fail "DKIM verification"
import pathlib, sys
import dkim
from listserv.distribute.dkim import active_key
d = pathlib.Path(sys.argv[1])
txt = active_key(d / "dkim", "lists.example.edu").public_txt().encode()
def dnsfunc(name, timeout=5):
    assert name == b"s2026._domainkey.lists.example.edu.", name
    return txt
n = 0
for f in sorted((d / "sink").iterdir()):
    data = f.read_bytes()
    if b"List-Id" in data:
        # smtp-sink's dump: envelope lines (X-Client-Addr ... X-Rcpt-Args) first, LF endings
        lines = data.replace(b"\r\n", b"\n").split(b"\n")
        while lines[0].startswith(b"X-"):
            lines.pop(0)
        body = b"\r\n".join(lines)
        assert dkim.verify(body, dnsfunc=dnsfunc), f.name
        n += 1
print(f"DKIM signatures verified after the trip through Postfix: {n}")
assert n == 2
EOF

# With listserv down, Postfix cannot verify an address it has not seen yet: it answers
# 450 (try again later), never 550, so no mail is lost to an outage.
kill "$LS_PID"; wait "$LS_PID" || true; LS_PID=""
P_IN=$P_IN "$PY" - <<'EOF' || fail "RCPT while listserv is down"
import os, smtplib
with smtplib.SMTP("127.0.0.1", int(os.environ["P_IN"]), timeout=60) as s:
    s.ehlo("client.example.org")
    s.mail("someone@example.org")
    code, text = s.rcpt("staff-join@lists.example.edu")
    print(f"listserv stopped: RCPT staff-join@lists.example.edu -> {code} {text.decode()}")
    assert 400 <= code < 500, code
EOF

"$LISTSERV" queue status --all
echo "--- listserv log (listserv's own lines)"; grep ' listserv\.' "$D/listserv.log" || true
echo "--- postfix log (status lines)"; grep -E "status=|reject" "$D/maillog" || true
echo "OK: post -> Postfix -> listserv -> Postfix -> members, as in docs/postfix.md"
