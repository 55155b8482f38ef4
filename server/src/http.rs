//! The monitoring HTTP endpoint (`[monitor] listen`): `/metrics` for
//! Prometheus, `/healthz` for load balancers and uptime checks, and the
//! read-only status page at `/` (`status_html`). Plain
//! HTTP on its own address, apart from the QUIC port clients use; it
//! shows set names and sizes, so bind it to a private interface.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::state::ServerState;

pub async fn serve(listener: tokio::net::TcpListener, state: Arc<ServerState>) -> std::io::Result<()> {
    let app = Router::new()
        .route("/", get(page))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(state);
    axum::serve(listener, app).await
}

async fn metrics(State(state): State<Arc<ServerState>>) -> Response {
    let body = tokio::task::spawn_blocking(move || {
        let st = crate::monitor::status(&state.monitor_inputs(&state.config()), crate::clock::now_ns())?;
        let firing = state.monitor().firing.load(std::sync::atomic::Ordering::Relaxed);
        Ok::<_, crate::store::StoreError>(crate::metrics::render(
            &st,
            &state.monitor().counters,
            firing,
            state.audit().dropped(),
        ))
    })
    .await;
    match body {
        Ok(Ok(text)) => ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response(),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, format!("store unreadable: {e}\n")).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

async fn page(State(state): State<Arc<ServerState>>) -> Response {
    match tokio::task::spawn_blocking(move || crate::status::collect(&state.monitor_inputs(&state.config()))).await {
        Ok(Ok(s)) => {
            ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], crate::status_html::render(&s)).into_response()
        }
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, format!("store unreadable: {e}\n")).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

/// 200 when the store answers a read, else 503.
async fn healthz(State(state): State<Arc<ServerState>>) -> Response {
    let ok = tokio::task::spawn_blocking(move || state.store().schema_version().map(|v| v.is_some())).await;
    match ok {
        Ok(Ok(true)) => (StatusCode::OK, "ok\n").into_response(),
        Ok(Ok(false)) => (StatusCode::SERVICE_UNAVAILABLE, "store has no schema record\n").into_response(),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}\n")).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}
