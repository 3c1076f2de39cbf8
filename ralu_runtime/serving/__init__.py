"""Serving: the continuous-batching engine (:mod:`ralu_runtime.serving.engine`) and its HTTP API
(:mod:`ralu_runtime.serving.http`, ``ralu serve``)."""
from .engine import (DEFAULT_TOKEN_BUDGET, DeadlineExceeded, Engine, EngineBusy, EngineClosed, EngineConfig,
                     RequestCancelled, RequestHandle)

__all__ = ["Engine", "EngineConfig", "RequestHandle", "EngineBusy", "EngineClosed", "DeadlineExceeded",
           "RequestCancelled", "DEFAULT_TOKEN_BUDGET"]
