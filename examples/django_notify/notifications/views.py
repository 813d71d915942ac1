"""The views: any view, signal handler or task of the process sends through the one client."""

import hmac

from django.conf import settings
from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from .broker import notifier


def authorized(request):
    """The caller presents the shared token: `Authorization: Bearer <NOTIFY_API_TOKEN>`."""
    expected = f"Bearer {settings.NOTIFY_API_TOKEN}".encode()
    given = request.headers.get("Authorization", "").encode()
    return bool(settings.NOTIFY_API_TOKEN) and hmac.compare_digest(given, expected)


@csrf_exempt  # an API for your other services (no browser form): the token authenticates them
@require_POST
def notify(request, room):
    if not authorized(request):
        return JsonResponse({"error": "unauthorized"}, status=401)
    # Queued by the client and written as soon as it is connected (buffered while the broker is away).
    notifier.send_room_message(room, request.body.decode())
    return JsonResponse({"queued": True}, status=202)
