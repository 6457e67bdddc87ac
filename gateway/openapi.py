"""The OpenAPI 3 document of ``puller-http``, served at ``GET /openapi.json``.

The test suite fuzzes a running gateway from this document (schemathesis) and checks
that every answer is one the document allows.
"""

from __future__ import annotations

from typing import Any

from contract import PROTOCOL_VERSION, puller_version

JSON = "application/json"


def _object(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
    }
    if required:
        schema["required"] = required
    return schema


def _answer(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


EXCEPTION = _object(
    {
        "exception": _object(
            {
                "path": {"type": "string"},
                "body": {"type": "string"},
                "class": {"type": "string", "enum": ["Puller"]},
                "message": {"type": "string"},
            },
            ["path", "body", "class", "message"],
        )
    },
    ["exception"],
)
NULLABLE_STRING = {"type": "string", "nullable": True}
ERROR = {
    "type": "object",
    "nullable": True,
    "properties": {"kind": {"type": "string"}, "message": {"type": "string"}},
    "required": ["kind", "message"],
}
ROW = _object(
    {
        "node": {"type": "string"},
        "status": {"type": "string", "enum": ["pulled", "present", "failed", "no_reply"]},
        "seconds": {"type": "number", "minimum": 0},
        "queued_seconds": {"type": "number", "minimum": 0},
        "image_id": NULLABLE_STRING,
        "digest": NULLABLE_STRING,
        "error": ERROR,
    },
    ["node", "status", "seconds", "queued_seconds", "image_id", "digest", "error"],
)
REPORT = {
    "oneOf": [
        _object(
            {
                "request_id": {"type": "string"},
                "image": {"type": "string"},
                "expected": {"type": "integer", "nullable": True},
                "ok": {"type": "boolean"},
                "missing": {"type": "integer", "minimum": 0},
                "nodes": {"type": "array", "items": ROW},
                "notes": {"type": "array", "items": {"type": "string"}},
            },
            ["request_id", "image", "expected", "ok", "missing", "nodes", "notes"],
        ),
        _object(
            {
                "request_id": {"type": "string"},
                "image": {"type": "string"},
                "ok": {"type": "boolean", "enum": [False]},
                "nodes": {"type": "array", "maxItems": 0},
                "error": {"type": "string"},
            },
            ["request_id", "image", "ok", "nodes", "error"],
        ),
    ]
}
PULL_IMAGES_ANSWER = _object(
    {
        "id": {"type": "string"},
        "image": {"type": "string"},
        "request_id": {"type": "string"},
        "reached_nodes": {"type": "boolean"},
        "note": {"type": "string"},
    },
    ["id", "image", "request_id", "reached_nodes"],
)
NODE = {
    "type": "object",
    "properties": {
        "node": {"type": "string"},
        "version": {"type": "string"},
        "engine": NULLABLE_STRING,
        "started_at": {"type": "number"},
        "last_seen": {"type": "number"},
        "state": {"type": "string"},
        "caught_up": {"type": "boolean", "nullable": True},
        "replay_pending": {"type": "integer"},
        "replay_failed": {"type": "integer"},
    },
    "required": ["node", "version", "engine", "started_at", "last_seen"],
}
BAD_REQUEST = _answer(
    "The caller's mistake: a body that is not a JSON object, a missing or unknown "
    "argument, an invalid value, or an unknown path",
    EXCEPTION,
)
UNAVAILABLE = _answer("RabbitMQ cannot be reached: nothing was published", EXCEPTION)
FORBIDDEN = _answer(
    "The image policy (PULLER_ALLOWED_IMAGES, PULLER_REQUIRE_DIGEST) refuses the image: "
    "nothing was published",
    EXCEPTION,
)
NO_ARGUMENTS = {
    "required": False,
    "content": {JSON: {"schema": _object({})}},
}


FLEET_CELL = {
    "oneOf": [
        {"type": "string", "enum": ["p", "a", "n"]},  # present, absent, no answer
        # ["d", version] drift, ["u", percent] pulling, ["w", seconds] asked, not there yet,
        # ["f", kind, message] failed
        {"type": "array", "minItems": 2, "maxItems": 3},
    ]
}
FLEET = _object(
    {
        "nodes": {
            "type": "array",
            "items": _object(
                {
                    "name": {"type": "string"},
                    "state": {"type": "string"},
                    "last_seen": {"type": "number", "nullable": True},
                    "version": NULLABLE_STRING,
                },
                ["name", "state", "last_seen", "version"],
            ),
        },
        "images": {"type": "array", "items": {"type": "string"}},
        "cells": {"type": "array", "items": {"type": "array", "items": FLEET_CELL}},
        "hidden_nodes": {"type": "integer", "minimum": 0},
        "notes": {"type": "array", "items": {"type": "string"}},
        "actions": {"type": "boolean"},
        "generated_at": {"type": "number"},
    },
    ["nodes", "images", "cells", "hidden_nodes", "notes", "actions", "generated_at"],
)


def _drop_in(key: str, value: dict[str, Any], summary: str, ready: bool = False) -> dict[str, Any]:
    responses: dict[str, Any] = {
        "200": _answer(summary, _object({key: value}, [key])),
        "400": BAD_REQUEST,
    }
    if ready:
        responses["503"] = _answer(
            "Not ready: RabbitMQ cannot be reached",
            _object(
                {"ready?": {"type": "boolean", "enum": [False]}, "reason": {"type": "string"}},
                ["ready?", "reason"],
            ),
        )
    return {
        "get": {"summary": summary, "responses": responses},
        "post": {"summary": summary, "requestBody": NO_ARGUMENTS, "responses": responses},
    }


def _pull_images(name: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": "Ask every node to pull an image; answers once RabbitMQ has the "
            "request, never waiting for a pull",
            "requestBody": {
                "required": True,
                "content": {
                    JSON: {
                        "schema": _object(
                            {
                                "id": {"type": "string", "minLength": 1, "maxLength": 128},
                                "image_name": {"type": "string", "minLength": 1},
                            },
                            ["id", "image_name"],
                        )
                    }
                },
            },
            "responses": {
                "200": _answer(
                    "Published (reached_nodes is false when no worker was connected: the "
                    "request is in the history, and nodes catch up on it)",
                    _object({name: PULL_IMAGES_ANSWER}, [name]),
                ),
                "400": BAD_REQUEST,
                "403": FORBIDDEN,
                "503": UNAVAILABLE,
            },
        }
    }


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "puller-http",
            "version": puller_version(),
            "description": "Puts a Docker image on every node of a cluster. A drop-in for "
            "cyber-dojo's original puller (/sha, /alive, /ready, /pull_images: any method, "
            "a JSON object body, empty for none), and puller's own /pulls and /nodes. "
            f"Message contract version {PROTOCOL_VERSION}.",
        },
        "paths": {
            "/sha": _drop_in(
                "sha", NULLABLE_STRING, "The commit the image was built from (env SHA)"
            ),
            "/alive": _drop_in("alive?", {"type": "boolean", "enum": [True]}, "Alive"),
            "/ready": _drop_in(
                "ready?", {"type": "boolean", "enum": [True]}, "Connected to RabbitMQ", True
            ),
            "/pull_images": _pull_images("pull_images"),
            "/pull_image": _pull_images("pull_image"),
            "/pulls": {
                "post": {
                    "summary": "Ask every node to pull an image and wait for their answers",
                    "requestBody": {
                        "required": True,
                        "content": {
                            JSON: {
                                "schema": _object(
                                    {
                                        "image": {"type": "string", "minLength": 1},
                                        "expect": {"type": "integer", "minimum": 1},
                                        "nodes": {
                                            "type": "array",
                                            "minItems": 1,
                                            "items": {"type": "string", "minLength": 1},
                                        },
                                        "timeout": {
                                            "type": "number",
                                            "exclusiveMinimum": True,
                                            "minimum": 0,
                                        },
                                    },
                                    ["image"],
                                )
                            }
                        },
                    },
                    "responses": {
                        "200": _answer(
                            "What each node answered (as `puller pull --json`); or, when no "
                            "worker was connected, ok false and the reason",
                            REPORT,
                        ),
                        "400": BAD_REQUEST,
                        "403": FORBIDDEN,
                        "503": _answer(
                            "RabbitMQ cannot be reached, or too many callers wait already",
                            EXCEPTION,
                        ),
                    },
                }
            },
            "/pulls/{request_id}": {
                "get": {
                    "summary": "What has come back so far for an earlier request of this gateway",
                    "parameters": [
                        {
                            "name": "request_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string", "minLength": 1},
                        }
                    ],
                    "responses": {
                        "200": _answer(
                            "The answers so far",
                            _object(
                                {
                                    "request_id": {"type": "string"},
                                    "image": NULLABLE_STRING,
                                    "answered": {"type": "integer", "minimum": 0},
                                    "nodes": {"type": "array", "items": ROW},
                                    "notes": {"type": "array", "items": {"type": "string"}},
                                },
                                ["request_id", "image", "answered", "nodes"],
                            ),
                        ),
                        "404": _answer("Not a request this gateway knows", EXCEPTION),
                        "410": _answer(
                            "A request of this gateway whose answers were forgotten to keep "
                            "its answer memory within PULLER_ANSWER_MEMORY_MB",
                            EXCEPTION,
                        ),
                    },
                }
            },
            "/nodes": {
                "get": {
                    "summary": "The live nodes (as `puller nodes --json`)",
                    "responses": {
                        "200": _answer(
                            "The roster; `notes` only when it may be incomplete (a flooded "
                            "presence stream)",
                            _object(
                                {
                                    "nodes": {"type": "array", "items": NODE},
                                    "notes": {"type": "array", "items": {"type": "string"}},
                                },
                                ["nodes"],
                            ),
                        ),
                        "503": UNAVAILABLE,
                    },
                }
            },
            "/fleet.json": {
                "get": {
                    "summary": "The fleet page's document: nodes by images, from the last "
                    "survey (docs/http-api.md)",
                    "parameters": [
                        {
                            "name": "image",
                            "in": "query",
                            "required": False,
                            "description": "An image to show besides those asked lately "
                            "(repeated, at most 100)",
                            "schema": {"type": "array", "items": {"type": "string"}},
                            "style": "form",
                            "explode": True,
                        }
                    ],
                    "responses": {
                        "200": _answer(
                            "The last survey; or why the fleet could not be surveyed",
                            {"oneOf": [FLEET, _object({"error": {"type": "string"}}, ["error"])]},
                        ),
                        "400": _answer(
                            "An invalid image, or too many; or the fleet page is off "
                            "(PULLER_HTTP_FLEET_PAGE=false: an unknown path, as any other)",
                            EXCEPTION,
                        ),
                        "403": _answer("An image the image policy refuses", EXCEPTION),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {
                        "200": {
                            "description": "Prometheus text format",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {"200": _answer("OpenAPI 3", {"type": "object"})},
                }
            },
        },
    }
