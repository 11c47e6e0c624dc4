//! The SQLite side of the store: opening and migrating the database, the
//! write batch (one transaction per group commit), history reads, retention.
//! Everything here blocks and runs on the pool.

pub mod bus;
mod read;
mod schema;
mod write;

pub use read::*;
pub use schema::*;
pub use write::*;

#[cfg(test)]
mod tests;
