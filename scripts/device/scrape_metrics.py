"""Dump the Prometheus metrics of a running `tandem serve`: the router's and every worker's
(found through the router's `/v1/metrics/targets`), one file, `_bucket`/`_created` lines left out.

    python3 scripts/device/scrape_metrics.py http://127.0.0.1:8000 metrics.txt

Then the mean KV transfer time of the run is tandem_worker_kv_transfer_seconds_sum / _count
on the prefill workers (docs/metrics.md).
"""

from __future__ import annotations

import sys

import httpx


def keep(line: str) -> bool:
    return not line.startswith("#") and "_bucket" not in line and "_created" not in line


def main() -> None:
    url, out = sys.argv[1].rstrip("/"), sys.argv[2]
    parts = [f"== router {url}"]
    parts += [
        line for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines() if keep(line)
    ]
    for group in httpx.get(f"{url}/v1/metrics/targets", timeout=10).json():
        for target in group.get("targets", []):
            text = httpx.get(f"http://{target}/metrics", timeout=10).text
            parts.append(f"== worker {target} {group.get('labels', {})}")
            parts += [line for line in text.splitlines() if keep(line)]
    with open(out, "w") as f:
        f.write("\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
