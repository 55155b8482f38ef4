//! The `damaged` record: which snapshot failed verification, which chunks
//! and paths, since when. Its codec is the store schema's
//! (`crate::store::schema::Damage`).

pub use crate::store::schema::Damage;
