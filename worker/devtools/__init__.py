"""TEST TOOLING ONLY: a development PKI and a development authorization server.

Nothing here belongs in a production deployment: keys are written unencrypted and the
authorization server vouches for any signer it is asked about.
"""
