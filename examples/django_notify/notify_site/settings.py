"""Settings of the Django notifications example: the smallest project that serves the views of
the `notifications` app (no database, no templates). Where the broker's backend port is comes
from the environment, as it would in production."""

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "only-for-this-example")
DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
ALLOWED_HOSTS = ["localhost", "127.0.0.1"]
INSTALLED_APPS = ["notifications"]
MIDDLEWARE = ["django.middleware.common.CommonMiddleware", "django.middleware.csrf.CsrfViewMiddleware"]
ROOT_URLCONF = "notify_site.urls"
WSGI_APPLICATION = "notify_site.wsgi.application"  # also what runserver serves
DATABASES = {}  # none needed: the views only send messages
USE_TZ = True

# The PyStrands broker's backend port (pystrands-broker --tcp-port).
PYSTRANDS_HOST = os.environ.get("PYSTRANDS_BROKER_HOST", "localhost")
PYSTRANDS_PORT = int(os.environ.get("PYSTRANDS_BROKER_PORT", "8081"))
# The token other services present to POST /rooms/<room>/notify (empty: every call is refused).
NOTIFY_API_TOKEN = os.environ.get("NOTIFY_API_TOKEN", "")
