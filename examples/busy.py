"""A small CPU-bound service stand-in for `cargo xtask demo`.

Three kinds of work in a loop: JSON encoding, a pure-Python prime sieve and
SHA-256 hashing (which releases the GIL), the last one in its own thread.
"""
import hashlib
import json
import threading
import time


def encode_orders(n):
    orders = [{"id": i, "items": list(range(i % 7)), "note": "ok"} for i in range(n)]
    return json.dumps(orders)


def sieve(limit):
    flags = [True] * limit
    primes = []
    for i in range(2, limit):
        if flags[i]:
            primes.append(i)
            for j in range(i * i, limit, i):
                flags[j] = False
    return primes


def checksum_forever():
    blob = b"pyebpf" * 1_000_000
    while True:
        hashlib.sha256(blob).hexdigest()
        time.sleep(0.01)


def handle_request():
    encode_orders(2000)
    sieve(60_000)


def main():
    threading.Thread(target=checksum_forever, daemon=True).start()
    print("busy.py running; Ctrl-C to stop", flush=True)
    while True:
        handle_request()


if __name__ == "__main__":
    main()
