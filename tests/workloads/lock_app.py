"""WSGI app for pyebpf's off-CPU tests: under gunicorn's gthread workers, a
request to /hold takes a lock and keeps it HOLD seconds; a request to /wait
blocks on that lock until the holder lets it go. Lines marked `# WAIT:<name>`
are where a handler spends its time; tests read the markers from this file.
"""
import threading
import time

HOLD = 0.2
LOCK = threading.Lock()


def hold():
    with LOCK:
        time.sleep(HOLD)  # WAIT:hold
    return b"held\n"


def wait():
    LOCK.acquire()  # WAIT:handler
    LOCK.release()
    return b"got it\n"


def app(environ, start_response):
    path = environ.get("PATH_INFO", "")
    body = {"/hold": hold, "/wait": wait}.get(path, lambda: b"ok\n")()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
