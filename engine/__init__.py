"""The shared torch engine: paged KV, continuous batching, sampling. No network, no roles."""

from engine.args import EngineArgs
from engine.config import EngineConfig, ModelConfig
from engine.engine import Engine
from engine.llm import LLM
from engine.outputs import CompletionOutput, GenerationResult, RequestOutput
from engine.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "CompletionOutput",
    "Engine",
    "EngineArgs",
    "EngineConfig",
    "GenerationResult",
    "ModelConfig",
    "RequestOutput",
    "SamplingParams",
]
