"""Plain-value conversions of the shared proto messages, for both worker roles (torch-free).

Converted once at the edge: SamplingParams travel as proto and become keyword arguments for
engine.SamplingParams (which validates them).
"""

from __future__ import annotations

from typing import Any

from proto import tandem_pb2 as pb

FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}


def sampling_kwargs(msg: pb.SamplingParams) -> dict[str, Any]:
    """proto SamplingParams -> keyword arguments of engine.sampling_params.SamplingParams."""
    return {
        "max_tokens": msg.max_tokens if msg.HasField("max_tokens") else None,
        "min_tokens": msg.min_tokens,
        "temperature": msg.temperature if msg.HasField("temperature") else 1.0,
        "top_p": msg.top_p if msg.HasField("top_p") else 1.0,
        "top_k": msg.top_k,
        "min_p": msg.min_p,
        "seed": msg.seed if msg.HasField("seed") else None,
        "presence_penalty": msg.presence_penalty,
        "frequency_penalty": msg.frequency_penalty,
        "repetition_penalty": (
            msg.repetition_penalty if msg.HasField("repetition_penalty") else 1.0
        ),
        "logit_bias": dict(msg.logit_bias),
        "stop": tuple(msg.stop),
        "stop_token_ids": tuple(msg.stop_token_ids),
        "include_stop_str_in_output": msg.include_stop_str_in_output,
        "ignore_eos": msg.ignore_eos,
        "logprobs": msg.logprobs if msg.HasField("logprobs") else None,
        "skip_special_tokens": not msg.keep_special_tokens,
    }


def logprob_to_proto(
    token_id: int, logprob: float, top: tuple[tuple[int, float], ...]
) -> pb.TokenLogprob:
    return pb.TokenLogprob(
        token_id=token_id,
        logprob=logprob,
        top_token_ids=[t for t, _ in top],
        top_logprobs=[lp for _, lp in top],
    )
