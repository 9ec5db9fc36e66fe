import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from serving.auth.keys import KeyService, split_key
from serving.storage import migrate
from serving.storage.clients import ClientRepository
from serving.storage.db import create_engine
from serving.storage.keys import KeyRepository

pytestmark = pytest.mark.anyio
PEPPER = b"p" * 40
SCOPES = frozenset({"chat", "models"})


async def create_schema(db) -> None:  # type: ignore[no-untyped-def]
    await migrate.upgrade(db)
    for name in ("billing-service", "x", "other"):
        await ClientRepository(db).add(name, "default")



@pytest.fixture
async def service(tmp_path: Path):  # type: ignore[no-untyped-def]
    db = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'state.db'}")
    await create_schema(db)
    yield KeyService(KeyRepository(db), PEPPER, cache_ttl_s=0)
    await db.dispose()


async def test_an_issued_key_verifies_and_names_its_owner(service: KeyService) -> None:
    issued = await service.issue("billing-service", SCOPES)
    record = await service.verify(issued.key)
    assert record is not None
    principal = service.principal(record)
    assert principal.client_id == "billing-service" and principal.policy == "default"
    assert principal.scopes == SCOPES
    assert principal.key_id == issued.record.id
    assert split_key(issued.key) == issued.record.id


async def test_only_an_hmac_is_stored_never_the_key(service: KeyService, tmp_path: Path) -> None:
    issued = await service.issue("x", SCOPES)
    secret = issued.key[20:]
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert issued.key.encode() not in raw
    assert secret.encode() not in raw
    records = await service.all()
    assert records[0].digest == service.digest(issued.key)
    assert records[0].digest != issued.key


async def test_a_wrong_secret_with_a_real_id_is_refused(service: KeyService) -> None:
    issued = await service.issue("x", SCOPES)
    tampered = issued.key[:-1] + ("A" if issued.key[-1] != "A" else "B")
    assert await service.verify(tampered) is None


@pytest.mark.parametrize("bad", ["", "sk-enc-", "Bearer x", "sk-enc-zzzzzzzzzzzz-" + "a" * 43,
                                 "sk-enc-0123456789ab-" + "a" * 42, "x" * 10_000])
async def test_malformed_keys_are_refused(service: KeyService, bad: str) -> None:
    assert await service.verify(bad) is None


async def test_a_revoked_key_is_refused(service: KeyService) -> None:
    issued = await service.issue("x", SCOPES)
    revoked = await service.revoke(issued.record.id)
    assert [r.id for r in revoked] == [issued.record.id]
    assert await service.verify(issued.key) is None


async def test_revoking_by_name_revokes_every_active_key_of_that_name(service: KeyService) -> None:
    a = await service.issue("x", SCOPES, name="demo")
    b = await service.issue("x", SCOPES, name="demo")
    other = await service.issue("other", SCOPES)
    assert len(await service.revoke("demo")) == 2
    assert await service.verify(a.key) is None and await service.verify(b.key) is None
    assert await service.verify(other.key) is not None


async def test_revocation_reaches_a_caching_service_within_its_ttl(tmp_path: Path) -> None:
    db = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'state.db'}")
    await create_schema(db)
    gateway = KeyService(KeyRepository(db), PEPPER, cache_ttl_s=0.2)
    admin = KeyService(KeyRepository(db), PEPPER, cache_ttl_s=0)
    issued = await admin.issue("x", SCOPES)
    assert await gateway.verify(issued.key) is not None
    await admin.revoke(issued.record.id)
    await asyncio.sleep(0.25)
    assert await gateway.verify(issued.key) is None
    await db.dispose()


async def test_a_key_is_bound_to_its_pepper(service: KeyService, tmp_path: Path) -> None:
    issued = await service.issue("x", SCOPES)
    db = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'state.db'}")
    other = KeyService(KeyRepository(db), b"q" * 40, cache_ttl_s=0)
    assert await other.verify(issued.key) is None
    await db.dispose()


async def test_names_are_validated(service: KeyService) -> None:
    with pytest.raises(ValueError):
        await service.issue("x", SCOPES, name="n" * 201)


async def test_an_expired_key_is_refused(service: KeyService) -> None:
    issued = await service.issue("x", SCOPES, expires_at=datetime.now(UTC) + timedelta(seconds=1))
    assert await service.verify(issued.key) is not None
    await asyncio.sleep(1.1)
    assert await service.verify(issued.key) is None
    with pytest.raises(ValueError, match="future"):
        await service.issue("x", SCOPES, expires_at=datetime.now(UTC) - timedelta(seconds=1))


async def test_rotation_keeps_both_keys_valid_then_the_old_one_expires(
        service: KeyService) -> None:
    old = await service.issue("x", frozenset({"chat"}), name="laptop")
    new, previous = await service.rotate(old.record.id, grace=timedelta(seconds=1))
    assert previous.id == old.record.id
    assert new.record.scopes == frozenset({"chat"}) and new.record.client_id == "x"
    assert new.record.rotated_from == old.record.id
    assert await service.verify(old.key) is not None and await service.verify(new.key) is not None
    await asyncio.sleep(1.1)
    assert await service.verify(old.key) is None
    assert await service.verify(new.key) is not None
    with pytest.raises(LookupError):
        await service.rotate("000000000000", grace=None)


async def test_a_client_secret_is_not_a_bearer_key(service: KeyService) -> None:
    issued = await service.issue("x", SCOPES, kind="secret")
    assert await service.verify(issued.key) is None
    assert await service.verify(issued.key, kind="secret") is not None


async def test_a_disabled_clients_keys_are_refused(service: KeyService, tmp_path: Path) -> None:
    issued = await service.issue("other", SCOPES)
    db = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'state.db'}")
    await ClientRepository(db).update("other", disabled=True)
    assert await service.verify(issued.key) is None
    await ClientRepository(db).update("other", disabled=False)
    assert await service.verify(issued.key) is not None
    await db.dispose()


async def test_last_used_is_written_in_batches(service: KeyService) -> None:
    issued = await service.issue("x", SCOPES)
    assert (await service.get(issued.record.id)).last_used_at is None  # type: ignore[union-attr]
    await service.verify(issued.key)
    await service.flush_last_used()
    used = (await service.get(issued.record.id)).last_used_at  # type: ignore[union-attr]
    assert used is not None and (datetime.now(UTC) - used).total_seconds() < 5
