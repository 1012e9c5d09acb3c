"""The :class:`~failoverd.core.store.Store` contract on etcd v3, through etcd3aio.

One gRPC channel (round-robin over every endpoint, optional TLS) carries the
KV, Lease, Auth and Watch services.  etcd3aio's KV/Lease services give us
deadlines and retry of transient errors; txn and grant are sent with a single
attempt because they are not idempotent.  The watch loop is ours so that it
resumes from the last revision it delivered rather than from a response
header.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
import grpc.aio
import structlog
from etcd3aio import (
    EtcdError,
    EtcdUnauthenticatedError,
    SortOrder,
    SortTarget,
    prefix_range_end,
)
from etcd3aio._protobuf import (
    Compare as PbCompare,
)
from etcd3aio._protobuf import (
    LeaseKeepAliveRequest,
    LeaseStub,
    WatchCreateRequest,
    WatchRequest,
    WatchStub,
)
from etcd3aio.auth import AuthService
from etcd3aio.connections import ConnectionManager
from etcd3aio.kv import KVService
from etcd3aio.lease import LeaseService

from failoverd import metrics
from failoverd.config import EtcdSettings
from failoverd.core.store import (
    Compare,
    Delete,
    Get,
    KeyValue,
    LeaseNotFound,
    Op,
    Put,
    Snapshot,
    StoreError,
    TxnResult,
    WatchEvent,
)

log = structlog.get_logger("failoverd.etcd.client")

T = TypeVar("T")

_EVENT_DELETE = 1
_WATCH_BACKOFF_MIN_S = 0.05
# The watch is the member's eyes: after an etcd outage it must be back within
# about a second, not after a backoff grown to 5 s (x1.5 jitter) while etcd
# was away.  One attempt a second costs etcd nothing.
_WATCH_BACKOFF_MAX_S = 1.0


def etcd_failure(text: str) -> str:
    """An etcd client error in words an operator can act on."""
    low = text.lower()
    if "certificate verify failed" in low or ("ssl_error_ssl" in low and "verify" in low):
        return "TLS verify failed (the server's certificate is not trusted by ca_file)"
    if "certificate required" in low or "bad certificate" in low or "unknown ca" in low \
            or "handshake" in low or "tsi_" in low or "ssl_error_ssl" in low:
        # gRPC's words for a TLS alert from the server ("Unwrap failed
        # (TSI_DATA_CORRUPTED, SSL_ERROR_SSL ...)"): a refused client cert.
        return f"TLS failed (client certificate refused?): {text[-160:]}"
    if "authentication failed" in low or "invalid auth token" in low or \
            "unauthenticated" in low or "user name is empty" in low:
        return "authentication failed (username/password_file)"
    if "permission denied" in low:
        return "permission denied (the user's role does not cover the cluster's prefix)"
    if "connection refused" in low or "failed to connect" in low or "unavailable" in low:
        return f"unreachable: {text[:160]}"
    if "timeout" in low or "deadline" in low:
        return "unreachable (timed out)"
    return text[:200]


def _text(raw: bytes) -> str:
    """etcd holds bytes; ours are UTF-8 JSON.  Anything else (a hand edit,
    another tool) decodes with replacement characters and is then refused
    as malformed by the parser that reads it, never a crash."""
    return raw.decode(errors="replace")


def _kv(pb: Any) -> KeyValue:
    return KeyValue(
        key=_text(pb.key),
        value=_text(pb.value),
        create_revision=int(pb.create_revision),
        mod_revision=int(pb.mod_revision),
        lease=int(pb.lease),
    )


class EtcdStore:
    """The :class:`~failoverd.core.store.Store` protocol over etcd v3's gRPC
    API (etcd3aio: KV, Txn, Lease, Watch on one round-robin channel).

    Shared by every task of the daemon.  Each call is bounded by
    ``asyncio.timeout`` (twice ``etcd.timeout_s``); every failure — gRPC
    status, timeout, or something the client library did not expect — is a
    :class:`~failoverd.core.store.StoreError` (:class:`LeaseNotFound` for an
    expired lease), so callers hold their last good state.  A txn is never
    retried blindly (it is not idempotent); a call refused for an expired
    auth token logs in again and is retried once.  :meth:`watch` resumes
    after a broken stream from the next revision and yields ``[]`` after a
    compaction (the caller reloads).
    """

    def __init__(self, settings: EtcdSettings) -> None:
        self._settings = settings
        self._timeout = settings.timeout_s
        tls: dict[str, bytes | None] = {}
        if settings.ca_file is not None:
            tls["ca_cert"] = settings.ca_file.read_bytes()
            if settings.cert_file is not None and settings.key_file is not None:
                tls["cert_chain"] = settings.cert_file.read_bytes()
                tls["cert_key"] = settings.key_file.read_bytes()
        manager = ConnectionManager(
            settings.endpoints, keepalive_time_ms=2_000, keepalive_timeout_ms=2_000
        )
        # gRPC's default reconnect backoff grows to 120 s: far too slow to
        # notice an etcd member that came back.  Keep it within a lease TTL.
        manager.grpc_options += [
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2_000),
        ]
        self._channel = manager.get_channel(**tls, tls_server_name=settings.tls_server_name)
        self._kv_svc = KVService(self._channel)
        self._lease_svc = LeaseService(self._channel)
        self._auth_svc = AuthService(self._channel)
        self._watch_stub = WatchStub(self._channel)
        self._lease_stub = LeaseStub(self._channel)
        # Per lease, one keep-alive stream kept open between renewals (a new
        # gRPC stream per renewal was most of a resting daemon's etcd CPU),
        # and whether a renewal is using it.
        self._keepalive_streams: dict[int, Any] = {}
        self._keepalive_busy: set[int] = set()
        self._keepalive_tokens: dict[int, tuple[tuple[str, str], ...]] = {}
        self._metadata: tuple[tuple[str, str], ...] = ()
        self._logged_in = False

    @property
    def _uses_auth(self) -> bool:
        return self._settings.username is not None and self._settings.password_file is not None

    async def authenticate(self) -> None:
        """Log in (user/password from the settings) and use the new token.

        Called lazily before the first call and again whenever etcd says the
        token is no longer valid (simple tokens expire: --auth-token-ttl).
        """
        if not self._uses_auth or self._settings.password_file is None:
            return
        password = self._settings.password_file.read_text().strip()
        async with asyncio.timeout(self._timeout * 2):
            resp = await self._auth_svc.authenticate(
                self._settings.username or "", password, timeout=self._timeout)
        token = str(resp.token)
        for svc in (self._kv_svc, self._lease_svc):
            svc.set_token(token)
        self._metadata = (("token", token),)
        self._logged_in = True

    @staticmethod
    def _unauthenticated(exc: BaseException) -> bool:
        return isinstance(exc, EtcdUnauthenticatedError) or (
            isinstance(exc, grpc.aio.AioRpcError)
            and exc.code() == grpc.StatusCode.UNAUTHENTICATED)

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        op = what.replace(" ", "_")
        try:
            with metrics.ETCD_LATENCY.labels(op).time():
                if self._uses_auth and not self._logged_in:
                    await self.authenticate()
                try:
                    async with asyncio.timeout(self._timeout * 2):
                        return await fn()
                except (EtcdError, grpc.aio.AioRpcError) as exc:
                    if not (self._uses_auth and self._unauthenticated(exc)):
                        raise
                    # The token expired.  A call refused for auth was not
                    # applied, so logging in again and retrying once is safe
                    # even for a txn.
                    await self.authenticate()
                    async with asyncio.timeout(self._timeout * 2):
                        return await fn()
        except (EtcdError, grpc.aio.AioRpcError, TimeoutError) as exc:
            metrics.ETCD_ERRORS.labels(op).inc()
            detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            if "lease not found" in (detail or ""):
                raise LeaseNotFound(f"etcd {what}: {detail}") from exc
            raise StoreError(f"etcd {what}: {detail or type(exc).__name__}") from exc
        except (ValueError, TypeError, AttributeError, LookupError, grpc.RpcError,
                asyncio.InvalidStateError) as exc:
            # Something the client library did not expect either: still a
            # store error (the caller holds its last good state), not a crash.
            metrics.ETCD_ERRORS.labels(op).inc()
            raise StoreError(f"etcd {what}: unexpected {type(exc).__name__}: {exc}") from exc

    async def grant(self, ttl: int) -> tuple[int, int]:
        resp = await self._call(
            "lease grant",
            lambda: self._lease_svc.grant(ttl, timeout=self._timeout, max_attempts=1),
        )
        return int(resp.ID), int(resp.TTL)

    async def keepalive(self, lease: int) -> int:
        """Renew ``lease`` once; its TTL.  On the lease's open stream when it
        is free (one request, one answer, in order); a renewal sent while
        another is still waiting — the lease's runner retries an attempt
        that gets no answer in time — goes on a stream of its own, so a
        stream stuck on a dead endpoint never holds a renewal back.  A
        stream that fails, times out or is abandoned is closed and not used
        again: an answer it owed can never be taken for a later request's."""
        if lease in self._keepalive_busy:
            return await self._keepalive_alone(lease)
        self._keepalive_busy.add(lease)
        ok = False
        try:
            ttl = await self._call("lease keepalive", lambda: self._keepalive_on_stream(lease))
            ok = True
        finally:
            self._keepalive_busy.discard(lease)
            if not ok:
                stream = self._keepalive_streams.pop(lease, None)
                if stream is not None:
                    stream.cancel()
        if ttl <= 0:
            stream = self._keepalive_streams.pop(lease, None)
            if stream is not None:
                stream.cancel()
            raise LeaseNotFound(f"lease {lease:x} expired")
        return ttl

    async def _keepalive_on_stream(self, lease: int) -> int:
        stream = self._keepalive_streams.get(lease)
        if stream is not None and self._keepalive_tokens.get(lease) != self._metadata:
            # Opened under an auth token we have since replaced (a retry
            # after logging in again): a stream carries its token for life.
            self._keepalive_streams.pop(lease).cancel()
            stream = None
        if stream is None:
            # A daemon renews one lease at a time; streams of leases it
            # stopped renewing (lost to their deadline) are closed here.
            for old in [k for k in self._keepalive_streams if k not in self._keepalive_busy]:
                self._keepalive_streams.pop(old).cancel()
            stream = self._lease_stub.LeaseKeepAlive(metadata=self._metadata or None)
            self._keepalive_streams[lease] = stream
            self._keepalive_tokens[lease] = self._metadata
        try:
            await stream.write(LeaseKeepAliveRequest(ID=lease))
            resp = await stream.read()
        except (asyncio.InvalidStateError, grpc.aio.UsageError) as exc:
            # The stream ended since the last renewal (its etcd member went
            # away): the caller drops it and the next renewal opens another.
            raise StoreError(f"etcd keepalive: stream ended ({exc})") from exc
        if resp is grpc.aio.EOF:
            raise StoreError("etcd keepalive: stream closed without an answer")
        return int(resp.TTL)

    async def _keepalive_alone(self, lease: int) -> int:
        async def once() -> int:
            stream = self._lease_svc.keep_alive(lease)
            try:
                async for resp in stream:
                    # Not cancelled: our one request is sent and half-closed,
                    # so etcd ends the stream itself (a cancel races grpc's
                    # request writer, which then formats a traceback).
                    return int(resp.TTL)
            except BaseException:
                stream.cancel()
                raise
            raise StoreError("etcd keepalive: stream closed without an answer")

        ttl = await self._call("lease keepalive", once)
        if ttl <= 0:
            raise LeaseNotFound(f"lease {lease:x} expired")
        return ttl

    async def revoke(self, lease: int) -> None:
        stream = self._keepalive_streams.pop(lease, None)
        if stream is not None:
            stream.cancel()
        with contextlib.suppress(LeaseNotFound):
            await self._call(
                "lease revoke", lambda: self._lease_svc.revoke(lease, timeout=self._timeout)
            )

    async def get(self, key: str) -> KeyValue | None:
        resp = await self._call("get", lambda: self._kv_svc.get(key, timeout=self._timeout))
        return _kv(resp.kvs[0]) if resp.kvs else None

    async def get_prefix(self, prefix: str, limit: int = 0, newest_first: bool = False,
                         keys_only: bool = False) -> Snapshot:
        order = SortOrder.DESCEND if newest_first else SortOrder.ASCEND
        resp = await self._call(
            "get prefix",
            lambda: self._kv_svc.get(
                prefix, prefix_range_end(prefix), limit=limit, sort_order=order,
                sort_target=SortTarget.KEY, keys_only=keys_only, timeout=self._timeout
            ),
        )
        return Snapshot(int(resp.header.revision), tuple(_kv(kv) for kv in resp.kvs))

    async def count(self, prefix: str) -> int:
        resp = await self._call(
            "count",
            lambda: self._kv_svc.get(prefix, prefix_range_end(prefix), count_only=True,
                                     timeout=self._timeout))
        return int(resp.count)

    async def snapshot(self, prefix: str, exclude: Sequence[str] = ()) -> Snapshot:
        # Cut [prefix, end) around each excluded sub-prefix; read the pieces
        # in one read-only txn so they share a revision.
        ranges: list[tuple[str, bytes]] = []
        start = prefix
        for sub in sorted(prefix + e for e in exclude):
            ranges.append((start, sub.encode()))
            start = prefix_range_end(sub).decode()
        ranges.append((start, prefix_range_end(prefix)))
        ops = [KVService.txn_op_get(k, range_end=end) for k, end in ranges]
        # A read-only txn is idempotent, so transient errors may be retried.
        resp = await self._call(
            "snapshot", lambda: self._kv_svc.txn([], ops, timeout=self._timeout)
        )
        kvs = tuple(
            _kv(kv) for r in resp.responses for kv in r.response_range.kvs
        )
        return Snapshot(int(resp.header.revision), kvs)

    async def put(self, key: str, value: str, lease: int = 0) -> int:
        resp = await self._call(
            "put", lambda: self._kv_svc.put(key, value, lease=lease, timeout=self._timeout)
        )
        return int(resp.header.revision)

    async def delete(self, key: str, prefix: bool = False) -> int:
        end = prefix_range_end(key) if prefix else None
        resp = await self._call(
            "delete", lambda: self._kv_svc.delete(key, end, timeout=self._timeout)
        )
        return int(resp.deleted)

    @staticmethod
    def _compare(c: Compare) -> Any:
        if c.target == "create":
            return KVService.txn_compare_create_revision(c.key, c.value)
        return PbCompare(
            result=PbCompare.EQUAL, target=PbCompare.MOD, key=c.key.encode(),
            mod_revision=c.value,
        )

    @staticmethod
    def _op(op: Op) -> Any:
        if isinstance(op, Put):
            return KVService.txn_op_put(op.key, op.value, lease=op.lease)
        if isinstance(op, Delete):
            end = (op.end.encode() if op.end is not None
                   else prefix_range_end(op.key) if op.prefix else None)
            return KVService.txn_op_delete(op.key, range_end=end)
        return KVService.txn_op_get(op.key)

    async def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        resp = await self._call(
            "txn",
            lambda: self._kv_svc.txn(
                [self._compare(c) for c in compares],
                [self._op(o) for o in success],
                [self._op(o) for o in failure],
                timeout=self._timeout,
                max_attempts=1,  # not idempotent: never retried blindly
            ),
        )
        branch = success if resp.succeeded else failure
        gets: list[KeyValue | None] = []
        for op, r in zip(branch, resp.responses, strict=True):
            if isinstance(op, Get):
                kvs = r.response_range.kvs
                gets.append(_kv(kvs[0]) if kvs else None)
        return TxnResult(bool(resp.succeeded), int(resp.header.revision), tuple(gets))

    async def watch(self, prefix: str, start_revision: int
                    ) -> AsyncGenerator[list[WatchEvent], None]:
        next_rev = start_revision
        backoff = _WATCH_BACKOFF_MIN_S
        while True:
            create = WatchCreateRequest(
                key=prefix.encode(), range_end=prefix_range_end(prefix),
                start_revision=next_rev,
            )

            async def requests(req: WatchCreateRequest = create) -> AsyncIterator[WatchRequest]:
                yield WatchRequest(create_request=req)
                await asyncio.Future()  # keep the stream open

            stream = self._watch_stub.Watch(requests(), metadata=self._metadata or None)
            try:
                async for resp in stream:
                    backoff = _WATCH_BACKOFF_MIN_S
                    if resp.compact_revision > 0:
                        log.warning("watch compacted", prefix=prefix, wanted=next_rev,
                                    compacted=resp.compact_revision)
                        next_rev = int(resp.compact_revision)
                        yield []  # the caller re-reads state
                        break
                    if resp.canceled:
                        log.warning("watch canceled by server", reason=resp.cancel_reason)
                        break
                    if resp.events:
                        next_rev = int(resp.events[-1].kv.mod_revision) + 1
                        # ``ev.kv`` builds a new message wrapper at each
                        # access: taken once per event (an evacuation of
                        # 1,000 groups streams ~10,000 events to each member).
                        yield [
                            WatchEvent(
                                key=_text(kv.key), value=_text(kv.value),
                                mod_revision=kv.mod_revision,
                                deleted=ev.type == _EVENT_DELETE,
                                create_revision=kv.create_revision,
                                lease=kv.lease,
                            )
                            for ev in resp.events for kv in (ev.kv,)
                        ]
            except grpc.aio.AioRpcError as exc:
                log.warning("watch stream failed; resuming", code=exc.code().name,
                            from_revision=next_rev)
                if self._uses_auth and self._unauthenticated(exc):
                    with contextlib.suppress(EtcdError, grpc.aio.AioRpcError, TimeoutError):
                        await self.authenticate()
            finally:
                stream.cancel()
            await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
            backoff = min(backoff * 2, _WATCH_BACKOFF_MAX_S)

    async def close(self) -> None:
        for stream in self._keepalive_streams.values():
            stream.cancel()
        self._keepalive_streams.clear()
        await self._channel.close()
