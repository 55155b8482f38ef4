//! The `bkp-server` command line. `main` only calls [`main`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use bkp_common::protocol::Role;
use clap::{Parser, Subcommand};

use crate::config::ServerConfig;
use crate::server::{bind, run, ServerState};
use crate::tokens::Tokens;

#[derive(Parser)]
#[command(name = "bkp-server", version, about = "bkp backup server")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a data directory: TLS key and certificate, empty store.
    Init {
        #[arg(long)]
        data: PathBuf,
    },
    /// Serve clients over QUIC.
    Serve {
        #[arg(long)]
        data: PathBuf,
        /// Listen address (default 127.0.0.1:7443, or the config's).
        #[arg(long)]
        listen: Option<SocketAddr>,
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Manage host tokens (works whether or not `serve` is running).
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a token and print it once.
    Create {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        host: String,
        #[arg(long, default_value = "push")]
        role: Role,
    },
    List {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by the id that `list` shows.
    Revoke {
        #[arg(long)]
        data: PathBuf,
        id: String,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match execute(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bkp-server: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init(data: &Path) -> Result<()> {
    std::fs::create_dir_all(data).with_context(|| format!("creating {}", data.display()))?;
    let fp = crate::tls::init(data)?;
    // Create the store now so that a bad directory fails here, not at serve.
    drop(ServerState::open(data, ServerConfig::default())?);
    println!("initialised {}", data.display());
    println!("certificate fingerprint (give it to clients as BKP_FINGERPRINT):");
    println!("{fp}");
    Ok(())
}

fn execute(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Init { data } => init(&data),
        Cmd::Serve { data, listen, config } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_env("BKP_LOG").unwrap_or_else(|_| "info".into()),
                )
                .with_writer(std::io::stderr)
                .init();
            let mut cfg = match config {
                Some(p) => ServerConfig::load(&p)?,
                None => ServerConfig::default(),
            };
            if let Some(l) = listen {
                cfg.listen = l;
            }
            let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
            rt.block_on(async move {
                let state = ServerState::open(&data, cfg.clone())?;
                let endpoint = bind(&data, cfg.listen)?;
                eprintln!("bkp-server listening on {}", endpoint.local_addr()?);
                run(endpoint, state, shutdown_signal()).await;
                Ok(())
            })
        }
        Cmd::Token { cmd } => match cmd {
            TokenCmd::Create { data, host, role } => {
                let (token, rec) = Tokens::new(&data).create(&host, role)?;
                eprintln!("created {} token {} for host {}; it is shown only once:", role.as_str(), rec.id, host);
                println!("{token}");
                Ok(())
            }
            TokenCmd::List { data, json } => {
                let list = Tokens::new(&data).list()?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&list)?);
                } else {
                    println!("{:<14} {:<24} {:<8} CREATED", "ID", "HOST", "ROLE");
                    for r in list {
                        println!("{:<14} {:<24} {:<8} {}", r.id, r.host, r.role.as_str(), r.created);
                    }
                }
                Ok(())
            }
            TokenCmd::Revoke { data, id } => {
                let r = Tokens::new(&data).revoke(&id)?;
                eprintln!("revoked token {} of host {}", r.id, r.host);
                Ok(())
            }
        },
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
