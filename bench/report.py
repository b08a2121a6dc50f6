"""Markdown tables from the JSON-lines results, and `docs/performance.md`.

Figures are medians over repeats; ratios compare dualcast with the best peer of
the same run, since these shared 2-core machines drift between runs.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from bench.procs import ROOT

RESULTS = ROOT / "bench" / "results"
NOTES = ROOT / "bench" / "NOTES.md"  # hand-written findings, appended to docs/performance.md
MODES = ["saturation", "matrix", "idle", "routing", "poll", "workers"]


def interleaved(labels: list[str], repeat: int, run: Callable[[str], dict[str, Any]],
                figure: str, unit: str) -> None:
    """`repeat` rounds of `run(label)` for each label in turn (interleaved, so a drift of
    the machine touches every label alike): each run's JSON line, then each label's
    median of `figure` with every run's value."""
    runs: dict[str, list[float]] = {label: [] for label in labels}
    for _ in range(repeat):
        for label in labels:
            result = run(label)
            print(json.dumps(result), flush=True)
            runs[label].append(float(result[figure]))
    for label, values in runs.items():
        print(f"{label}: median {statistics.median(values):.1f} {unit} "
              f"({' / '.join(f'{v:.1f}' for v in values)})")


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": model or platform.processor(),
            "python": platform.python_version(), "kernel": platform.release()}


