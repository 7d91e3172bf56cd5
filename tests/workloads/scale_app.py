"""WSGI app for the gunicorn soak of `cargo xtask bench --scale`.

Handlers do varied Python work: JSON, hashing, generators, exceptions and
recursion of varying depth, so the profiles hold many distinct stacks.
"""
import hashlib
import json
import random


class AppError(Exception):
    pass


def render_json(n):
    doc = {"items": [{"id": i, "name": f"item-{i}", "tags": ["a", "b", str(i % 7)]}
                     for i in range(n)]}
    return json.loads(json.dumps(doc))["items"][-1]["name"].encode()


def digest(n):
    h = hashlib.sha256()
    for i in range(n):
        h.update(str(i).encode())
    return h.hexdigest().encode()


def evens(n):
    for i in range(n):
        if i % 2 == 0:
            yield i * i


def squares(n):
    return str(sum(x for x in evens(n) if x % 3)).encode()


def fragile(i):
    if i % 5 == 0:
        raise AppError(i)
    return i


def failing(n):
    caught = 0
    for i in range(n):
        try:
            fragile(i)
        except AppError:
            caught += 1
    return str(caught).encode()


def descend(depth, work):
    if depth == 0:
        return sum(range(work))
    return descend(depth - 1, work)


def recurse(depth):
    return str(descend(depth, 2000)).encode()


ROUTES = {
    "/json": lambda: render_json(200),
    "/hash": lambda: digest(2000),
    "/gen": lambda: squares(20000),
    "/exc": lambda: failing(2000),
    "/deep": lambda: recurse(random.randint(5, 300)),
}


def app(environ, start_response):
    handler = ROUTES.get(environ.get("PATH_INFO", ""))
    if handler is None:
        start_response("404 Not Found", [("Content-Length", "0")])
        return [b""]
    body = handler()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
