#!/usr/bin/env python3
"""Small helpers for loadtest/run.sh (standard library only).

  lt.py freeport [N]                  print N distinct free loopback TCP ports
  lt.py wait-http URL SECONDS         wait until URL answers any HTTP status
  lt.py get URL                       print the body of GET URL (exit 1 on failure)
  lt.py sample OUT SECONDS URL...     poll each URL every 0.25 s for SECONDS, append
                                      {"t": unix_time, "url": ..., "body": <json>} lines
  lt.py record MANIFEST key=value...  append one run's metadata (values that parse as
                                      JSON are stored as JSON) to a JSON-lines manifest
  lt.py wrkjson TEXT OUT              pull the WRKJSON line out of wrk's output into OUT
  lt.py summary KIND FILE             one human line for a finished run (oha | wrk)
  lt.py rss PID                       resident memory of PID in KiB
  lt.py cpu PID...                    CPU seconds (user + system) of PIDs and descendants
"""
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request


def freeport(count=1):
    # Hold every socket until all are bound, so the ports handed out are distinct.
    socks = []
    try:
        for _ in range(int(count)):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        print(" ".join(str(s.getsockname()[1]) for s in socks))
    finally:
        for s in socks:
            s.close()


def fetch(url, timeout=2.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def wait_http(url, seconds):
    deadline = time.time() + float(seconds)
    while time.time() < deadline:
        try:
            fetch(url, timeout=1.0)
            return 0
        except urllib.error.HTTPError:
            return 0  # it answered; the status is not our business here
        except Exception:
            time.sleep(0.1)
    print(f"timed out after {seconds}s waiting for {url}", file=sys.stderr)
    return 1


def get(url):
    try:
        sys.stdout.write(fetch(url).decode())
        return 0
    except Exception as e:  # noqa: BLE001 - report and fail
        print(f"GET {url}: {e}", file=sys.stderr)
        return 1


def sample(out, seconds, urls):
    # Bounded: stops by itself after `seconds`, whatever happens to the targets.
    deadline = time.time() + float(seconds)
    with open(out, "a") as f:
        while time.time() < deadline:
            t0 = time.time()
            for url in urls:
                try:
                    body = json.loads(fetch(url, timeout=0.5))
                except Exception as e:  # noqa: BLE001 - a missed sample is not fatal
                    body = {"error": str(e)}
                f.write(json.dumps({"t": t0, "url": url, "body": body}) + "\n")
            f.flush()
            time.sleep(max(0.0, 0.25 - (time.time() - t0)))
    return 0


def record(manifest, pairs):
    entry = {}
    for pair in pairs:
        k, _, v = pair.partition("=")
        try:
            entry[k] = json.loads(v)
        except ValueError:
            entry[k] = v
    with open(manifest, "a") as f:
        f.write(json.dumps(entry) + "\n")
    return 0


def wrkjson(text, out):
    for line in open(text, errors="replace"):
        if line.startswith("WRKJSON "):
            data = json.loads(line[len("WRKJSON "):])
            with open(out, "w") as f:
                json.dump(data, f, indent=1)
            return 0
    print(f"no WRKJSON line in {text}", file=sys.stderr)
    return 1


def summary(kind, path):
    try:
        d = json.load(open(path))
    except Exception as e:  # noqa: BLE001
        print(f"(no result: {e})")
        return 1
    if kind == "oha":
        s = d.get("summary", {})
        p = d.get("latencyPercentiles", {})
        codes = d.get("statusCodeDistribution", {})
        errs = d.get("errorDistribution", {})
        ms = lambda x: "-" if x is None else f"{x * 1000:.2f}ms"  # noqa: E731
        line = (f"{s.get('requestsPerSec', 0):10.0f} req/s  p50 {ms(p.get('p50'))}  "
                f"p99 {ms(p.get('p99'))}  status {json.dumps(codes, sort_keys=True)}")
        if errs:
            line += f"  errors {json.dumps(errs, sort_keys=True)}"
    else:
        lat = d["latency_us"]["percentiles"]
        rps = d["requests"] / (d["duration_us"] / 1e6)
        line = (f"{rps:10.0f} req/s  p50 {lat['50'] / 1000:.2f}ms  p99 {lat['99'] / 1000:.2f}ms  "
                f"non-2xx/3xx {d['errors']['status']} of {d['requests']}")
        other = {k: v for k, v in d["errors"].items() if k != "status" and v}
        if other:
            line += f"  socket errors {json.dumps(other, sort_keys=True)}"
    print(line)
    return 0


def rss(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                print(line.split()[1])
                return 0
    except OSError:
        pass
    print("0")
    return 0


def cpu(*pids):
    """CPU seconds (user + system, every thread) used so far by PIDS and their descendants,
    from /proc/<pid>/stat: nginx's workers are children of the pid run.sh knows."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            raw = open(f"/proc/{d}/stat").read()
        except OSError:
            continue
        # The command name (field 2) may hold spaces: split after its closing parenthesis.
        fields = raw[raw.rindex(")") + 2:].split()
        stats[int(d)] = (int(fields[1]), int(fields[11]) + int(fields[12]))  # ppid, utime+stime
    wanted = {int(p) for p in pids}
    grew = True
    while grew:
        more = {pid for pid, (ppid, _) in stats.items() if ppid in wanted} - wanted
        wanted |= more
        grew = bool(more)
    print(f"{sum(stats[p][1] for p in wanted if p in stats) / tick:.3f}")
    return 0


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = argv[1], argv[2:]
    if cmd == "freeport":
        return freeport(*args)
    if cmd == "wait-http":
        return wait_http(*args)
    if cmd == "get":
        return get(*args)
    if cmd == "sample":
        return sample(args[0], args[1], args[2:])
    if cmd == "record":
        return record(args[0], args[1:])
    if cmd == "wrkjson":
        return wrkjson(*args)
    if cmd == "summary":
        return summary(*args)
    if cmd == "rss":
        return rss(*args)
    if cmd == "cpu":
        return cpu(*args)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv) or 0)
