//! The HTTP surface: the axum router, its layers and its handlers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

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
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::error::{ApiError, Result};
use crate::fault_settings::{Action, Draw, FaultSettings, FaultTable};
use crate::faults::{Fault, HeaderFault, broken_body};
use crate::reply::{build_reply, completion, completion_id};
use crate::stream::{FRAGMENTS_BEFORE_BREAK, break_point, chunks, encode, events};
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
    /// Fault settings made at run time through `/_sim/faults`.
    pub(crate) faults: Arc<FaultTable>,
}

/// The router with its layers; the last layer added is the outermost.
pub(crate) fn app(state: AppState) -> Router {
    Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/models/{model}", get(get_model))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/healthz", get(healthz))
        .route("/_sim/faults", get(list_faults).delete(delete_all_faults))
        .route(
            "/_sim/faults/{*model}",
            get(get_faults).put(put_faults).delete(delete_faults),
        )
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

/// What a request acts out: a delay, then an answer, no answer, an error or a broken body.
#[derive(Debug)]
enum Plan {
    Answer,
    Hang,
    Reject(ApiError),
    Break { fragments: usize },
}

impl Plan {
    fn of_fault(fault: Option<Fault>) -> (Duration, Self) {
        match fault {
            None => (Duration::ZERO, Self::Answer),
            Some(Fault::Slow(delay)) => (delay, Self::Answer),
            Some(Fault::Hang) => (Duration::ZERO, Self::Hang),
            Some(Fault::StreamBreak) => (
                Duration::ZERO,
                Self::Break {
                    fragments: FRAGMENTS_BEFORE_BREAK,
                },
            ),
            Some(fault) => (
                Duration::ZERO,
                fault.error().map_or(Self::Answer, Self::Reject),
            ),
        }
    }

    fn of_draw(draw: Draw) -> (Duration, Self) {
        let plan = match draw.action {
            Action::Answer => Self::Answer,
            Action::Hang => Self::Hang,
            Action::RateLimit { retry_after_s } => {
                Self::Reject(ApiError::SimulatedRateLimit { retry_after_s })
            }
            Action::Error(StatusCode::INTERNAL_SERVER_ERROR) => {
                Self::Reject(ApiError::SimulatedServerError)
            }
            Action::Error(status) => Self::Reject(ApiError::SimulatedStatus(status)),
            Action::Drop { after_chunks } => Self::Break {
                fragments: after_chunks as usize,
            },
        };
        (draw.delay, plan)
    }
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
    // The header, then a fault-named model, then the settings made at run time.
    let (delay, plan) = match (header_fault, fault) {
        (HeaderFault::Absent, None) => match state.faults.lookup(&req.model) {
            Some(settings) => Plan::of_draw(settings.draw()),
            None => Plan::of_fault(None),
        },
        (_, fault) => Plan::of_fault(fault),
    };
    tracing::debug!(
        model = %req.model,
        stream = req.stream,
        n = req.n,
        tools = req.tools.len(),
        delay_ms = delay.as_millis() as u64,
        plan = ?plan,
        "simulated chat completion"
    );

    if !delay.is_zero() {
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = state.shutdown.wait() => return Err(ApiError::ShuttingDown),
        }
    }
    let break_after = match plan {
        Plan::Answer => None,
        Plan::Hang => {
            state.shutdown.wait().await;
            return Err(ApiError::ShuttingDown);
        }
        Plan::Reject(err) => return Err(err),
        Plan::Break { fragments } => Some(fragments),
    };

    let id = completion_id(&body);
    let reply = build_reply(&req);
    if req.stream {
        let chunks = chunks(&id, &req, &reply);
        let body = if let Some(fragments) = break_after {
            let frames = chunks[..break_point(&chunks, fragments)]
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
        let body = if break_after.is_some() {
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

async fn list_faults(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "simulated": true,
        "data": state.faults.list(),
    }))
}

async fn get_faults(
    State(state): State<AppState>,
    Path(model): Path<String>,
) -> Result<Json<Value>> {
    state
        .faults
        .get(&model)
        .map(Json)
        .ok_or(ApiError::NoFaultSettings(model))
}

async fn put_faults(
    State(state): State<AppState>,
    Path(model): Path<String>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Json<Value>> {
    let body = body.map_err(|rejection| ApiError::from_body_rejection(&rejection))?;
    let settings = FaultSettings::parse(&body)?;
    tracing::info!(model = %model, settings = %settings.to_json(), "simulated fault settings changed");
    Ok(Json(state.faults.set(&model, settings)))
}

async fn delete_faults(
    State(state): State<AppState>,
    Path(model): Path<String>,
) -> Result<Json<Value>> {
    if !state.faults.clear(&model) {
        return Err(ApiError::NoFaultSettings(model));
    }
    tracing::info!(model = %model, "simulated fault settings cleared");
    Ok(Json(json!({"model": model, "deleted": true})))
}

async fn delete_all_faults(State(state): State<AppState>) -> Json<Value> {
    let deleted = state.faults.clear_all();
    tracing::info!(deleted, "every simulated fault setting cleared");
    Json(json!({"deleted": deleted}))
}
