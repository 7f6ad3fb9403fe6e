"""Metrics against ground truth on a real cluster (router + workers as processes, tiny model).

A scripted, sequential set of requests with token-id prompts and forced output lengths makes
every counter predictable: tokens computed per role, prefix-cache hits, steps and batch sizes,
KV bytes moved, histogram counts. Each is checked exactly, on the router and on every worker
(found through the router's `/v1/metrics/targets`, as Prometheus finds them). Then every metric
the Grafana dashboard and the planner query must exist on the running cluster.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deploy.local_cluster import ClusterConfig, LocalCluster

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BLOCK_SIZE = 16
WORKER_ARGS = ("--num-blocks", "512", "--max-model-len", "512", "--block-size", str(BLOCK_SIZE))
# tiny_chat_model_dir: 2 layers x (k, v) x 2 kv heads x head_dim 16 x 4 bytes per token
BLOCK_BYTES = 2 * 2 * 2 * 16 * 4 * BLOCK_SIZE

PROMPT_A = list(range(1000, 1040))  # 40 tokens: 2 full blocks + 8
PROMPT_B = list(range(2000, 2020))  # 20 tokens
# (prompt, max_tokens, stream); sent one after the other
SCRIPT = [(PROMPT_A, 5, False), (PROMPT_B, 7, True), (PROMPT_A, 3, False)]
NUM = len(SCRIPT)
PROMPT_TOKENS = sum(len(p) for p, _, _ in SCRIPT)  # 100
OUTPUT_TOKENS = sum(n for _, n, _ in SCRIPT)  # 15
CACHED = 32  # the third request finds PROMPT_A's 2 full blocks (never its last token)
PREFILL_TOKENS = PROMPT_TOKENS - CACHED  # 68
DECODE_TOKENS = sum(n - 1 for _, n, _ in SCRIPT)  # 12: the first token comes from the prefill
# disagg: 8 prompt blocks, of which the third request's 2 full ones are in the decode worker's
# own prefix cache (from the first request): reused there, not transferred
REUSED_BLOCKS = CACHED // BLOCK_SIZE
KV_BYTES = (sum(-(-len(p) // BLOCK_SIZE) for p, _, _ in SCRIPT) - REUSED_BLOCKS) * BLOCK_BYTES


@pytest.fixture(scope="module", params=["collocated", "disagg"])
def cluster(request: pytest.FixtureRequest, tiny_chat_model_dir: Path) -> Iterator[LocalCluster]:
    mode = request.param
    config = ClusterConfig(
        model_dir=tiny_chat_model_dir,
        port=0,
        num_prefill=1 if mode == "disagg" else 0,
        num_decode=1,
        mode=mode,
        worker_args=WORKER_ARGS,
        router_args=("--served-model-name", "tiny", "--slo-ttft", "60", "--slo-itl", "60"),
        start_timeout_s=180,
    )
    c = LocalCluster(config).start()
    try:
        wait_for(lambda: httpx.get(f"{c.url}/health").status_code == 200, "router healthy")
        num_workers = 2 if mode == "disagg" else 1
        wait_for(lambda: len(targets(c)) == 1 + num_workers, "every worker's metrics target")
        yield c
    finally:
        c.stop()


def wait_for(condition: object, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise TimeoutError(f"waited {timeout_s} s for {what}")


def targets(c: LocalCluster) -> list[dict]:
    groups = httpx.get(f"{c.url}/v1/metrics/targets").json()
    assert isinstance(groups, list)
    return groups


def scrape(address: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = httpx.get(f"http://{address}/metrics").text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples named `name` whose labels include `labels`."""
    want = set(labels.items())
    found = [v for (n, lbl), v in samples.items() if n == name and want <= lbl]
    assert found, f"no sample {name}{labels}"
    return float(sum(found))


def by_pool(c: LocalCluster) -> dict[str, str]:
    """tandem_pool (router/prefill/decode) -> its one metrics address."""
    return {g["labels"]["tandem_pool"]: g["targets"][0] for g in targets(c)}


def run_script(url: str) -> None:
    for prompt, max_tokens, stream in SCRIPT:
        body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "stream": stream,
                "temperature": 0, "ignore_eos": True}  # fmt: skip
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
    bad = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "x", "n": 0})
    assert bad.status_code == 400


