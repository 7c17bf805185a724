#!/usr/bin/env python3
"""Turns one loadtest/run.sh results directory into <scenario>.json, report.md and plots.

    python3 loadtest/report.py loadtest/results/<timestamp>

Input (written by run.sh): meta.jsonl, raw/<scenario>/runs.jsonl (one line per run, naming
the run's oha JSON / parsed wrk JSON and any emulator-stats snapshots), the files those
lines name, oha's per-request SQLite files where present, and logs/.

Output: <scenario>.json (every run's metadata with its raw oha JSON or parsed wrk output,
plus the computed summary), report.md (tables, ratios, anomalies, plots), *.png, and a
copy of the summary tables in loadtest/results/latest-summary.md.

Numbers: "req/s" is completed responses (any status) per second of load; latencies are
the load generator's, in milliseconds; with several rounds a figure is the median of the
rounds and "range" is min-max.
"""
import json
import re
import sqlite3
import statistics
import sys
from pathlib import Path

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:  # the tables are still worth having
    plt = None

OUT = None
ANSI = re.compile(r"\x1b\[[0-9;]*m")
EXPECTED = {  # statuses each scenario is designed to produce from sluicegate
    "shed": {"200", "429"},
    "passthrough": {"200"},
    "seed000": {"200", "429"},
    "manykeys": {"200", "429"},
    "batching": {"200"},
    "admitted": {"200"},
    "noisy": {"200", "429"},
    "bulk": {"200"},
}
COLORS = {"sluicegate": "#1f77b4", "nginx": "#2ca02c", "static429": "#7f7f7f", "direct": "#9467bd",
          "many-keys": "#1f77b4", "one-key": "#ff7f0e", "adaptive": "#1f77b4", "window": "#d62728",
          "raw": "#ff7f0e", "bulk": "#1f77b4", "single": "#ff7f0e"}


# --- loading ------------------------------------------------------------------------

def jsonl(path):
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_json(rel):
    if not rel:
        return None
    p = OUT / rel
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def load_runs(scenario):
    runs = jsonl(OUT / "raw" / scenario / "runs.jsonl")
    for run in runs:
        run["result"] = load_json(run.get("file"))
        for key in ("stats_before", "stats_end", "stats_after"):
            if key in run:
                run[key + "_json"] = load_json(run[key])
        run["metrics"] = metrics(run)
    return runs


def sqlite_rows(run):
    """(start_s, latency_s, status) per request from oha's --db-url file, or [].

    With --latency-correction oha records when each request was due to start
    (start_latency_correction); latency is measured from then, as oha's own summary does,
    so queueing inside the load generator is not hidden (coordinated omission)."""
    f = run.get("file", "")
    if not f.endswith(".json"):
        return []
    db = OUT / (f[: -len(".json")] + ".sqlite")
    if not db.exists():
        return []
    try:
        con = sqlite3.connect(str(db))
        rows = con.execute(
            "select coalesce(start_latency_correction, start), "
            "end - coalesce(start_latency_correction, start), status from oha order by 1").fetchall()
        con.close()
        return rows
    except sqlite3.Error:
        return []


# --- per-run metrics ----------------------------------------------------------------

def metrics(run):
    r = run.get("result")
    if not r:
        return None
    if run.get("tool") == "wrk":
        secs = r["duration_us"] / 1e6
        pct = r["latency_us"]["percentiles"]
        non2xx = r["errors"]["status"]
        return {
            "rps": r["requests"] / secs if secs else 0.0,
            "requests": r["requests"],
            "seconds": secs,
            "p50": pct["50"] / 1000, "p90": pct["90"] / 1000, "p99": pct["99"] / 1000,
            "p99.9": pct["99.9"] / 1000,
            "status": {"2xx/3xx": r["requests"] - non2xx, ">=400": non2xx},
            "errors": {k: v for k, v in r["errors"].items() if k != "status" and v},
        }
    s = r["summary"]
    codes = r.get("statusCodeDistribution", {})
    done = sum(codes.values())
    secs = s.get("total") or 0.0
    lat = r.get("latencyPercentiles", {})
    ms = lambda k: None if lat.get(k) is None else lat[k] * 1000  # noqa: E731
    errors = dict(r.get("errorDistribution", {}))
    return {
        "rps": done / secs if secs else 0.0,
        "requests": done,
        "seconds": secs,
        "p50": ms("p50"), "p90": ms("p90"), "p99": ms("p99"), "p99.9": ms("p99.9"),
        "status": codes,
        "errors": errors,
    }


def per_status_latency(rows):
    """{status: {n, p50, p99} in ms} from per-request rows."""
    by = {}
    for _, dur, st in rows:
        by.setdefault(str(st), []).append(dur * 1000)
    out = {}
    for st, xs in sorted(by.items()):
        xs.sort()
        out[st] = {"n": len(xs), "p50": pct(xs, 50), "p99": pct(xs, 99), "max": xs[-1]}
    return out