def load(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def med(values: Iterable[Any]) -> float | None:
    nums = [v for v in values if isinstance(v, int | float) and v == v]
    return statistics.median(nums) if nums else None


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _group(
    records: list[dict[str, Any]], *keys: str
) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[tuple(r.get(k) for k in keys)].append(r)
    return groups


def best_peer(values: dict[str, float | None], higher_is_better: bool = True) -> tuple[str, float]:
    peers = {k: v for k, v in values.items() if not k.startswith("dualcast") and v}
    if not peers:
        return ("-", float("nan"))
    pick = max if higher_is_better else min
    name = pick(peers, key=lambda k: peers[k])  # type: ignore[arg-type,return-value]
    return name, float(peers[name])  # type: ignore[arg-type]


def saturation_md(records: list[dict[str, Any]]) -> str:
    summary = [r for r in records if r.get("mode") == "saturation"]
    if not summary:
        return ""
    rows, sat = [], {}
    for (kind,), rs in _group(summary, "target").items():
        sat[kind] = med(r["saturation_deliveries_per_s"] for r in rs)
        rows.append([kind, sat[kind], len(rs),
                     " / ".join(fmt(r["saturation_deliveries_per_s"]) for r in rs),
                     med(r["rate"] for r in rs), med(r["p99_ms"] for r in rs),
                     med(r["server_us_per_delivery"] for r in rs),
                     med(r["generator_cpu_pct"] for r in rs)])
    rows.sort(key=lambda row: -(row[1] or 0))
    text = table(["target", "saturation deliveries/s (median)", "runs", "each run",
                  "events/s at it", "p99 ms", "server µs/delivery", "generator CPU %"], rows)
    ratios = []
    for kind in ("dualcast-ws", "dualcast-sse"):
        ours = sat.get(kind)
        if not ours:
            continue
        for peer in ("broadcaster-ws", "broadcaster-sse", "socketio-ws"):
            theirs = sat.get(peer)
            if theirs:
                ratios.append(f"{kind} / {peer}: **{ours / theirs:.2f}x**")
    if ratios:
        text += "\n\nRatios of medians: " + "; ".join(ratios) + "."
    return text


def matrix_md(records: list[dict[str, Any]]) -> str:
    rs = [r for r in records if r.get("mode") == "matrix"]
    if not rs:
        return ""
    rows = []
    for (n, rate, kind), g in sorted(_group(rs, "clients", "rate", "target").items(),
                                     key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        rows.append([n, rate, kind, med(r["deliveries_per_s"] for r in g),
                     med(r["p50_ms"] for r in g), med(r["p90_ms"] for r in g),
                     med(r["p99_ms"] for r in g), med(r["max_ms"] for r in g),
                     med(r["lost"] for r in g), med(r["duplicated"] for r in g),
                     med(r["out_of_order"] for r in g), med(r["closed"] for r in g),
                     med(r["rss_per_conn_kb"] for r in g), med(r["server_cpu_pct"] for r in g),
                     med(r["server_us_per_delivery"] for r in g),
                     med(r["generator_cpu_pct"] for r in g), med(r["redis_cpu_pct"] for r in g)])
    return table(["clients", "events/s", "target", "deliveries/s", "p50 ms", "p90 ms", "p99 ms",
                  "max ms", "lost", "dup", "out of order", "cut off", "KB/conn",
                  "server CPU %", "server µs/delivery", "generator CPU %", "redis CPU %"], rows)


def idle_md(records: list[dict[str, Any]]) -> str:
    rs = [r for r in records if r.get("mode") == "idle"]
    if not rs:
        return ""
    rows = [[r["target"], r["connected"], r["rss_per_conn_kb"], r["idle_server_cpu_pct"],
             r["window_s"], r["alive_at_end"]] for r in rs]
    return table(["target", "idle connections", "KB RSS per connection",
                  "server CPU % of a core (heartbeats only)", "window s", "alive at end"], rows)


def routing_md(records: list[dict[str, Any]]) -> str:
    rs = [r for r in records if r.get("mode") == "routing"]
    if not rs:
        return ""
    rows = [[r["clients"], r["rooms"], r["receivers"], r["sent"], r["dispatch_us_per_event"],
             r["server_us_per_event"], r["idle_server_cpu_pct"], r["p50_ms"], r["p99_ms"],
             r["lost"], r["misrouted"]] for r in rs]
    text = table(["subscribers", "user rooms", "in the target room", "events",
                  "dispatch µs/event (minus idle)", "server µs/event (total)",
                  "idle server CPU %", "p50 ms", "p99 ms", "lost", "misrouted"], rows)
    by_n = {r["clients"]: r for r in rs}
    if len(by_n) >= 2:
        small, large = by_n[min(by_n)], by_n[max(by_n)]
        if small["dispatch_us_per_event"] > 0:
            ratio = large["dispatch_us_per_event"] / small["dispatch_us_per_event"]
            text += (f"\n\nDispatch cost ratio {large['clients']:,} vs {small['clients']:,} "
                     f"subscribers: **{ratio:.2f}x** (target: within 1.2x).")
    return text


def poll_md(records: list[dict[str, Any]]) -> str:
    """Medians per (served, pollers, rate, server workers) over the repeats."""
    rs = [r for r in records if r.get("mode") == "poll"]
    if not rs:
        return ""
    groups = _group(rs, "served", "clients", "rate", "server_workers")
    rows = []
    for (served, n, rate, count), g in groups.items():
        rows.append([served, n, rate, count or 1, len(g),
                     med(r["deliveries_per_s"] for r in g), med(r["p50_ms"] for r in g),
                     med(r["p99_ms"] for r in g), " / ".join(fmt(r["p99_ms"]) for r in g),
                     max(r["max_ms"] for r in g), sum(r["lost"] for r in g),
                     sum(r["closed"] for r in g), med(r["server_cpu_pct"] for r in g),
                     med(r.get("generator_cpu_pct") for r in g),
                     med(r["redis_cpu_pct"] for r in g)])
    return table(["served", "pollers", "events/s", "server workers", "runs", "deliveries/s",
                  "p50 ms", "p99 ms (median)", "each run p99", "max ms", "lost (all runs)",
                  "cut off", "server CPU %", "generator CPU %", "redis CPU %"], rows)


def workers_md(records: list[dict[str, Any]]) -> str:
    """Per delivery and per event read, each worker count against the first one."""
    rs = [r for r in records if r.get("mode") == "workers"]
    if not rs:
        return ""
    groups = _group(rs, "target", "clients", "rate", "server_workers")
    base: dict[tuple[Any, ...], float | None] = {}
    rows = []
    for (kind, n, rate, count), g in sorted(groups.items(), key=lambda kv: kv[0][1:]):
        us = med(r["server_us_per_delivery"] for r in g)
        per_event = med(1e6 * r["server_cpu_s"] / r["sent"] for r in g if r.get("sent"))
        ref = base.setdefault((kind, n, rate), us)
        ratio = f"{us / ref:.3f}x" if us is not None and ref else "-"
        rows.append([kind, n, rate, count, len(g), med(r["deliveries_per_s"] for r in g),
                     us, " / ".join(fmt(r["server_us_per_delivery"]) for r in g), ratio,
                     per_event, med(r["server_cpu_pct"] for r in g), med(r["p50_ms"] for r in g),
                     med(r["p99_ms"] for r in g), sum(r["lost"] for r in g),
                     " / ".join("+".join(map(str, r.get("clients_per_worker") or ["?"]))
                                for r in g),
                     " / ".join("+".join(map(str, r.get("us_per_event_by_process") or ["?"]))
                                for r in g)])
    return table(["target", "clients", "events/s", "server workers", "runs", "deliveries/s",
                  "server µs/delivery (median)", "each run", "vs fewest workers",
                  "server µs/event", "server CPU %", "p50 ms", "p99 ms", "lost (all runs)",
                  "clients per worker (each run)", "µs/event by process (each run)"], rows)


RENDER = {"saturation": saturation_md, "matrix": matrix_md, "idle": idle_md,
          "routing": routing_md, "poll": poll_md, "workers": workers_md}
TITLES = {
    "saturation": "Saturation (1,000 clients; zero loss and p99 ≤ 250 ms)",
    "matrix": "Fixed matrix",
    "idle": "Idle connections",
    "routing": "Routing cost (events for one user room)",
    "poll": "Long-polling",
    "workers": "Workers: the same load on one and on two server processes",
}


def latest_files() -> dict[str, Path]:
    """The newest results file of each mode (files are named `<mode>-<UTC stamp>.jsonl`)."""
    found: dict[str, Path] = {}
    for path in sorted(RESULTS.glob("*.jsonl")):
        mode = path.name.split("-", 1)[0]
        found[mode] = path
    return found


def markdown(records: list[dict[str, Any]]) -> str:
    parts = []
    for mode in MODES:
        body = RENDER[mode](records)
        if body:
            parts.append(f"### {TITLES[mode]}\n\n{body}")
    return "\n\n".join(parts)


def write_docs(path: Path, intro: str) -> Path:
    files = latest_files()
    sections = []
    for mode in MODES:
        if mode not in files:
            continue
        records = load(files[mode])
        body = RENDER[mode](records)
        if not body:
            continue
        meta = records[0]
        cmd = meta.get("command", "")
        when = meta.get("started", "")
        served = ", ".join(sorted({r["served"] for r in records if r.get("served")}))
        sections.append(
            f"## {TITLES[mode]}\n\nRun {when}, `{files[mode].name}`; command: `{cmd}`; "
            f"served: {served}\n\n{body}"
        )
    m = machine()
    head = (f"# Performance\n\n{intro}\n\nMachine: {m['nproc']} CPUs, {m['cpu']}, "
            f"Python {m['python']}, Linux {m['kernel']}.\n")
    notes = NOTES.read_text().strip() if NOTES.exists() else ""
    tail = f"\n\n{notes}\n" if notes else "\n"
    path.write_text(head + "\n" + "\n\n".join(sections) + tail)
    return path
