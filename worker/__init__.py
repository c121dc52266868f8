"""sam-worker: an open Signature Activation Module served over RabbitMQ.

The package is laid out by responsibility: ``domain`` holds the pure decisions
(authorization, key-pair state, audit records, the message contract), ``hsm`` and
``transport`` are the adapters to PKCS#11 and AMQP, ``service`` wires them per
request, and ``client`` is the SDK a Server Signing Application uses.
"""

__version__ = "0.2.0"