def pct(sorted_xs, q):
    if not sorted_xs:
        return None
    i = min(len(sorted_xs) - 1, max(0, int(round(q / 100 * len(sorted_xs) + 0.5)) - 1))
    return sorted_xs[i]


def timeline(rows, bin_s=0.25):
    """Responses completed per second in each bin, by status: (times, {status: [rates]}).

    Binned by completion time: goodput is what callers get back per second (binning by
    start would show a false collapse at the end, where slow requests were cut off)."""
    if not rows:
        return [], {}
    end = max(r[0] + r[1] for r in rows)
    n = max(1, int(end / bin_s))  # whole bins only: a partial last bin reads as a collapse
    series = {}
    for start, lat, st in rows:
        i = int((start + lat) / bin_s)
        if i >= n:
            continue
        key = "2xx" if 200 <= st < 300 else str(st)
        series.setdefault(key, [0] * n)[i] += 1 / bin_s
    return [i * bin_s for i in range(n)], series


def fn_totals(stats):
    """Sum the emulator's counters over every function in a /emulator/stats body."""
    tot = {"invocations": 0, "records": 0, "throttles": 0, "errors": 0, "peak_concurrency": 0}
    if not stats:
        return tot
    for f in stats.get("functions", {}).values():
        tot["invocations"] += f.get("invocations", 0)
        tot["records"] += f.get("records", 0)
        tot["throttles"] += sum(f.get("throttles", {}).values())
        tot["errors"] += f.get("errors", 0)
        tot["peak_concurrency"] = max(tot["peak_concurrency"], f.get("peak_concurrency", 0))
    return tot


def delta(run, before="stats_before_json", after="stats_after_json"):
    a, b = fn_totals(run.get(before)), fn_totals(run.get(after))
    d = {k: b[k] - a[k] for k in a}
    d["peak_concurrency"] = b["peak_concurrency"]  # a high-water mark, not a counter
    return d


# --- aggregation and formatting -----------------------------------------------------

def agg(runs, contender, tool=None):
    ms = [r["metrics"] for r in runs
          if r.get("contender") == contender and (tool is None or r.get("tool") == tool) and r["metrics"]]
    if not ms:
        return None
    med = lambda k: statistics.median([m[k] for m in ms if m.get(k) is not None]) \
        if any(m.get(k) is not None for m in ms) else None  # noqa: E731
    status = {}
    for m in ms:
        for k, v in m["status"].items():
            status[k] = status.get(k, 0) + v
    errors = {}
    for m in ms:
        for k, v in m["errors"].items():
            errors[k] = errors.get(k, 0) + v
    rps = [m["rps"] for m in ms]
    return {"rounds": len(ms), "rps": statistics.median(rps), "rps_min": min(rps), "rps_max": max(rps),
            "p50": med("p50"), "p90": med("p90"), "p99": med("p99"), "p99.9": med("p99.9"),
            "status": status, "errors": errors}


def f_ms(x):
    return "–" if x is None else (f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.0f}")


def f_rps(x):
    return "–" if x is None else f"{x:,.0f}"


def f_ratio(a, b):
    return "–" if not a or not b else f"{a / b:.2f}"


def status_mix(status):
    total = sum(status.values())
    if not total:
        return "–"
    parts = [f"{k}: {v / total:.1%}" if v / total >= 0.001 else f"{k}: {v}"
             for k, v in sorted(status.items(), key=lambda kv: -kv[1])]
    return ", ".join(parts)


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def rng(a):
    return f"{f_rps(a['rps_min'])}–{f_rps(a['rps_max'])}" if a["rounds"] > 1 else "–"


# --- plots --------------------------------------------------------------------------

def save(fig, name):
    path = OUT / name
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return name


def plot_percentiles(name, title, groups):
    """groups: {subplot title: {contender: agg}} -> grouped bars of p50/p90/p99/p99.9."""
    if plt is None or not groups:
        return None
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4), squeeze=False)
    qs = ["p50", "p90", "p99", "p99.9"]
    for ax, (sub, aggs) in zip(axes[0], groups.items()):
        names = [c for c, a in aggs.items() if a]
        width = 0.8 / max(1, len(names))
        for i, c in enumerate(names):
            vals = [aggs[c].get(q) or 0 for q in qs]
            ax.bar([x + i * width for x in range(len(qs))], vals, width, label=c, color=COLORS.get(c))
        ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(qs))])
        ax.set_xticklabels(qs)
        ax.set_yscale("log")
        ax.set_ylabel("latency (ms, log)")
        ax.set_title(sub)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    return save(fig, name)


