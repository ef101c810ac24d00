//! Latchkey's integration tests: one binary (STYLE habit 1). Every test starts the real
//! server on port 0 against real services — a fresh PostgreSQL database or SQLite file,
//! Redis under its own key prefix or the in-process store — and talks HTTP to it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod accounts;
mod bad_input;
mod cli;
mod connections;
mod devices;
mod emails;
mod example;
mod flow;
mod helpers;
mod instances;
mod kubernetes;
mod limits;
mod location;
mod mail;
mod mariadb;
mod mfa;
mod openapi;
mod ops;
mod outage;
mod pages;
mod passkeys;
mod passwords;
mod readme;
mod redis_scaleout;
mod revocation;
mod sessions;
mod tokens;
mod verifiers;
