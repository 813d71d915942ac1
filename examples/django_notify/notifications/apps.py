"""Starts the PyStrands client once in each process that serves requests, when Django has loaded
the apps."""

import os
import sys
from pathlib import Path

from django.apps import AppConfig


def serving():
    """True under a WSGI server (gunicorn, uWSGI, ...: in each worker, after the fork) and in the
    process of `manage.py runserver` that serves; False for other management commands (migrate,
    shell, ...) and for the process of runserver that only watches files for changes."""
    if Path(sys.argv[0]).name != "manage.py":
        return True
    if sys.argv[1:2] != ["runserver"]:
        return False
    return os.environ.get("RUN_MAIN") == "true" or "--noreload" in sys.argv


class NotificationsConfig(AppConfig):
    name = "notifications"

    def ready(self):
        if serving():
            from .broker import start

            start()
