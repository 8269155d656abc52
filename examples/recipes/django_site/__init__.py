"""A minimal Django project serving one report view through dedupe (see views.py)."""
