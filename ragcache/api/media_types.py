"""The media types of responses that are not JSON, as the OpenAPI schema states them, so
that the schema names every body a route can send."""

from __future__ import annotations

from typing import Any

EVENT_STREAM = "text/event-stream"
OPENMETRICS = "application/openmetrics-text"

# A route that answers JSON, or server-sent events when the request asks to stream.
JSON_OR_EVENT_STREAM: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "JSON, or server-sent events when the request sets stream",
        "content": {EVENT_STREAM: {"schema": {"type": "string"}}},
    }
}

# /metrics: the Prometheus text format, or OpenMetrics when the scraper accepts it.
PROMETHEUS_TEXT: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Prometheus text format, or OpenMetrics on request",
        "content": {OPENMETRICS: {"schema": {"type": "string"}}},
    }
}