def plot_throughput(name, title, groups):
    if plt is None or not groups:
        return None
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.6), squeeze=False)
    for ax, (sub, aggs) in zip(axes[0], groups.items()):
        names = [c for c, a in aggs.items() if a]
        vals = [aggs[c]["rps"] for c in names]
        err = [[aggs[c]["rps"] - aggs[c]["rps_min"] for c in names],
               [aggs[c]["rps_max"] - aggs[c]["rps"] for c in names]]
        ax.bar(names, vals, yerr=err, capsize=4, color=[COLORS.get(c) for c in names])
        ax.set_ylabel("responses/s (median, min–max)")
        ax.set_title(sub)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    return save(fig, name)


def plot_timelines(name, title, series_by_name, hlines=()):
    """series_by_name: {subplot: (times, {label: rates})}."""
    if plt is None or not series_by_name:
        return None
    n = len(series_by_name)
    fig, axes = plt.subplots(n, 1, figsize=(8, 2.6 * n), squeeze=False, sharex=True)
    for ax, (sub, (times, series)) in zip(axes[:, 0], series_by_name.items()):
        for label, ys in sorted(series.items()):
            ax.plot(times[: len(ys)], ys, label=label, linewidth=1.2)
        for y, label in hlines:
            ax.axhline(y, linestyle="--", color="black", linewidth=0.8, alpha=0.6)
            ax.text(0, y, " " + label, fontsize=7, va="bottom")
        ax.set_yscale("symlog", linthresh=10)
        ax.set_ylim(bottom=0)
        ax.set_ylabel("per second")
        ax.set_title(sub, fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("seconds since the load started")
    fig.suptitle(title)
    return save(fig, name)


# --- scenarios ----------------------------------------------------------------------

def anomalies(scenario, runs):
    """Statuses or socket errors sluicegate was not expected to produce in this scenario."""
    notes = []
    for r in runs:
        m = r["metrics"]
        label = Path(r.get("file", "?")).stem
        if m is None:
            notes.append(f"{scenario}/{label}: no result file (the load generator failed)")
            continue
        if r.get("contender") not in ("sluicegate", "many-keys", "one-key", "adaptive", "window"):
            continue
        if r.get("tool", "").startswith("oha"):
            odd = {k: v for k, v in m["status"].items() if k not in EXPECTED[scenario]}
            if odd:
                notes.append(f"{scenario}/{label}: unexpected statuses {odd}" + scope_hint(scenario))
        errs = {k: v for k, v in m["errors"].items() if k != "aborted due to deadline"}
        if errs:
            notes.append(f"{scenario}/{label}: client-side errors {errs}")
    return notes


def scope_hint(scenario):
    """sluicegate's own counters of non-200 answers, from its /metrics snapshot, if any."""
    lines = []
    for prom in sorted((OUT / "raw" / scenario).glob("metrics-*.prom")):
        for ln in prom.read_text(errors="replace").splitlines():
            if not ln.startswith("#") and ("scope" in ln or re.search(r'status="[45]', ln)):
                lines.append(ln.strip())
    return "" if not lines else "; sluicegate /metrics: `" + "`, `".join(lines[:8]) + "`"


def report_shed(runs):
    md, summary, plots = [], {}, []
    groups = {}
    for tool in ("oha", "wrk"):
        aggs = {c: agg(runs, c, tool) for c in ("sluicegate", "nginx", "static429")}
        if not any(aggs.values()):
            continue
        groups[tool] = aggs
        s, n, c = aggs["sluicegate"], aggs["nginx"], aggs["static429"]
        rows = [[name, f_rps(a["rps"]), rng(a), f_ms(a["p50"]), f_ms(a["p99"]), status_mix(a["status"])]
                for name, a in aggs.items() if a]
        md.append(f"**{tool}** (`-c64`{', `-t1`' if tool == 'wrk' else ''})\n")
        md.append(table(["contender", "req/s", "range", "p50 ms", "p99 ms", "statuses"], rows))
        ratios = {"sluicegate/nginx": s and n and s["rps"] / n["rps"],
                  "sluicegate/static429": s and c and s["rps"] / c["rps"]}
        md.append("\nthroughput ratio sluicegate/nginx = **" + f_ratio(s and s["rps"], n and n["rps"])
                  + "**, sluicegate/static429 = **" + f_ratio(s and s["rps"], c and c["rps"]) + "**\n")
        summary[tool] = {"contenders": aggs, "ratios": ratios}
    plots.append(plot_throughput("shed-throughput.png", "shed: one hot key, 429 path", groups))
    plots.append(plot_percentiles("shed-latency.png", "shed: latency percentiles (median of rounds)", groups))
    tl = {}
    for r in runs:
        if r.get("tool") == "oha-timeline":
            rows = sqlite_rows(r)
            if rows:
                tl[f"{r['contender']} (oha -c64, every request kept)"] = timeline(rows)
    plots.append(plot_timelines("shed-timeline.png", "shed: goodput (2xx/s) and shed rate (429/s)", tl))
    return md, summary, plots


def report_passthrough(runs):
    md, plots = [], []
    aggs = {c: agg(runs, c, "oha") for c in ("direct", "sluicegate", "nginx")}
    d = aggs["direct"]
    rows = []
    for name, a in aggs.items():
        if not a:
            continue
        added = None if not d or name == "direct" else a["p50"] - d["p50"]
        rows.append([name, f_rps(a["rps"]), rng(a), f_ratio(a["rps"], d and d["rps"]), f_ms(a["p50"]),
                     "–" if added is None else f"{added:+.3f}", f_ms(a["p99"]), status_mix(a["status"])])
    md.append("oha `-c64`, raw envelope, one record per invoke, instant echo function\n")
    md.append(table(["path", "req/s", "range", "vs direct", "p50 ms", "p50 added over direct (ms)",
                     "p99 ms", "statuses"], rows))
    checks = []
    for r in runs:
        if r.get("contender") == "sluicegate" and r["metrics"]:
            dd = delta(r)
            ok = r["metrics"]["status"].get("200", 0)
            checks.append(f"{Path(r['file']).stem}: 200s {ok:,}, emulator invocations +{dd['invocations']:,}")
    if checks:
        md.append("\ncross-check (each sluicegate 200 is one invoke): " + "; ".join(checks) + "\n")
    plots.append(plot_percentiles("passthrough-latency.png", "passthrough: latency percentiles",
                                  {"oha -c64": aggs}))
    return md, {"contenders": aggs}, plots


def report_seed000(runs):
    md, summary, plots = [], [], []
    rows, tl = [], {}
    for r in runs:
        m = r["metrics"]
        if not m:
            continue
        dur = m["seconds"] or float(r.get("duration", 1))
        ok = m["status"].get("200", 0)
        d_end, d_all = delta(r, "stats_before_json", "stats_end_json"), delta(r)
        quota = float(r.get("emulator_quota", 10)) * int(r.get("max_records", 20))
        paced = float(r.get("invoke_rate", 10)) * int(r.get("max_records", 20))
        sl = per_status_latency(sqlite_rows(r))
        other = {k: v for k, v in m["status"].items() if k not in ("200", "429")}
        row = {
            "offered": r.get("rate"), "seconds": dur, "responses": m["requests"],
            "delivered_per_s": ok / dur, "emulator_records_per_s": d_end["records"] / dur,
            "emulator_records_total_settled": d_all["records"], "ok": ok,
            "quota_records_per_s": quota, "paced_records_per_s": paced,
            "invocations": d_all["invocations"], "throttles": d_all["throttles"],
            "records_per_invoke": d_all["records"] / d_all["invocations"] if d_all["invocations"] else None,
            "peak_concurrency": d_all["peak_concurrency"],
            "p99_429_ms": sl.get("429", {}).get("p99"), "p50_429_ms": sl.get("429", {}).get("p50"),
            "p99_200_ms": sl.get("200", {}).get("p99"), "p50_200_ms": sl.get("200", {}).get("p50"),
            "status": m["status"], "other_statuses": other, "errors": m["errors"],
        }
        summary.append(row)
        rows.append([f"{row['offered']}/s", f"{m['rps']:,.0f}", f"{row['delivered_per_s']:.1f}",
                     f"{row['emulator_records_per_s']:.1f}", f"{quota:.0f} ({paced:.0f} paced)",
                     f"{row['invocations']:,}", f"{row['throttles']:,}",
                     "–" if row["records_per_invoke"] is None else f"{row['records_per_invoke']:.1f}",
                     row["peak_concurrency"], f_ms(row["p50_429_ms"]), f_ms(row["p99_429_ms"]),
                     f_ms(row["p99_200_ms"]), status_mix(m["status"])])
        samples = jsonl(OUT / r["samples"]) if r.get("samples") else []
        req_rows = sqlite_rows(r)
        if req_rows:
            # 1 s bins: at ~10 invokes/s of 20 records a shorter bin shows invoke aliasing.
            tl[f"offered {r.get('rate')}/s: client responses/s by status"] = timeline(req_rows, 1.0)
        if len(samples) > 1:
            # Records/s the emulator saw between consecutive samples, on the load's clock.
            t0 = float(r["start"])
            recs = [(s["t"] - t0, fn_totals(s["body"])["records"]) for s in samples if "functions" in s["body"]]
            em_t = [b[0] for a, b in zip(recs, recs[1:])]
            em = [(b[1] - a[1]) / max(1e-6, b[0] - a[0]) for a, b in zip(recs, recs[1:])]
            tl[f"offered {r.get('rate')}/s: records/s delivered to Lambda (emulator)"] = (em_t, {"records/s": em})
    md.append("sluicegate → emulator (invoke_rate 10/s, reserved concurrency 5, 100 ms); "
              "sluicegate batches 20, paces 10 invokes/s, ≤5 in flight; oha `-q RATE -c200 --latency-correction`\n")
    md.append(table(["offered", "responses/s", "delivered rec/s (200s)", "emulator rec/s",
                     "quota × max_records", "invokes", "throttled", "rec/invoke", "peak conc.",
                     "429 p50 ms", "429 p99 ms", "200 p99 ms", "statuses"], rows))
    plots.append(plot_timelines("seed000-timeline.png", "seed000: goodput, shed and Lambda records over time",
                                tl, hlines=[(200, "quota × 20 = 200 rec/s")]))
    return md, summary, plots


def report_manykeys(runs):
    md, plots = [], []
    aggs = {c: agg(runs, c, "wrk") for c in ("many-keys", "one-key")}
    m, o = aggs["many-keys"], aggs["one-key"]
    keys = next((r.get("keys") for r in runs if r.get("contender") == "many-keys"), "?")
    rows = [[name, f_rps(a["rps"]), rng(a), f_ms(a["p50"]), f_ms(a["p99"]), status_mix(a["status"])]
            for name, a in aggs.items() if a]
    md.append(f"wrk `-t1 -c64` with a Lua script drawing `x-api-key` uniformly from {keys:,} keys "
              "(one-key: the same script with 1 key); every key's token spent in a warm-up pass\n"
              if isinstance(keys, int) else "")
    md.append(table(["keys", "req/s", "range", "p50 ms", "p99 ms", "statuses (wrk: 2xx/3xx vs >=400)"], rows))
    ratio = m and o and m["rps"] / o["rps"]
    md.append(f"\nthroughput ratio many-keys/one-key = **{f_ratio(m and m['rps'], o and o['rps'])}**\n")
    mem = jsonl(OUT / "raw" / "manykeys" / "memory.jsonl")
    warm = load_json("raw/manykeys/warmup.json")
    routes = load_json("raw/manykeys/admin-routes-end.json")
    extra = {}
    if mem:
        mm = mem[-1]
        extra = {"rss_kib": mm, "tracked_keys": routes.get("tracked_keys") if routes else None}
        md.append(f"sluicegate RSS: {mm['rss_kib_start'] / 1024:.0f} MiB at start, "
                  f"{mm['rss_kib_after_warmup'] / 1024:.0f} MiB after the warm-up, "
                  f"{mm['rss_kib_end'] / 1024:.0f} MiB at the end; tracked keys at the end: "
                  f"{extra['tracked_keys']}\n")
    if warm:
        md.append(f"warm-up: {warm['requests']:,} requests in {warm['duration_us'] / 1e6:.1f} s, "
                  f"{warm['errors']['status']:,} of them >=400\n")
    plots.append(plot_throughput("manykeys-throughput.png", "manykeys: shed path, 100k keys vs 1 key",
                                 {"wrk -t1 -c64": aggs}))
    return md, {"contenders": aggs, "ratio_many_over_one": ratio, **extra}, plots


def report_batching(runs):
    md, summary, plots = [], [], []
    rows = []
    for r in runs:
        m = r["metrics"]
        if not m:
            continue
        d = delta(r)
        per_k = 1000 * d["invocations"] / d["records"] if d["records"] else None
        row = {"flush": r["contender"], "offered": r.get("rate"), "rps": m["rps"], "records": d["records"],
               "invocations": d["invocations"], "invokes_per_1000_records": per_k,
               "mean_batch": d["records"] / d["invocations"] if d["invocations"] else None,
               "p50": m["p50"], "p99": m["p99"], "status": m["status"]}
        summary.append(row)
        rows.append([row["flush"], f"{row['offered']}/s", f"{m['rps']:,.0f}", f"{d['records']:,}",
                     f"{d['invocations']:,}", "–" if per_k is None else f"{per_k:.0f}",
                     "–" if row["mean_batch"] is None else f"{row['mean_batch']:.1f}",
                     f_ms(m["p50"]), f_ms(m["p99"]), status_mix(m["status"])])
    md.append("max_records 20, max_wait 50 ms, function latency 20 ms, ≤10 invokes in flight; "
              "oha `-q RATE -c128 --latency-correction`\n")
    md.append(table(["flush", "offered", "achieved req/s", "records", "invokes", "invokes / 1000 records",
                     "records / invoke", "p50 ms", "p99 ms", "statuses"], rows))
    if plt is not None and summary:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
        for flush in ("adaptive", "window"):
            pts = sorted((s["offered"], s["invokes_per_1000_records"], s["p50"]) for s in summary
                         if s["flush"] == flush and s["invokes_per_1000_records"] is not None)
            if pts:
                a1.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=flush, color=COLORS[flush])
                a2.plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=flush, color=COLORS[flush])
        rates = sorted({s["offered"] for s in summary if s["offered"]})
        for ax, yl in ((a1, "invokes per 1000 records"), (a2, "p50 latency (ms)")):
            ax.set_xscale("log")
            ax.set_xticks(rates, [str(x) for x in rates])
            ax.minorticks_off()
            ax.set_xlabel("offered load (req/s)")
            ax.set_ylabel(yl)
            ax.grid(alpha=0.3)
            ax.legend()
        a1.axhline(50, linestyle="--", color="black", linewidth=0.8)
        a1.text(a1.get_xlim()[0], 50, " full batches (20)", fontsize=7, va="bottom")
        fig.suptitle("batching: adaptive vs window flush")
        plots.append(save(fig, "batching.png"))
    return md, summary, plots


