"""Python's process pools on procpool's benchmark workloads (fork, 2 workers).

Usage: python3 bench/py/pools.py WORKLOAD...  -> one JSON object on stdout.
Workloads mirror bench/*.lua exactly; see bench/README.md.
"""
import json
import multiprocessing as mp
import sys
import time
from concurrent.futures import ProcessPoolExecutor

CTX = mp.get_context("fork")
W = 2


def noop(x=None):
    return x


def echo(x):
    return x


def spin(n):
    s = 0
    for i in range(n):
        s += i * i % 7
    return s


def best(fn, reps=3):
    fn()
    t = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        t = min(t, time.perf_counter() - t0)
    return t


def executor_pipelined(n=20000):
    with ProcessPoolExecutor(W, mp_context=CTX) as ex:
        ex.submit(noop).result()

        def run():
            fs = [ex.submit(noop) for _ in range(n)]
            for f in fs:
                f.result()
        return n / best(run)


def executor_sequential(n=2000):
    with ProcessPoolExecutor(W, mp_context=CTX) as ex:
        ex.submit(noop).result()

        def run():
            for _ in range(n):
                ex.submit(noop).result()
        return best(run) / n * 1e6


def executor_map(n=200000):
    items = list(range(n))
    with ProcessPoolExecutor(W, mp_context=CTX) as ex:
        ex.submit(noop).result()
        return n / best(lambda: list(ex.map(noop, items)), reps=1)


def pool_map(n=200000):
    items = list(range(n))
    with CTX.Pool(W) as p:
        p.map(noop, range(10))
        return n / best(lambda: p.map(noop, items))


def pool_imap_unordered(n=200000, chunksize=1000):
    items = list(range(n))
    with CTX.Pool(W) as p:
        p.map(noop, range(10))
        return n / best(lambda: list(p.imap_unordered(noop, items, chunksize)))


def pool_apply_async(n=20000):
    with CTX.Pool(W) as p:
        p.map(noop, range(10))

        def run():
            rs = [p.apply_async(noop, (i,)) for i in range(n)]
            for r in rs:
                r.get()
        return n / best(run)


def echo_64mib():
    data = b"x" * (64 << 20)
    with ProcessPoolExecutor(W, mp_context=CTX) as ex:
        ex.submit(noop).result()
        t = best(lambda: ex.submit(echo, data).result(), reps=3)
        return 64 / t  # MiB/s


def cpu_speedup(n=8, work=2000000):
    def run(w):
        with ProcessPoolExecutor(w, mp_context=CTX) as ex:
            ex.submit(noop).result()
            t0 = time.perf_counter()
            list(ex.map(spin, [work] * n))
            return time.perf_counter() - t0
    # a virtual CPU's speed drifts: alternate, keep the best of each
    t1 = t2 = float("inf")
    for _ in range(3):
        t1 = min(t1, run(1))
        t2 = min(t2, run(2))
    return t1 / t2


WORKLOADS = {k: v for k, v in globals().items() if callable(v) and k not in (
    "best", "noop", "echo", "spin", "ProcessPoolExecutor")}

if __name__ == "__main__":
    out = {}
    for name in sys.argv[1:]:
        out[name] = WORKLOADS[name]()
    print(json.dumps(out))
