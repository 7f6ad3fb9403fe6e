"""Against a running `tandem serve`: chat requests, where each worker's GPU is, and the KV
transfer metrics of the workers (bytes moved, transfer seconds). Prints one report.

    python3 scripts/device/serve-check.py http://127.0.0.1:8000 MODEL_NAME
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx


def chat(url: str, model: str, prompt: str, max_tokens: int) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
    }
    t0 = time.monotonic()
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    dt = time.monotonic() - t0
    print(f"POST /v1/chat/completions -> {r.status_code} in {dt * 1e3:.0f} ms")
    print(f"  x-tandem-route: {r.headers.get('x-tandem-route')}")
    if r.status_code == 200:
        reply = r.json()
        text = reply["choices"][0]["message"]["content"]
        print(f"  usage: {reply['usage']}")
        print(f"  content (dummy weights, noise): {text[:80]!r}")
    else:
        print(f"  body: {r.text[:400]}")


def main() -> None:
    url, model = sys.argv[1], sys.argv[2]
    for prompt, n in [
        ("What is the capital of France?", 16),
        ("Write a haiku about GPUs.", 24),
        ("Summarize: " + "NVLink moves KV blocks between GPUs. " * 120, 8),  # ~1,000 tokens
        ("Count: " + " ".join(str(i) for i in range(1500)), 8),  # ~3,000 tokens
    ]:
        chat(url, model, prompt, n)
    print("\nnvidia-smi (GPU index, bus id) and the processes on each GPU:")
    print(
        subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=index,uuid,pci.bus_id,memory.used",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
        ).stdout
    )
    apps = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,gpu_uuid,used_memory", "--format=csv,noheader"],
        capture_output=True,
        text=True,
    ).stdout
    for line in apps.strip().splitlines():
        pid = line.split(",")[0].strip()
        cmd = subprocess.run(["ps", "-o", "args=", "-p", pid], capture_output=True, text=True)
        print(f"  {line}  <- {cmd.stdout.strip()[:140]}")
    targets = httpx.get(f"{url}/v1/metrics/targets", timeout=10).json()
    print(f"\nworker metrics targets: {json.dumps(targets)}")
    for group in targets:
        for target in group.get("targets", []):
            text = httpx.get(f"http://{target}/metrics", timeout=10).text
            print(f"-- {target} {group.get('labels', {})}")
            for line in text.splitlines():
                if line.startswith("tandem_worker_kv_transfer") and not any(
                    part in line for part in ("_bucket", "_created")
                ):
                    print("  " + line)


if __name__ == "__main__":
    main()
