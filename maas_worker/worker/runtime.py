"""Per-process worker state: keyring, Redis clients, guard, audit log, models.

Built once per worker process (after the prefork fork, never shared across
it) and reused by every job. The main worker process also advertises the
models it serves, so clients can refuse an unknown model before enqueueing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time

import redis

from maas_worker.backend import functions, keyspace, scripts
from maas_worker.backend.audit import AuditLog
from maas_worker.backend.catalog import advertise, withdraw
from maas_worker.backend.claims import JobGuard, LeaseKeeper
from maas_worker.backend.redis import backend_client
from maas_worker.broker import fetch, shards
from maas_worker.crypto.primitives import CryptoBackend, crypto_backend
from maas_worker.errors import ConfigError
from maas_worker.models import EchoModel, Model, ModelRegistry, SleepModel
from maas_worker.models.repository import RejectHook
from maas_worker.monitoring import metrics
from maas_worker.monitoring.memory import read_memory
from maas_worker.private.evaluate import PrivateCache
from maas_worker.protocol import AuditReason
from maas_worker.settings import Settings
from maas_worker.tenancy.keyring import KeyringSource
from maas_worker.tenancy.quota import Quotas
from maas_worker.worker.batching import DynamicBatcher
from maas_worker.worker.watchdog import Watchdog

log = logging.getLogger(__name__)

#: How often a worker refreshes its entry in the model catalogue and node list.
ADVERTISE_INTERVAL_S = 10.0
#: How soon a failed advertisement is tried again.
ADVERTISE_RETRY_S = 1.0
MEMORY_CHECK_INTERVAL_S = 1.0


class RedisReleaseFloor:
    """The model release floor (`models.release.ReleaseFloor`) in a Redis hash.

    `keyspace.RELEASES` maps a model name to the highest release serial any
    worker has seen for it, so a restarted worker still refuses an older
    release copied back. Only workers write it. Unreachable Redis (or a value
    that is not a number) gives None: the repository keeps its in-memory
    floor and asks again later, so a Redis blip never stops model loading.
    """

    def __init__(self, client: redis.Redis) -> None:
        self._record = scripts.register(client, "record_release")

    def record(self, name: str, serial: int) -> int | None:
        """Store ``serial`` for ``name`` if higher; the highest stored (None: unreachable)."""
        try:
            raw = self._record(keys=[keyspace.RELEASES], args=[name, serial])
            return int(raw)
        except redis.RedisError as exc:
            log.warning("release floor unavailable (%s)", type(exc).__name__)
        except (TypeError, ValueError):
            log.warning("release floor of %s is not a number", name)
        return None


def build_registry(
    settings: Settings, on_reject: RejectHook | None = None, backend: redis.Redis | None = None
) -> ModelRegistry:
    """The models this worker serves: the diagnostics (if enabled) and the signed repository.

    Cheap to build and to list: the repository verifies signatures when it
    scans and loads a model (hashes, decryption, session) only when a job first
    resolves it. ``on_reject`` hears of every refused version. With
    ``backend``, the highest release serial seen per model is persisted there
    (`RedisReleaseFloor`); without, it is kept in memory only.
    """
    from maas_worker.models.artifact_crypto import ModelKeysSource
    from maas_worker.models.repository import ModelRepository
    from maas_worker.models.signing import TrustedSignersSource

    registry = ModelRegistry()
    if settings.diagnostic_models:
        registry.register(EchoModel())
        registry.register(SleepModel())
    registry.add_source(
        ModelRepository(
            settings.model_dir,
            signers=TrustedSignersSource(settings.trusted_signers).get,
            model_keys=ModelKeysSource(settings.model_keys_path).get,
            on_reject=on_reject,
            on_load=metrics.observe_model_load,
            release_floor=RedisReleaseFloor(backend) if backend is not None else None,
        )
    )
    return registry


def audit_rejections(audit: AuditLog, *, stage: str) -> RejectHook:
    """A hook recording refused model versions of one stage as ``model_rejected``.

    The main worker process records what its periodic scan refuses (bad or
    missing signature, manifest); each pool process records what it failed to
    load (hashes, decryption, runtime), so each refusal is recorded where it
    happens and not once per process. A bare name made unavailable by its
    release (missing, refused, rolled back) is a scan refusal, recorded by the
    main process once per change with the bare name as the reference.
    """

    def hook(ref: str, why: str, at: str) -> None:
        if at == stage:
            audit.record(
                job_id="",
                tenant="",
                reason=AuditReason.MODEL_REJECTED,
                verified=False,
                detail=f"{ref}: {why}",
            )

    return hook


class WorkerRuntime:
    """Everything a job needs that is worth building only once per process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        #: AES-GCM for every envelope this process opens or seals (MAAS_CRYPTO_BACKEND).
        self.crypto: CryptoBackend = crypto_backend(settings.crypto_backend)
        self.keyring = KeyringSource(settings.keyring_path)
        self.backend = backend_client(settings)
        self.guard = JobGuard(self.backend, lease_s=settings.lease_s, ha=settings.redis_ha)
        self.audit = AuditLog(self.backend, maxlen=settings.audit_maxlen, on_record=metrics.refused)
        self.registry = build_registry(
            settings, on_reject=audit_rejections(self.audit, stage="load"), backend=self.backend
        )
        self.quotas = Quotas(self.backend)
        #: Private inference: loaded public CKKS contexts and models' affine layers.
        self.private = PrivateCache(settings.private_context_cache)
        self._lease_keeper = LeaseKeeper(self.guard)
        self._lease_keeper.start()
        self._watchdog: Watchdog | None = None
        self._batchers: dict[tuple[str, str, int], DynamicBatcher] = {}
        self._batchers_lock = threading.Lock()
        self._memory_checked = 0.0
        self._memory_high = False

    def batcher_for(self, model: Model) -> DynamicBatcher | None:
        """The dynamic batcher of ``model`` if ``MAAS_BATCH`` lists it and it can batch."""
        spec = self.settings.batching.get(model.name) or self.settings.batching.get(
            f"{model.name}@{model.version}"
        )
        if spec is None or not hasattr(model, "predict_batch"):
            return None
        key = (model.name, model.version, id(model))  # a hot-reloaded model gets its own
        with self._batchers_lock:
            batcher = self._batchers.get(key)
            if batcher is None:
                batcher = self._batchers[key] = DynamicBatcher(
                    model,  # type: ignore[arg-type]
                    max_batch=spec[0],
                    max_wait_s=spec[1] / 1000,
                )
        return batcher

    @property
    def watchdog(self) -> Watchdog:
        """The job watchdog (created on first use, in the thread that runs jobs)."""
        if self._watchdog is None:
            self._watchdog = Watchdog()
        return self._watchdog

    def memory_pressure(self) -> bool:
        """True while memory use is above the high-water mark (checked at most 1/s): the
        container's, against its limit, where it has one (monitoring/memory.py)."""
        now = time.monotonic()
        if now - self._memory_checked >= MEMORY_CHECK_INTERVAL_S:
            self._memory_checked = now
            used = read_memory().used_percent
            self._memory_high = used > self.settings.memory_high_water_pct
        return self._memory_high


