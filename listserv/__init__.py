"""listserv: a mailing-list server (SMTP in, posting policy, DKIM, batched delivery)."""

from __future__ import annotations

__version__ = "0.1.0"
