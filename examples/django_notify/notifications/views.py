"""The views: any view, signal handler or task of the process sends through the one client."""

from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from .broker import notifier


@csrf_exempt  # called by other services, not by a form of this site
@require_POST
def notify(request, room):
    notifier.send_room_message(room, request.body.decode())
    return JsonResponse({"sent": True})
