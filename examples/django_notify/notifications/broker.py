"""The process's one PyStrands client: the backend that admits browsers into rooms and that the
views send through."""

import threading

from django.conf import settings

from pystrands import PyStrandsClient


class Notifier(PyStrandsClient):
    def on_connection_request(self, request):
        request.context.room_id = request.url.strip("/") or "lobby"
        return True


notifier = Notifier(settings.PYSTRANDS_HOST, settings.PYSTRANDS_PORT)  # connects in start()
_lock = threading.Lock()
_started = False


def start():
    """Runs the client in a daemon thread (once per process, however often it is called): it
    connects, reconnects with backoff, and ends with the process."""
    global _started
    with _lock:
        if _started:
            return
        _started = True
    threading.Thread(target=notifier.run_forever, name="pystrands", daemon=True).start()
