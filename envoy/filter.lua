-- Shapes REST responses after gRPC-JSON transcoding into the error envelope and statuses
-- of docs/errors.md.
--
-- It sits before the transcoder in the filter chain, so on the way back it sees the
-- already transcoded response (and Envoy's own local replies). `make generate` writes it
-- into envoy/envoy.json after the tables it reads (envoy_tables.py): from the error
-- contract (errors.py) GATEWAY_CODES (HTTP status -> public code of an error without the
-- service's envelope), FALLBACK_CODE and RETRY_AFTER (HTTP status -> default Retry-After
-- seconds); from the descriptor set ENUM_VALUES (enum full name -> accepted JSON
-- spellings), UNWRAP (HTTP rules with a `response_body`: method, Lua path pattern, JSON
-- field), MESSAGES and SHAPE_RULES (the request fields whose JSON shape is checked, and
-- the HTTP rules with body "*" they apply to, see find_bad_shape). On the way in it
-- rejects request bodies whose bool fields hold anything but true, false or null, and
-- whose list fields hold a lone value or nested arrays. Native gRPC callers are left
-- alone.
--
-- Contract with the gRPC server (metadata keys, all ASCII values):
--   x-http-status: 201 | 204   a success status other than 200: initial metadata sent
--                              just before returning
--   x-http-status: <4xx/5xx>   with x-error-envelope: <JSON of the whole envelope>
--                              on errors: trailing metadata of the abort (arrives here as
--                              headers of a trailers-only response, or as trailers when
--                              initial metadata went first), or initial metadata sent
--                              before aborting. Errors without it get a generic envelope.
--   x-retry-after: <seconds>   beside them on retryable errors: the Retry-After header

-- Dynamic metadata namespace carrying per-request facts from the request to the response.
local NS = "segments.rest"

-- Never shown to HTTP clients: the server's side channel and gRPC transport details.
local INTERNAL_HEADERS = {
  "x-http-status", "x-error-envelope", "x-retry-after", "grpc-status", "grpc-message",
  "grpc-status-details-bin", "grpc-accept-encoding", "grpc-encoding",
}

-- What a proto scalar type means to a JSON client.
local TYPE_MESSAGES = {
  TYPE_STRING = "must be a string",
  TYPE_BOOL = "must be true or false",
  TYPE_INT32 = "must be a 32-bit integer",
  TYPE_SINT32 = "must be a 32-bit integer",
  TYPE_SFIXED32 = "must be a 32-bit integer",
  TYPE_UINT32 = "must be a non-negative 32-bit integer",
  TYPE_FIXED32 = "must be a non-negative 32-bit integer",
  TYPE_INT64 = "must be an integer",
  TYPE_SINT64 = "must be an integer",
  TYPE_SFIXED64 = "must be an integer",
  TYPE_UINT64 = "must be a non-negative integer",
  TYPE_FIXED64 = "must be a non-negative integer",
  TYPE_DOUBLE = "must be a number",
  TYPE_FLOAT = "must be a number",
}

local function json_escape(s)
  s = s:gsub('[%c"\\]', function(c)
    if c == '"' then return '\\"' end
    if c == "\\" then return "\\\\" end
    if c == "\n" then return "\\n" end
    if c == "\t" then return "\\t" end
    if c == "\r" then return "\\r" end
    return string.format("\\u%04x", c:byte())
  end)
  return s
end

local function utf8_char(cp)
  if cp < 0x80 then return string.char(cp) end
  if cp < 0x800 then
    return string.char(0xC0 + math.floor(cp / 0x40), 0x80 + cp % 0x40)
  end
  if cp < 0x10000 then
    return string.char(0xE0 + math.floor(cp / 0x1000), 0x80 + math.floor(cp / 0x40) % 0x40,
      0x80 + cp % 0x40)
  end
  return string.char(0xF0 + math.floor(cp / 0x40000), 0x80 + math.floor(cp / 0x1000) % 0x40,
    0x80 + math.floor(cp / 0x40) % 0x40, 0x80 + cp % 0x40)
end

local ESCAPES = { n = "\n", t = "\t", r = "\r", b = "\b", f = "\f" }

-- Index just past the JSON string whose opening quote is at `i`; nil if it never ends.
-- A plain find is much faster than a pattern on long strings.
local function string_end(text, i)
  local j = i
  while true do
    j = text:find('"', j + 1, true)
    if not j then return nil end
    -- The quote ends the string unless an odd number of backslashes precede it.
    local k = j - 1
    while text:byte(k) == 92 do k = k - 1 end -- '\\'
    if (j - 1 - k) % 2 == 0 then return j + 1 end
  end
end

-- The inside of a JSON string literal (without its quotes) with its escapes resolved.
local function json_unescape(s)
  if not s:find("\\", 1, true) then return s end
  local out, i = {}, 1
  while true do
    local k = s:find("\\", i, true)
    if not k then
      out[#out + 1] = s:sub(i)
      return table.concat(out)
    end
    out[#out + 1] = s:sub(i, k - 1)
    local e = s:sub(k + 1, k + 1)
    if e == "u" then
      local cp = tonumber(s:sub(k + 2, k + 5), 16) or 0xFFFD
      i = k + 6
      local lo = s:sub(i, i + 1) == "\\u" and tonumber(s:sub(i + 2, i + 5), 16)
      if cp >= 0xD800 and cp < 0xDC00 and lo and lo >= 0xDC00 and lo < 0xE000 then
        cp = 0x10000 + (cp - 0xD800) * 0x400 + (lo - 0xDC00)
        i = i + 6
      end
      out[#out + 1] = utf8_char(cp)
    else
      out[#out + 1] = ESCAPES[e] or e
      i = k + 2
    end
  end
end

-- Value of the first top-level-looking "key":"..." string in a JSON text, unescaped.
-- Only used on bodies Envoy itself printed (local replies, google.rpc.Status), whose
-- first occurrence of such a key is the one wanted.
local function json_string_field(text, key)
  local _, start = text:find('"' .. key .. '":"', 1, true)
  if not start then return nil end
  local stop = string_end(text, start)
  if not stop then return nil end
  return json_unescape(text:sub(start + 1, stop - 2))
end

-- At most `limit` bytes of `s`, cut on a UTF-8 character boundary.
local function shorten(s, limit)
  if #s <= limit then return s end
  local cut = limit
  while cut > 0 and s:byte(cut + 1) and s:byte(cut + 1) >= 0x80 and s:byte(cut + 1) < 0xC0 do
    cut = cut - 1
  end
  return s:sub(1, cut) .. "..."
end

-- "condition.groups[1].filters[0].track_membership" -> "condition.groups.1.filters.0.trackMembership"
local function json_path(proto_path)
  local path = proto_path:gsub("%[(%d+)%]", ".%1")
  path = path:gsub("_(%l)", function(c) return c:upper() end)
  return path
end

-- Strict shapes of request bodies -----------------------------------------------------
-- The transcoder's JSON parser takes the strings "yes", "no", "1", "t", "true", ... for a
-- bool field, a lone value for a list ("emails": "a@x.com") and flattens nested arrays
-- into one; the contract wants a 400 naming the field. MESSAGES (prepended by
-- envoy_tables.py from the descriptor) maps each request message's name to its checked
-- fields by JSON key (json_name and proto name alike): a node has the field's JSON `name`,
-- `repeated` for a list, `bool` for a bool, `message` for a message field (its object, or
-- each object of its list, is checked against that message's fields) and `element`, what
-- the value or each element must be. Free-form objects (google.protobuf.Struct/Value,
-- such as `data`) are not in the table, so nothing inside them is looked at. Malformed
-- JSON is left to the transcoder's own 400.

for _, fields in pairs(MESSAGES) do
  for _, node in pairs(fields) do
    if node.message then node.fields = MESSAGES[node.message] or {} end
  end
end

local WHITESPACE = "^[ \t\r\n]*()"

-- Index just past the JSON value starting at `i`, not looking inside it; nil if the
-- value is cut short or not JSON.
local function skip_value(text, i)
  local c = text:byte(i)
  if c == 34 then return string_end(text, i) end -- '"'
  if c ~= 123 and c ~= 91 then -- a number, true, false or null: not '{' nor '['
    return text:match("^[%w%.%+%-]+()", i)
  end
  local depth, j = 0, i
  while true do
    j = text:find('[%[%]{}"]', j) -- only brackets and strings matter
    if not j then return nil end
    c = text:byte(j)
    if c == 34 then
      j = string_end(text, j)
      if not j then return nil end
    else
      depth = (c == 123 or c == 91) and depth + 1 or depth - 1
      j = j + 1
      if depth == 0 then return j end
    end
  end
end

-- Whether `s` is valid UTF-8 (for the transcoder, anything else is malformed JSON).
local function valid_utf8(s)
  if not s:find("[\128-\255]") then return true end
  local i = 1
  while i <= #s do
    local c = s:byte(i)
    -- Sequence length, and the range of its second byte (no overlongs, no surrogates).
    local len, lo, hi = 1, 0x80, 0xBF
    if c >= 0xC2 and c <= 0xDF then len = 2
    elseif c >= 0xE0 and c <= 0xEF then
      len, lo, hi = 3, c == 0xE0 and 0xA0 or 0x80, c == 0xED and 0x9F or 0xBF
    elseif c >= 0xF0 and c <= 0xF4 then
      len, lo, hi = 4, c == 0xF0 and 0x90 or 0x80, c == 0xF4 and 0x8F or 0xBF
    elseif c >= 0x80 then return false end
    for j = i + 1, i + len - 1 do
      local b = s:byte(j)
      if not b or b < lo or b > hi then return false end
      lo, hi = 0x80, 0xBF
    end
    i = i + len
  end
  return true
end

local check_value

-- The value at `i` is wrong for `path`: returns the index just past it (nil if it is not
-- JSON) and `bad`, or when there was none yet { field = <dot path>, reason, got = <the
-- JSON value> }.
local function refuse(text, i, path, reason, bad)
  local stop = skip_value(text, i)
  if not stop then return nil end
  if not bad then
    local got = text:sub(i, stop - 1)
    if not valid_utf8(got) then return nil end -- never echoed into the error
    bad = { field = path, reason = reason, got = got }
  end
  return stop, bad
end

-- Checks the members of the object at `i` (its '{') against `node.fields`. Returns the
-- index just past the object, or nil for malformed JSON, and `bad` or the first bad field
-- found in it (see refuse).
local function check_object(text, i, node, prefix, bad)
  i = text:match(WHITESPACE, i + 1)
  if text:byte(i) == 125 then return i + 1, bad end -- '}'
  while true do
    if text:byte(i) ~= 34 then return nil end
    local key_end = string_end(text, i)
    if not key_end then return nil end
    local child = node.fields[json_unescape(text:sub(i + 1, key_end - 2))]
    i = text:match(WHITESPACE, key_end)
    if text:byte(i) ~= 58 then return nil end -- ':'
    i = text:match(WHITESPACE, i + 1)
    if child then
      i, bad = check_value(text, i, child, prefix .. child.name, bad)
    else
      i = skip_value(text, i)
    end
    if not i then return nil end
    i = text:match(WHITESPACE, i)
    local c = text:byte(i)
    if c == 125 then return i + 1, bad end -- '}'
    if c ~= 44 then return nil end -- ','
    i = text:match(WHITESPACE, i + 1)
  end
end

-- One value (not a list) of the field `node` at `i`.
local function check_single(text, i, node, path, bad)
  if node.fields then
    if text:byte(i) == 123 then return check_object(text, i, node, path .. ".", bad) end
    return skip_value(text, i), bad -- not an object: the transcoder's business
  end
  if node.bool then
    local stop = skip_value(text, i)
    if not stop then return nil end
    local got = text:sub(i, stop - 1)
    if got ~= "true" and got ~= "false" and got ~= "null" then
      return refuse(text, i, path, node.element, bad)
    end
    return stop, bad
  end
  return skip_value(text, i), bad -- a string, number or enum: the transcoder checks it
end

-- Like check_object, for the value at `i` of the field `node` whose path is `path`.
check_value = function(text, i, node, path, bad)
  if not node.repeated or text:sub(i, i + 3) == "null" then
    return check_single(text, i, node, path, bad)
  end
  if text:byte(i) ~= 91 then return refuse(text, i, path, "must be an array", bad) end -- '['
  local index = 0
  i = text:match(WHITESPACE, i + 1)
  if text:byte(i) == 93 then return i + 1, bad end -- ']'
  while true do
    local here = path .. "." .. index
    if text:byte(i) == 91 then
      i, bad = refuse(text, i, here, node.element, bad) -- a nested array
    else
      i, bad = check_single(text, i, node, here, bad)
    end
    if not i then return nil end
    i = text:match(WHITESPACE, i)
    local c = text:byte(i)
    if c == 93 then return i + 1, bad end -- ']'
    if c ~= 44 then return nil end -- ','
    index = index + 1
    i = text:match(WHITESPACE, i + 1)
  end
end

-- Every key of a message's checked bool and list fields, and of those of the messages
-- below it, as it appears quoted in JSON.
local function quoted_keys(message, out, seen)
  if seen[message] then return out end
  seen[message] = true
  for key, node in pairs(MESSAGES[message] or {}) do
    if node.bool or node.repeated then out[#out + 1] = '"' .. key .. '"' end
    if node.message then quoted_keys(node.message, out, seen) end
  end
  return out
end
for _, rule in ipairs(SHAPE_RULES) do
  rule.fields = MESSAGES[rule.message] or {}
  rule.quoted_keys = quoted_keys(rule.message, {}, {})
end

-- The first field of a request body (JSON text) for `rule` whose value has the wrong
-- shape, as { field, reason, got }; nil when all are fine or the JSON is malformed.
local function find_bad_shape(text, rule)
  -- Most bodies name none of the fields at all (a key could only hide behind a \u
  -- escape): then the scan is not needed.
  local named = text:find("\\u", 1, true)
  for _, key in ipairs(rule.quoted_keys) do
    named = named or text:find(key, 1, true)
  end
  if not named then return nil end
  local i = text:match(WHITESPACE, 1)
  if text:byte(i) ~= 123 then return nil end -- not an object: the transcoder answers
  -- pcall: absurdly deep nesting (Lua stack overflow), like any error here, leaves the
  -- body to the transcoder rather than failing the request.
  local ok, stop, bad = pcall(check_object, text, i, rule, "", nil)
  if not ok or not stop or not text:match("^[ \t\r\n]*$", stop) then return nil end
  return bad
end

-- RFC 3339 UTC with milliseconds, like the %START_TIME% of Envoy's local replies.
local function now_rfc3339(handle)
  local ok, ms = pcall(function() return handle:timestamp() end)
  if not ok or type(ms) ~= "number" then
    return os.date("!%Y-%m-%dT%H:%M:%SZ")
  end
  return os.date("!%Y-%m-%dT%H:%M:%S", math.floor(ms / 1000)) .. string.format(".%03dZ", ms % 1000)
end

local function envelope(code, message, status, request_id, timestamp, errors)
  local parts = {
    '{"success":false,"error":{"code":"', json_escape(code),
    '","message":"', json_escape(message),
    '","statusCode":', tostring(status),
    ',"requestId":"', json_escape(request_id or ""), '"',
  }
  if errors and #errors > 0 then
    local items = {}
    for i, e in ipairs(errors) do
      items[i] = '{"field":"' .. json_escape(e.field) .. '","message":"' .. json_escape(e.message)
        .. '","code":"' .. json_escape(e.code) .. '"}'
    end
    parts[#parts + 1] = ',"errors":[' .. table.concat(items, ",") .. "]"
  end
  parts[#parts + 1] = '},"timestamp":"' .. json_escape(timestamp) .. '"}'
  return table.concat(parts)
end

-- Turns the transcoder's request-parsing message into a readable message and, when it
-- names a field, one `errors` entry with a camelCase dot path.
local function explain_bad_request(raw)
  local proto_path, value, type_name = raw:match("^([%w_%.%[%]]+): invalid value (.-) for type (%S+)$")
  if proto_path then
    local field = json_path(proto_path)
    value = shorten(value, 100)
    local full_type = type_name:gsub("^type%.googleapis%.com/", "")
    local message, code
    if ENUM_VALUES[full_type] then
      message, code = "must be one of " .. ENUM_VALUES[full_type] .. "; got " .. value, "invalid_enum"
    elseif TYPE_MESSAGES[full_type] then
      message, code = TYPE_MESSAGES[full_type] .. "; got " .. value, "invalid_type"
    elseif full_type == "google.protobuf.Timestamp" then
      message, code = "must be an RFC 3339 timestamp such as 2024-01-31T12:00:00Z", "invalid_value"
    elseif full_type == "google.protobuf.ListValue" then
      message, code = "must be an array; got " .. value, "invalid_type"
    else
      message, code = "must be an object; got " .. value, "invalid_type"
    end
    return field .. ": " .. message, { { field = field, message = message, code = code } }
  end
  -- JSON syntax errors come as "<reason>\n<snippet of the body>\n<spaces>^".
  if raw:find("\n%s*%^$") then
    return "Malformed JSON: " .. raw:match("^[^\n]*"), nil
  end
  local param = raw:match('^Could not find field "([^"]*)" in the type')
  if param then
    local field = json_path(param)
    return 'Unknown query parameter "' .. shorten(param, 100) .. '"',
      { { field = field, message = "unknown query parameter", code = "unknown_field" } }
  end
  local bound = raw:match("^The binding value .- of the field (%S+) is conflicting")
  if bound then
    local field = json_path(bound)
    local message = "conflicts with the " .. field .. " in the URL path"
    return field .. ": " .. message, { { field = field, message = message, code = "conflict" } }
  end
  -- The parser names no path for these; only the leaf field name, if anything.
  local path_less = raw:match("^: (.*)$")
  if path_less then
    if path_less:find("Root element must be a message", 1, true) then
      return "The request body must be a JSON object", nil
    end
    local leaf = path_less:match("^invalid value Starting an object on a scalar field for type (%S+)$")
    if leaf then
      return 'Invalid request body: "' .. json_path(leaf) .. '" cannot be an object', nil
    end
    if path_less:find("Proto field is not repeating, cannot start list", 1, true) then
      return "Invalid request body: an array was given for a field that is not a list", nil
    end
    return "Invalid request body: " .. path_less, nil
  end
  local field_path, reason = raw:match("^([%w_%.%[%]]+): (.*)$")
  if field_path then
    local field = json_path(field_path)
    return field .. ": " .. reason, { { field = field, message = reason, code = "invalid" } }
  end
  return raw, nil
end

-- Replaces the whole response body; headers are fetched again because body() may have
-- yielded, after which the earlier header object must not be used.
local function set_body(handle, text, content_type)
  local body = handle:body(true)
  body:setBytes(text)
  local headers = handle:headers()
  if text == "" then
    headers:remove("content-length")
    headers:remove("content-type")
  else
    headers:replace("content-length", tostring(#text))
    headers:replace("content-type", content_type)
  end
  return headers
end

local function body_text(handle)
  local body = handle:body(true)
  return body:getBytes(0, body:length())
end

-- Once the body has been buffered the upstream gRPC trailers (grpc-status: 0) would be
-- passed on to HTTP/2 clients.
local function strip_trailers(handle)
  local trailers = handle:trailers()
  if trailers then
    for _, name in ipairs(INTERNAL_HEADERS) do
      trailers:remove(name)
    end
  end
end

-- Request headers become gRPC metadata upstream, where names are limited to [0-9a-z_.-]
-- and grpc-* names are the protocol's own; grpcio fails the whole call on anything else.
local function drop_non_metadata_headers(headers)
  local drop = {}
  for name, _ in pairs(headers) do
    if name:sub(1, 1) ~= ":" and (name:sub(1, 5) == "grpc-" or not name:match("^[0-9a-z_.%-]+$")) then
      drop[#drop + 1] = name
    end
  end
  for _, name in ipairs(drop) do
    headers:remove(name)
  end
end

function envoy_on_request(handle)
  local headers = handle:headers()
  local meta = handle:streamInfo():dynamicMetadata()
  if (headers:get("content-type") or ""):sub(1, 16) == "application/grpc" then
    return meta:set(NS, "grpc", true) -- native gRPC: status, body, trailers stay the server's
  end
  drop_non_metadata_headers(headers)
  local path = headers:get(":path") or ""
  local method = headers:get(":method") or ""
  meta:set(NS, "request_id", headers:get("x-request-id") or "")
  -- Envoy's transcoder cannot apply `response_body` to a non-HttpBody field (GET
  -- /segments answers a bare array), so that field is unwrapped in envoy_on_response.
  local bare_path = path:match("^[^?]*")
  for _, rule in ipairs(UNWRAP) do
    if rule.method == method and bare_path:match(rule.pattern) then
      meta:set(NS, "unwrap", rule.field)
      break
    end
  end
  for _, rule in ipairs(SHAPE_RULES) do
    if rule.method == method and bare_path:match(rule.pattern) then
      -- Waits for the whole body (the buffer filter after this one holds it anyway).
      local body = handle:body()
      if body then
        local bad = find_bad_shape(body:getBytes(0, body:length()), rule)
        if bad then
          -- Shaped into the envelope by envoy_on_response, like the transcoder's 400s.
          -- Fetched again: objects from before body() must not be used after it yielded.
          meta = handle:streamInfo():dynamicMetadata()
          meta:set(NS, "invalid_field", bad.field)
          meta:set(NS, "invalid_reason", bad.reason)
          meta:set(NS, "invalid_value", shorten(bad.got, 100))
          handle:respond({ [":status"] = "400" }, bad.field .. ": " .. bad.reason)
        end
      end
      break
    end
  end
end

function envoy_on_response(handle)
  local meta = handle:streamInfo():dynamicMetadata():get(NS) or {}
  if meta.grpc then return end
  local headers = handle:headers()
  local status = tonumber(headers:get(":status")) or 500
  local wanted = tonumber(headers:get("x-http-status") or "")
  local server_envelope = headers:get("x-error-envelope")
  local retry_after = headers:get("x-retry-after")
  for _, name in ipairs(INTERNAL_HEADERS) do
    headers:remove(name)
  end

  if status < 400 then
    if wanted == 204 then
      -- No body and no content-length/content-type: a leftover "{}" with
      -- content-length 2 would desynchronise keep-alive connections.
      headers:replace(":status", "204")
      set_body(handle, "", nil)
      strip_trailers(handle)
      return
    end
    if wanted and wanted >= 200 and wanted < 300 then
      headers:replace(":status", tostring(wanted))
    end
    if meta.unwrap then
      local text = body_text(handle)
      local prefix = '{"' .. meta.unwrap .. '":'
      if text:sub(1, #prefix) == prefix and text:sub(-1) == "}" then
        set_body(handle, text:sub(#prefix + 1, -2), "application/json")
      elseif text == "{}" then
        set_body(handle, "[]", "application/json")
      end
      strip_trailers(handle)
    end
    return
  end

  -- Errors: everything below needs the whole (small) body, and the trailers, which
  -- hold the server's metadata when it had sent initial metadata before aborting.
  local text = body_text(handle)
  local trailers = handle:trailers()
  if trailers and not server_envelope and trailers:get("x-error-envelope") then
    server_envelope = trailers:get("x-error-envelope")
    wanted = tonumber(trailers:get("x-http-status") or "")
    retry_after = trailers:get("x-retry-after")
  end
  strip_trailers(handle)
  headers = handle:headers()
  if wanted and wanted >= 400 then
    status = wanted
    headers:replace(":status", tostring(status))
  end
  -- Whole seconds from the server (its google.rpc.RetryInfo), else the contract's default
  -- for the status.
  retry_after = (retry_after or ""):match("^%d+$") or RETRY_AFTER[status]
  if retry_after then
    headers:replace("retry-after", retry_after)
  end

  if server_envelope then
    set_body(handle, server_envelope, "application/json")
    return
  end

  if text:sub(1, 10) == '{"error":{' then
    -- Envoy's own local reply, already an envelope (local_reply_config); 400s from
    -- the transcoder get a readable message and the offending field.
    if status == 400 then
      local message, errors
      if meta.invalid_field then
        -- A value of the wrong shape for its field (envoy_on_request).
        local reason = meta.invalid_reason .. "; got " .. meta.invalid_value
        message = meta.invalid_field .. ": " .. reason
        errors = { { field = meta.invalid_field, message = reason, code = "invalid_type" } }
      else
        message, errors = explain_bad_request(json_string_field(text, "message") or "")
      end
      local request_id = text:match('"requestId":"([^"]*)"') or meta.request_id
      local timestamp = text:match('"timestamp":"([^"]*)"') or now_rfc3339(handle)
      set_body(handle, envelope(GATEWAY_CODES[400], message, status, request_id, timestamp, errors),
        "application/json")
    end
    return
  end

  -- A gRPC error without an envelope (a server bug or an unexpected exception): the
  -- transcoder printed a google.rpc.Status; keep its message, use the generic code.
  local message = json_string_field(text, "message")
  if not message or message == "" then
    message = "HTTP " .. tostring(status)
  end
  set_body(handle, envelope(GATEWAY_CODES[status] or FALLBACK_CODE, message, status, meta.request_id,
    now_rfc3339(handle)), "application/json")
end
