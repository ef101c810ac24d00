//! Persistence: SQL (the durable truth) and the revocation store (fast session state).

pub mod batch;
pub mod bounded;
pub mod db;
pub mod entity;
pub mod held;
pub mod limits;
pub mod redis_conn;
pub mod revocation;
