"""Split the low-load TTFT of one deployment into parts, from two metric dumps of
scripts/device/scrape_metrics.py taken before and after a one-at-a-time run of bench.serve.

    python3 scripts/device/ttft_parts.py before.txt after.txt probe.json

Each part is the mean over the run's requests (the difference of a histogram's _sum over the
difference of its _count): the router's TTFT and dispatch time, on a decode worker the wait
for a remote prefill (request sent on the PrefillSession -> KV landed) and its Generate call
to the first message, on a prefill worker one request in its servicer (compute, then KV
transfer) and the KV transfer. The client's TTFT (probe.json, bench.serve) adds the HTTP hop
to the router's.
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict

PARTS = (  # (metric, role or "" for the router, label)
    ("tandem_router_time_to_first_token_seconds", "", "router TTFT"),
    ("tandem_router_dispatch_seconds", "", "router dispatch"),
    ("tandem_worker_kv_wait_seconds", "decode", "decode: remote prefill wait (RPC -> KV landed)"),
    # the decode worker's steps of a remote prefill (a `step` label: metric[step]); reserve and
    # lease overlap the remote prefill, destination_wait is the part of them it waited for
    ("tandem_worker_time_to_first_token_seconds", "decode", "decode: Generate -> first message"),
    ("tandem_worker_remote_prefill_step_seconds[reserve]", "decode", "decode: reserve (1 command)"),
    ("tandem_worker_remote_prefill_step_seconds[lease]", "decode", "decode: sink lease"),
    (
        "tandem_worker_remote_prefill_step_seconds[first_token]",
        "decode",
        "decode: remote prefill, request sent -> first token",
    ),
    (
        "tandem_worker_remote_prefill_step_seconds[first_output]",
        "decode",
        "decode: first token's output (1 command)",
    ),
    (
        "tandem_worker_remote_prefill_step_seconds[kv_send]",
        "decode",
        "decode: first token -> reply (KV written; off TTFT)",
    ),
    (
        "tandem_worker_remote_prefill_step_seconds[destination_wait]",
        "decode",
        "decode: computed KV waiting for reserve + lease",
    ),
    ("tandem_worker_remote_prefill_step_seconds[outcome]", "decode", "decode: sink outcome"),
    ("tandem_worker_remote_prefill_step_seconds[admit]", "decode", "decode: admit (1 command)"),
    ("tandem_worker_request_duration_seconds", "prefill", "prefill: one request in its servicer"),
    ("tandem_worker_request_queue_time_seconds", "prefill", "prefill: queued in its engine"),
    ("tandem_worker_kv_transfer_seconds", "prefill", "prefill: KV transfer"),
    ("tandem_worker_request_queue_time_seconds", "decode", "decode: queued in its engine"),
    ("tandem_worker_step_duration_seconds", "prefill", "prefill: engine step"),
    ("tandem_worker_step_duration_seconds", "decode", "decode: engine step"),
)
LINE = re.compile(r"^(\w+?)_(sum|count)(?:\{(.*)\})? ([-+0-9.eE]+|NaN)$")


def read(path: str) -> dict[tuple[str, str, str], float]:
    """(metric, role, sum|count) -> value, summed over workers; the router counted once."""
    out: dict[tuple[str, str, str], float] = defaultdict(float)
    seen_router = False
    section = ""
    with open(path) as f:
        for line in f:
            if line.startswith("== "):
                section = line.split()[1]
                if section == "router":
                    seen_router_now = seen_router
                    seen_router = True
                    section = "router-dup" if seen_router_now else "router"
                continue
            m = LINE.match(line.strip())
            if not m or section == "router-dup":
                continue
            name, kind, labels, value = m.groups()
            role = ""
            if labels and (r := re.search(r'role="(\w+)"', labels)):
                role = r.group(1)
            if labels and (st := re.search(r'step="(\w+)"', labels)):
                name = f"{name}[{st.group(1)}]"
            if section == "router" and name.startswith("tandem_router_"):
                out[(name, "", kind)] += float(value)
            elif section == "worker" and name.startswith("tandem_worker_"):
                out[(name, role, kind)] += float(value)
    return out


def main() -> None:
    before, after = read(sys.argv[1]), read(sys.argv[2])
    lines = []
    if len(sys.argv) > 3:
        try:
            with open(sys.argv[3]) as f:
                probe = json.load(f)
            ttft = probe["ttft_s"]
            lines.append(
                f"client TTFT: mean {ttft['mean'] * 1000:.1f} ms, p50 {ttft['p50'] * 1000:.1f} ms "
                f"({probe.get('completed', '?')} requests one at a time)"
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            lines.append(f"client TTFT: not read ({exc!r})")
    for metric, role, label in PARTS:
        n = after.get((metric, role, "count"), 0.0) - before.get((metric, role, "count"), 0.0)
        s = after.get((metric, role, "sum"), 0.0) - before.get((metric, role, "sum"), 0.0)
        if n > 0:
            lines.append(f"  {label:<48} {s / n * 1000:8.2f} ms  (n={n:.0f})")
    print(f"{sys.argv[2]}:")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
