"""TEST TOOLING ONLY: a development PKI, a development authorization server, the local
stack, the benchmark and the fault drills of sam-worker.

Nothing here belongs in a production deployment: keys are written unencrypted and the
authorization server vouches for any signer it is asked about. It is a distribution of
its own (``sam-worker-devtools``, from ``ops/devtools``), so no install of sam-worker
carries it.
"""

__version__ = "0.2.0"
