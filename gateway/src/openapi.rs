//! The OpenAPI 3.1 document of every route (`GET /openapi.json`) and a human-readable page
//! rendered from it (`GET /docs`), both unauthenticated.
//!
//! The document is built from one table, [`OPERATIONS`], written next to the role table
//! ([`crate::roles::ROUTE_ROLES`]): each `/v1` operation's required roles come from that table,
//! and the tests check that both tables list exactly the same routes and that every documented
//! route is served. The docs page is plain server-rendered HTML: no scripts, nothing loaded from
//! the internet.

use crate::roles::ROUTE_ROLES;
use axum::Router;
use axum::http::{HeaderValue, Method, header};
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use serde_json::{Map, Value, json};
use std::sync::{Arc, LazyLock};

/// Where a parameter goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum In {
    /// A `{name}` segment of the path.
    Path,
    /// The query string.
    Query,
    /// A request header.
    Header,
}

/// One documented parameter.
#[derive(Debug, Clone, Copy)]
pub struct Param {
    /// Its name as sent.
    pub name: &'static str,
    /// Where it is sent.
    pub at: In,
    /// What it means and its bounds.
    pub description: &'static str,
}

/// One documented operation (method + axum path pattern).
#[derive(Debug, Clone)]
pub struct Operation {
    /// The HTTP method.
    pub method: Method,
    /// The path as registered with axum, e.g. `/v1/conversations/{id}`.
    pub path: &'static str,
    /// A grouping tag.
    pub tag: &'static str,
    /// One line: what it does.
    pub summary: &'static str,
    /// Parameters (path, query, header).
    pub params: &'static [Param],
    /// The name of the request body schema in `components/schemas`, if it takes a JSON body.
    pub body: Option<&'static str>,
    /// The success status and the name of its schema in `components/schemas`.
    pub ok: (u16, &'static str),
    /// The error statuses it can answer with (all with the error envelope).
    pub errors: &'static [u16],
    /// False for the open routes (health, metrics, this document).
    pub authenticated: bool,
}

const fn p(name: &'static str, at: In, description: &'static str) -> Param {
    Param {
        name,
        at,
        description,
    }
}

const ID: Param = p(
    "id",
    In::Path,
    "the resource id (a UUID); another tenant's id is a 404",
);
const AFTER: Param = p(
    "after",
    In::Query,
    "a commit token returned by a command: wait (bounded) until the read model reflects it",
);
const NURA_AFTER: Param = p("Nura-After", In::Header, "the same as `after`, as a header");
const LIMIT: Param = p(
    "limit",
    In::Query,
    "page size; clamped to 1..=200 (default 50)",
);
const CURSOR: Param = p(
    "cursor",
    In::Query,
    "the `next_cursor` of the previous page",
);
const IDEMPOTENCY: Param = p(
    "Idempotency-Key",
    In::Header,
    "1-128 printable ASCII characters; a repeat returns the first result",
);
const IF_MATCH: Param = p(
    "If-Match",
    In::Header,
    "the stream version last seen (an ETag); a different version is a 409",
);

/// Statuses every authenticated route may answer besides its own.
const AUTH_ERRORS: &[u16] = &[401, 403, 429, 503];

/// Every route the app serves.
pub const OPERATIONS: &[Operation] = &[
    open(
        Method::GET,
        "/healthz",
        "Liveness: the process answers",
        "Health",
    ),
    open(
        Method::GET,
        "/readyz",
        "Readiness: Postgres and NATS are reachable",
        "Health",
    ),
    open(Method::GET, "/metrics", "Prometheus metrics", "Text"),
    open(Method::GET, "/openapi.json", "This document", "Object"),
    open(
        Method::GET,
        "/docs",
        "A human-readable page of this document",
        "Text",
    ),
    Operation {
        method: Method::POST,
        path: "/v1/conversations",
        tag: "conversations",
        summary: "Start a conversation",
        params: &[IDEMPOTENCY],
        body: Some("StartConversation"),
        ok: (201, "CommandResult"),
        errors: &[400, 413, 415, 422],
        authenticated: true,
    },
    Operation {
        method: Method::POST,
        path: "/v1/conversations/{id}/messages",
        tag: "conversations",
        summary: "Post a message to an active conversation",
        params: &[ID, IDEMPOTENCY, IF_MATCH],
        body: Some("PostMessage"),
        ok: (201, "CommandResult"),
        errors: &[400, 404, 409, 413, 415, 422],
        authenticated: true,
    },
    Operation {
        method: Method::POST,
        path: "/v1/conversations/{id}/archive",
        tag: "conversations",
        summary: "Archive a conversation (archiving twice is a no-op)",
        params: &[ID, IDEMPOTENCY, IF_MATCH],
        body: Some("Empty"),
        ok: (200, "CommandResult"),
        errors: &[400, 404, 409, 415],
        authenticated: true,
    },
    Operation {
        method: Method::GET,
        path: "/v1/conversations",
        tag: "conversations",
        summary: "List the tenant's conversations, newest first (keyset pages)",
        params: &[
            p("status", In::Query, "`active` or `archived`"),
            LIMIT,
            CURSOR,
            AFTER,
            NURA_AFTER,
        ],
        body: None,
        ok: (200, "ConversationPage"),
        errors: &[400, 504],
        authenticated: true,
    },
    Operation {
        method: Method::GET,
        path: "/v1/conversations/{id}",
        tag: "conversations",
        summary: "One conversation with its messages (at most 1000); ETag is its version",
        params: &[ID, AFTER, NURA_AFTER],
        body: None,
        ok: (200, "Conversation"),
        errors: &[400, 404, 504],
        authenticated: true,
    },
    Operation {
        method: Method::GET,
        path: "/v1/streams/{stream_id}/events",
        tag: "audit",
        summary: "The stored events of one of the tenant's streams (audit history)",
        params: &[
            p("stream_id", In::Path, "e.g. `conversation-<uuid>`"),
            p(
                "after_version",
                In::Query,
                "return events after this version",
            ),
            p("limit", In::Query, "clamped to 1..=1000 (default 100)"),
            AFTER,
            NURA_AFTER,
        ],
        body: None,
        ok: (200, "EventPage"),
        errors: &[400, 404],
        authenticated: true,
    },
    Operation {
        method: Method::GET,
        path: "/v1/dead-letters",
        tag: "operations",
        summary: "List the tenant's dead letters (events a projector could not apply)",
        params: &[
            p("status", In::Query, "`open` or `resolved`"),
            p("after", In::Query, "the `next_after` of the previous page"),
            p("limit", In::Query, "page size; clamped"),
        ],
        body: None,
        ok: (200, "Object"),
        errors: &[400],
        authenticated: true,
    },
    Operation {
        method: Method::POST,
        path: "/v1/dead-letters/{id}/retry",
        tag: "operations",
        summary: "Retry a dead letter and the events parked behind it",
        params: &[p("id", In::Path, "the dead letter's numeric id")],
        body: None,
        ok: (200, "Object"),
        errors: &[404, 409],
        authenticated: true,
    },
    Operation {
        method: Method::POST,
        path: "/v1/api-keys",
        tag: "api keys",
        summary: "Issue an API key; its secret is in this response only",
        params: &[IDEMPOTENCY],
        body: Some("IssueApiKey"),
        ok: (201, "IssuedApiKey"),
        errors: &[400, 413, 415, 422],
        authenticated: true,
    },
    Operation {
        method: Method::POST,
        path: "/v1/api-keys/{id}/revoke",
        tag: "api keys",
        summary: "Revoke an API key (effective once the api_keys projection applied it)",
        params: &[ID, IDEMPOTENCY],
        body: Some("Empty"),
        ok: (200, "KeyCommandResult"),
        errors: &[400, 404, 409, 415],
        authenticated: true,
    },
    Operation {
        method: Method::GET,
        path: "/v1/api-keys",
        tag: "api keys",
        summary: "List the tenant's API keys (never their secrets or hashes)",
        params: &[
            p("status", In::Query, "`active` or `revoked`"),
            LIMIT,
            CURSOR,
            AFTER,
            NURA_AFTER,
        ],
        body: None,
        ok: (200, "ApiKeyPage"),
        errors: &[400, 504],
        authenticated: true,
    },
    Operation {
        method: Method::GET,
        path: "/v1/api-keys/{id}",
        tag: "api keys",
        summary: "One API key, with its last use (refreshed at most once a minute)",
        params: &[ID, AFTER, NURA_AFTER],
        body: None,
        ok: (200, "ApiKey"),
        errors: &[400, 404, 504],
        authenticated: true,
    },
];

const fn open(
    method: Method,
    path: &'static str,
    summary: &'static str,
    ok: &'static str,
) -> Operation {
    Operation {
        method,
        path,
        tag: "service",
        summary,
        params: &[],
        body: None,
        ok: (200, ok),
        errors: &[],
        authenticated: false,
    }
}

/// The OpenAPI document, built once.
static DOCUMENT: LazyLock<Arc<Value>> = LazyLock::new(|| Arc::new(document()));
static DOCS_PAGE: LazyLock<Arc<String>> = LazyLock::new(|| Arc::new(docs_page(&DOCUMENT)));

/// `GET /openapi.json` and `GET /docs`, open to everyone (they describe, never reveal).
pub fn router() -> Router {
    Router::new()
        .route(
            "/openapi.json",
            get(|| async { axum::Json(Value::clone(&DOCUMENT)) }),
        )
        .route(
            "/docs",
            get(|| async {
                let csp = HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'");
                (
                    [(header::CONTENT_SECURITY_POLICY, csp)],
                    Html(String::clone(&DOCS_PAGE)),
                )
                    .into_response()
            }),
        )
}

/// The roles the role table requires for a route, or `None` when it is not listed.
fn required_roles(method: &Method, path: &str) -> Option<Vec<String>> {
    ROUTE_ROLES
        .iter()
        .find(|r| r.method == *method && r.path == path)
        .map(|r| {
            r.roles
                .iter()
                .map(|role| {
                    serde_json::to_value(role)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default()
                })
                .collect()
        })
}

fn status_text(code: u16) -> &'static str {
    match code {
        200 => "OK",
        201 => "Created",
        400 => "Malformed request, invalid parameter or unknown body field",
        401 => "Missing, invalid or expired credential",
        403 => "The credential lacks the required role",
        404 => "Not found (also another tenant's resource)",
        409 => "Version or state conflict",
        413 => "Body too large",
        415 => "Content-Type is not application/json",
        422 => "A business rule refused the command",
        429 => "Rate limited; see Retry-After",
        503 => "A dependency is unavailable; retry",
        504 => "Timed out (or the read model has not caught up); retry",
        _ => "",
    }
}

