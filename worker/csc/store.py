"""The gateway's credential store: each signer's sealed key pairs (the SAM keeps
nothing), behind ``CredentialStore`` so that several gateway processes can share a
PostgreSQL implementation; ``SqliteCredentialStore`` is the embedded default.

A credential belongs to a user — (authorization server, subject), the issuer and
subject of the service token — and a lookup always names the user: another user's
``credentialID`` is not found, whoever asks. The sealed key pair is not a secret (the
SAM trusts only what its own signature covers) but it is the signer's: it is served
only to its user's calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol, TypeVar

__all__ = [
    "MIGRATIONS",
    "Credential",
    "CredentialState",
    "CredentialStore",
    "CredentialStoreError",
    "SqliteCredentialStore",
]

_T = TypeVar("_T")


class CredentialState(StrEnum):
    """Where a credential is in its enrolment: its certificate is awaited, it signs, or
    it was disabled by an operator."""

    awaiting_certificate = "awaiting_certificate"
    enabled = "enabled"
    disabled = "disabled"


@dataclass(frozen=True)
class Credential:
    """One signer's credential: ``key_pair`` is the SAM's sealed key pair (its JSON as
    the SAM returned it), ``signer`` the signer id bound in it, ``chain`` the certificate
    chain (signer's certificate first, DER), ``request`` the certification request while
    the certificate is awaited."""

    credential_id: str
    issuer: str
    subject: str
    signer: str
    key_pair: str
    state: CredentialState
    algorithm: str
    size: int | None = None
    named_curve: str | None = None
    chain: tuple[bytes, ...] = ()
    request: bytes | None = None
    description: str | None = None


class CredentialStore(Protocol):
    """Credentials by user. Errors: ``CredentialStoreError`` when the store cannot be read
    or written."""

    async def of_user(self, issuer: str, subject: str) -> list[Credential]: ...

    async def get(self, issuer: str, subject: str, credential_id: str) -> Credential | None: ...

    async def find(self, credential_id: str) -> Credential | None:
        """For the operator's tools only, never for a client's call."""
        ...

    async def put(self, credential: Credential) -> None: ...


class CredentialStoreError(Exception):
    """The store could not answer (the gateway answers 503)."""


# Each entry takes the schema from its index to the next; applied in order, once, in a
# transaction each, recorded in schema_version. Never edit one that shipped: add another.
MIGRATIONS: Sequence[str] = (
    """
    CREATE TABLE credentials (
        credential_id TEXT PRIMARY KEY,
        issuer TEXT NOT NULL,
        subject TEXT NOT NULL,
        signer TEXT NOT NULL,
        key_pair TEXT NOT NULL,
        state TEXT NOT NULL,
        algorithm TEXT NOT NULL,
        size INTEGER,
        named_curve TEXT,
        request BLOB,
        description TEXT
    );
    CREATE INDEX credentials_by_user ON credentials (issuer, subject);
    CREATE TABLE certificates (
        credential_id TEXT NOT NULL REFERENCES credentials (credential_id),
        position INTEGER NOT NULL,
        der BLOB NOT NULL,
        PRIMARY KEY (credential_id, position)
    );
    """,
)

# literal queries only: nothing a caller sends is ever spliced into SQL
_SELECT_OF_USER = (
    "SELECT credential_id, issuer, subject, signer, key_pair, state, algorithm, size, named_curve, request,"
    " description FROM credentials WHERE issuer = ? AND subject = ? ORDER BY credential_id"
)
_SELECT_ONE_OF_USER = (
    "SELECT credential_id, issuer, subject, signer, key_pair, state, algorithm, size, named_curve, request,"
    " description FROM credentials WHERE issuer = ? AND subject = ? AND credential_id = ?"
)
_SELECT_ONE = (
    "SELECT credential_id, issuer, subject, signer, key_pair, state, algorithm, size, named_curve, request,"
    " description FROM credentials WHERE credential_id = ?"
)
_UPSERT = (
    "INSERT OR REPLACE INTO credentials (credential_id, issuer, subject, signer, key_pair, state, algorithm,"
    " size, named_curve, request, description) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


class SqliteCredentialStore:
    """``CredentialStore`` in one SQLite file (WAL, so enrolment by the admin CLI and the
    gateway's reads do not block each other); calls run on a worker thread."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA foreign_keys=ON")
        return connection

    def migrate(self) -> int:
        """Bring the schema up to date; returns its version."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as connection:
            connection.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = connection.execute("SELECT max(version) FROM schema_version").fetchone()
            version = row[0] or 0
            if version > len(MIGRATIONS):
                raise CredentialStoreError(
                    f"{self.path} has schema version {version}, newer than this gateway's {len(MIGRATIONS)}"
                )
            for number in range(version, len(MIGRATIONS)):
                connection.execute("BEGIN IMMEDIATE")
                try:
                    for statement in MIGRATIONS[number].split(";"):
                        if statement.strip():
                            connection.execute(statement)
                    connection.execute("INSERT INTO schema_version VALUES (?)", (number + 1,))
                    connection.execute("COMMIT")
                except BaseException:
                    connection.execute("ROLLBACK")
                    raise
            return len(MIGRATIONS)

    async def _run(self, query: Callable[[sqlite3.Connection], _T]) -> _T:
        def job() -> _T:
            try:
                with contextlib.closing(self._connect()) as connection:
                    return query(connection)
            except sqlite3.Error as exc:
                raise CredentialStoreError(f"credential store {self.path}: {type(exc).__name__}") from exc

        return await asyncio.to_thread(job)

    async def of_user(self, issuer: str, subject: str) -> list[Credential]:
        return await self._run(
            lambda c: _credentials(
                c,
                _SELECT_OF_USER,
                (issuer, subject),
            )
        )

    async def get(self, issuer: str, subject: str, credential_id: str) -> Credential | None:
        found = await self._run(
            lambda c: _credentials(
                c,
                _SELECT_ONE_OF_USER,
                (issuer, subject, credential_id),
            )
        )
        return found[0] if found else None

    async def find(self, credential_id: str) -> Credential | None:
        found = await self._run(lambda c: _credentials(c, _SELECT_ONE, (credential_id,)))
        return found[0] if found else None

    async def put(self, credential: Credential) -> None:
        def write(connection: sqlite3.Connection) -> None:
            connection.execute("BEGIN IMMEDIATE")
            try:
                row = connection.execute(
                    "SELECT issuer, subject FROM credentials WHERE credential_id = ?",
                    (credential.credential_id,),
                ).fetchone()
                if row is not None and tuple(row) != (credential.issuer, credential.subject):
                    raise CredentialStoreError(
                        f"credential {credential.credential_id} belongs to another user"
                    )
                connection.execute(
                    _UPSERT,
                    (
                        credential.credential_id,
                        credential.issuer,
                        credential.subject,
                        credential.signer,
                        credential.key_pair,
                        str(credential.state),
                        credential.algorithm,
                        credential.size,
                        credential.named_curve,
                        credential.request,
                        credential.description,
                    ),
                )
                connection.execute(
                    "DELETE FROM certificates WHERE credential_id = ?", (credential.credential_id,)
                )
                connection.executemany(
                    "INSERT INTO certificates VALUES (?, ?, ?)",
                    [(credential.credential_id, n, der) for n, der in enumerate(credential.chain)],
                )
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise

        await self._run(write)


def _credentials(
    connection: sqlite3.Connection, query: str, parameters: tuple[object, ...]
) -> list[Credential]:
    found = []
    for row in connection.execute(query, parameters).fetchall():
        chain = tuple(
            bytes(der)
            for (der,) in connection.execute(
                "SELECT der FROM certificates WHERE credential_id = ? ORDER BY position", (row[0],)
            )
        )
        found.append(
            Credential(
                credential_id=row[0],
                issuer=row[1],
                subject=row[2],
                signer=row[3],
                key_pair=row[4],
                state=CredentialState(row[5]),
                algorithm=row[6],
                size=row[7],
                named_curve=row[8],
                chain=chain,
                request=bytes(row[9]) if row[9] is not None else None,
                description=row[10],
            )
        )
    return found
