"""The durable response cache: one SQLite database in WAL mode, one row per request key.

Every answer is committed the moment it arrives, so a crash or ``kill -9`` loses at most the requests
that were in flight. WAL with ``synchronous=NORMAL`` survives a killed process (not a power cut, which
only costs re-asking the last few requests). Several processes (Snakemake shards) may share one file.

Statuses: ``completed`` and ``refused`` (content filter) are final and never re-sent; ``failed``
(retries exhausted, or a failed batch line) is re-sent by the next run; ``unusable`` (HTTP 200, but the
answer did not parse or fit the schema after the bounded re-asks) is kept, and re-sent only when asked
(``llm.retry_unusable``). A stored row is only replaced by one at least as good: failed < unusable <
completed / refused.

Leases: a runner that is about to send a request first *claims* it (``leases``: key, owner, expiry), many
keys in one transaction. A second runner sharing the file (a job that outlived its Snakemake, a re-run
started meanwhile, another shard with overlapping keys) does not re-send a key under a live foreign
lease: it polls until the owner's answer is stored, and takes the key over only once the lease has
expired (a killed owner stops renewing, so nothing is lost and nothing is paid twice while it lives); the
lease of a runner of this host whose process is gone is taken over at once.
Owners renew all their leases with one statement while requests are in flight; storing an answer
releases its lease (a trigger, in the same statement).
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

FINAL = ("completed", "refused")
# How good a stored answer is: a row is never replaced by a worse one (a re-asked unusable answer that then
# fails in transport keeps the unusable one on record).
_RANK_SQL = "CASE {} WHEN 'completed' THEN 2 WHEN 'refused' THEN 2 WHEN 'unusable' THEN 1 ELSE 0 END"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    content TEXT,
    finish_reason TEXT,
    error TEXT,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    cost REAL,
    attempts INTEGER,
    executor TEXT,
    model TEXT,
    batch_id TEXT,
    updated REAL
);
CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT PRIMARY KEY,
    endpoint TEXT,
    input_file_id TEXT,
    keys TEXT NOT NULL,
    status TEXT NOT NULL,
    created REAL,
    collected INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS leases (
    key TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS leases_by_owner ON leases (owner);
-- An answer stored (or improved) ends the request's flight: its lease goes in the same statement.
CREATE TRIGGER IF NOT EXISTS release_on_insert AFTER INSERT ON responses
BEGIN DELETE FROM leases WHERE key = NEW.key; END;
CREATE TRIGGER IF NOT EXISTS release_on_update AFTER UPDATE ON responses
BEGIN DELETE FROM leases WHERE key = NEW.key; END;
"""


def resend_statuses(retry_failed: bool, retry_unusable: bool) -> tuple[str, ...]:
    """The stored statuses a run sends again: ``failed`` (``retry_failed``), ``unusable`` (``retry_unusable``)."""
    return (("failed",) if retry_failed else ()) + (("unusable",) if retry_unusable else ())


def owner_alive(owner: str) -> bool:
    """False only for an owner known dead: a process of this host that no longer exists (a runner killed
    with -9 on this machine: its leases are taken over at once instead of after they expire). An owner on
    another host, or a live pid, counts as alive until its lease expires."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def new_owner() -> str:
    """A lease owner id: host, pid and a random part (a pid is reused; two runners in one process differ)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass
class Claim:
    """What :meth:`Cache.claim` made of a list of keys (each in exactly one list, in the given order)."""

    claimed: list[str]  # ours now: send them
    busy: list[str]  # another owner's live lease: wait for its answer, or for the lease to expire
    answered: list[str]  # an answer is stored that this run must not ask again


@dataclass
class Result:
    """What the cache holds for one request key."""

    key: str
    status: str  # completed | refused | unusable | failed
    content: str | None = None
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    attempts: int = 0
    executor: str | None = None
    model: str | None = None
    batch_id: str | None = None

    @property
    def final(self) -> bool:
        return self.status in FINAL


_COLUMNS = (
    "key",
    "status",
    "content",
    "finish_reason",
    "error",
    "prompt_tokens",
    "completion_tokens",
    "cost",
    "attempts",
    "executor",
    "model",
    "batch_id",
)


