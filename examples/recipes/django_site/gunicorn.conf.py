"""gunicorn settings of the Django recipe (BIND, or -b, sets the address):

gunicorn --chdir examples/recipes -c examples/recipes/django_site/gunicorn.conf.py
"""

import os

wsgi_app = "django_site.wsgi"
bind = os.environ.get("BIND", "127.0.0.1:8000")
workers = 2
worker_class = "gthread"  # each worker serves requests on threads: they share flights too
threads = 8
# The master imports the app (and builds the SingleFlight) once, then forks the workers.
preload_app = True
timeout = 30
graceful_timeout = 10