def admitted_row(r):
    """One admitted run: throughput and latency, records per invoke from the emulator,
    CPU µs per answered request from the contender's /proc CPU seconds."""
    m = r["metrics"]
    d = delta(r)
    ok = m["status"].get("200", 0)
    try:
        cpu_s = float(r["cpu_s_after"]) - float(r["cpu_s_before"])
    except (KeyError, TypeError, ValueError):
        cpu_s = None
    return {"contender": r["contender"], "tool": r.get("tool"), "rate": r.get("rate"), "rps": m["rps"],
            "p50": m["p50"], "p99": m["p99"], "status": m["status"], "records": d["records"],
            "invocations": d["invocations"],
            "records_per_invoke": d["records"] / d["invocations"] if d["invocations"] else None,
            "cpu_us_per_request": cpu_s * 1e6 / ok if cpu_s is not None and ok else None}


def report_admitted(runs):
    md, plots = [], []
    names = {"adaptive": "sluicegate `/records` adaptive (max_concurrency 64)",
             "window": "sluicegate `/window` window 2 ms (max_concurrency 8)",
             "raw": "sluicegate `/raw` one record per invoke",
             "lean-raw": "sluicegate `/raw`, TOKIO_WORKER_THREADS=1",
             "lean": "sluicegate `/records` adaptive, `linger = 5ms`, TOKIO_WORKER_THREADS=1",
             "nginx": "nginx `proxy_pass`",
             "ceiling": "ceiling: bare hyper server answering itself (static429, no upstream)"}
    aggs = {c: agg(runs, c, "oha") for c in names if c != "lean"}
    ng = aggs["nginx"]
    rows = []
    per_run = [admitted_row(r) for r in runs if r["metrics"]]
    for c, a in aggs.items():
        if not a:
            continue
        mine = [x for x in per_run if x["contender"] == c and x["tool"] == "oha"]
        rpi = [x["records_per_invoke"] for x in mine if x["records_per_invoke"]]
        cpu = [x["cpu_us_per_request"] for x in mine if x["cpu_us_per_request"]]
        rows.append([names[c], f_rps(a["rps"]), rng(a), f_ratio(a["rps"], ng and ng["rps"]), f_ms(a["p50"]),
                     f_ms(a["p99"]), f"{statistics.median(rpi):.1f}" if rpi else "–",
                     f"{statistics.median(cpu):.0f}" if cpu else "–", status_mix(a["status"])])
    md.append("instant echo functions, no quotas; oha `-c128`; requests/s are records/s (one record "
              "per request); records per invoke from the emulator's counters\n")
    md.append(table(["path", "req/s", "range", "vs nginx", "p50 ms", "p99 ms", "records / invoke",
                     "CPU µs / request", "statuses"], rows))
    fixed = [x for x in per_run if x["tool"] == "oha-fixed"]
    if fixed:
        rows = [[names[x["contender"]], f"{x['rate']}/s", f_rps(x["rps"]),
                 "–" if x["cpu_us_per_request"] is None else f"{x['cpu_us_per_request']:.0f}",
                 "–" if x["records_per_invoke"] is None else f"{x['records_per_invoke']:.1f}",
                 f_ms(x["p50"]), f_ms(x["p99"]), status_mix(x["status"])] for x in fixed]
        md.append("\nCPU per record at fixed offered loads (oha `-q RATE -c128 --latency-correction`; "
                  "process CPU from `/proc/<pid>/stat`, nginx with its workers, ÷ 200s)\n")
        md.append(table(["path", "offered", "achieved req/s", "CPU µs / request", "records / invoke",
                         "p50 ms", "p99 ms", "statuses"], rows))
    plots.append(plot_percentiles("admitted-latency.png", "admitted: latency percentiles",
                                  {"oha -c128": aggs}))
    return md, per_run, plots