class Cache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=120, isolation_level=None, check_same_thread=False)
        # Switching to WAL needs the file to itself and SQLite does not wait for that (no busy handler):
        # two runners opening a new cache at the same moment would otherwise crash with "locked".
        deadline = time.monotonic() + 120
        while True:
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- responses -------------------------------------------------------------------------------
    def put(self, result: Result, owner: str | None = None) -> None:
        """Store one answer durably (one transaction) and release its lease. A stored answer is never
        replaced by a worse one (then ``owner``'s lease of the key is released by a second statement)."""
        values = [getattr(result, c) for c in _COLUMNS] + [time.time()]
        stored = self.db.execute(
            f"INSERT INTO responses ({', '.join(_COLUMNS)}, updated) VALUES ({', '.join('?' * (len(_COLUMNS) + 1))})"
            " ON CONFLICT(key) DO UPDATE SET "
            + ", ".join(f"{c}=excluded.{c}" for c in (*_COLUMNS[1:], "updated"))
            + f" WHERE {_RANK_SQL.format('excluded.status')} >= {_RANK_SQL.format('responses.status')}",
            values,
        ).rowcount
        if not stored and owner is not None:
            self.release(owner, [result.key])

    def get_many(self, keys: Iterable[str]) -> dict[str, Result]:
        keys = list(keys)
        found: dict[str, Result] = {}
        for i in range(0, len(keys), 900):  # SQLite's bound-parameter limit
            chunk = keys[i : i + 900]
            rows = self.db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM responses WHERE key IN ({', '.join('?' * len(chunk))})",
                chunk,
            )
            for row in rows:
                found[row[0]] = Result(*row)
        return found

    def get(self, key: str) -> Result | None:
        return self.get_many([key]).get(key)

    def pending(
        self, keys: Iterable[str], retry_failed: bool = True, retry_unusable: bool = False
    ) -> list[str]:
        """Keys to send (in the given order, duplicates removed): never asked, failed (``retry_failed``) or
        recorded as unusable (``retry_unusable``)."""
        keys = list(dict.fromkeys(keys))
        status: dict[str, str] = {}
        for i in range(0, len(keys), 900):
            chunk = keys[i : i + 900]
            status.update(
                self.db.execute(
                    f"SELECT key, status FROM responses WHERE key IN ({', '.join('?' * len(chunk))})", chunk
                ).fetchall()
            )
        resend = resend_statuses(retry_failed, retry_unusable)
        return [k for k in keys if k not in status or status[k] in resend]

    # -- leases --------------------------------------------------------------------------------
    def claim(
        self,
        keys: Iterable[str],
        owner: str,
        lease_s: float,
        *,
        resend: Iterable[str] = ("failed",),
        since: float | None = None,
    ) -> Claim:
        """Take the lease of every key that still has to be sent and that no other owner holds, in one
        write transaction (so two runners never both take a key).

        A key still has to be sent when no answer is stored, or the stored status is in ``resend`` and
        was written before ``since`` (the caller's start: a failed answer another runner stored during
        this run is that run's attempt, not one to repeat). A foreign lease counts until it expires;
        the caller's own leases are extended."""
        keys = list(dict.fromkeys(keys))
        resend = set(resend)
        claimed: list[str] = []
        busy: list[str] = []
        answered: list[str] = []
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            now = time.time()
            for i in range(0, len(keys), 900):
                chunk = keys[i : i + 900]
                marks = ", ".join("?" * len(chunk))
                stored = {
                    k: (status, updated)
                    for k, status, updated in db.execute(
                        f"SELECT key, status, updated FROM responses WHERE key IN ({marks})", chunk
                    )
                }
                held = dict(
                    db.execute(
                        f"SELECT key, owner FROM leases WHERE key IN ({marks}) AND expires > ? AND owner != ?",
                        (*chunk, now, owner),
                    ).fetchall()
                )
                take = []
                for k in chunk:
                    row = stored.get(k)
                    if row is not None and (
                        row[0] not in resend or (since is not None and (row[1] or 0) >= since)
                    ):
                        answered.append(k)
                    elif k in held and owner_alive(held[k]):
                        busy.append(k)
                    else:
                        take.append(k)
                db.executemany(
                    "INSERT OR REPLACE INTO leases (key, owner, expires) VALUES (?, ?, ?)",
                    [(k, owner, now + lease_s) for k in take],
                )
                claimed.extend(take)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return Claim(claimed, busy, answered)

    def renew(self, owner: str, lease_s: float) -> int:
        """Extend every lease of ``owner`` by ``lease_s`` from now (one statement); returns how many."""
        return self.db.execute(
            "UPDATE leases SET expires = ? WHERE owner = ?", (time.time() + lease_s, owner)
        ).rowcount

    def release(self, owner: str, keys: Iterable[str] | None = None) -> None:
        """Give up ``owner``'s leases (of ``keys``, or all): others may send those keys at once."""
        if keys is None:
            self.db.execute("DELETE FROM leases WHERE owner = ?", (owner,))
            return
        keys = list(keys)
        for i in range(0, len(keys), 900):
            chunk = keys[i : i + 900]
            self.db.execute(
                f"DELETE FROM leases WHERE owner = ? AND key IN ({', '.join('?' * len(chunk))})",
                (owner, *chunk),
            )

    def leases(self) -> dict[str, tuple[str, float]]:
        """``{key: (owner, expires)}`` of every lease on record (live or expired)."""
        return {k: (o, e) for k, o, e in self.db.execute("SELECT key, owner, expires FROM leases")}

    def iter_all(self) -> Iterator[Result]:
        for row in self.db.execute(f"SELECT {', '.join(_COLUMNS)} FROM responses"):
            yield Result(*row)

    def counts(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT status, count(*) FROM responses GROUP BY status").fetchall())

    # -- batches ---------------------------------------------------------------------------------
    def add_batch(self, batch_id: str, endpoint: str, input_file_id: str, keys: list[str]) -> None:
        """Record a submitted batch BEFORE polling it, so a restart adopts it instead of paying twice."""
        self.db.execute(
            "INSERT OR REPLACE INTO batches VALUES (?, ?, ?, ?, 'submitted', ?, 0)",
            (batch_id, endpoint, input_file_id, json.dumps(keys), time.time()),
        )

    def open_batches(self, endpoint: str) -> list[tuple[str, list[str]]]:
        rows = self.db.execute(
            "SELECT batch_id, keys FROM batches WHERE endpoint = ? AND collected = 0", (endpoint,)
        ).fetchall()
        return [(b, json.loads(k)) for b, k in rows]

    def close_batch(self, batch_id: str, status: str) -> None:
        self.db.execute("UPDATE batches SET status = ?, collected = 1 WHERE batch_id = ?", (status, batch_id))


# -- Batch API JSONL interchange ------------------------------------------------------------------
def export_requests(requests, path: str | Path, url: str = "/v1/chat/completions") -> int:
    """Write requests as Batch API input lines (``custom_id`` = request key; Azure wants
    ``url="/chat/completions"`` and the deployment as ``body.model``)."""
    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        for req in requests:
            fh.write(json.dumps({**req.batch_line(), "url": url}, ensure_ascii=False) + "\n")
            n += 1
    return n


def result_from_output_line(line: dict, executor: str, model: str | None = None, batch_id=None) -> Result:
    """A :class:`Result` from one Batch API output line (success, refusal or failure)."""
    key = line["custom_id"]
    response = line.get("response") or {}
    error = line.get("error")
    status_code = response.get("status_code")
    body = response.get("body") or {}
    if status_code == 200 and body.get("choices"):
        choice = body["choices"][0]
        usage = body.get("usage") or {}
        refused = choice.get("finish_reason") == "content_filter"
        return Result(
            key,
            "refused" if refused else "completed",
            content=(choice.get("message") or {}).get("content"),
            finish_reason=choice.get("finish_reason"),
            error="content_filter" if refused else None,
            prompt_tokens=usage.get("prompt_tokens") or 0,
            completion_tokens=usage.get("completion_tokens") or 0,
            attempts=1,
            executor=executor,
            model=body.get("model") or model,
            batch_id=batch_id,
        )
    err = error or (body.get("error") if isinstance(body, dict) else None) or {}
    code = (err.get("code") if isinstance(err, dict) else None) or (
        f"http_{status_code}" if status_code else "no_response"
    )
    if code == "content_filter":
        return Result(
            key,
            "refused",
            error="content_filter",
            attempts=1,
            executor=executor,
            model=model,
            batch_id=batch_id,
        )
    message = (err.get("message") if isinstance(err, dict) else str(err)) or ""
    return Result(
        key,
        "failed",
        error=f"{code}: {message[:200]}",
        attempts=1,
        executor=executor,
        model=model,
        batch_id=batch_id,
    )


def import_results(
    path: str | Path, cache: Cache, executor: str, model: str | None = None, batch_id=None
) -> dict[str, int]:
    """Store every line of a Batch API output JSONL in the cache; returns counts per status."""
    counts: dict[str, int] = {}
    with open(path, encoding="utf-8") as fh:
        for raw in fh:
            if not raw.strip():
                continue
            result = result_from_output_line(json.loads(raw), executor, model, batch_id)
            cache.put(result)
            counts[result.status] = counts.get(result.status, 0) + 1
    return counts
