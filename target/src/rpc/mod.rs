//! The JSON-RPC 2.0 control socket.
//!
//! Requests arrive back to back on a Unix stream socket, as SPDK's clients send them: no length
//! prefix, no required newline. Each connection is read into a bounded buffer and parsed as a
//! stream of JSON values; a value cut across reads waits for the rest. Requests on one
//! connection are answered in order; connections are served concurrently.

pub mod framework;
pub mod server;
pub mod spdk_params;
pub mod spdk_settings;

use crate::app::App;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

pub use server::{serve, RpcServer, MAX_REQUEST_BYTES};

pub const PARSE_ERROR: i32 = -32700;
pub const INVALID_REQUEST: i32 = -32600;
pub const METHOD_NOT_FOUND: i32 = -32601;
pub const INVALID_PARAMS: i32 = -32602;
pub const INTERNAL_ERROR: i32 = -32603;

/// A JSON-RPC error: a code (JSON-RPC's own, or a negative errno as SPDK uses) and a message a
/// person can act on.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcError {
    pub code: i32,
    pub message: String,
}

impl RpcError {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        RpcError {
            code,
            message: message.into(),
        }
    }

    pub fn invalid_params(message: impl Into<String>) -> Self {
        Self::new(INVALID_PARAMS, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(INTERNAL_ERROR, message)
    }

    /// An error for a failed operation, coded `-errno` as SPDK does (`-17` File exists, …).
    pub fn errno(errno: i32, message: impl Into<String>) -> Self {
        Self::new(-errno, message)
    }
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (code {})", self.message, self.code)
    }
}

impl From<crate::bdev::BdevError> for RpcError {
    fn from(e: crate::bdev::BdevError) -> Self {
        RpcError::errno(e.errno(), e.to_string())
    }
}

impl From<crate::reactor::ReactorError> for RpcError {
    fn from(e: crate::reactor::ReactorError) -> Self {
        RpcError::internal(e.to_string())
    }
}

pub type RpcResult = Result<Value, RpcError>;
type BoxFuture = Pin<Box<dyn Future<Output = RpcResult> + Send>>;
type Handler = Arc<dyn Fn(Arc<App>, Value) -> BoxFuture + Send + Sync>;

/// The methods plexd answers, by name.
#[derive(Default, Clone)]
pub struct Methods {
    map: BTreeMap<&'static str, Handler>,
}

impl Methods {
    /// Every method of every module.
    pub fn all() -> Methods {
        let mut m = Methods::default();
        framework::register(&mut m);
        crate::bdev::rpc::register(&mut m);
        crate::bdev::nvme::rpc::register(&mut m);
        crate::bdev::mirror::rpc::register(&mut m);
        crate::bdev::lvol::rpc::register(&mut m);
        crate::nvmf::rpc::register(&mut m);
        spdk_settings::register(&mut m);
        #[cfg(feature = "fault-injection")]
        crate::fatal::injection::register(&mut m);
        m
    }

    /// Adds a method whose params deserialize into `P`. Absent params count as `{}`, so a
    /// struct of optional fields takes none; a param struct should `deny_unknown_fields` so a
    /// misspelt parameter is an error, not a silent default.
    pub fn add<P, R, F, Fut>(&mut self, name: &'static str, f: F)
    where
        P: DeserializeOwned + Send + 'static,
        R: serde::Serialize,
        F: Fn(Arc<App>, P) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, RpcError>> + Send + 'static,
    {
        let f = Arc::new(f);
        let h: Handler = Arc::new(move |app, params| {
            let mut params = if params.is_null() { json!({}) } else { params };
            // SPDK's client sends parameters of features we lack, at their defaults.
            if let Err(e) = spdk_params::admit(name, &mut params) {
                return Box::pin(async move { Err(e) });
            }
            // Through serde_path_to_error so that a value of the wrong type names its field.
            match serde_path_to_error::deserialize::<_, P>(params) {
                Ok(p) => {
                    let fut = f(app, p);
                    Box::pin(async move {
                        let r = fut.await?;
                        serde_json::to_value(r).map_err(|e| RpcError::internal(e.to_string()))
                    })
                }
                Err(e) => {
                    let msg = match e.path().to_string().as_str() {
                        "." => format!("invalid parameters for {name}: {}", e.inner()),
                        field => format!("invalid parameters for {name}: {field}: {}", e.inner()),
                    };
                    Box::pin(async move { Err(RpcError::invalid_params(msg)) })
                }
            }
        });
        self.map.insert(name, h);
    }

    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.map.keys().copied()
    }

    /// Runs one method call.
    pub async fn call(&self, app: Arc<App>, method: &str, params: Value) -> RpcResult {
        match self.map.get(method) {
            Some(h) => h(app, params).await,
            None => Err(RpcError::new(
                METHOD_NOT_FOUND,
                format!("method {method:?} not found (rpc_get_methods lists them)"),
            )),
        }
    }
}

/// A request that passed JSON-RPC 2.0's checks.
#[derive(Debug, PartialEq)]
pub struct Request {
    /// None for a notification, which gets no reply.
    pub id: Option<Value>,
    pub method: String,
    pub params: Value,
}

/// The reply to request `id`.
pub fn reply(id: Option<Value>, result: RpcResult) -> Value {
    let id = id.unwrap_or(Value::Null);
    match result {
        Ok(v) => json!({"jsonrpc": "2.0", "id": id, "result": v}),
        Err(e) => json!({"jsonrpc": "2.0", "id": id,
                         "error": {"code": e.code, "message": e.message}}),
    }
}

/// Checks one parsed value as a JSON-RPC request without running it. `Err` is the error
/// reply to send (invalid requests are answered even without an id, as JSON-RPC says).
/// Pure, so the fuzzer can drive it without a daemon.
pub fn parse_request(req: Value) -> Result<Request, Value> {
    let id = req.get("id").cloned();
    let bad = |code, msg: &str| reply(id.clone(), Err(RpcError::new(code, msg)));
    let obj = match req.as_object() {
        Some(o) => o,
        None if req.is_array() => {
            return Err(bad(
                INVALID_REQUEST,
                "batch requests are not supported: send one request object at a time",
            ))
        }
        None => return Err(bad(INVALID_REQUEST, "a request must be a JSON object")),
    };
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(bad(INVALID_REQUEST, "\"jsonrpc\" must be \"2.0\""));
    }
    if let Some(id) = &id {
        if !(id.is_number() || id.is_string() || id.is_null()) {
            return Err(reply(
                None,
                Err(RpcError::new(
                    INVALID_REQUEST,
                    "\"id\" must be a number, a string or null",
                )),
            ));
        }
    }
    let Some(method) = obj.get("method").and_then(Value::as_str) else {
        return Err(bad(INVALID_REQUEST, "\"method\" must be a string"));
    };
    let params = obj.get("params").cloned().unwrap_or(Value::Null);
    if !(params.is_object() || params.is_null()) {
        return Err(bad(
            INVALID_PARAMS,
            "\"params\" must be an object of named parameters",
        ));
    }
    Ok(Request {
        id,
        method: method.to_string(),
        params,
    })
}

/// Answers one parsed request object. Returns `None` for a notification (no `id`).
pub async fn handle_request(app: Arc<App>, req: Value) -> Option<Value> {
    let req = match parse_request(req) {
        Ok(r) => r,
        Err(error_reply) => return Some(error_reply),
    };
    let methods = app.methods.clone();
    let result = methods.call(app, &req.method, req.params).await;
    if let Err(e) = &result {
        tracing::debug!("rpc {} failed: {e}", req.method);
    }
    req.id.as_ref()?;
    Some(reply(req.id, result))
}
