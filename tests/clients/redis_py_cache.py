"""redis-py with its client-side cache on, against cacheward's Redis-protocol front end.

Usage: redis_py_cache.py SOCKET. Reads commands from stdin, one per line, answers one JSON line
each: `GET key` -> {"value": str|null}; `SIZE` -> {"size": entries in the client's cache}.
"""
import json
import sys

import redis
from redis.cache import CacheConfig

client = redis.Redis(unix_socket_path=sys.argv[1], protocol=3, cache_config=CacheConfig())
for line in sys.stdin:
    words = line.split()
    if not words:
        continue
    if words[0] == "GET":
        value = client.get(words[1])
        answer = {"value": value.decode() if value is not None else None}
    elif words[0] == "SIZE":
        answer = {"size": client.get_cache().size}
    else:
        answer = {"error": f"unknown {words[0]}"}
    print(json.dumps(answer), flush=True)
