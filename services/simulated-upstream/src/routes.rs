//! The HTTP surface: the axum router, its layers and its handlers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::map_response;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use futures::stream;
use tokio::sync::watch;

use crate::error::{ApiError, Result};
use crate::faults::{Fault, HeaderFault, broken_body};
use crate::reply::{build_reply, completion, completion_id};
use crate::stream::{break_point, chunks, encode, events};
use crate::wire::{ChatRequest, ModelCard, ModelList};

/// Largest accepted request body.
pub(crate) const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// Response header set on every response.
pub const SIMULATED_HEADER: &str = "x-crewmesh-simulated";
/// Models listed by `GET /v1/models` (any name is accepted for completions).
pub const LISTED_MODELS: [&str; 2] = ["sim-small", "sim-large"];

/// Resolves once the server starts draining; never, if it has no way to be told.
#[derive(Debug, Clone)]
pub(crate) struct ShutdownSignal(watch::Receiver<bool>);

impl ShutdownSignal {
    pub(crate) fn new(receiver: watch::Receiver<bool>) -> Self {
        Self(receiver)
    }

    async fn wait(&self) {
        let mut receiver = self.0.clone();
        if receiver.wait_for(|draining| *draining).await.is_err() {
            // The sender is gone without ever signalling: no shutdown will come.
            std::future::pending::<()>().await;
        }
    }
}

/// Shared by all handlers.
#[derive(Debug, Clone)]
pub(crate) struct AppState {
    pub(crate) requests: Arc<AtomicU64>,
    pub(crate) shutdown: ShutdownSignal,
}

/// The router with its layers; the last layer added is the outermost.
pub(crate) fn app(state: AppState) -> Router {
    Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/models/{model}", get(get_model))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/healthz", get(healthz))
        .fallback(not_found)
        .with_state(state)
        // Caps request bodies at 4 MiB; the chat handler turns the rejection into an
        // OpenAI-style 413.
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        // Outermost, so that every response (errors, 404s and 405s included) says it
        // comes from a simulation.
        .layer(map_response(mark_simulated))
}

async fn mark_simulated(mut response: Response) -> Response {
    response.headers_mut().insert(
        HeaderName::from_static(SIMULATED_HEADER),
        HeaderValue::from_static("true"),
    );
    response
}

async fn list_models() -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: LISTED_MODELS
            .into_iter()
            .map(ModelCard::simulated)
            .collect(),
    })
}

async fn get_model(Path(model): Path<String>) -> Json<ModelCard> {
    Json(ModelCard::simulated(model))
}

async fn healthz() -> &'static str {
    "ok (simulated upstream)\n"
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::NotFound {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
}

async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    state.requests.fetch_add(1, Ordering::Relaxed);
    serve_chat(&state, &headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn serve_chat(
    state: &AppState,
    headers: &HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Response> {
    let header_fault = HeaderFault::from_headers(headers)?;
    // A header-selected error answers before the body is even looked at.
    if let HeaderFault::Fault(fault) = header_fault
        && let Some(err) = fault.error()
    {
        return Err(err);
    }
    let body = body.map_err(|rejection| ApiError::from_body_rejection(&rejection))?;
    let req = ChatRequest::parse(&body)?;
    let fault = header_fault.resolve(&req.model);
    tracing::debug!(
        model = %req.model,
        stream = req.stream,
        n = req.n,
        tools = req.tools.len(),
        fault = ?fault,
        "simulated chat completion"
    );

    match fault {
        Some(Fault::Hang) => {
            state.shutdown.wait().await;
            return Err(ApiError::ShuttingDown);
        }
        Some(Fault::Slow(delay)) => {
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = state.shutdown.wait() => return Err(ApiError::ShuttingDown),
            }
        }
        Some(fault) => {
            if let Some(err) = fault.error() {
                return Err(err);
            }
        }
        None => {}
    }
    let break_stream = fault == Some(Fault::StreamBreak);

    let id = completion_id(&body);
    let reply = build_reply(&req);
    if req.stream {
        let chunks = chunks(&id, &req, &reply);
        let body = if break_stream {
            let frames = chunks[..break_point(&chunks)]
                .iter()
                .map(encode)
                .collect::<std::result::Result<Vec<_>, _>>()?;
            broken_body(frames)
        } else {
            let events = events(&chunks)?;
            Body::from_stream(stream::iter(
                events.into_iter().map(Ok::<_, std::convert::Infallible>),
            ))
        };
        Ok((
            StatusCode::OK,
            [
                (CONTENT_TYPE, HeaderValue::from_static("text/event-stream")),
                (CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            ],
            body,
        )
            .into_response())
    } else {
        let json = Bytes::from(serde_json::to_vec(&completion(id, &req, &reply))?);
        let body = if break_stream {
            // Not streamed: the connection drops halfway through the JSON body.
            broken_body(vec![json.slice(..json.len() / 2)])
        } else {
            Body::from(json)
        };
        Ok((
            StatusCode::OK,
            [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
            body,
        )
            .into_response())
    }
}
