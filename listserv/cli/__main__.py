"""``python -m listserv.cli``: the same as the ``listserv`` script."""

from __future__ import annotations

from listserv.cli import main

if __name__ == "__main__":
    main()
