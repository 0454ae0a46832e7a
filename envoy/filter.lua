-- Shapes REST responses after gRPC-JSON transcoding into the error envelope and statuses
-- of docs/errors.md: what Envoy's own configuration cannot say.
--
-- It sits first in the filter chain, so on the way back it sees the transcoded response
-- and every local reply. Request bodies and query strings are checked before the
-- transcoder by the service itself (ext_authz, segments_service/rest_check.py), and Envoy's
-- own replies are enveloped by its local_reply_config; neither needs this filter but to
-- pass them on. `make generate` writes it into envoy/envoy.json after the tables it reads
-- (envoy_tables.py): from the error contract (errors.py) GATEWAY_CODES (HTTP status ->
-- public code of an error without the service's envelope), FALLBACK_CODE and RETRY_AFTER
-- (HTTP status -> default Retry-After seconds); OPENAPI_PATH, where Envoy serves the OpenAPI
-- document, and OPENAPI_SERVER, the JSON string of its `servers` URL as generated, which is
-- replaced by the URL the caller fetched it from; from the descriptor set UNWRAP (HTTP
-- rules with a `response_body`: method, Lua path pattern, JSON field). Native gRPC callers
-- are left alone.
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
--   x-envelope-body: 1         on a reply whose body already is the envelope: Envoy's
--                              local replies and the service's ext_authz denials

-- Dynamic metadata namespace carrying per-request facts from the request to the response.
local NS = "segments.rest"

-- Never shown to HTTP clients: the server's side channel and gRPC transport details.
local INTERNAL_HEADERS = {
  "x-http-status", "x-error-envelope", "x-retry-after", "x-envelope-body", "grpc-status",
  "grpc-message", "grpc-status-details-bin", "grpc-accept-encoding", "grpc-encoding",
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

-- RFC 3339 UTC with milliseconds, like the %START_TIME% of Envoy's local replies.
local function now_rfc3339(handle)
  local ok, ms = pcall(function() return handle:timestamp() end)
  if not ok or type(ms) ~= "number" then
    return os.date("!%Y-%m-%dT%H:%M:%SZ")
  end
  return os.date("!%Y-%m-%dT%H:%M:%S", math.floor(ms / 1000)) .. string.format(".%03dZ", ms % 1000)
end

-- The envelope of an error the service did not explain: no `errors`, the generic code.
local function envelope(code, message, status, request_id, timestamp)
  return table.concat({
    '{"success":false,"error":{"code":"', json_escape(code),
    '","message":"', json_escape(message),
    '","statusCode":', tostring(status),
    ',"requestId":"', json_escape(request_id or ""),
    '"},"timestamp":"', json_escape(timestamp), '"}',
  })
end

-- A grpc-message value: percent-encoded (gRPC's rule for what is not printable ASCII).
local function grpc_message(value)
  if not value or value == "" then return nil end
  return (value:gsub("%%(%x%x)", function(hex) return string.char(tonumber(hex, 16)) end))
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

-- The URL the caller reached this listener at, from the request's Host (:authority) and
-- x-forwarded-proto (https when it says so, else http); nil when the Host is not a plain
-- host[:port], which then is not repeated to the caller.
local function served_from(headers)
  local host = headers:get(":authority") or ""
  if not host:match("^[%w%.%-_:%[%]]+$") then return nil end
  local proto = (headers:get("x-forwarded-proto") or ""):match("^%s*([^,%s]+)") or ""
  return (proto:lower() == "https" and "https" or "http") .. "://" .. host
end

-- The OpenAPI document with `servers` naming `url`: the generated URL is replaced where it
-- first follows the "servers" key (the document is generated, so it is there once).
local function with_server(text, url)
  local at = text:find('"servers"', 1, true)
  local from, to = nil, nil
  if at then from, to = text:find(OPENAPI_SERVER, at, true) end
  if not from then return nil end
  return text:sub(1, from - 1) .. '"' .. json_escape(url) .. '"' .. text:sub(to + 1)
end

function envoy_on_request(handle)
  local headers = handle:headers()
  local meta = handle:streamInfo():dynamicMetadata()
  if (headers:get("content-type") or ""):sub(1, 16) == "application/grpc" then
    return meta:set(NS, "grpc", true) -- native gRPC: status, body, trailers stay the server's
  end
  drop_non_metadata_headers(headers)
  local method = headers:get(":method") or ""
  meta:set(NS, "request_id", headers:get("x-request-id") or "")
  local bare_path = (headers:get(":path") or ""):match("^[^?]*")
  if method == "GET" and bare_path == OPENAPI_PATH then
    local url = served_from(headers)
    if url then meta:set(NS, "openapi_server", url) end
    return
  end
  -- Envoy's transcoder cannot apply `response_body` to a non-HttpBody field (GET
  -- /segments answers a bare array), so that field is unwrapped in envoy_on_response.
  for _, rule in ipairs(UNWRAP) do
    if rule.method == method and bare_path:match(rule.pattern) then
      meta:set(NS, "unwrap", rule.field)
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
  local enveloped = headers:get("x-envelope-body")
  local message = grpc_message(headers:get("grpc-message"))
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
    if meta.openapi_server and status == 200 then
      local text = with_server(body_text(handle), meta.openapi_server)
      if text then set_body(handle, text, "application/json") end
      return
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
  if enveloped then return end -- Retry-After, if any, came with it

  -- Errors from the server: the whole (small) body is awaited for the trailers, which
  -- hold its metadata when it had sent initial metadata before aborting.
  handle:body(true)
  local trailers = handle:trailers()
  if trailers and not server_envelope and trailers:get("x-error-envelope") then
    server_envelope = trailers:get("x-error-envelope")
    wanted = tonumber(trailers:get("x-http-status") or "")
    retry_after = trailers:get("x-retry-after")
  end
  if trailers then
    message = message or grpc_message(trailers:get("grpc-message"))
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
  -- A gRPC error without an envelope (a server bug, an unexpected exception, a status
  -- from grpcio itself): its message, the contract's generic code for the status.
  set_body(handle, envelope(GATEWAY_CODES[status] or FALLBACK_CODE, message or ("HTTP " .. status),
    status, meta.request_id, now_rfc3339(handle)), "application/json")
end
