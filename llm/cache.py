"""`JsonlCache`: a durable append-only JSONL file (fsync per record, torn last line detected and cut, an exclusive
lock against a second writer), keyed by a tuple of record fields; the API key is redacted from every line."""

import fcntl
import json
import logging
import os

from .client import redact

logger = logging.getLogger(__name__)


class CacheInUseError(RuntimeError):
    """A cache file is locked by another process (a second build or evaluation on the same output)."""


class JsonlCache:
    """Append-only JSONL records keyed by `tuple(record[f] for f in key_fields)`; the last record of a
    key wins. `append` returns only after the line is on disk (flush + fsync), so a record that is
    there after a crash was complete. Opening cuts a torn last line (a write cut off by a kill) and
    skips, with a warning, any other line that does not parse. One writer at a time (flock; a second
    one gets `CacheInUseError`). `secret` (the API key) is redacted from every line before it is written.
    """

    def __init__(self, path: str, key_fields: tuple[str, ...], secret: str | None = None):
        self.path, self.key_fields, self.secret = path, tuple(key_fields), secret
        self.records: dict[tuple, dict] = {}
        self.torn_bytes = 0
        self.bad_lines = 0
        new = not os.path.exists(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._file = open(path, "a+b")
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise CacheInUseError(f"{path} is in use by another process (another build or evaluation writing the same "
                                  "cache?); wait for it to finish or use another --output") from None
        if new:  # make the new file's directory entry durable too
            fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self._load()

    def _load(self) -> None:
        self._file.seek(0)
        data = self._file.read()
        good_end = 0
        lines = data.split(b"\n")
        for i, line in enumerate(lines):
            last = i == len(lines) - 1  # the bytes after the final newline: empty unless the write was torn
            if last and line == b"":
                break
            try:
                record = json.loads(line)
                if last:
                    raise ValueError("no newline: torn write")
                self.records[self.key(record)] = record
                good_end += len(line) + 1
            except (ValueError, KeyError, TypeError):
                if last:
                    self.torn_bytes = len(line)
                    logger.warning("%s: the last line is torn (%d bytes, a write cut off by a crash); ignoring it", self.path, len(line))
                else:
                    self.bad_lines += 1
                    good_end += len(line) + 1
                    logger.warning("%s: line %d is not a valid record; skipping it", self.path, i + 1)
        if self.torn_bytes:
            self._file.truncate(good_end)
            os.fsync(self._file.fileno())

    def key(self, record: dict) -> tuple:
        return tuple(record[f] for f in self.key_fields)

    def get(self, key: tuple) -> dict | None:
        return self.records.get(tuple(key))

    def __contains__(self, key) -> bool:
        return tuple(key) in self.records

    def __len__(self) -> int:
        return len(self.records)

    def append(self, record: dict) -> None:
        key = self.key(record)
        line = redact(json.dumps(record, ensure_ascii=False), self.secret)
        record = json.loads(line)  # what is kept is what the file says
        self._file.write((line + "\n").encode())
        self._file.flush()
        os.fsync(self._file.fileno())
        self.records[key] = record

    def close(self) -> None:
        self._file.close()  # also releases the lock

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