/// Builds the OpenAPI 3.1 document from [`OPERATIONS`] and the role table.
pub fn document() -> Value {
    let mut paths = Map::new();
    for op in OPERATIONS {
        let mut parameters = Vec::new();
        for prm in op.params {
            let location = match prm.at {
                In::Path => "path",
                In::Query => "query",
                In::Header => "header",
            };
            parameters.push(json!({
                "name": prm.name,
                "in": location,
                "required": prm.at == In::Path,
                "description": prm.description,
                "schema": {"type": "string"},
            }));
        }
        let mut responses = Map::new();
        let (ok, ok_schema) = op.ok;
        let ok_content = match ok_schema {
            "Text" => json!({"text/plain": {"schema": {"type": "string"}}}),
            _ => {
                json!({"application/json": {"schema": {"$ref": format!("#/components/schemas/{ok_schema}")}}})
            }
        };
        responses.insert(
            ok.to_string(),
            json!({"description": status_text(ok), "content": ok_content}),
        );
        let extra: &[u16] = if op.authenticated { AUTH_ERRORS } else { &[] };
        for code in op.errors.iter().chain(extra) {
            responses.insert(
                code.to_string(),
                json!({"$ref": format!("#/components/responses/E{code}")}),
            );
        }
        let mut operation = json!({
            "tags": [op.tag],
            "summary": op.summary,
            "operationId": operation_id(&op.method, op.path),
            "parameters": parameters,
            "responses": responses,
        });
        if let Some(body) = op.body {
            operation["requestBody"] = json!({
                "required": body != "Empty",
                "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{body}")}}},
            });
        }
        if op.authenticated {
            let roles = required_roles(&op.method, op.path).unwrap_or_default();
            operation["security"] = json!([{"bearer": []}, {"apiKey": []}]);
            operation["x-required-roles"] = json!(roles);
            let text = format!(
                "{} Requires one of the roles: {} (admin holds every role).",
                op.summary,
                roles.join(", ")
            );
            operation["description"] = json!(text);
        } else {
            operation["security"] = json!([]);
        }
        let entry = paths.entry(op.path.to_owned()).or_insert_with(|| json!({}));
        entry[op.method.as_str().to_ascii_lowercase()] = operation;
    }
    let mut error_responses = Map::new();
    for code in [400, 401, 403, 404, 409, 413, 415, 422, 429, 503, 504] {
        let mut r = json!({
            "description": status_text(code),
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        });
        if code == 429 || code == 503 {
            r["headers"] = json!({"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}});
        }
        error_responses.insert(format!("E{code}"), r);
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Nura API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Event-sourced CQRS backend. Commands append events; reads come from \
                read models (pass a command's `commit` as `after` to read your own writes). Every \
                error is the envelope {\"error\": {code, message, details, request_id}}.",
        },
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                    "description": "A JWT with iss, aud and exp; or an API key `nura_…` as the bearer token."},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-Api-Key",
                    "description": "An API key `nura_<key id>_<secret>` issued by POST /v1/api-keys."},
            },
            "responses": error_responses,
            "schemas": schemas(),
        },
    })
}

