-- What a stored value is, as src/model/entry.rs says (live_version, tombstone_json): prepended to
-- the scripts that read entries (apply.lua, drop.lua), so the rule is written once in Lua.

-- The version a stored string carries and whether it is a tombstone; nil when it is not
-- cacheward's. As model::entry has it: a live entry is an object with an integer version and an
-- id (not null: a user's row) or a row that is an object (a declared table's {"version","row"};
-- cjson makes arrays tables too), whatever else it holds (a row may have a column named
-- "tombstone"); a tombstone is {"tombstone":true} with an integer version (any: a drop of a row's
-- first version, 1, leaves one of version 0); anything else is foreign.
local function read_entry(current)
  local ok, stored = pcall(cjson.decode, current)
  if not ok or type(stored) ~= 'table' then return nil, false end
  local v = stored['version']
  if type(v) ~= 'number' or v ~= math.floor(v) then return nil, false end
  local id = stored['id']
  if id ~= nil and id ~= cjson.null then return v, false end
  if type(stored['row']) == 'table' then return v, false end
  if stored['tombstone'] == true then return v, true end
  return nil, false
end

-- A tombstone's stored form (model::entry::tombstone_json builds the same text).
local function tombstone(v)
  return '{"tombstone":true,"version":' .. string.format('%d', v) .. '}'
end
