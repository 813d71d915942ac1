"""The WSGI entry point (gunicorn notify_site.wsgi, uWSGI, and `manage.py runserver` through
WSGI_APPLICATION). The PyStrands client starts here, so it runs only in processes that serve
requests: not in `manage.py migrate` or `shell`, not in runserver's file-watching process."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "notify_site.settings")
application = get_wsgi_application()

from notifications.broker import start  # noqa: E402  (needs the settings loaded above)

start()
