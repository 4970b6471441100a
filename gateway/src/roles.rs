//! Which roles may call which endpoint: one table, enforced by the authentication middleware for
//! every `/v1` route. A route missing from the table is refused for everybody (403), so a new
//! endpoint cannot ship unchecked; handlers keep their own checks as defence in depth.

use axum::http::Method;
use nura_http::Role;

/// One row of the table: a route (method and axum path pattern) and the roles that may call it
/// (admin holds every role).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteRole {
    /// The HTTP method (`HEAD` is checked as `GET`).
    pub method: Method,
    /// The route pattern as registered with axum, e.g. `/v1/conversations/{id}`.
    pub path: &'static str,
    /// Any one of these roles grants access.
    pub roles: &'static [Role],
}

/// Every role: reads.
const READERS: &[Role] = &[Role::Viewer, Role::Member, Role::Service];
/// Commands.
const WRITERS: &[Role] = &[Role::Member, Role::Service];
/// Operations.
const ADMINS: &[Role] = &[Role::Admin];

const fn rule(method: Method, path: &'static str, roles: &'static [Role]) -> RouteRole {
    RouteRole {
        method,
        path,
        roles,
    }
}

/// The table of every `/v1` route Nura serves and the roles it needs.
pub const ROUTE_ROLES: &[RouteRole] = &[
    rule(Method::POST, "/v1/conversations", WRITERS),
    rule(Method::POST, "/v1/conversations/{id}/messages", WRITERS),
    rule(Method::POST, "/v1/conversations/{id}/archive", WRITERS),
    rule(Method::GET, "/v1/conversations", READERS),
    rule(Method::GET, "/v1/conversations/{id}", READERS),
    rule(Method::GET, "/v1/streams/{stream_id}/events", READERS),
    rule(Method::GET, "/v1/dead-letters", ADMINS),
    rule(Method::POST, "/v1/dead-letters/{id}/retry", ADMINS),
    rule(Method::POST, "/v1/api-keys", ADMINS),
    rule(Method::POST, "/v1/api-keys/{id}/revoke", ADMINS),
    rule(Method::GET, "/v1/api-keys", ADMINS),
    rule(Method::GET, "/v1/api-keys/{id}", ADMINS),
];

/// What the table says about one request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Access {
    /// The route is listed; any of these roles may call it.
    Roles(&'static [Role]),
    /// The path is listed, but not with this method.
    MethodNotListed,
    /// The path is not in the table at all.
    NotListed,
}

/// Looks `method` + matched `path` up in `table`.
pub(crate) fn access(table: &[RouteRole], method: &Method, path: &str) -> Access {
    let method = if method == Method::HEAD {
        &Method::GET
    } else {
        method
    };
    let mut path_known = false;
    for r in table.iter().filter(|r| r.path == path) {
        path_known = true;
        if r.method == *method {
            return Access::Roles(r.roles);
        }
    }
    if path_known {
        Access::MethodNotListed
    } else {
        Access::NotListed
    }
}
