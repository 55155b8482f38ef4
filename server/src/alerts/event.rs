//! One notification, as every target gets it (the JSON body of a
//! webhook, the text of a mail): apart from the rest of `alerts`, so the
//! targets' modules need only this.

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Firing,
    Resolved,
}

/// One notification: the JSON body webhooks receive.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Event {
    pub status: Status,
    pub key: String,
    pub kind: String,
    pub summary: String,
    /// When the condition started (RFC 3339).
    pub since: String,
    pub server: String,
}