def report_noisy(runs):
    """Key b's goodput and p99 next to key a's flood: per-key fair queue, FIFO, and b alone."""
    md, summary = [], []
    rows = []
    # Compared on answered (200) requests: a run shed fast would otherwise look quick.
    alone_p99 = None
    for r in runs:
        if r["metrics"] and r.get("contender") == "b-alone":
            alone_p99 = per_status_latency(sqlite_rows(r)).get("200", {}).get("p99")
    for r in runs:
        m = r["metrics"]
        if not m:
            continue
        total = sum(m["status"].values())
        ok = m["status"].get("200", 0)
        goodput = ok / total if total else None
        by_status = per_status_latency(sqlite_rows(r))
        p99_ok = by_status.get("200", {}).get("p99")
        row = {"run": r["contender"], "key": r.get("key"), "fairness": r.get("fairness"),
               "offered": r.get("rate"), "requests": total, "goodput": goodput, "p50": m["p50"],
               "p99": m["p99"], "p99_200": p99_ok, "status": m["status"]}
        summary.append(row)
        vs_alone = f_ratio(p99_ok, alone_p99) if r.get("key") == "b" and r["contender"] != "b-alone" else "–"
        rows.append([r["contender"], f"{r.get('rate')}/s", f"{total:,}",
                     "–" if goodput is None else f"{goodput:.1%}", f_ms(m["p50"]), f_ms(m["p99"]),
                     f_ms(p99_ok), vs_alone, status_mix(m["status"])])
    rates = {r.get("key"): r.get("rate") for r in runs}
    md.append(f"function: 10 invokes/s × 20 records = 200 records/s; queue max_pending 100; key a offers "
              f"10× that (oha `-q {rates.get('a')} -c400`), key b 5 % (`-q {rates.get('b')} -c32`), both "
              "`--latency-correction`; b's p99 compared over its 200s. Target with per_key: b's goodput "
              "≥ 95 % and b's p99 ≤ 2× b alone.\n")
    md.append(table(["run", "offered", "requests", "goodput (200)", "p50 ms", "p99 ms", "p99 of 200s ms",
                     "p99 vs b alone", "statuses"], rows))
    return md, summary, []


