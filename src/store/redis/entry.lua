-- What a stored value is, as src/model/entry.rs says (live_version, tombstone_json): prepended to
-- the scripts that read entries (apply.lua, drop.lua), so the rule is written once in Lua.

-- The version a stored string carries and whether it is a tombstone; nil when it is not
-- cacheward's (not JSON, not an object, no version, or a live-looking object without an id).
local function read_entry(current)
  local ok, stored = pcall(cjson.decode, current)
  if not ok or type(stored) ~= 'table' then return nil, false end
  local v = tonumber(stored['version'])
  local tomb = stored['tombstone'] == true
  if not tomb and stored['id'] == nil then v = nil end
  return v, tomb
end

-- A tombstone's stored form (model::entry::tombstone_json builds the same text).
local function tombstone(v)
  return '{"tombstone":true,"version":' .. string.format('%d', v) .. '}'
end