def test_counters_equal_the_ground_truth(cluster: LocalCluster) -> None:
    mode = cluster.config.mode
    run_script(cluster.url)
    pools = by_pool(cluster)
    # streamed responses finish their timing just after [DONE]: wait for the last one
    wait_for(
        lambda: (
            value(scrape(pools["router"]), "tandem_router_e2e_request_latency_seconds_count") == NUM
        ),
        "the router's e2e count",
    )
    r = scrape(pools["router"])
    assert value(r, "tandem_router_requests_total", endpoint="/v1/completions", status="200") == NUM
    assert value(r, "tandem_router_requests_total", endpoint="/v1/completions", status="400") == 1
    assert value(r, "tandem_router_finished_choices_total", reason="length") == NUM
    assert value(r, "tandem_router_prompt_tokens_total") == PROMPT_TOKENS
    assert value(r, "tandem_router_generation_tokens_total") == OUTPUT_TOKENS
    assert value(r, "tandem_router_request_prompt_tokens_sum") == PROMPT_TOKENS
    assert value(r, "tandem_router_request_prompt_tokens_count") == NUM
    assert value(r, "tandem_router_request_generation_tokens_sum") == OUTPUT_TOKENS
    assert value(r, "tandem_router_request_generation_tokens_count") == NUM
    for name in ("time_to_first_token", "e2e_request_latency", "overhead", "dispatch"):
        assert value(r, f"tandem_router_{name}_seconds_count") == NUM, name
    assert value(r, "tandem_router_inter_token_latency_seconds_count") == DECODE_TOKENS
    assert value(r, "tandem_router_time_per_output_token_seconds_count") == NUM
    assert value(r, "tandem_router_goodput_requests_total") == NUM  # generous SLOs: all meet
    assert value(r, "tandem_router_slo_seconds", slo="ttft") == 60
    where = "remote" if mode == "disagg" else "local"
    assert value(r, "tandem_router_route_decisions_total", mode=mode, prefill=where,
                 reason=mode) == NUM  # fmt: skip
    assert value(r, "tandem_router_worker_inflight_requests") == 0
    assert value(r, "tandem_router_worker_prefilling_requests") == 0

    d = scrape(pools["decode"])
    assert value(d, "tandem_worker_requests_total", outcome="length", role="decode") == NUM
    assert value(d, "tandem_worker_request_duration_seconds_count") == NUM
    assert value(d, "tandem_worker_decode_tokens_total") == DECODE_TOKENS
    assert value(d, "tandem_worker_preemptions_total") == 0
    assert value(d, "tandem_worker_requests_running") == 0
    assert value(d, "tandem_worker_requests_waiting") == 0
    assert value(d, "tandem_worker_kv_blocks_used") == 0
    assert value(d, "tandem_worker_kv_blocks_capacity") == 512
    # usage.cached_tokens: the longer of the prefill and decode workers' prefix hits
    assert value(r, "tandem_router_cached_prompt_tokens_total") == CACHED
    if mode == "collocated":
        # the decode worker prefills too: one step per prompt, then one per decode token
        computes_prompts, steps = d, NUM + DECODE_TOKENS
        assert value(d, "tandem_worker_kv_transfer_bytes_total") == 0
    else:
        p = scrape(pools["prefill"])
        computes_prompts = p
        steps = DECODE_TOKENS
        assert value(d, "tandem_worker_prefill_tokens_total") == 0
        assert value(d, "tandem_worker_prefix_cache_queries_total") == 0
        assert value(d, "tandem_worker_request_queue_time_seconds_count") == 0
        assert value(d, "tandem_worker_kv_transfer_bytes_total") == KV_BYTES
        assert value(d, "tandem_worker_kv_reused_blocks_total") == REUSED_BLOCKS
        assert value(d, "tandem_worker_kv_wait_seconds_count") == NUM
        assert value(p, "tandem_worker_requests_total", outcome="ok", role="prefill") == NUM
        assert value(p, "tandem_worker_request_duration_seconds_count") == NUM
        assert value(p, "tandem_worker_decode_tokens_total") == 0
        assert value(p, "tandem_worker_kv_transfer_bytes_total") == KV_BYTES
        assert value(p, "tandem_worker_kv_transfer_seconds_count") == NUM
        assert value(p, "tandem_worker_kv_blocks_used") == 0  # every hand-off released
        # one step per prompt (each fits the token budget; max_tokens=1 there)
        assert value(p, "tandem_worker_step_duration_seconds_count") == NUM
        assert value(p, "tandem_worker_batch_size_sum") == NUM
    # one row per step: the requests run one after the other
    assert value(d, "tandem_worker_step_duration_seconds_count") == steps
    assert value(d, "tandem_worker_batch_size_count") == steps
    assert value(d, "tandem_worker_batch_size_sum") == steps
    w = computes_prompts
    assert value(w, "tandem_worker_prefill_tokens_total") == PREFILL_TOKENS
    assert value(w, "tandem_worker_prefix_cache_queries_total") == PROMPT_TOKENS
    assert value(w, "tandem_worker_prefix_cache_hits_total") == CACHED
    assert value(w, "tandem_worker_request_queue_time_seconds_count") == NUM
    role = "prefill" if mode == "disagg" else "decode"
    labels = dict(role=role, worker_id=f"{role}-0", model=cluster.config.model_dir.name, gpu="cpu")
    assert value(w, "tandem_worker_prefill_tokens_total", **labels) == PREFILL_TOKENS


def exported_names(address: str) -> set[str]:
    """Every series name a scrape of `address` can hold, sampled now or not (a labelled counter
    with no child yet has only its HELP and TYPE lines)."""
    names: set[str] = set()
    text = httpx.get(f"http://{address}/metrics").text
    for family in text_string_to_metric_families(text):
        suffixes = {
            "counter": ("_total",),
            "histogram": ("_bucket", "_sum", "_count"),
        }.get(family.type, ("",))
        names.update(family.name + s for s in suffixes)
    return names


def dashboard_metric_names() -> set[str]:
    dashboard = json.loads((REPO / "deploy/grafana/tandem.json").read_text())
    exprs: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, item in node.items():
                if key in ("expr", "query") and isinstance(item, str):
                    exprs.append(item)
                else:
                    walk(item)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(dashboard)
    assert exprs, "the dashboard has no queries"
    return {m for e in exprs for m in re.findall(r"\btandem_[a-z0-9_]+", e)}


def test_every_metric_the_dashboard_and_the_planner_query_exists(cluster: LocalCluster) -> None:
    from deploy.plan import PLANNER_METRICS

    exported: set[str] = set()
    for group in targets(cluster):
        exported |= exported_names(group["targets"][0])
    wanted = dashboard_metric_names() | set(PLANNER_METRICS)
    missing = sorted(wanted - exported)
    assert not missing, f"queried but not exported: {missing}"
