//! The routes, the request-tracking middleware (counts, durations, a handler's panic as a 500) and the fallbacks.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request as HttpRequest, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::FutureExt as _;

use super::handlers::{
    health, index, metrics_text, models, native_generate, openai_generate, ready,
};
use super::{ApiError, App};

const ENDPOINTS: [&str; 9] = [
    "/v1/images/generations",
    "/v1/generate",
    "/v1/models",
    "/health",
    "/ready",
    "/v1/health/live",
    "/v1/health/ready",
    "/metrics",
    "/",
];

pub(super) fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/images/generations", post(openai_generate))
        .route("/v1/generate", post(native_generate))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/ready", get(ready))
        // The probe paths NVIDIA NIM and other serving platforms expect, beside fluxrt's own.
        .route("/v1/health/live", get(health))
        .route("/v1/health/ready", get(ready))
        .route("/metrics", get(metrics_text))
        .route("/", get(index))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(app.clone(), track))
        .with_state(app)
}

/// Counts every response by endpoint and status, and the duration; a request whose client went away
/// before the answer is counted with status 499 (the future is dropped, so the guard records it).
async fn track(State(app): State<Arc<App>>, req: HttpRequest, next: Next) -> Response {
    struct Guard {
        app: Arc<App>,
        endpoint: &'static str,
        start: Instant,
        status: Option<u16>,
    }
    impl Drop for Guard {
        fn drop(&mut self) {
            self.app.metrics.record_request(
                self.endpoint,
                self.status.unwrap_or(499),
                self.start.elapsed(),
            );
        }
    }
    let path = req.uri().path();
    let endpoint = ENDPOINTS
        .iter()
        .find(|e| **e == path)
        .copied()
        .unwrap_or("other");
    app.metrics.request_started();
    let mut guard = Guard {
        app,
        endpoint,
        start: Instant::now(),
        status: None,
    };
    // A panic in a handler becomes a 500 for this request; the server goes on.
    let resp = match AssertUnwindSafe(next.run(req)).catch_unwind().await {
        Ok(resp) => resp,
        Err(_) => {
            guard.app.log("a request handler panicked");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal server error",
            )
            .into_response()
        }
    };
    guard.status = Some(resp.status().as_u16());
    resp
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "no such endpoint; see GET / for the list",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "this endpoint does not take that method",
    )
}
