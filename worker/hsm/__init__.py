"""HSM adapters: the ``Hsm`` interface and its PKCS#11 implementation."""
