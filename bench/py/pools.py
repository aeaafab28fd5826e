"""Python's process pools on procpool's benchmark workloads (fork, 2 workers).

Usage: python3 bench/py/pools.py WORKLOAD...  -> one JSON object on stdout.
Workloads mirror bench/*.lua exactly; see bench/README.md.
"""
import gc
import json
import multiprocessing as mp
import os
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


def executor_map_chunked(n=200000, chunksize=1000):
    items = list(range(n))
    with ProcessPoolExecutor(W, mp_context=CTX) as ex:
        ex.submit(noop).result()
        return n / best(lambda: list(ex.map(noop, items, chunksize=chunksize)))


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


# Makespan (bench/makespan.lua): the wall time from the first submit to the
# last result of sleeps of heterogeneous durations, median of 3 runs after
# a warm-up.

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def pending_bytes(n=100000):
    """RSS per pending no-op Future behind a worker blocked on a pipe."""
    r, w = os.pipe()
    ex = ProcessPoolExecutor(1, mp_context=CTX)
    ex.submit(noop).result()
    ex.submit(os.read, r, 1)
    gc.collect()
    r0 = rss()
    fs = [ex.submit(noop) for _ in range(n)]
    gc.collect()
    per = (rss() - r0) / n
    ex.shutdown(wait=False, cancel_futures=True)
    os.write(w, b"x")
    ex.shutdown(wait=True)
    del fs
    return per


def median(fn, reps=3, setup=None):
    ts = []
    for k in range(reps + 1):
        if setup:
            setup()
        t0 = time.perf_counter()
        fn()
        if k:
            ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[reps // 2] if reps % 2 else (ts[reps // 2 - 1] + ts[reps // 2]) / 2


def heavy_tail(n=200, seed=3):
    """The durations of bench/makespan.lua: the same LCG, the same Pareto
    (scale 1 ms, shape 0.9, capped at 300 ms), in whole microseconds."""
    s, ds = seed, []
    for _ in range(n):
        s = (s * 1103515245 + 12345) % 2147483648
        us = int(1000 * (1 - s / 2147483648) ** (-1 / 0.9))
        ds.append(min(us, 300000) / 1e6)
    return ds


ADVERSARIAL = [0.5] + [0.002] * 200
ORDER = [0.5, 0.001, 0.001, 0.001]
N_BURST = 2000


def submit_all(ex, ds):
    fs = [ex.submit(time.sleep, d) for d in ds]
    for f in fs:
        f.result()


def ex_burst(ex):
    def run():
        fs = [ex.submit(noop, i) for i in range(N_BURST)]
        for f in fs:
            f.result()
    return run


def pool_burst(p):
    def run():
        rs = [p.apply_async(noop, (i,)) for i in range(N_BURST)]
        for r in rs:
            r.get()
    return run


def makespan_heavy_work():
    return sum(heavy_tail())  # checked against Lua's sequence


def makespan_heavy_submit():
    ds = heavy_tail()
    with ProcessPoolExecutor(W, mp_context=CTX) as ex:
        ex.submit(noop).result()
        return median(lambda: submit_all(ex, ds))


def makespan_adv_submit():
    with ProcessPoolExecutor(W, mp_context=CTX) as ex:
        ex.submit(noop).result()
        return median(lambda: submit_all(ex, ADVERSARIAL), setup=ex_burst(ex))


def makespan_heavy_map():
    ds = heavy_tail()
    with CTX.Pool(W) as p:
        p.map(noop, range(10))
        return median(lambda: p.map(time.sleep, ds))


def makespan_heavy_imap():
    ds = heavy_tail()
    with CTX.Pool(W) as p:
        p.map(noop, range(10))
        return median(lambda: list(p.imap_unordered(time.sleep, ds, 1)))


def makespan_adv_map():
    with CTX.Pool(W) as p:
        p.map(noop, range(10))
        return median(lambda: p.map(time.sleep, ADVERSARIAL), setup=pool_burst(p))


def makespan_adv_imap():
    with CTX.Pool(W) as p:
        p.map(noop, range(10))
        return median(lambda: list(p.imap_unordered(time.sleep, ADVERSARIAL, 1)),
                      setup=pool_burst(p))


def sleep_and_return(d):
    time.sleep(d)
    return d


def makespan_slow_last(reps=3):
    """Runs (of reps) in which imap_unordered(f, [0.5, 1 ms x 3], 1) right
    after a burst yields the slow item last."""
    with CTX.Pool(W) as p:
        p.map(noop, range(10))
        k = 0
        for _ in range(reps):
            pool_burst(p)()
            k += list(p.imap_unordered(sleep_and_return, ORDER, 1))[-1] == ORDER[0]
        return k


WORKLOADS = {k: v for k, v in globals().items() if callable(v) and k not in (
    "best", "noop", "echo", "spin", "ProcessPoolExecutor", "median", "heavy_tail",
    "submit_all", "ex_burst", "pool_burst", "rss", "sleep_and_return")}

if __name__ == "__main__":
    out = {}
    for name in sys.argv[1:]:
        out[name] = WORKLOADS[name]()
    print(json.dumps(out))