_runtime: WorkerRuntime | None = None
_runtime_pid: int | None = None
_runtime_lock = threading.Lock()


def get_runtime(settings: Settings | None = None) -> WorkerRuntime:
    """This process's runtime, built on first use (and rebuilt after a fork).

    It is built from ``settings`` (a pool child: its app's, inherited from the
    main process), or from the environment when none are given (the first job
    of a solo or threads pool).
    """
    global _runtime, _runtime_pid  # noqa: PLW0603 -- a per-process cache, one per pool child
    pid = os.getpid()
    if _runtime is None or _runtime_pid != pid:
        with _runtime_lock:
            if _runtime is None or _runtime_pid != pid:
                _runtime = WorkerRuntime(settings or Settings.from_env())
                _runtime_pid = pid
    return _runtime


class Advertiser:
    """Daemon thread in the main worker process keeping its advertisement fresh."""

    def __init__(self, settings: Settings, node: str | None = None) -> None:
        self.node = node or socket.gethostname()
        self._client = backend_client(settings)
        self._registry = build_registry(
            settings,
            on_reject=audit_rejections(
                AuditLog(self._client, maxlen=settings.audit_maxlen, on_record=metrics.refused),
                stage="scan",
            ),
            backend=self._client,
        )
        self._refs: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="maas-advertise", daemon=True)
        # Fair share: the tenants' weights, where the take reads them (fetch.py):
        # in each queue shard the node consumes (shards.py).
        self._brokers = [
            (shards.broker_client(settings, k), shards.key_prefix(settings, k))
            for k in shards.consumed(settings)
        ]
        self._keyring = KeyringSource(settings.keyring_path)

    def start(self) -> None:
        """Load the function library, advertise now and then every `ADVERTISE_INTERVAL_S`."""
        try:
            # Before the node is announced: clients that wait for a worker
            # find the library producers and monitors call (functions.py).
            functions.load(self._client)
        except (ConfigError, redis.RedisError) as exc:
            log.warning("could not load the Redis function library %s: %s", functions.LIBRARY, exc)
        advertise(self._client, self.node, self.refs())
        self._thread.start()

    def share(self, *, reannounce: bool = False) -> None:
        """Publish the keyring's fair-share weights (`fetch.publish_weights`) and, with
        ``reannounce``, put back in the rings any tenant whose queued jobs are outside
        them (`fetch.reannounce`). A Redis error is logged: the next round retries."""
        try:
            ring = self._keyring.get()
        except redis.RedisError as exc:
            log.warning("could not publish the tenants' fair-share weights: %s", exc)
            return
        weights = {name: t.policy.weight for name, t in ring.tenants.items()}
        for broker, prefix in self._brokers:
            try:
                fetch.publish_weights(broker, weights, prefix)
                if reannounce and (n := fetch.reannounce(broker, ring.tenants, prefix)):
                    log.info(
                        "fair share: %d tenant queue(s) with jobs announced again%s",
                        n,
                        f" (shard {prefix})" if prefix else "",
                    )
            except redis.RedisError as exc:
                log.warning("could not publish the tenants' fair-share weights: %s", exc)

    def stop(self) -> None:
        """Stop and withdraw the node."""
        self._stop.set()
        with contextlib.suppress(redis.RedisError):
            withdraw(self._client, self.node)

    def refs(self) -> list[str]:
        """What this worker serves now: recomputed each time, so new versions appear."""
        try:
            self._refs = self._registry.refs()
        except Exception:
            log.exception("could not list the models; advertising the previous list")
        # Each model's queue-wait and run series exist from the first scrape,
        # so its first job is an increase rate() sees (metrics.declare_models).
        metrics.declare_models(self._refs)
        return self._refs

    def _run(self) -> None:
        wait_s = ADVERTISE_INTERVAL_S
        while not self._stop.wait(wait_s):
            try:
                advertise(self._client, self.node, self.refs())
                self.share()
                wait_s = ADVERTISE_INTERVAL_S
            except redis.RedisError:
                log.warning("could not refresh the model catalogue; retrying")
                # Listed live again as soon as Redis answers (after a partition,
                # say), not up to a whole interval later.
                wait_s = ADVERTISE_RETRY_S
