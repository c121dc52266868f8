"""The gateway's contract as an OpenAPI 3.1 document (``schemas/csc-openapi.yaml``),
rendered from the request models the gateway parses with and the response models below,
which the integration tests hold the gateway's real answers to."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from worker.csc.protocol import CSC_SPECS, CredentialInfoRequest, CredentialsListRequest, SignHashBody

__all__ = ["openapi"]


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


class InfoResponse(_Response):
    specs: str
    name: str
    logo: str
    region: str
    lang: str
    description: str
    authType: list[str]
    methods: list[str]
    signAlgorithms: dict[str, list[str]]
    oauth2: str | None = None


class CredentialKey(_Response):
    status: str = Field(pattern="^(enabled|disabled)$")
    algo: list[str] = Field(
        description="the key's algorithm OID and the signature algorithm OIDs it signs with"
    )
    len: int
    curve: str | None = None


class CredentialCertificate(_Response):
    status: str
    certificates: list[str] | None = Field(default=None, description="base64 DER, the signer's first")
    issuerDN: str | None = None
    serialNumber: str | None = None
    subjectDN: str | None = None
    validFrom: str | None = None
    validTo: str | None = None


class CredentialInfoResponse(_Response):
    key: CredentialKey
    cert: CredentialCertificate
    auth: dict[str, str]
    SCAL: str = Field(pattern="^2$", description="the SAD is bound to the hashes (SCAL2), always")
    multisign: int = Field(ge=1)
    lang: str
    description: str | None = None


class ListedCredential(CredentialInfoResponse):
    credentialID: str


class CredentialsListResponse(_Response):
    credentialIDs: list[str]
    credentialInfos: list[ListedCredential] | None = None


class SignHashResponse(_Response):
    signatures: list[str] = Field(description="base64, one per hash, in order (ECDSA: DER)")


class ErrorResponse(_Response):
    error: str = Field(
        description="invalid_request, invalid_token, insufficient_scope, temporarily_unavailable, ..."
    )
    error_description: str
    request_id: str | None = Field(default=None, description="the SAM's request id, where the SAM refused")


_ENDPOINTS: list[tuple[str, str, type[BaseModel] | None, type[BaseModel], bool]] = [
    ("info", "What the service offers", None, InfoResponse, False),
    ("credentials/list", "The user's credentials", CredentialsListRequest, CredentialsListResponse, True),
    ("credentials/info", "One credential of the user's", CredentialInfoRequest, CredentialInfoResponse, True),
    ("signatures/signHash", "Sign hashes with a credential", SignHashBody, SignHashResponse, True),
]

_ERRORS = {
    "400": "invalid_request: a parameter is missing, of the wrong type, too long, or names no "
    "credential of the user's; a SAD the SAM refused",
    "401": "invalid_token: no bearer service token, or one not from a registered authorization "
    "server, for another service, expired",
    "403": "insufficient_scope: the token's scope has no service",
    "408": "the request body did not arrive in time",
    "413": "the request body is too large",
    "503": "temporarily_unavailable: the SAM or the credential store is unavailable; retry the same call",
}


def openapi() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the gateway."""
    components: dict[str, Any] = {}

    def ref(model: type[BaseModel]) -> dict[str, str]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, definition in schema.pop("$defs", {}).items():
            components[name] = definition
        components[model.__name__] = schema
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    error = ref(ErrorResponse)
    paths: dict[str, Any] = {}
    for version in ("v2", "v1"):
        for name, summary, request, response, authenticated in _ENDPOINTS:
            operation: dict[str, Any] = {
                "operationId": f"{version}_{name.replace('/', '_')}",
                "summary": summary + (" (v1 path, the same behaviour)" if version == "v1" else ""),
                "responses": {
                    "200": {"description": "OK", "content": {"application/json": {"schema": ref(response)}}},
                    **{
                        status: {"description": text, "content": {"application/json": {"schema": error}}}
                        for status, text in _ERRORS.items()
                        if authenticated or status not in ("401", "403")
                    },
                },
            }
            if request is not None:
                operation["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": ref(request)}},
                }
            if authenticated:
                operation["security"] = [{"serviceToken": []}]
            paths[f"/csc/{version}/{name}"] = {"post": operation}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "sam-csc: CSC API v2 gateway to the SAM",
            "version": CSC_SPECS,
            "description": "The subset of the Cloud Signature Consortium API v2 that sam-csc offers "
            "(docs/CSC.md: what is offered and what is not). Errors are CSC / OAuth 2 error documents.",
        },
        "paths": paths,
        "components": {
            "schemas": dict(sorted(components.items())),
            "securitySchemes": {
                "serviceToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "an access token of scope service from a registered authorization server",
                }
            },
        },
    }
