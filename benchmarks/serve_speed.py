"""Time to the first character and characters per second: `charlm serve`'s stream against `charlm generate`.

Both run as the user runs them, as processes, alternating, on one checkpoint with the same settings:
- generate: from process start (imports and loading included) to the first character after the prompt on its
  stdout, and from there to the last;
- serve: started once; from sending POST /api/generate to the first token event, and from there to the last.
The rate is the characters after the first over the time from the first to the last. Target: serve at least 90% of
generate's rate.

    python benchmarks/serve_speed.py [--ckpt_path last] [--max_new_tokens 2000] [--repeats 3]
"""

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import time

SETTINGS = {"prompt": "ROMEO:", "temperature": 0.8, "seed": 1337}


def cli(ckpt_path: str, max_new_tokens: int) -> tuple[float, float]:
    """(seconds to the first generated character, characters per second after it) of `charlm generate`."""
    command = [sys.executable, "-m", "charlm", "generate", "--ckpt_path", ckpt_path, "--device", "cpu",
               "--prompt", SETTINGS["prompt"], "--seed", str(SETTINGS["seed"]),
               "--max_new_tokens", str(max_new_tokens)]  # fmt: skip
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    seen, first = b"", None
    while chunk := os.read(process.stdout.fileno(), 65536):
        seen += chunk
        if first is None and len(seen) > len(SETTINGS["prompt"]):
            first, at_first = time.perf_counter(), len(seen) - len(SETTINGS["prompt"])
    last = time.perf_counter()
    assert process.wait() == 0
    return first - start, (max_new_tokens - at_first) / (last - first)


def server(address: str, ckpt_run: str | None, max_new_tokens: int) -> tuple[float, float]:
    """The same through the server's stream."""
    connection = http.client.HTTPConnection(address, timeout=600)
    body = json.dumps({**SETTINGS, "max_new_tokens": max_new_tokens, "run": ckpt_run})
    start = time.perf_counter()
    connection.request("POST", "/api/generate", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    first, count = None, 0
    for line in response:
        if line.startswith(b"event: token"):
            count += 1
            if first is None:
                first = time.perf_counter()
    last = time.perf_counter()
    connection.close()
    assert count == max_new_tokens
    return first - start, (count - 1) / (last - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt_path", default="last")
    parser.add_argument("--max_new_tokens", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    process = subprocess.Popen(
        [sys.executable, "-m", "charlm", "serve", "--ckpt_path", args.ckpt_path, "--port", "0", "--device", "cpu"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        address = process.stdout.readline().split("http://")[1].split()[0]
        runs = json.loads(urlopen(address, "/api/runs"))["runs"]
        served = next(run["name"] for run in runs if run["served"])
        server(address, served, 50)  # the first request's thread pool and page cache, not measured
        results = {"generate": [], "serve": []}
        for _ in range(args.repeats):
            results["generate"].append(cli(args.ckpt_path, args.max_new_tokens))
            results["serve"].append(server(address, served, args.max_new_tokens))
    finally:
        process.terminate()
        process.wait()
    print(f"{served}, {args.max_new_tokens} characters, {args.repeats} runs each, alternating (medians)")
    print(f"{'':10} {'first char (s)':>15} {'chars/s':>10}")
    for name, rows in results.items():
        first, rate = statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)
        print(f"{name:10} {first:>15.3f} {rate:>10.1f}")
    ratio = statistics.median(r[1] for r in results["serve"]) / statistics.median(r[1] for r in results["generate"])
    print(f"serve / generate: {ratio:.1%} of the CLI's rate (target: at least 90%)")


def urlopen(address: str, path: str) -> bytes:
    connection = http.client.HTTPConnection(address, timeout=60)
    connection.request("GET", path)
    body = connection.getresponse().read()
    connection.close()
    return body


if __name__ == "__main__":
    main()
