"""``python -m maas_worker`` is the ``maas-worker`` command."""

from __future__ import annotations

from maas_worker.cli import main

raise SystemExit(main())
