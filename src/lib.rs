//! Latchkey: a single-binary JWT auth server.
//!
//! A request reads top to bottom: `api` (poem-openapi operations and the bearer scheme)
//! → `service` (the rules) → `store` (SQL and the revocation store). `token` is the only
//! module that touches jsonwebtoken; `password` the only one that runs argon2.

pub mod api;
pub mod audit;
pub mod cli;
pub mod clock;
pub mod config;
pub mod domain;
pub mod error;
pub mod geoip;
pub mod keys;
pub mod mail;
pub mod metrics;
pub mod pages;
pub mod password;
pub mod rate_limit;
pub mod serve;
pub mod service;
pub mod startup;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod token;
