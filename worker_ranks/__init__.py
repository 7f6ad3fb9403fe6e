"""The ranks of a tensor-parallel worker: one process per rank, started by rank 0.

`python -m prefill_worker|decode_worker --tensor-parallel-size N` is rank 0: it serves gRPC,
owns the engine (scheduler, block manager) and the KV protocol with the other role's workers.
It starts ranks 1..N-1 as `python -m worker_ranks` children (launch.py), each of which holds
its model shard and KV pool shard (engine/parallel.py), runs every StepPlan rank 0 broadcasts
(ModelRunner.serve_followers) and runs its own KV endpoint (a Sink or a Source with its own NIXL
agent) commanded by rank 0 over the rank channel (kv_transfer/rank_channel.py).

One failure unit: a follower dies with rank 0 (PR_SET_PDEATHSIG), and rank 0 exits when a
follower dies (its collectives could not go on), so a crashed TP worker is restarted whole.
"""