def bulk_row(r):
    """One bulk-scenario run: records/s from oha (2xx responses × records per request) and
    from the emulator (records its function received during the run)."""
    m = r["metrics"]
    d = delta(r)
    per = int(r.get("records_per_request") or 1)
    ok = sum(v for k, v in m["status"].items() if k.startswith("2"))
    secs = m["seconds"] or 0.0
    return {"contender": r["contender"], "rps": m["rps"], "records_per_request": per,
            "records_per_s": ok * per / secs if secs else 0.0,
            "delivered_per_s": d["records"] / secs if secs else 0.0,
            "invocations": d["invocations"], "records": d["records"],
            "records_per_invoke": d["records"] / d["invocations"] if d["invocations"] else None,
            "p50": m["p50"], "p99": m["p99"], "status": m["status"]}


def report_bulk(runs):
    md, plots = [], []
    names = {"bulk": "sluicegate bulk NDJSON (`/bulk`)", "single": "sluicegate one record per request "
             "(`/records`)", "nginx": "nginx `proxy_pass` (one record per request)"}
    per_run = [bulk_row(r) for r in runs if r["metrics"]]
    med = {}
    for c in names:
        mine = [x for x in per_run if x["contender"] == c]
        if mine:
            med[c] = {k: statistics.median([x[k] for x in mine if x[k] is not None] or [0])
                      for k in ("rps", "records_per_s", "delivered_per_s", "p50", "p99")}
            med[c]["per"] = mine[0]["records_per_request"]
            rpi = [x["records_per_invoke"] for x in mine if x["records_per_invoke"]]
            med[c]["rpi"] = statistics.median(rpi) if rpi else None
            med[c]["range"] = (min(x["records_per_s"] for x in mine), max(x["records_per_s"] for x in mine))
    rows = []
    for c, m in med.items():
        status = agg(runs, c, "oha")["status"]
        rows.append([names[c], m["per"], f_rps(m["rps"]), f_rps(m["records_per_s"]),
                     f"{f_rps(m['range'][0])}–{f_rps(m['range'][1])}" if len(per_run) > len(med) else "–",
                     f_rps(m["delivered_per_s"]),
                     f_ratio(m["records_per_s"], med.get("single", {}).get("records_per_s")),
                     f_ratio(m["records_per_s"], med.get("nginx", {}).get("records_per_s")),
                     "–" if m["rpi"] is None else f"{m['rpi']:.1f}", f_ms(m["p50"]), f_ms(m["p99"]),
                     status_mix(status)])
    md.append("instant echo functions, no quotas; oha `-c64`; records/s = 2xx responses/s × records per "
              "request (median of rounds); delivered/s = records the emulator's function received ÷ run time; "
              "targets: bulk ≥ 5× single and ≥ 3× nginx\n")
    md.append(table(["path", "records / request", "req/s", "records/s", "range", "delivered/s",
                     "vs single", "vs nginx", "records / invoke", "p50 ms", "p99 ms", "statuses"], rows))
    return md, {"medians": med, "runs": per_run}, plots


