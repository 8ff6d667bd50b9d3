"""E-mail commands and subscriptions (-request, -join, -leave, -confirm).

Comes with the subscriptions issue; until then such mail is stored, pending.
"""

from __future__ import annotations
