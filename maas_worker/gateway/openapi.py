"""The gateway's OpenAPI 3.1 document, served at ``/openapi.json``.

Written by hand, beside the routes it describes (http.py): the checked-in
copy, docs/gateway-openapi.json, is compared with it by a test
(``python -m maas_worker.gateway.openapi > docs/gateway-openapi.json`` rewrites it).
"""

from __future__ import annotations

import json
from typing import Any

from maas_worker import __version__

_JOB_ID = {
    "name": "job_id",
    "in": "path",
    "required": True,
    "description": "the job id: the envelope's job_id, a lowercase hyphenated UUID",
    "schema": {"type": "string"},
}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "seconds to wait before trying again",
        "schema": {"type": "integer", "minimum": 1},
    }
}


def _error(description: str, *, retry: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if retry:
        out["headers"] = _RETRY_AFTER
    return out


_AUTH_ERRORS = {"401": _error("missing or invalid bearer token")}


def document() -> dict[str, Any]:
    """The OpenAPI document (a fresh dict each call)."""
    accepted = {
        "description": "accepted and queued (or the same envelope again: `duplicate` true)",
        "headers": {
            "Location": {"description": "the job's URL", "schema": {"type": "string"}},
        },
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Accepted"}}},
    }
    submit_errors = {
        "400": _error("not a well-formed request envelope"),
        "401": _error("missing or invalid bearer token, or the envelope's MAC does not check"),
        "403": _error("the tenant's policy refuses the model or priority, or another tenant"),
        "408": _error("the body did not arrive in time (MAAS_GATEWAY_BODY_TIMEOUT_S)"),
        "409": _error("the job id is in use by another envelope"),
        "413": _error("the body is too large"),
        "415": _error("wrong Content-Type"),
        "422": _error("the envelope is expired, or names a model no worker serves"),
        "429": _error("the tenant is over its rate or in-flight quota", retry=True),
        "503": _error("a queue is full or Redis is unavailable", retry=True),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "maas-worker gateway",
            "version": __version__,
            "description": "Submit jobs sealed end to end (docs/envelope.md) and read their "
            "sealed results over HTTP. The gateway checks envelopes with the tenants' MAC keys "
            "and never holds a key that decrypts (docs/gateway.md).",
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/jobs": {
                "post": {
                    "operationId": "submitJob",
                    "summary": "Submit one sealed request envelope",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/octet-stream": {
                                "schema": {"type": "string", "format": "binary"}
                            }
                        },
                    },
                    "responses": {"202": accepted, **submit_errors},
                }
            },
            "/v1/jobs:batch": {
                "post": {
                    "operationId": "submitJobs",
                    "summary": "Submit many envelopes in one request; one status per item",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Batch"}}
                        },
                    },
                    "responses": {
                        "200": {
                            "description": "one item per envelope, in order",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/BatchResult"}
                                }
                            },
                        },
                        "400": _error("not a batch document"),
                        "401": _error("missing or invalid bearer token"),
                        "408": _error("the body did not arrive in time"),
                        "413": _error("too large, or more envelopes than MAAS_GATEWAY_MAX_BATCH"),
                        "415": _error("wrong Content-Type"),
                    },
                }
            },
            "/v1/jobs/{job_id}": {
                "get": {
                    "operationId": "getJob",
                    "summary": "The job's state, and its sealed result once there is one",
                    "parameters": [
                        _JOB_ID,
                        {
                            "name": "wait",
                            "in": "query",
                            "required": False,
                            "description": "long-poll: wait up to this many seconds for "
                            "the job to end (capped by MAAS_GATEWAY_MAX_WAIT_S)",
                            "schema": {"type": "number", "minimum": 0, "maximum": 3600},
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "where the job stands",
                            "content": {
                                "application/json": {"schema": {"$ref": "#/components/schemas/Job"}}
                            },
                        },
                        "400": _error("wait is not a number of seconds"),
                        **_AUTH_ERRORS,
                        "404": _error("no such job of this tenant"),
                        "503": _error("Redis is unavailable", retry=True),
                    },
                },
                "delete": {
                    "operationId": "cancelJob",
                    "summary": "Cancel the job (as its tenant)",
                    "parameters": [_JOB_ID],
                    "responses": {
                        "200": {
                            "description": "cancel_requested false: it had already ended",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Cancelled"}
                                }
                            },
                        },
                        **_AUTH_ERRORS,
                        "404": _error("no such job of this tenant"),
                        "503": _error("Redis is unavailable", retry=True),
                    },
                },
            },
            "/healthz": {
                "get": {
                    "operationId": "health",
                    "summary": "200 while Redis answers",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "healthy",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "properties": {"ok": {"type": "boolean"}},
                                        "required": ["ok"],
                                    }
                                }
                            },
                        },
                        "503": _error("Redis does not answer", retry=True),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus counters",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "Prometheus text format 0.0.4",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "OpenAPI 3.1",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "<tenant>.<key version>.<base64url token>, derived from the "
                    "tenant's root secret (docs/gateway.md)",
                }
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
                    "required": ["error", "message"],
                },
                "Accepted": {
                    "type": "object",
                    "properties": {
                        "job_id": {"type": "string"},
                        "state": {"type": "string", "enum": ["queued"]},
                        "url": {"type": "string"},
                        "duplicate": {"type": "boolean"},
                    },
                    "required": ["job_id", "state", "url", "duplicate"],
                },
                "Batch": {
                    "type": "object",
                    "properties": {
                        "envelopes": {
                            "type": "array",
                            "items": {"type": "string", "contentEncoding": "base64"},
                        }
                    },
                    "required": ["envelopes"],
                },
                "BatchResult": {
                    "type": "object",
                    "properties": {
                        "items": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "status": {"type": "integer"},
                                    "job_id": {"type": "string"},
                                    "url": {"type": "string"},
                                    "error": {"type": "string"},
                                    "message": {"type": "string"},
                                    "retry_after": {"type": "number"},
                                },
                                "required": ["status"],
                            },
                        }
                    },
                    "required": ["items"],
                },
                "Job": {
                    "type": "object",
                    "properties": {
                        "job_id": {"type": "string"},
                        "state": {
                            "type": "string",
                            "enum": [
                                "queued",
                                "running",
                                "completed",
                                "failed",
                                "rejected",
                                "expired",
                                "cancelled",
                            ],
                        },
                        "reason": {"type": ["string", "null"]},
                        "result": {
                            "type": ["string", "null"],
                            "description": "the sealed result envelope, base64 (state "
                            "completed): open it with the tenant's keys",
                        },
                    },
                    "required": ["job_id", "state", "reason", "result"],
                },
                "Cancelled": {
                    "type": "object",
                    "properties": {
                        "job_id": {"type": "string"},
                        "cancel_requested": {"type": "boolean"},
                    },
                    "required": ["job_id", "cancel_requested"],
                },
            },
        },
    }


def main() -> None:
    """Print the document (what docs/gateway-openapi.json holds)."""
    print(json.dumps(document(), indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
