//! The client API: one set of operations ([`ops`]) served over HTTP/JSON ([`http`]) and
//! gRPC ([`grpc`]), with one error type ([`error`]); accounts and sessions
//! ([`accounts`]); the browser client every node serves at `/` ([`web`]).

pub mod accounts;
pub mod admin;
pub mod error;
pub mod grpc;
pub mod http;
pub mod listener;
pub mod ops;
pub mod web;
pub mod ws;

pub use error::ApiError;
