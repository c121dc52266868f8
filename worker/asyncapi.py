"""The AsyncAPI 3.0 document of the SAM's broker interface, built from the code (the
operations, queues and topology it actually uses); written to ``schemas/asyncapi.yaml``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from worker import __version__
from worker.domain.contract import (
    HEADER_ANSWER_BY,
    HEADER_REPEAT,
    HEADER_REQUEST_JWS,
    HEADER_SAD,
    HEADER_STATUS,
    OPERATION_QUEUE,
    Operation,
)
from worker.transport import topology

__all__ = ["asyncapi"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": name}


def asyncapi(
    replies: dict[Operation, type[BaseModel] | None], statuses: dict[Operation, int]
) -> dict[str, Any]:
    """The AsyncAPI 3.0 document: request channels per queue class, replies on ``reply_to``
    and the audit exchange. ``replies`` gives each operation's reply model (``None``: an
    empty body), ``statuses`` its success status where it is not 200."""
    vhost = topology.VHOST
    work_queue = {
        "x-queue-type": "quorum",
        "x-delivery-limit": topology.DELIVERY_LIMIT,
        "x-dead-letter-exchange": topology.DEAD_LETTER_EXCHANGE,
    }
    request_headers = {
        "type": "object",
        "required": [HEADER_REQUEST_JWS],
        "properties": {
            HEADER_REQUEST_JWS: {
                "type": "string",
                "description": "compact JWS by the caller's registered key; payload {body_sha256 (base64url "
                "SHA-256 of the body), message_id, type, user_id, iat}",
            },
            HEADER_SAD: {
                "type": "string",
                "description": "the SAD or SKAD (compact JWT), where the operation takes one",
            },
            HEADER_ANSWER_BY: {
                "type": "integer",
                "description": "optional: epoch milliseconds after which the caller no longer waits; the SAM "
                "releases no result of the request after it (request_expired). The SDK sets it to when it "
                "gives up, less a second",
            },
        },
    }
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for queue_class in sorted(set(OPERATION_QUEUE.values()), key=str):
        channels[f"requests-{queue_class}"] = {
            "address": queue_class.value,
            "description": f"requests routed to the quorum queue {queue_class.queue_name}",
            "messages": {},
            "bindings": {
                "amqp": {
                    "is": "routingKey",
                    "exchange": {
                        "name": topology.REQUESTS_EXCHANGE,
                        "type": "direct",
                        "durable": True,
                        "autoDelete": False,
                        "vhost": vhost,
                    },
                    "x-queue": {"name": queue_class.queue_name, "durable": True, "arguments": work_queue},
                    "bindingVersion": "0.3.0",
                }
            },
        }
    for operation in Operation:
        name = str(operation).replace(".", "_")
        channel = f"requests-{OPERATION_QUEUE[operation]}"
        messages[f"{name}_request"] = {
            "name": str(operation),
            "title": f"{operation} request",
            "summary": "AMQP properties: type (the operation), message_id, correlation_id, reply_to, user_id",
            "contentType": "application/json",
            "headers": request_headers,
            "payload": _ref(f"./{operation}.request.json"),
            "correlationId": {"location": "$message.header#/correlation_id"},
            "bindings": {
                "amqp": {"messageType": str(operation), "contentEncoding": "utf-8", "bindingVersion": "0.3.0"}
            },
        }
        channels[channel]["messages"][f"{name}_request"] = _ref(f"#/components/messages/{name}_request")
        success = _ref(f"./{operation}.reply.json") if replies[operation] is not None else {"maxLength": 0}
        messages[f"{name}_reply"] = {
            "name": f"{operation} reply",
            "contentType": "application/json",
            "headers": {
                "type": "object",
                "required": [HEADER_STATUS],
                "properties": {
                    HEADER_STATUS: {"type": "integer", "description": "HTTP-like status"},
                    HEADER_REPEAT: {
                        "type": "boolean",
                        "description": "present (true) when the reply answers a repeat of the request (same "
                        "caller, message_id, operation, body and SAD) with the result of an earlier attempt",
                    },
                },
            },
            "payload": {"oneOf": [success, _ref("./error.reply.json")]},
            "correlationId": {"location": "$message.header#/correlation_id"},
        }
        operations[name] = {
            "action": "send",
            "channel": _ref(f"#/channels/{channel}"),
            "summary": f"{operation} (success: {statuses.get(operation, 200)})",
            "messages": [_ref(f"#/channels/{channel}/messages/{name}_request")],
            "reply": {
                "channel": _ref("#/channels/replies"),
                "messages": [_ref(f"#/channels/replies/messages/{name}_reply")],
            },
            "bindings": {"amqp": {"deliveryMode": 2, "mandatory": True, "bindingVersion": "0.3.0"}},
        }
    channels["replies"] = {
        "address": None,
        "description": "the caller's reply_to queue: <user>.replies.<uuid>, readable by that user only",
        "messages": {key: _ref(f"#/components/messages/{key}") for key in messages if key.endswith("_reply")},
        "bindings": {
            "amqp": {"is": "queue", "queue": {"exclusive": True, "vhost": vhost}, "bindingVersion": "0.3.0"}
        },
    }
    messages["audit_entry"] = {
        "name": "audit entries",
        "contentType": "application/x-ndjson",
        "description": "one or more consecutive entries of one chain that share the routing key, "
        "one JSON document per line, in chain order; the payload schema is that of one line",
        "payload": {"oneOf": [_ref("./audit.record.json"), _ref("./audit.checkpoint.json")]},
    }
    channels["audit"] = {
        "address": "{log}.{operation}.{outcome}",
        "description": "every audit record and checkpoint, published with confirms (mandatory), "
        "consecutive records with one routing key in one message (JSON lines); bind your own queue",
        "parameters": {
            "log": {"enum": ["service", "admin"]},
            "operation": {"description": "the operation, or `checkpoint`"},
            "outcome": {"enum": ["success", "failure"]},
        },
        "messages": {"audit_entry": _ref("#/components/messages/audit_entry")},
        "bindings": {
            "amqp": {
                "is": "routingKey",
                "exchange": {
                    "name": topology.AUDIT_EXCHANGE,
                    "type": "topic",
                    "durable": True,
                    "autoDelete": False,
                    "vhost": vhost,
                },
                "bindingVersion": "0.3.0",
            }
        },
    }
    operations["receive_audit"] = {
        "action": "receive",
        "channel": _ref("#/channels/audit"),
        "summary": "SIEMs consume audit entries (sam-admin audit tail verifies them as they arrive)",
        "messages": [_ref("#/channels/audit/messages/audit_entry")],
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "sam-worker",
            "version": __version__,
            "description": "Signature Activation Module over RabbitMQ: Server Signing Applications "
            "publish requests signed with their registered key, the SAM answers on reply_to and "
            "streams audit entries. "
            "Error codes and their statuses: error-codes.json.",
        },
        "defaultContentType": "application/json",
        "servers": {
            "local": {
                "host": "127.0.0.1:25671",
                "protocol": "amqps",
                "pathname": f"/{vhost}",
                "description": "the local stack (ops/stack): TLS client certificate, SASL EXTERNAL, "
                "CN = user_id",
                "security": [_ref("#/components/securitySchemes/clientCertificate")],
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "messages": messages,
            "securitySchemes": {
                "clientCertificate": {
                    "type": "X509",
                    "description": "TLS 1.2+ client certificate; the broker authenticates with EXTERNAL "
                    "and checks user_id",
                }
            },
        },
    }
