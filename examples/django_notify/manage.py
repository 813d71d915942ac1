"""Django's command-line entry point for the notifications example: `python manage.py runserver`."""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "notify_site.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
