"""Settings of the Django recipe: the least a project needs, plus dedupe's Redis URL.

export DEDUPE_REDIS_URL=redis://127.0.0.1:6379/0
gunicorn --chdir examples/recipes -c examples/recipes/django_site/gunicorn.conf.py
"""

from __future__ import annotations

import os

# Read from the environment like any secret; the fallback only serves this recipe.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "recipe-only-not-a-secret")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "django_site.urls"
INSTALLED_APPS: list[str] = []
MIDDLEWARE: list[str] = []
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True

# dedupe's settings, read once by django_site/flights.py.
DEDUPE_REDIS_URL = os.environ["DEDUPE_REDIS_URL"]
DEDUPE_PREFIX = "recipes"
