"""The project's one SingleFlight, built from settings. With gunicorn's preload_app the master
imports it before forking: dedupe connects only on first use, and a forked worker starts with
its own connections and threads."""

from __future__ import annotations

from django.conf import settings

from dedupe import SingleFlight

flights = SingleFlight(settings.DEDUPE_REDIS_URL, prefix=settings.DEDUPE_PREFIX)
