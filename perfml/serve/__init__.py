"""`perfml serve`: the HTTP server and its continuous-batching engine (perfml.serve.engine)."""

from perfml.serve.engine import (
    Engine,
    Event,
    QueueFull,
    Request,
    RequestTooLong,
    SamplingParams,
)

__all__ = ["Engine", "Event", "QueueFull", "Request", "RequestTooLong", "SamplingParams"]
