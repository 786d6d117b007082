-- The cache's id (KEYS[1]): what it holds if it is one (32 lowercase hex digits), else ARGV[1],
-- stored there first (over anything else: the key is cacheward's own). Returns the id.
local v = redis.pcall('GET', KEYS[1])
if type(v) == 'string' and #v == 32 and string.match(v, '^[0-9a-f]+$') then return v end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
