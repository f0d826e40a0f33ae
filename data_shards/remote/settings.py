"""How remote shards are read: retries, timeouts, backoff and the cache, with the rules they obey."""

from __future__ import annotations

from dataclasses import dataclass

# The defaults suit a data centre link; the run config (train/config.py, data.*) starts from them too.
DEFAULT_RETRIES = 5
DEFAULT_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class RemoteSettings:
    """How remote shards are read. Tests shrink the defaults."""

    retries: int = DEFAULT_RETRIES  # failures in a row before ShardReadError (1 MiB of progress starts a new count)
    timeout_s: float = DEFAULT_TIMEOUT_S  # longest a connect or a single read may block
    backoff_s: float = 1.0  # first pause before a retry; doubles each failure in a row
    cache_dir: str | None = None  # the cache keeps its copies in CACHE_SUBFOLDER of it (None: no cache)
    cache_limit_bytes: int | None = None  # required with cache_dir: the most the cache may hold

    def __post_init__(self):
        problem = settings_problem(self.retries, self.timeout_s, self.cache_dir, self.cache_limit_bytes,
                                   self.backoff_s)
        if problem:
            raise ValueError(problem)


def settings_problem(retries: int, timeout_s: float, cache_dir: str | None, cache_limit: float | None,
                     backoff_s: float = 0.0, *, prefix: str = "", limit_name: str = "cache_limit_bytes") -> str | None:
    """The rules every remote setting obeys, or None. A message names each field `prefix` + its
    RemoteSettings name (the run config passes 'data.'), the cache limit `prefix` + `limit_name`
    (its unit is the caller's: the run config's is data.cache_limit_gb)."""
    if retries < 0:
        return f"{prefix}retries={retries} must be >= 0 (0: a failed read skips the shard at once)"
    if not timeout_s > 0:
        return f"{prefix}timeout_s={timeout_s} must be a positive number of seconds"
    if backoff_s < 0:
        return f"{prefix}backoff_s={backoff_s} must be >= 0"
    if (cache_dir is None) != (cache_limit is None):
        return (f"{prefix}cache_dir and {prefix}{limit_name} go together: give the cache folder (e.g. a node's "
                "local SSD) and the most disk it may use")
    if cache_limit is not None and not cache_limit > 0:
        return f"{prefix}{limit_name}={cache_limit} must be positive"
    return None
