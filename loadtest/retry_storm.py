#!/usr/bin/env python3
"""The retry-storm client of loadtest/run.sh (scenario retry-storm).

  retry_storm.py URL EMULATOR_STATS_URL FUNCTION CLIENTS RECORDS {keyed|unkeyed} OUT_JSON

CLIENTS threads each send RECORDS distinct records to URL, retrying every 504, 503, 429
and 409 (after Retry-After, capped at 300 ms) up to 50 times; `keyed` sends each record's
own Idempotency-Key with every attempt. Each attempt carries its own deadline
(x-sluicegate-timeout-ms, 100-700 ms). Reads the emulator's counters for FUNCTION before
and after and writes what it saw to OUT_JSON: records processed, duplicate_records, the
final status of every record and the count of every answer. Exits 0; run.sh judges.
"""
import http.client
import json
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter

RETRIED = {504, 503, 429, 409}


def stats(url, function):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)["functions"].get(function, {})


def client(url, c, records, keyed, answers, finals, lock):
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    for r in range(records):
        body = json.dumps({"client": c, "record": r, "t": time.time_ns()})
        status = 0
        for attempt in range(50):
            headers = {"content-type": "application/json",
                       "x-sluicegate-timeout-ms": str(100 + (attempt * 37 + c * 13 + r * 7) % 600)}
            if keyed:
                headers["idempotency-key"] = f"storm-{c}-{r}"
            try:
                conn.request("POST", u.path, body=body, headers=headers)
                resp = conn.getresponse()
                resp.read()
                status = resp.status
                retry_after = resp.getheader("retry-after")
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
                status, retry_after = 0, None
            with lock:
                answers[status] += 1
            if status not in RETRIED and status != 0:
                break
            wait = min(int(retry_after) * 1.0, 0.3) if retry_after and retry_after.isdigit() else 0.05
            time.sleep(wait)
        with lock:
            finals[status] += 1
    conn.close()


def main():
    url, stats_url, function, clients, records, mode, out = sys.argv[1:8]
    clients, records, keyed = int(clients), int(records), mode == "keyed"
    before = stats(stats_url, function)
    answers, finals, lock = Counter(), Counter(), threading.Lock()
    started = time.time()
    threads = [threading.Thread(target=client, args=(url, c, records, keyed, answers, finals, lock))
               for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.time() - started
    # Let records whose callers left finish in the function before reading the counters.
    deadline = time.time() + 10
    after = stats(stats_url, function)
    while after.get("in_flight", 0) and time.time() < deadline:
        time.sleep(0.1)
        after = stats(stats_url, function)
    result = {
        "mode": mode, "clients": clients, "records_sent": clients * records,
        "elapsed_s": round(elapsed, 2),
        "records_processed": after.get("records", 0) - before.get("records", 0),
        "duplicate_records": after.get("duplicate_records", 0) - before.get("duplicate_records", 0),
        "answers": {str(k): v for k, v in sorted(answers.items())},
        "finals": {str(k): v for k, v in sorted(finals.items())},
    }
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
