"""Serving: the continuous-batching engine (:mod:`ralu_runtime.serving.engine`) and its HTTP API
(:mod:`ralu_runtime.serving.http`, ``ralu serve``; the OpenAI request / response layer it shares with the Ray Serve
front-end is :mod:`ralu_runtime.serving.protocol`)."""
from .engine import (DEFAULT_TOKEN_BUDGET, DeadlineExceeded, Engine, EngineBusy, EngineClosed, EngineConfig,
                     RequestCancelled, RequestHandle)

__all__ = ["Engine", "EngineConfig", "RequestHandle", "EngineBusy", "EngineClosed", "DeadlineExceeded",
           "RequestCancelled", "DEFAULT_TOKEN_BUDGET"]
