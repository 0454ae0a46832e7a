-- Shapes REST responses after gRPC-JSON transcoding into the SPEC.md section 3 contract.
--
-- It sits before the transcoder in the filter chain, so on the way back it sees the
-- already transcoded response (and Envoy's own local replies). envoy_proxy.py prepends,
-- from the descriptor set, ENUM_VALUES (enum full name -> accepted JSON spellings) and
-- UNWRAP (HTTP rules with a `response_body`: method, Lua path pattern, JSON field).
--
-- Contract with the gRPC server (metadata keys, all ASCII values):
--   x-http-status: 201 | 204   a success status other than 200: initial metadata sent
--                              just before returning
--   x-http-status: <4xx/5xx>   with x-error-envelope: <JSON of the whole SPEC envelope>
--                              on errors: trailing metadata of the abort (arrives here as
--                              headers of a trailers-only response, or as trailers when
--                              initial metadata went first), or initial metadata sent
--                              before aborting. Errors without it get a generic envelope.

-- Dynamic metadata namespace carrying per-request facts from the request to the response.
local NS = "segments.rest"

-- Never shown to HTTP clients: the server's side channel and gRPC transport details.
local INTERNAL_HEADERS = {
  "x-http-status", "x-error-envelope", "grpc-status", "grpc-message",
  "grpc-status-details-bin", "grpc-accept-encoding", "grpc-encoding",
}

-- Public error codes for statuses whose response carries no envelope of its own.
local CODES = {
  [400] = "VALIDATION_ERROR", [401] = "UNAUTHENTICATED", [403] = "FORBIDDEN",
  [404] = "NOT_FOUND", [409] = "CONFLICT", [413] = "PAYLOAD_TOO_LARGE",
  [429] = "RATE_LIMITED", [503] = "SERVICE_UNAVAILABLE",
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

-- Value of the first top-level-looking "key":"..." string in a JSON text, unescaped.
-- Only used on bodies Envoy itself printed (local replies, google.rpc.Status), whose
-- first occurrence of such a key is the one wanted.
local function json_string_field(text, key)
  local _, start = text:find('"' .. key .. '":"', 1, true)
  if not start then return nil end
  local out, i = {}, start + 1
  while i <= #text do
    local c = text:sub(i, i)
    if c == '"' then return table.concat(out) end
    if c == "\\" then
      local e = text:sub(i + 1, i + 1)
      if e == "u" then
        local cp = tonumber(text:sub(i + 2, i + 5), 16) or 0xFFFD
        i = i + 6
        if cp >= 0xD800 and cp < 0xDC00 and text:sub(i, i + 1) == "\\u" then
          local lo = tonumber(text:sub(i + 2, i + 5), 16) or 0
          cp = 0x10000 + (cp - 0xD800) * 0x400 + (lo - 0xDC00)
          i = i + 6
        end
        out[#out + 1] = utf8_char(cp)
      else
        local map = { n = "\n", t = "\t", r = "\r", b = "\b", f = "\f" }
        out[#out + 1] = map[e] or e
        i = i + 2
      end
    else
      out[#out + 1] = c
      i = i + 1
    end
  end
  return nil
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

function envoy_on_request(handle)
  local headers = handle:headers()
  local meta = handle:streamInfo():dynamicMetadata()
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
end

function envoy_on_response(handle)
  local headers = handle:headers()
  local status = tonumber(headers:get(":status")) or 500
  local wanted = tonumber(headers:get("x-http-status") or "")
  local server_envelope = headers:get("x-error-envelope")
  for _, name in ipairs(INTERNAL_HEADERS) do
    headers:remove(name)
  end
  local meta = handle:streamInfo():dynamicMetadata():get(NS) or {}

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
  if trailers then
    if not server_envelope and trailers:get("x-error-envelope") then
      server_envelope = trailers:get("x-error-envelope")
      wanted = tonumber(trailers:get("x-http-status") or "")
    end
    for _, name in ipairs(INTERNAL_HEADERS) do
      trailers:remove(name)
    end
  end
  headers = handle:headers()
  if wanted and wanted >= 400 then
    status = wanted
    headers:replace(":status", tostring(status))
  end
  if status == 503 then
    headers:replace("retry-after", "1")
  end

  if server_envelope then
    set_body(handle, server_envelope, "application/json")
    return
  end

  if text:sub(1, 10) == '{"error":{' then
    -- Envoy's own local reply, already an envelope (local_reply_config); 400s from
    -- the transcoder get a readable message and the offending field.
    if status == 400 then
      local raw = json_string_field(text, "message") or ""
      local message, errors = explain_bad_request(raw)
      local request_id = text:match('"requestId":"([^"]*)"') or meta.request_id
      local timestamp = text:match('"timestamp":"([^"]*)"') or now_rfc3339(handle)
      set_body(handle, envelope("VALIDATION_ERROR", message, status, request_id, timestamp, errors),
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
  set_body(handle, envelope(CODES[status] or "INTERNAL_ERROR", message, status, meta.request_id,
    now_rfc3339(handle)), "application/json")
end
