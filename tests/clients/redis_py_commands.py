"""redis-py, RESP2 and RESP3, through every command cacheward's Redis-protocol front end serves.

Usage: redis_py_commands.py SOCKET PORT PASSWORD. Checks what each command answers against what
the test seeded (tests/resp.rs: user alice, accounts 1 and 2); prints "ok" and exits 0, or fails
with the assertion that did not hold.
"""
import json
import sys

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

socket, port, password = sys.argv[1], int(sys.argv[2]), sys.argv[3]


def refused(call, kind, says):
    try:
        call()
    except kind as e:
        assert says in str(e), f"{kind.__name__} says {e!r}, not {says!r}"
        return
    raise AssertionError(f"{call} was not refused with {kind.__name__}")


def check(client, protocol):
    # The handshake redis-py makes (HELLO 3 in RESP3, CLIENT SETINFO lib-name/lib-ver) worked.
    assert client.ping() is True
    info = client.client_info()
    assert info["lib-name"] == "redis-py", info
    assert int(info["resp"]) == protocol, info
    # Reads.
    alice = json.loads(client.get("user:alice"))
    assert alice["username"] == "alice", alice
    assert client.get("user:nobody") is None
    rows = client.mget(["accounts:1", "accounts:2", "accounts:99"])
    assert [json.loads(r)["id"] if r else None for r in rows] == [1, 2, None], rows
    assert "secret" not in json.loads(rows[0]), "an excluded column is never answered"
    assert json.loads(client.get("accounts:by_email=b@x"))["id"] == 2
    assert client.exists("user:alice", "accounts:1", "accounts:99") == 2
    # Connection commands.
    assert client.echo("hi") == b"hi"
    assert client.execute_command("SELECT", 0) in (True, b"OK", "OK")
    assert client.client_setname("py-client") is True
    assert client.client_getname() in ("py-client", b"py-client")
    assert client.client_id() > 0
    assert client.client_setinfo("lib-ver", "9.9") is True
    assert client.execute_command("CLIENT", "GETREDIR") == -1
    assert client.command_count() > 10
    # COMMAND as redis-py reads it (its own parser: name, arity, flags, key positions).
    commands = client.command()
    assert commands["get"]["arity"] == 2 and "readonly" in commands["get"]["flags"], commands["get"]
    server = client.info("server")
    assert server["server_name"] == "cacheward", server
    assert server["redis_version"] == "7.4.0", server
    # Errors: writes, unknown commands, keys under no table.
    refused(lambda: client.set("user:alice", "x"), redis.exceptions.ReadOnlyError, "JSON-RPC")
    refused(lambda: client.execute_command("FROB", "x"), redis.exceptions.ResponseError, "unknown command")
    refused(lambda: client.get("nowhere:1"), redis.exceptions.ResponseError, "under no table")
    refused(lambda: client.execute_command("SELECT", 1), redis.exceptions.ResponseError, "out of range")
    # Still usable after the errors.
    assert client.exists("accounts:2") == 1


for protocol in (2, 3):
    with redis.Redis(unix_socket_path=socket, protocol=protocol) as client:
        check(client, protocol)
    # Over TCP the password is required, and a wrong one refused.
    # Refused at once: no retry (redis-py retries connection errors, a refused AUTH among them).
    once = Retry(NoBackoff(), 0)
    with redis.Redis(host="127.0.0.1", port=port, protocol=protocol, retry=once) as client:
        refused(client.ping, redis.exceptions.AuthenticationError, "")
    with redis.Redis(
        host="127.0.0.1", port=port, password="wrong", protocol=protocol, retry=once
    ) as client:
        refused(client.ping, redis.exceptions.AuthenticationError, "")
    with redis.Redis(host="127.0.0.1", port=port, password=password, protocol=protocol) as client:
        check(client, protocol)
print("ok")
