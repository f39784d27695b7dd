"""The signed release pointer: a bare model name never silently rolls back.

Each test plays the attacker the pointer is for (someone who can write the
model folder, not sign) or the owner who rolls back on purpose.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import fakeredis
import pytest
import redis

from maas_worker.backend import keyspace
from maas_worker.backend.audit import AuditLog
from maas_worker.errors import ModelRejected
from maas_worker.models import ModelRegistry
from maas_worker.models.artifact_crypto import ModelKeysSource
from maas_worker.models.manifest import canonical_json
from maas_worker.models.paths import BUNDLED_MODEL_DIR, BUNDLED_SIGNERS_DIR
from maas_worker.models.release import (
    RELEASE_CONTEXT,
    RELEASE_FILE,
    Release,
    ReleaseFloor,
    manifest_digest,
    read_release,
)
from maas_worker.models.repository import ModelRepository, verify_manifest
from maas_worker.models.signing import SigningKey, TrustedSigners, TrustedSignersSource
from maas_worker.settings import Settings
from maas_worker.worker.runtime import RedisReleaseFloor, audit_rejections, build_registry
from tests.modelkit import Clock, ModelKit, Rejections, holdout

SAMPLES = holdout()
ROWS4 = {"inputs": SAMPLES["inputs"][:4]}


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


class Repo:
    """A repository as one worker process sees it, and what it reported."""

    def __init__(self, kit: ModelKit, floor: ReleaseFloor | None) -> None:
        self.rejected: Rejections = []
        self.clock = Clock()
        self.repo = ModelRepository(
            kit.root,
            signers=TrustedSignersSource([kit.signers_dir]).get,
            model_keys=ModelKeysSource(kit.keys_path).get,
            on_reject=lambda *a: self.rejected.append(a),
            clock=self.clock,
            release_floor=floor,
        )

    def rescan(self) -> None:
        self.clock.tick()
        self.repo.scan()

    def about(self, ref: str) -> list[str]:
        return [why for r, why, _ in self.rejected if r == ref]


@pytest.fixture
def start(kit: ModelKit, server: fakeredis.FakeServer) -> Callable[..., Repo]:
    """A new repository instance (a worker (re)start); by default with the Redis floor."""

    def factory(persisted: bool = True) -> Repo:
        floor = RedisReleaseFloor(fakeredis.FakeRedis(server=server)) if persisted else None
        return Repo(kit, floor)

    return factory


def flip(path: Path, pos: int = 300) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= 0x01
    path.write_bytes(bytes(data))


def two_versions(kit: ModelKit) -> tuple[Path, Path]:
    """digits@1 (max batch 2, so it can be told apart) and digits@2, both released in turn."""
    v1 = kit.publish("digits", "1", max_batch=2)
    v2 = kit.publish("digits", "2")
    return v1, v2


def test_the_bare_name_is_the_released_version_not_the_newest(
    kit: ModelKit, start: Callable[..., Repo]
) -> None:
    kit.publish("digits", "1")
    kit.publish("digits", "2", release=False)  # staged: signed, not released
    w = start()
    assert w.repo.get("digits", None).version == "1"
    assert w.repo.refs() == ["digits", "digits@1", "digits@2"]
    assert w.repo.get("digits", "2").version == "2"  # an explicit version is the client's choice
    kit.release("digits", "2")
    w.rescan()
    assert w.repo.get("digits", None).version == "2"
    assert w.rejected == []


def test_released_version_with_a_flipped_byte_is_unavailable_not_the_older_one(
    kit: ModelKit, start: Callable[..., Repo]
) -> None:
    _, v2 = two_versions(kit)
    flip(v2 / "model.onnx")
    for w in (start(), start()):  # and again after a restart
        with pytest.raises(ModelRejected) as err:
            w.repo.get("digits", None)
        assert err.value.reason == "model_rejected"
        assert "released version digits@2 is refused" in str(err.value)
        assert "does not match its hash" in str(err.value)
        assert w.about("digits@2") == ["file model.onnx does not match its hash (altered)"]
        assert "digits" not in w.repo.refs()
        assert w.repo.get("digits", "1").version == "1"  # still there, never chosen for "digits"
        w.rescan()
        with pytest.raises(ModelRejected):
            w.repo.get("digits", None)


def test_released_version_deleted_is_unavailable_audited_once(
    kit: ModelKit, start: Callable[..., Repo]
) -> None:
    _, v2 = two_versions(kit)
    w = start()
    assert w.repo.get("digits", None).version == "2"
    shutil.rmtree(v2)
    w.rescan()
    for _ in range(3):
        with pytest.raises(ModelRejected, match="released version digits@2 is missing"):
            w.repo.get("digits", None)
        w.rescan()
    assert w.rejected == [("digits", "released version digits@2 is missing", "scan")]
    assert w.repo.refs() == ["digits@1"]
    assert w.repo.get("digits", "1").version == "1"


def test_release_deleted_is_unavailable(kit: ModelKit, start: Callable[..., Repo]) -> None:
    two_versions(kit)
    w = start()
    assert w.repo.get("digits", None).version == "2"
    (kit.root / "digits" / RELEASE_FILE).unlink()
    w.rescan()
    with pytest.raises(ModelRejected, match="no signed release"):
        w.repo.get("digits", None)
    assert w.about("digits") == ["no signed release (release.json)"]
    assert w.repo.refs() == ["digits@1", "digits@2"]
    assert w.repo.get("digits", "2").version == "2"
    w2 = start()  # a restart does not bring back "the newest"
    with pytest.raises(ModelRejected, match="no signed release"):
        w2.repo.get("digits", None)


def test_a_folder_with_versions_and_no_release_serves_no_bare_name(
    kit: ModelKit, start: Callable[..., Repo]
) -> None:
    kit.publish("digits", "1", release=False)
    w = start()
    with pytest.raises(ModelRejected, match="no signed release"):
        w.repo.get("digits", None)
    assert w.repo.refs() == ["digits@1"]
    assert w.rejected == [("digits", "no signed release (release.json)", "scan")]
    assert w.repo.get("nothing", None) is None  # an unknown model is still just unknown


def test_an_older_release_copied_back_is_refused_also_after_a_restart(
    kit: ModelKit, start: Callable[..., Repo], server: fakeredis.FakeServer
) -> None:
    kit.publish("digits", "1", max_batch=2)
    old_release = (kit.root / "digits" / RELEASE_FILE).read_bytes()  # serial 1 -> digits@1
    kit.publish("digits", "2")  # serial 2 -> digits@2
    w = start()
    assert w.repo.get("digits", None).version == "2"
    assert fakeredis.FakeRedis(server=server).hget(keyspace.RELEASES, "digits") == b"2"

    (kit.root / "digits" / RELEASE_FILE).write_bytes(old_release)  # the attacker's rollback
    w.rescan()
    why = "release serial 1 is below the highest seen (2): rollback refused"
    with pytest.raises(ModelRejected, match="rollback refused"):
        w.repo.get("digits", None)
    assert w.rejected == [("digits", why, "scan")]
    assert "digits" not in w.repo.refs()

    restarted = start()  # new process, the floor persisted in Redis
    with pytest.raises(ModelRejected, match="rollback refused"):
        restarted.repo.get("digits", None)
    assert restarted.rejected == [("digits", why, "scan")]
    assert restarted.repo.get("digits", "1").version == "1"  # explicit: the client's choice
    # Without the persisted floor a fresh process has nothing to compare with:
    # that is what the Redis floor is for.
    assert start(persisted=False).repo.get("digits", None).version == "1"
    assert fakeredis.FakeRedis(server=server).hget(keyspace.RELEASES, "digits") == b"2"


def test_the_owner_rolls_back_on_purpose_with_a_newer_release(
    kit: ModelKit, start: Callable[..., Repo]
) -> None:
    _, v2 = two_versions(kit)
    w = start()
    assert w.repo.get("digits", None).version == "2"
    flip(v2 / "model.onnx")  # v2 is found bad; the owner signs "go back to 1"
    release = kit.release("digits", "1")
    assert release.serial == 3
    w.rescan()
    model = w.repo.get("digits", None)
    assert model.version == "1" and model.manifest.max_batch == 2
    assert start().repo.get("digits", None).version == "1"
    assert [ref for ref, _, _ in w.rejected] == ["digits@2"]  # the altered file, only


def test_a_release_signed_by_an_untrusted_key_or_not_at_all_is_refused(
    kit: ModelKit, start: Callable[..., Repo]
) -> None:
    kit.publish("digits", "1", release=False)
    stranger = SigningKey.generate()
    forged = Release("digits", "1", 1, "0" * 64, stranger.key_id, "2026-01-01T00:00:00Z")
    path = kit.root / "digits" / RELEASE_FILE
    path.write_bytes(forged.to_file(stranger))
    w = start()
    with pytest.raises(ModelRejected, match="release signed by an untrusted key"):
        w.repo.get("digits", None)

    # The owner's real release with one field changed: the signature fails.
    kit.release("digits", "1")
    doc = json.loads(path.read_bytes())
    doc["release"]["serial"] = 99
    path.write_bytes(canonical_json(doc))
    w.rescan()
    with pytest.raises(ModelRejected, match="release signature does not verify"):
        w.repo.get("digits", None)
    # No signature at all, or not JSON.
    path.write_bytes(canonical_json({"release": doc["release"]}))
    w.rescan()
    with pytest.raises(ModelRejected, match=r"release\.json is malformed"):
        w.repo.get("digits", None)
    path.write_bytes(b"\x00not json")
    w.rescan()
    with pytest.raises(ModelRejected, match="not JSON"):
        w.repo.get("digits", None)
    # A manifest signature is no release signature (domain separation).
    good = kit.release("digits", "1")
    body = good.signed_bytes()
    sig = json.loads(kit.key.sign(body))  # under the manifest label
    path.write_bytes(canonical_json({"release": json.loads(body), "signature": sig}))
    w.rescan()
    with pytest.raises(ModelRejected, match="release signature does not verify"):
        w.repo.get("digits", None)
    assert json.loads(kit.key.sign(body, context=RELEASE_CONTEXT)) != sig
    assert w.repo.get("digits", "1").version == "1"  # the version itself is fine
    assert all(ref == "digits" for ref, _, _ in w.rejected)


def test_a_release_of_another_signer_or_model_or_build_is_refused(
    kit: ModelKit, start: Callable[..., Repo]
) -> None:
    other = SigningKey.generate()  # trusted too, but not the owner of digits
    (kit.signers_dir / "other.pub").write_text(other.public_pem())
    kit.publish("digits", "1", release=False)
    kit.publish("mine", "1", key=other)  # other's model, released by other
    w = start()

    # Another trusted signer signs a release of the owner's version: not the owner.
    trusted = TrustedSigners({kit.key.key_id: kit.key.key.public_key()})
    m = verify_manifest(kit.root / "digits" / "1", trusted)
    foreign = Release(
        "digits", "1", 10**12, manifest_digest(m), other.key_id, "2026-01-01T00:00:00Z"
    )
    (kit.root / "digits" / RELEASE_FILE).write_bytes(foreign.to_file(other))
    w.rescan()
    with pytest.raises(ModelRejected, match="not by the signer of digits@1"):
        w.repo.get("digits", None)
    # ... and it did not raise the floor: the owner's serial 1 is accepted.
    kit.release("digits", "1")
    w.rescan()
    assert w.repo.get("digits", None).version == "1"

    # Another model's release copied into this folder.
    shutil.copy(kit.root / "mine" / RELEASE_FILE, kit.root / "digits" / RELEASE_FILE)
    w.rescan()
    with pytest.raises(ModelRejected, match="another model than its folder"):
        w.repo.get("digits", None)

    # Another build signed under the same version number: not what was released.
    kit.release("digits", "1")  # serial 2
    w.rescan()
    assert w.repo.get("digits", None).version == "1"
    shutil.rmtree(kit.root / "digits" / "1")
    kit.publish("digits", "1", release=False, max_batch=3)  # validly signed, other manifest
    w.rescan()
    with pytest.raises(ModelRejected, match="not the build the release names"):
        w.repo.get("digits", None)
    assert w.repo.get("digits", "1").manifest.max_batch == 3  # explicit still served


def test_a_symlinked_or_huge_release_is_refused(kit: ModelKit, start: Callable[..., Repo]) -> None:
    kit.publish("digits", "1")
    path = kit.root / "digits" / RELEASE_FILE
    real = kit.tmp / "elsewhere.json"
    shutil.move(path, real)
    os.symlink(real, path)
    w = start()
    with pytest.raises(ModelRejected, match="not a regular file"):
        w.repo.get("digits", None)
    path.unlink()
    path.write_bytes(b" " * 5000)
    w.rescan()
    with pytest.raises(ModelRejected, match="too large"):
        w.repo.get("digits", None)


def test_tenants_restricted_to_signers_see_only_their_signers_releases(
    kit: ModelKit, start: Callable[..., Repo]
) -> None:
    other = SigningKey.generate()
    (kit.signers_dir / "other.pub").write_text(other.public_pem())
    kit.publish("digits", "1")
    kit.publish("digits", "2", key=other, release=False)
    w = start()
    assert w.repo.get("digits", None, signers=[kit.key.key_id]).version == "1"
    assert w.repo.get("digits", None, signers=[other.key_id]) is None
    kit.release("digits", "2", key=other)  # other now releases its own version
    w.rescan()
    assert w.repo.get("digits", None, signers=[other.key_id]).version == "2"
    assert w.repo.get("digits", None, signers=[kit.key.key_id]) is None
    assert w.repo.get("digits", "1", signers=[kit.key.key_id]).version == "1"
    # An unverifiable release is nobody's: a restricted tenant gets "unknown", not an error.
    (kit.root / "digits" / RELEASE_FILE).write_bytes(b"{}")
    w.rescan()
    assert w.repo.get("digits", None, signers=[kit.key.key_id]) is None
    with pytest.raises(ModelRejected):
        w.repo.get("digits", None)


class FlakyFloor:
    """A persisted floor that can be down, or hold what another worker recorded."""

    def __init__(self) -> None:
        self.up = False
        self.stored: dict[str, int] = {}
        self.calls = 0

    def record(self, name: str, serial: int) -> int | None:
        self.calls += 1
        if not self.up:
            raise redis.ConnectionError("down")
        self.stored[name] = max(self.stored.get(name, 0), serial)
        return self.stored[name]


def test_an_unreachable_floor_never_stops_loading_and_is_asked_again(kit: ModelKit) -> None:
    kit.publish("digits", "1")
    floor = FlakyFloor()
    w = Repo(kit, floor)
    assert w.repo.get("digits", None).version == "1"  # Redis down: memory floor only
    calls = floor.calls
    w.repo.get("digits", None)
    assert floor.calls == calls  # not asked on every job
    floor.up, floor.stored["digits"] = True, 5  # back, and some worker saw serial 5
    w.rescan()
    with pytest.raises(ModelRejected, match="below the highest seen \\(5\\)"):
        w.repo.get("digits", None)
    assert w.rejected[-1][0] == "digits"


def test_redis_release_floor_keeps_the_highest_serial(server: fakeredis.FakeServer) -> None:
    client = fakeredis.FakeRedis(server=server)
    floor = RedisReleaseFloor(client)
    assert floor.record("digits", 3) == 3
    assert floor.record("digits", 2) == 3
    assert floor.record("digits", 2**53 - 1) == 2**53 - 1
    assert floor.record("other", 1) == 1
    assert client.hgetall(keyspace.RELEASES) == {b"digits": str(2**53 - 1).encode(), b"other": b"1"}
    client.hset(keyspace.RELEASES, "digits", "garbage")
    assert floor.record("digits", 4) == 4  # a value that is not a number is replaced
    dead = RedisReleaseFloor(redis.Redis(port=1, socket_connect_timeout=0.2))
    assert dead.record("digits", 1) is None


def test_a_rollback_is_audited_model_rejected_by_the_worker_hook(
    kit: ModelKit, server: fakeredis.FakeServer
) -> None:
    kit.publish("digits", "1")
    old = (kit.root / "digits" / RELEASE_FILE).read_bytes()
    kit.publish("digits", "2")
    client = fakeredis.FakeRedis(server=server)
    audit = AuditLog(client, maxlen=100)
    clock = Clock()
    repo = ModelRepository(
        kit.root,
        signers=TrustedSignersSource([kit.signers_dir]).get,
        model_keys=ModelKeysSource(kit.keys_path).get,
        on_reject=audit_rejections(audit, stage="scan"),
        clock=clock,
        release_floor=RedisReleaseFloor(client),
    )
    assert "digits" in repo.refs()
    (kit.root / "digits" / RELEASE_FILE).write_bytes(old)
    for _ in range(3):
        clock.tick()
        assert "digits" not in repo.refs()
    records = [r for r in audit.latest() if r.reason == "model_rejected"]
    assert [r.detail for r in records] == [
        "digits: release serial 1 is below the highest seen (2): rollback refused"
    ]
    assert records[0].job_id == "" and records[0].tenant == ""


def test_registry_resolution_and_catalogue_follow_the_release(
    kit: ModelKit, start: Callable[..., Repo]
) -> None:
    _, v2 = two_versions(kit)
    w = start()
    reg = ModelRegistry(sources=[w.repo])
    assert reg.resolve("digits").version == "2"
    assert "digits" in reg.refs()
    shutil.rmtree(v2)
    w.rescan()
    with pytest.raises(ModelRejected):
        reg.resolve("digits")
    assert reg.refs() == ["digits@1"]
    two = {"inputs": SAMPLES["inputs"][:2]}  # digits@1 takes at most 2 rows
    assert reg.resolve("digits@1").predict(two)["labels"] == SAMPLES["sklearn_predictions"][:2]


def test_the_bundled_digits_is_released_and_served_by_bare_name() -> None:
    signers = TrustedSigners.from_paths([BUNDLED_SIGNERS_DIR])
    release = read_release(BUNDLED_MODEL_DIR / "digits", signers)
    assert (release.name, release.version) == ("digits", "2") and release.serial >= 2
    # The bundled keys: the digits owner's and digits-he's (its release is its own).
    he = read_release(BUNDLED_MODEL_DIR / "digits-he", signers)
    assert set(signers.keys) == {release.signer, he.signer}
    registry = build_registry(Settings.from_env({}))
    model = registry.resolve("digits")
    assert model.version == "2"
    assert model.predict(ROWS4)["labels"] == SAMPLES["sklearn_predictions"][:4]
