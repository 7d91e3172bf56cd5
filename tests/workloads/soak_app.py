"""WSGI app for `cargo xtask soak`: gunicorn gthread workers whose handlers
create and drop frames fast (generators, exceptions, short-lived threads,
JSON, hashing, gc.collect), the shapes most likely to catch a stack walker
reading a frame while CPython frees it.

Each handler's busy line carries a `# HOT:name` marker: the soak checks that
the profile shows `name (.../soak_app.py:LINE)` at exactly that line.
"""
import gc
import hashlib
import json
import threading


class Bounce(Exception):
    pass


def gen_items(n):
    for i in range(n):
        yield i * i


def gen(n=1000):
    total = 0
    for _ in range(4):
        total += sum(x for x in gen_items(n) if x % 3)  # HOT:gen
    return total


def fragile(i):
    if i % 2:
        raise Bounce(i)
    return i


def exc(n=3000):
    caught = 0
    for i in range(n):
        try:
            fragile(i)  # HOT:exc
        except Bounce:
            caught += 1
    return caught


def spin(n, out, k):
    out[k] = sum(i * i for i in range(n))  # HOT:threads


def threads(n=6):
    out = [0] * n
    ts = [threading.Thread(target=spin, args=(3000, out, k)) for k in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(out)


def encode(n=150):
    doc = {"items": [{"id": i, "name": f"item-{i}", "tags": ["a", str(i % 7)]}
                     for i in range(n)]}
    return len(json.loads(json.dumps(doc))["items"])  # HOT:json


def digest(n=3000):
    h = hashlib.sha256()
    for i in range(n):
        h.update(str(i).encode())  # HOT:hash
    return h.hexdigest()


def collect():
    junk = [[object() for _ in range(20)] for _ in range(200)]
    for a, b in zip(junk, junk[1:]):
        a.append(b)
    junk[-1].append(junk[0])
    del junk
    return gc.collect(1)  # HOT:gc


ROUTES = {
    "/gen": gen,
    "/exc": exc,
    "/threads": threads,
    "/json": encode,
    "/hash": digest,
    "/gc": collect,
}


def app(environ, start_response):
    handler = ROUTES.get(environ.get("PATH_INFO", ""))
    if handler is None:
        start_response("404 Not Found", [("Content-Length", "0")])
        return [b""]
    body = str(handler()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