fn operation_id(method: &Method, path: &str) -> String {
    let mut id = method.as_str().to_ascii_lowercase();
    for part in path.split('/').filter(|s| !s.is_empty()) {
        id.push('_');
        id.extend(
            part.chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }),
        );
    }
    id.replace("__", "_").trim_end_matches('_').to_owned()
}

fn schemas() -> Value {
    let token = json!({"type": "string", "description": "commit token `<tx>.<pos>.<partition>`"});
    let time = json!({"type": "string", "format": "date-time"});
    let uuid = json!({"type": "string", "format": "uuid"});
    let roles = json!({"type": "array", "items": {"type": "string", "enum": ["member", "viewer", "service"]}});
    json!({
        "Error": {
            "type": "object", "required": ["error"],
            "properties": {"error": {
                "type": "object", "required": ["code", "message", "request_id"],
                "properties": {
                    "code": {"type": "string"}, "message": {"type": "string"},
                    "details": {}, "request_id": {"type": "string"},
                }}},
        },
        "Object": {"type": "object"},
        "Health": {"type": "object", "properties": {
            "status": {"type": "string"}, "postgres": {"type": "boolean"}, "nats": {"type": "boolean"}}},
        "Empty": {"type": "object", "additionalProperties": false,
            "description": "no body, or `{}`"},
        "StartConversation": {"type": "object", "additionalProperties": false, "required": ["title"],
            "properties": {"title": {"type": "string", "maxLength": 200}}},
        "PostMessage": {"type": "object", "additionalProperties": false, "required": ["text"],
            "properties": {"text": {"type": "string", "maxLength": 32000}}},
        "CommandResult": {"type": "object", "properties": {
            "conversation_id": uuid, "message_id": uuid, "commit": token, "version": {"type": "integer"}}},
        "Message": {"type": "object", "properties": {
            "message_id": uuid, "author": {"type": "string"}, "text": {"type": "string"},
            "posted_at": time, "stream_version": {"type": "integer"}}},
        "Conversation": {"type": "object", "properties": {
            "conversation_id": uuid, "stream_id": {"type": "string"}, "title": {"type": "string"},
            "status": {"type": "string", "enum": ["active", "archived"]},
            "message_count": {"type": "integer"}, "last_message_at": time, "created_by": {"type": "string"},
            "created_at": time, "updated_at": time, "archived_at": time, "version": {"type": "integer"},
            "messages": {"type": "array", "items": {"$ref": "#/components/schemas/Message"}},
            "messages_truncated": {"type": "boolean"}}},
        "ConversationPage": {"type": "object", "properties": {
            "items": {"type": "array", "items": {"$ref": "#/components/schemas/Conversation"}},
            "next_cursor": {"type": ["string", "null"]}}},
        "EventPage": {"type": "object", "properties": {
            "stream_id": {"type": "string"}, "events": {"type": "array", "items": {"type": "object"}},
            "next_after_version": {"type": ["integer", "null"]}}},
        "IssueApiKey": {"type": "object", "additionalProperties": false, "required": ["name", "roles"],
            "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 100}, "roles": roles}},
        "IssuedApiKey": {"type": "object", "properties": {
            "key_id": uuid,
            "api_key": {"type": ["string", "null"], "description":
                "`nura_<key id>_<secret>`: shown only here; null on an idempotent repeat"},
            "name": {"type": "string"}, "roles": roles, "commit": token, "version": {"type": "integer"},
            "note": {"type": "string"}}},
        "KeyCommandResult": {"type": "object", "properties": {
            "key_id": uuid, "commit": token, "version": {"type": "integer"}}},
        "ApiKey": {"type": "object", "properties": {
            "key_id": uuid, "name": {"type": "string"}, "roles": roles,
            "status": {"type": "string", "enum": ["active", "revoked"]},
            "issued_by": {"type": "string"}, "issued_at": time, "revoked_by": {"type": ["string", "null"]},
            "revoked_at": time, "last_used_at": time, "version": {"type": "integer"}}},
        "ApiKeyPage": {"type": "object", "properties": {
            "items": {"type": "array", "items": {"$ref": "#/components/schemas/ApiKey"}},
            "next_cursor": {"type": ["string", "null"]}}},
    })
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The `/docs` page: every operation of `doc` as HTML, rendered once on the server.
fn docs_page(doc: &Value) -> String {
    let mut html = String::from(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Nura API</title>\
         <style>body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}\
         code,pre{background:#f4f4f4;padding:.1em .3em}pre{overflow:auto;padding:.5em}\
         .op{border-top:1px solid #ccc;padding:.5em 0}.m{font-weight:bold;width:4em;display:inline-block}\
         </style></head><body><h1>Nura API</h1>\
         <p>The machine-readable document is <a href=\"/openapi.json\">/openapi.json</a>. \
         Authenticate with <code>Authorization: Bearer &lt;JWT or API key&gt;</code> or \
         <code>X-Api-Key: nura_…</code>. Errors are <code>{\"error\": {code, message, details, request_id}}</code>.</p>",
    );
    let empty = Map::new();
    let paths = doc["paths"].as_object().unwrap_or(&empty);
    for (path, item) in paths {
        for (method, op) in item.as_object().unwrap_or(&empty) {
            html.push_str(&format!(
                "<div class=\"op\"><span class=\"m\">{}</span><code>{}</code> — {}",
                escape(&method.to_uppercase()),
                escape(path),
                escape(op["summary"].as_str().unwrap_or_default())
            ));
            match op["x-required-roles"].as_array() {
                Some(roles) => {
                    let roles: Vec<&str> = roles.iter().filter_map(Value::as_str).collect();
                    html.push_str(&format!(
                        "<br>Roles: {} (or admin)",
                        escape(&roles.join(", "))
                    ));
                }
                None => html.push_str("<br>No authentication."),
            }
            if let Some(params) = op["parameters"].as_array().filter(|p| !p.is_empty()) {
                html.push_str("<ul>");
                for prm in params {
                    html.push_str(&format!(
                        "<li><code>{}</code> ({}) {}</li>",
                        escape(prm["name"].as_str().unwrap_or_default()),
                        escape(prm["in"].as_str().unwrap_or_default()),
                        escape(prm["description"].as_str().unwrap_or_default())
                    ));
                }
                html.push_str("</ul>");
            }
            if let Some(r) =
                op["requestBody"]["content"]["application/json"]["schema"]["$ref"].as_str()
            {
                let name = r.rsplit('/').next().unwrap_or_default();
                let schema = serde_json::to_string_pretty(&doc["components"]["schemas"][name])
                    .unwrap_or_default();
                html.push_str(&format!(
                    "Body <code>{}</code>:<pre>{}</pre>",
                    escape(name),
                    escape(&schema)
                ));
            }
            let codes: Vec<&str> = op["responses"]
                .as_object()
                .map(|r| r.keys().map(String::as_str).collect())
                .unwrap_or_default();
            html.push_str(&format!("Responses: {}</div>", escape(&codes.join(", "))));
        }
    }
    html.push_str("</body></html>");
    html
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn the_documented_v1_routes_are_exactly_the_role_tables_routes() {
        let documented: BTreeSet<(String, &str)> = OPERATIONS
            .iter()
            .filter(|o| o.authenticated)
            .map(|o| (o.method.to_string(), o.path))
            .collect();
        let table: BTreeSet<(String, &str)> = ROUTE_ROLES
            .iter()
            .map(|r| (r.method.to_string(), r.path))
            .collect();
        assert_eq!(documented, table);
    }

    #[test]
    fn every_path_parameter_is_documented_and_every_operation_id_is_unique() {
        let mut ids = BTreeSet::new();
        for op in OPERATIONS {
            for segment in op.path.split('/') {
                if let Some(name) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                    assert!(
                        op.params.iter().any(|p| p.at == In::Path && p.name == name),
                        "{} {} lacks path parameter {name}",
                        op.method,
                        op.path
                    );
                }
            }
            assert!(ids.insert(operation_id(&op.method, op.path)));
        }
    }

    #[test]
    fn every_schema_reference_resolves() {
        let doc = document();
        let text = doc.to_string();
        for part in text.split("\"$ref\":\"#/components/").skip(1) {
            let target = part.split('"').next().unwrap_or_default();
            let (kind, name) = target.split_once('/').unwrap();
            assert!(
                doc["components"][kind].get(name).is_some(),
                "unresolved reference {target}"
            );
        }
    }

    #[test]
    fn the_docs_page_escapes_and_loads_nothing_from_elsewhere() {
        let page = docs_page(&document());
        assert!(page.contains("/v1/api-keys/{id}/revoke"));
        assert!(!page.contains("<script"));
        assert!(!page.contains("http://") && !page.contains("https://"));
    }
}
