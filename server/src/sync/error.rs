//! Why a sync run stopped.

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("no [[sync]] job named {0:?} in the server config; the configured ones: {1}")]
    Unknown(String, String),
    #[error("{0}")]
    Config(String),
    /// Connecting, or a refusal before any snapshot was copied.
    #[error("remote {0}: {1}")]
    Remote(String, bkp_client::ClientError),
    #[error(
        "remote {0}: the token is a {1} token; a sync needs one of role sync (on the remote: \
         `bkp-server token create --host THIS-SERVER --role sync`)"
    )]
    Role(String, &'static str),
    /// The link failed during the run: what was copied stays, the next
    /// run goes on from there.
    #[error("the connection to the remote failed during the sync ({0}); what was copied is kept, run it again")]
    Link(bkp_client::ClientError),
    #[error(transparent)]
    Store(#[from] StoreError),
}
