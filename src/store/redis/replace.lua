-- Replaces KEYS[1] with ARGV[2] (TTL ARGV[3] seconds) only if it still holds exactly ARGV[1]: the
-- consistency checker's repair of an entry it found wrong, which a write made since (the value
-- changed) makes moot. Returns 1 when it replaced it, 0 otherwise.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return 1
end
return 0