SCENARIOS = {
    "shed": ("shed — one hot key far over its limit", report_shed),
    "passthrough": ("passthrough — cost added on the way to Lambda", report_passthrough),
    "seed000": ("seed000 — Lambda's 10 invokes/s quota, 3–5× offered", report_seed000),
    "manykeys": ("manykeys — shed path with many distinct keys", report_manykeys),
    "batching": ("batching — invokes per 1000 records, adaptive vs window", report_batching),
    "admitted": ("admitted — the admitted path at full speed, vs nginx proxy_pass", report_admitted),
    "noisy": ("noisy — a flooding key next to a light one, per_key vs fifo queue", report_noisy),
    "bulk": ("bulk — records/s through NDJSON requests of 100 records vs one per request", report_bulk),
}


def log_findings():
    notes = []
    for log in sorted((OUT / "logs").glob("*.sluicegate.log")):
        lines = ANSI.sub("", log.read_text(errors="replace")).splitlines()
        bad = [ln for ln in lines if " WARN " in ln or " ERROR " in ln or "panicked" in ln]
        if bad:
            uniq = []
            for ln in bad:
                msg = ln.split(" ", 1)[-1][:200]
                if msg not in uniq:
                    uniq.append(msg)
            notes.append(f"{log.name}: {len(bad)} warning/error lines, e.g. `{uniq[0]}`"
                         + (f" (+{len(uniq) - 1} distinct)" if len(uniq) > 1 else ""))
    return notes


