"""``sam-csc``: a Cloud Signature Consortium API v2 gateway that is an SSA of the SAM.

Standard remote-signing clients (pyHanko's ``CSCSigner``, EU DSS, wallets) speak CSC;
the gateway answers them over HTTPS and signs through the SAM with the SDK
(``worker.client``). It keeps each signer's sealed key pairs (``store``), checks the
client's bearer service token (``tokens``), and passes the signer's credential-scoped
token to the SAM unchanged as the SAD — the SAM, not the gateway, decides whether the
signer authorized exactly those hashes. ``protocol`` is the pure part (CSC request and
response shapes, v1 and v2 names, error mapping); ``gateway`` the HTTP adapter;
``enrolment`` the path from a new key pair to an enabled credential.
"""
