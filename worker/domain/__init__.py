"""Pure decisions of the SAM: no I/O, no aio-pika, no PKCS#11 in this package."""
