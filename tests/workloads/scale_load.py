"""Bounded HTTP load for the gunicorn soak of `cargo xtask bench --scale`.

Usage: scale_load.py TAG PORT THREADS RATE SECONDS

THREADS threads share RATE requests per second (each paced on its own
schedule; a late thread does not catch up), over keep-alive connections to
127.0.0.1:PORT, cycling through the app's routes. Prints "ready" at once and
"done REQUESTS ERRORS" at the end.
"""
import http.client
import sys
import threading
import time

ROUTES = ["/json", "/hash", "/gen", "/exc", "/deep"]


def worker(port, interval, until, counts, k):
    conn = None
    n = k
    next_at = time.monotonic()
    while time.monotonic() < until:
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", ROUTES[n % len(ROUTES)])
            resp = conn.getresponse()
            resp.read()
            counts[k][0 if resp.status == 200 else 1] += 1
        except (OSError, http.client.HTTPException):
            counts[k][1] += 1
            conn = None
        n += 1
        next_at = max(next_at + interval, time.monotonic())
        time.sleep(max(0.0, next_at - time.monotonic()))


def main(args):
    port, threads, rate, seconds = int(args[1]), int(args[2]), float(args[3]), float(args[4])
    print("ready", flush=True)
    until = time.monotonic() + seconds
    counts = [[0, 0] for _ in range(threads)]
    ts = [threading.Thread(target=worker, args=(port, threads / rate, until, counts, k))
          for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    print(f"done {sum(c[0] for c in counts)} {sum(c[1] for c in counts)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
