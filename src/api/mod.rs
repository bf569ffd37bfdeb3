//! The client API: one set of operations ([`ops`]) served over HTTP/JSON ([`http`]) and
//! gRPC ([`grpc`]), with one error type ([`error`]).

pub mod error;
pub mod grpc;
pub mod http;
pub mod listener;
pub mod ops;
pub mod ws;

pub use error::ApiError;
