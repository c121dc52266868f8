"""AMQP adapters: connection, topology, request consumer, ledger streams, audit sink."""