def main():
    global OUT
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    OUT = Path(sys.argv[1]).resolve()
    meta = (jsonl(OUT / "meta.jsonl") or [{}])[-1]
    head = [f"# sluicegate load tests — {OUT.name}", ""]
    head.append(f"git `{meta.get('git', '?')}`, {meta.get('nproc', '?')} cores, load average at start "
                f"{meta.get('loadavg', '?')}, kernel {meta.get('kernel', '?')}; {meta.get('oha', 'oha ?')}, "
                f"{meta.get('wrk', 'wrk ?')}, nginx {meta.get('nginx', '?')}. Loads of "
                f"{meta.get('duration_s', '?')} s, {meta.get('rounds', '?')} A/B rounds"
                + (" — **quick dry run: numbers are not measurements**" if str(meta.get("quick")) == "1" else "")
                + ".")
    head.append("")
    body, summary_md, findings = [], [], []
    for name, (title, fn) in SCENARIOS.items():
        runs = load_runs(name)
        if not runs:
            continue
        md, summary, plots = fn(runs)
        findings += anomalies(name, runs)
        section = [f"## {title}", ""] + md + [""]
        section += [f"![{p}]({p})" for p in plots if p]
        body += section + [""]
        summary_md += [f"### {title}", ""] + md + [""]
        combined = {"scenario": name, "meta": meta, "summary": summary,
                    "runs": [{k: v for k, v in r.items() if k != "metrics"} | {"metrics": r["metrics"]}
                             for r in runs]}
        (OUT / f"{name}.json").write_text(json.dumps(combined, indent=1, default=str))
        print(f"\n== {title}")
        print("\n".join(md))
    findings += log_findings()
    tail = ["## Anomalies", ""]
    tail += [f"- {f}" for f in findings] if findings else ["none seen (statuses as designed, no client "
                                                          "errors, no WARN/ERROR lines in sluicegate's logs)"]
    report = "\n".join(head + body + tail) + "\n"
    (OUT / "report.md").write_text(report)
    latest = "\n".join(head + summary_md + tail) + "\n"
    # Only a measured run replaces the summary that may be committed; a --quick dry run
    # keeps its copy next to its report.
    quick = str(meta.get("quick")) == "1"
    target = (OUT / "summary.md") if quick else (OUT.parent / "latest-summary.md")
    target.write_text(latest.replace(f"# sluicegate load tests — {OUT.name}",
                                     f"# sluicegate load tests — latest summary ({OUT.name})"))
    print("\n== anomalies")
    print("\n".join(tail[2:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
