"""How many TinyGSM completions per second the reward verifies, isolated, on this machine.

Compares ``reward.score_batch`` (warm sandbox pool: one fork per snippet) with the naive way, one fresh
``python -c`` interpreter per snippet, run as many at a time as there are cores. The tests assert no
throughput (a busy runner would fail them); this is where it is measured. Usage:

    .venv/bin/python bench/sandbox.py [--n 500] [--baseline 100]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from echochamber.formats import extract_function
from echochamber.reward import compare, score_batch
from echochamber.sandbox import SandboxPool

ITEMS = ["eggs", "apples", "cookies", "marbles", "stickers", "pencils", "books", "cupcakes"]
NAMES = ["Janet", "Tom", "Maria", "Ali", "Chen", "Priya", "Lucas", "Emma"]


def completion(rng: random.Random) -> tuple[str, str, bool]:
    """A TinyGSM-style completion (question docstring, named variables, ``result``), its gold answer,
    and whether it is correct."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start, used, given, price = rng.randint(20, 90), rng.randint(1, 9), rng.randint(1, 9), rng.randint(2, 12)
    half = rng.random() < 0.2                            # some answers are floats
    lines = [
        "def simple_math_problem() -> int:",
        '    """',
        f"    {name} has {start} {item}. {name} uses {used} and gives away {given}. "
        f"Each remaining one sells for ${price}{' and half of the money is saved' if half else ''}. "
        "How much money is that?",
        '    """',
        f"    {item}_start = {start}",
        f"    {item}_used = {used}",
        f"    {item}_given = {given}",
        f"    {item}_left = {item}_start - {item}_used - {item}_given",
        f"    price_per_{item[:-1]} = {price}",
        f"    money = {item}_left * price_per_{item[:-1]}",
    ]
    lines.append("    result = money / 2" if half else "    result = money")
    lines.append("    return result")
    value = (start - used - given) * price
    gold = value / 2 if half else value
    correct = rng.random() > 0.3                          # a wrong completion now and then
    if not correct:
        lines[-2] += " + 1"
    return "\n".join(lines) + "\n", f"{gold:g}", correct


def naive(text: str, gold: str) -> bool:
    """Verify with one fresh interpreter per snippet."""
    fn = extract_function(text)
    code = f"{fn.source}\nprint({fn.name}())\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=10,
                         env={}, stdin=subprocess.DEVNULL)
    answer = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    return compare(gold, answer)[0]


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--baseline", type=int, default=100, help="snippets for the python -c baseline")
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    rng = random.Random(0)
    texts, golds, truth = zip(*(completion(rng) for _ in range(args.n)))

    cpu0 = cpu_seconds()
    with SandboxPool(workers=cores) as pool:
        score_batch(texts[:cores * 4], golds[:cores * 4], pool=pool)          # warm up the workers
        start = time.perf_counter()
        verdicts = score_batch(texts, golds, pool=pool)
        pooled = time.perf_counter() - start
        isolation = pool.isolation
    pooled_cpu = cpu_seconds() - cpu0                   # caller + workers + children (workers reaped)
    assert [v.correct for v in verdicts] == list(truth), "scores disagree with the truth"

    sub = list(zip(texts, golds))[: args.baseline]
    cpu0, start = cpu_seconds(), time.perf_counter()
    with ThreadPoolExecutor(cores) as ex:
        naive_ok = list(ex.map(lambda tg: naive(*tg), sub))
    fresh, fresh_cpu = time.perf_counter() - start, cpu_seconds() - cpu0
    assert naive_ok == [v.correct for v in verdicts[: len(sub)]]

    rate, naive_rate = args.n / pooled, len(sub) / fresh
    cpu_ms, naive_cpu_ms = pooled_cpu / (args.n + cores * 4) * 1e3, fresh_cpu / len(sub) * 1e3
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{cores} cores (os.cpu_count()={os.cpu_count()}), load average {os.getloadavg()[0]:.1f}")
    print(f"python {platform.python_version()}; isolation: {isolation}")
    print(f"{'method':42s} {'snippets':>8s} {'seconds':>8s} {'per second':>10s} {'CPU ms each':>11s}")
    print(f"{'score_batch, warm SandboxPool (fork each)':42s} {args.n:8d} {pooled:8.2f} {rate:10.0f} {cpu_ms:11.2f}")
    print(f"{'fresh `python -c` per snippet':42s} {len(sub):8d} {fresh:8.2f} {naive_rate:10.1f} {naive_cpu_ms:11.2f}")
    print(f"ratio: {rate / naive_rate:.1f}x in wall time, {naive_cpu_ms / cpu_ms:.1f}x in CPU time; "
          f"CPU bound on {cores} idle cores: {cores * 1e3 / cpu_ms:.0f} verifications/s "
          "(CPU ms counts every process: caller, workers, children)")

if __name__ == "__main__":
    main()
